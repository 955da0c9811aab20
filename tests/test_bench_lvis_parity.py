"""bench/lvis_parity.py: the federated file it makes is as LVIS's are, its detections reach every case LVIS's
scoring treats apart, and (where lvis-api is installed, which CI lacks) ours and LVIS's 26 numbers agree."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import lvis_parity  # noqa: E402


def test_the_file_is_federated_as_lvis_files_are(dataset):
    data = json.loads((dataset / "annotations" / "instances_val2017.json").read_text())
    data["images"].append({**data["images"][0], "id": max(i["id"] for i in data["images"]) + 1})  # no instances
    federated = lvis_parity.federated(data, np.random.default_rng(0))
    present: dict = {}
    for ann in federated["annotations"]:
        assert not ann.get("iscrowd") and isinstance(ann["segmentation"], list)
        present.setdefault(ann["image_id"], set()).add(ann["category_id"])
    assert [a["id"] for a in federated["annotations"]] == list(range(1, len(federated["annotations"]) + 1))
    for image in federated["images"]:
        own = present.get(image["id"], set())
        assert not set(image["neg_category_ids"]) & own and set(image["not_exhaustive_category_ids"]) <= own
    assert any(image["neg_category_ids"] for image in federated["images"])
    assert any(image["not_exhaustive_category_ids"] for image in federated["images"])
    assert {c["frequency"] for c in federated["categories"]} <= {"r", "c", "f"}

    assert any(image["id"] not in present for image in federated["images"]), "an image without instances"
    outputs = lvis_parity.detections(federated, np.random.default_rng(0))
    assert max(len(o["scores"]) for o in outputs.values()) > 300, "images past LVIS's 300 detections"
    checked = {image["id"]: present.get(image["id"], set()) | set(image["neg_category_ids"])
               for image in federated["images"]}
    unchecked = sum(label not in checked[image] for image, o in outputs.items() for label in o["labels"].tolist())
    assert unchecked > 100, "detections of categories an image was not checked for, which scoring leaves out"
    first = next(iter(outputs.values()))
    assert first["masks"].shape[1:] == (1, federated["images"][0]["height"], federated["images"][0]["width"])


@pytest.mark.skipif(importlib.util.find_spec("lvis") is None, reason="lvis-api is not installed (CI lacks it)")
def test_ours_and_lvis_apis_numbers_agree(dataset):
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "lvis_parity.py"), "--annotations",
                          str(dataset / "annotations" / "instances_val2017.json")],
                         capture_output=True, text=True, check=True)
    result = json.loads(run.stdout)
    assert result["max_abs_diff"] < 1e-12 and len(result["metrics"]["segm"]) == 13

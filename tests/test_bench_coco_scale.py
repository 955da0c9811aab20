"""bench/bench_coco_scale.py runs end to end at a tiny size, beside torchvision's reference where a checkout of
its references/detection is found ($TORCHVISION_REFERENCE, or /work/ref/references/detection), and prints the
figures it promises; its synthetic detections are those a DistributedSampler's shards would see, every time."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from pycocotools.coco import COCO

from conftest import ROOT, load_file_module, reference_checkout

PER_PROCESS = {"rank", "images", "wall_s", "evaluation_s", "generate_s", "update_s", "synchronize_s",
               "rss_before_mb", "peak_rss_mb", "peak_uss_mb"}


@pytest.fixture(scope="module")
def bench():
    """The benchmark's module."""
    return load_file_module(ROOT / "bench" / "bench_coco_scale.py", "bench_coco_scale")


def _check_group(group: dict, images: int) -> None:
    """One implementation's figures: every process measured, 24 finite numbers, AP above zero."""
    assert len(group["processes"]) == 2
    for figures in group["processes"]:
        assert set(figures) >= PER_PROCESS
        assert figures["peak_rss_mb"] >= figures["rss_before_mb"] > 0 and figures["wall_s"] > 0
    assert group["processes"][0]["images_scored"] == images
    for iou_type in ("bbox", "segm"):
        assert len(group["stats"][iou_type]) == 12
        assert all(math.isfinite(v) for v in group["stats"][iou_type])
    assert group["stats"]["bbox"][0] > 0 and group["stats"]["segm"][0] > 0, "detections overlap the ground truth"


@pytest.mark.parametrize("beside_the_reference", [False, True], ids=["ours", "beside_the_reference"])
def test_bench_runs_at_a_tiny_size(beside_the_reference):
    reference = reference_checkout("coco_eval.py") if beside_the_reference else None
    if beside_the_reference and reference is None:
        pytest.skip("no checkout of torchvision's references/detection")
    command = [sys.executable, str(ROOT / "bench" / "bench_coco_scale.py"), "--images", "6", "--detections", "5",
               "--height", "48", "--width", "64", "--processes", "2"]
    if reference:
        command += ["--reference", str(reference)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["benchmark"] == "coco_scale" and printed["ground_truth"]["images"] == 6
    assert printed["ours"]["auto"]["processes"][0]["resolved_backend"] in ("faster", "pycocotools")
    _check_group(printed["ours"]["auto"], 6)
    if reference:
        _check_group(printed["reference"], 6)
        assert printed["comparison"]["auto"]["largest_difference"]["all"] < 1e-4
    else:
        assert "reference" not in printed


def test_shards_are_those_of_a_distributed_sampler(bench):
    for images in (6, 7):
        dataset = list(range(images))
        for rank in (0, 1):
            sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=False)
            assert bench.shard(images, rank, 2) == [i + 1 for i in sampler]


def test_detections_depend_on_the_image_alone(bench):
    coco = COCO()
    coco.dataset = bench.make_ground_truth(3, 48, 64, seed=1)
    coco.createIndex()
    make = bench.DetectionMaker(coco, 20, seed=1)
    first = {k: v.clone() for k, v in make(1).items()}
    make(2)  # writes other masks into the reused buffer, which must be cleared for the next image
    again = make(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert first["masks"].shape == (20, 1, 48, 64) and (first["masks"] > 0.5).any()
    assert set(first["labels"].tolist()) <= set(coco.cats)

"""LVIS parity: the 13 numbers of LVIS's federated evaluation, boxes and masks, from our CocoEvaluator and from
LVIS's own lvis-api, on the same ground truth and detections, and their largest difference.

    pip install lvis --no-deps    # lvis-api 0.5.3: its visualiser imports OpenCV, and it uses np.float
    python3 bench/lvis_parity.py --annotations datasets/coco-like/annotations/instances_val2017.json

No LVIS files are needed: the script makes a COCO-format file federated as LVIS's are (each category a frequency
group, each image a few categories checked and absent and some of its own not exhaustively annotated; crowd
regions left out, as LVIS has none), and detections of every kind that scoring treats apart: found instances,
wrong categories, boxes of categories an image was not checked for, and images of more than 300. Prints one
JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import sys
import tempfile
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

from coco_eval import LVIS_MAX_DETECTIONS, CocoEvaluator, metric_names  # noqa: E402

# lvis-api's names for the metrics this project names otherwise.
LVIS_API_NAMES = {f"AR{LVIS_MAX_DETECTIONS}": f"AR@{LVIS_MAX_DETECTIONS}",
                  **{f"AR{size}": f"AR{size}@{LVIS_MAX_DETECTIONS}" for size in "sml"}}


def federated(data: dict, rng: np.random.Generator) -> dict:
    """The file's instances (crowd regions and unusable boxes aside) and all its images (some without instances)
    with LVIS's per-image and per-category fields drawn at random."""
    kept = [dict(a, id=i) for i, a in enumerate((a for a in data["annotations"] if not a.get("iscrowd")
                                                 and isinstance(a.get("segmentation"), list)
                                                 and min(a["bbox"][2:]) > 1), start=1)]
    categories = [dict(c, frequency=str(rng.choice(["r", "c", "f"]))) for c in data["categories"]]
    ids = [c["id"] for c in categories]
    present: dict = {}
    for ann in kept:
        present.setdefault(ann["image_id"], set()).add(ann["category_id"])
    images = []
    for image in data["images"]:
        own = sorted(present.get(image["id"], ()))
        absent = [i for i in ids if i not in own]
        # one checked category at most, so that detections of unchecked ones are many (files have few categories)
        images.append(dict(image, neg_category_ids=[int(i) for i in rng.permutation(absent)[:rng.integers(0, 2)]],
                           not_exhaustive_category_ids=[i for i in own if rng.random() < 0.3]))
    return {"images": images, "annotations": kept, "categories": categories}


def detections(data: dict, rng: np.random.Generator) -> dict[int, dict[str, torch.Tensor]]:
    """Model outputs by image id: most instances found (some as another category), random boxes of random
    categories, and over 300 on three images; masks fill their boxes."""
    ids = [c["id"] for c in data["categories"]]
    found: dict = {image["id"]: [] for image in data["images"]}
    for ann in data["annotations"]:
        if rng.random() < 0.85:
            x, y, w, h = np.asarray(ann["bbox"]) + rng.normal(0, 3, 4)
            label = ann["category_id"] if rng.random() < 0.8 else int(rng.choice(ids))
            found[ann["image_id"]].append((label, [max(0, x), max(0, y), max(2, w), max(2, h)]))
    outputs = {}
    for n, image in enumerate(data["images"]):
        height, width = image["height"], image["width"]
        for _ in range(350 if n < 3 else int(rng.integers(0, 40))):
            w, h = rng.uniform(4, width / 3), rng.uniform(4, height / 3)
            found[image["id"]].append((int(rng.choice(ids)), [rng.uniform(0, width - w), rng.uniform(0, height - h),
                                                              w, h]))
        outputs[image["id"]] = output_of(found[image["id"]], height, width, rng)
    return outputs


def output_of(found: list[tuple[int, list[float]]], height: int, width: int, rng: np.random.Generator) -> dict:
    """One image's detections as a Mask R-CNN gives them: corner boxes, labels, scores, (N, 1, H, W) masks."""
    boxes = torch.tensor([[x, y, x + w, y + h] for _, (x, y, w, h) in found], dtype=torch.float32).reshape(-1, 4)
    masks = torch.zeros(len(found), 1, height, width)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.round().int().tolist()):
        mask[0, y0:y1, x0:x1] = 1.0
    return {"boxes": boxes, "labels": torch.tensor([label for label, _ in found], dtype=torch.int64),
            "scores": torch.from_numpy(rng.random(len(found))).float(), "masks": masks}


def lvis_api():
    """lvis-api's LVIS, LVISResults and LVISEval, made importable here: its visualiser (which scoring does not
    use) imports OpenCV, and it calls np.float, which NumPy 1.24 removed."""
    sys.modules.setdefault("cv2", types.ModuleType("cv2"))
    np.float = float  # what lvis-api meant by it
    try:
        from lvis import LVIS, LVISEval, LVISResults
    except ImportError:
        sys.exit("lvis-api is not installed: pip install lvis --no-deps")
    return LVIS, LVISEval, LVISResults


def official(gt_file: Path, records: list[dict], iou_type: str) -> dict[str, float]:
    """LVIS's evaluation of the records, by lvis-api (which keeps each image's 300 of highest score itself)."""
    LVIS, LVISEval, LVISResults = lvis_api()
    with contextlib.redirect_stdout(io.StringIO()):
        gt = LVIS(str(gt_file))
        evaluator = LVISEval(gt, LVISResults(gt, copy.deepcopy(records), max_dets=LVIS_MAX_DETECTIONS), iou_type)
        evaluator.run()
    return {name: float(value) for name, value in evaluator.results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotations", required=True, help="a COCO-format annotation file with polygons")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    data = federated(json.loads(Path(args.annotations).read_text()), rng)
    folder = tempfile.TemporaryDirectory()
    gt_file = Path(folder.name) / "lvis.json"
    gt_file.write_text(json.dumps(data))  # before scoring, which adds fields of its own to the annotations
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    evaluator = CocoEvaluator(coco, ("bbox", "segm"), max_dets=LVIS_MAX_DETECTIONS)
    evaluator.update(detections(data, rng))
    with contextlib.redirect_stdout(io.StringIO()):
        ours = evaluator.summarize()
    result: dict = {"images": len(data["images"]), "instances": len(data["annotations"]),
                    "detections": sum(len(e.scores) for e in evaluator.per_image.values()), "metrics": {}}
    with folder:
        for iou_type in ("bbox", "segm"):
            theirs = official(gt_file, evaluator.results(iou_type), iou_type)
            result["metrics"][iou_type] = {
                name: [ours[iou_type][name], theirs[LVIS_API_NAMES.get(name, name)]]
                for name in metric_names(iou_type, LVIS_MAX_DETECTIONS, federated=True)}
    result["max_abs_diff"] = max(abs(a - b) for metrics in result["metrics"].values() for a, b in metrics.values())
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()

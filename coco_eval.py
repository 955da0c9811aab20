"""Collect predictions from every rank, turn them into COCO results and score them with COCOeval."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import utils
from coco_utils import CategoryMap

# The order of COCOeval.stats, named.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def to_coco_results(image_id: int, output: dict[str, torch.Tensor], category_map: CategoryMap,
                    iou_types: tuple[str, ...]) -> dict[str, list[dict]]:
    """One image's model output as COCO result records per IoU type, with the file's category ids."""
    boxes = output["boxes"].tolist()
    scores = output["scores"].tolist()
    category_ids = [category_map.category_id(label) for label in output["labels"].tolist()]
    results: dict[str, list[dict]] = {}
    if "bbox" in iou_types:
        results["bbox"] = [
            {"image_id": image_id, "category_id": c, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": s}
            for (x0, y0, x1, y1), s, c in zip(boxes, scores, category_ids)
        ]
    if "segm" in iou_types:
        masks = (output["masks"][:, 0] > 0.5).numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if len(masks) else []
        results["segm"] = [
            {"image_id": image_id, "category_id": c, "segmentation": {"size": r["size"],
                                                                     "counts": r["counts"].decode("ascii")},
             "score": s}
            for r, s, c in zip(rles, scores, category_ids)
        ]
    return results


def score(coco_gt: COCO, results: list[dict], iou_type: str, image_ids: list[int]) -> COCOeval:
    """Run COCOeval on result records over the given images; prints the standard 12-line summary."""
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(copy.deepcopy(results))  # loadRes adds fields to the records it is given
    else:  # pycocotools' loadRes cannot take an empty list; no detections scores zero, not a crash
        coco_dt = COCO()
        coco_dt.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                           "annotations": []}
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt.createIndex()
    evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
    evaluator.params.imgIds = sorted(image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    evaluator.summarize()
    return evaluator


class CocoEvaluator:
    """Gathers COCO result records per image during evaluation and scores them once at the end."""

    def __init__(self, coco_gt: COCO, category_map: CategoryMap, iou_types: tuple[str, ...] = ("bbox", "segm")
                 ) -> None:
        self.coco_gt = coco_gt
        self.category_map = category_map
        self.iou_types = iou_types
        self.per_image: dict[int, dict[str, list[dict]]] = {}

    def update(self, outputs: dict[int, dict[str, torch.Tensor]]) -> None:
        """Add model outputs (on the CPU) keyed by image id."""
        for image_id, output in outputs.items():
            self.per_image[image_id] = to_coco_results(image_id, output, self.category_map, self.iou_types)

    def synchronize_between_processes(self) -> None:
        """Merge every rank's records; an image seen by two ranks (sampler padding) counts once."""
        merged: dict[int, dict[str, list[dict]]] = {}
        for part in utils.all_gather_object(self.per_image):
            merged.update(part)
        self.per_image = merged

    def results(self, iou_type: str) -> list[dict]:
        return [r for image_id in sorted(self.per_image) for r in self.per_image[image_id][iou_type]]

    def summarize(self) -> dict[str, dict]:
        """Score each IoU type and print its table and AP per category.

        Returns {iou_type: {metric name: value, ..., "per_category": {category name: AP}}}.
        """
        metrics = {}
        for iou_type in self.iou_types:
            print(f"IoU metric: {iou_type}")
            evaluator = score(self.coco_gt, self.results(iou_type), iou_type, list(self.per_image))
            metrics[iou_type] = dict(zip(METRIC_NAMES, (float(v) for v in evaluator.stats)))
            metrics[iou_type]["per_category"] = per_category_ap(evaluator)
        print(format_per_category(metrics))
        return metrics


    def write_results(self, output_dir: str | Path) -> list[Path]:
        """predictions_{iou_type}.json in COCO results format, as the evaluation server takes them."""
        paths = []
        for iou_type in self.iou_types:
            path = Path(output_dir) / f"predictions_{iou_type}.json"
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.results(iou_type)))
            tmp.replace(path)
            paths.append(path)
        return paths


def per_category_ap(evaluator: COCOeval) -> dict[str, float]:
    """AP at IoU 0.50:0.95, all areas, 100 detections, of each category that has ground truth."""
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # [iou, recall, category]
    result = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k]
        values = values[values > -1]
        if values.size:
            result[evaluator.cocoGt.cats[category_id]["name"]] = float(values.mean())
    return result


def format_per_category(metrics: dict[str, dict]) -> str:
    """A table of AP per category, one column per IoU type."""
    iou_types = list(metrics)
    names = sorted({n for m in metrics.values() for n in m["per_category"]})
    width = max([len("category")] + [len(n) for n in names])
    lines = ["AP per category", f"{'category':<{width}}  " + "  ".join(f"{t:>6}" for t in iou_types)]
    for name in names:
        cells = [metrics[t]["per_category"].get(name) for t in iou_types]
        lines.append(f"{name:<{width}}  " + "  ".join("   n/a" if c is None else f"{c:6.3f}" for c in cells))
    return "\n".join(lines)

"""A COCO results file (a JSON list of detections, as --test-only, tools/predict.py, Detectron2 and MMDetection
write them), read and checked against the annotation file it is scored on, as records per IoU type."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from pycocotools.coco import COCO

from annotations import (
    compressed_rles_covered,
    finite_box,
    finite_coordinates,
    parse_json,
    segmentation_problem,
)
from coco_utils import as_compressed_rle
from errors import UserError

# Each IoU type's geometry field in a result record, in the order they are scored.
GEOMETRY = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}


def read_results(path: Path) -> list[dict]:
    """The records of a results file: a JSON list of objects."""
    try:
        data = parse_json(Path(path).read_bytes())
    except FileNotFoundError:
        raise UserError(f"predictions file {path}: no such file; check the path") from None
    except OSError as e:
        raise UserError(f"predictions file {path} cannot be read ({e.strerror}); check the path") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"predictions file {path} is not readable JSON ({e}); write it again") from None
    if isinstance(data, dict) and "annotations" in data:
        raise UserError(f"{path} is an annotation file, not predictions: give a COCO results file (a list of "
                        f"detections, as predictions_segm.json)")
    if not isinstance(data, list) or not all(isinstance(record, dict) for record in data):
        raise UserError(f"{path} is no COCO results file: it must be a JSON list of detections, each an object with "
                        f"image_id, category_id, score and a bbox, segmentation or keypoints")
    return data


def iou_types_in(records: list[dict]) -> tuple[str, ...]:
    """The IoU types the records can be scored as: those whose geometry every record has (a Detectron2 file's
    boxes and masks, say)."""
    return tuple(t for t, key in GEOMETRY.items() if records and all(key in record for record in records))


def checked_records(records: list[dict], coco_gt: COCO, iou_type: str, path: Path) -> tuple[list[dict], Counter]:
    """New records of one IoU type, checked against the ground truth: image_id, category_id, score and the type's
    geometry (masks as compressed RLE, polygons and uncompressed RLE encoded), and the detections left out by
    category id, those of ids that are no category of the file. A UserError names the first faulty record."""
    covered = compressed_rles_covered(records) if iou_type == "segm" else {}
    faults: Counter = Counter()
    first: dict[str, tuple[int, str]] = {}
    kept, unknown = [], Counter()
    for index, record in enumerate(records):
        fault = _record_fault(record, coco_gt, iou_type, covered)
        if fault == UNKNOWN_CATEGORY:
            unknown[record["category_id"]] += 1
        elif fault:
            faults[fault[0]] += 1
            first.setdefault(fault[0], (index, fault[1]))
        else:
            kept.append(_scored_record(record, coco_gt, iou_type))
    if faults:
        kind, count = faults.most_common(1)[0]
        index, detail = first[kind]
        raise UserError(f"{path}: {count} of {len(records)} detections {detail} (the first: detection {index}); "
                        f"{REMEDIES[kind]}")
    return kept, unknown


def _scored_record(record: dict, coco_gt: COCO, iou_type: str) -> dict:
    """A sound record as scoring takes it: its own fields alone, a mask as compressed RLE."""
    key = GEOMETRY[iou_type]
    geometry = record[key]
    if iou_type == "segm":
        image = coco_gt.imgs[record["image_id"]]
        rle = as_compressed_rle(geometry, image["height"], image["width"])
        counts = rle["counts"]
        geometry = {"size": list(rle["size"]), "counts": counts.decode() if isinstance(counts, bytes) else counts}
    return {"image_id": record["image_id"], "category_id": record["category_id"], "score": record["score"],
            key: geometry}


UNKNOWN_CATEGORY = ("unknown", "")  # _record_fault's word for a sound record of no category of the file: left out
REMEDIES = {
    "fields": "each needs image_id, category_id, score and the geometry of the IoU type scored",
    "image": "score the predictions against the annotation file of the images they were made on",
    "category": "give each the category id of the annotation file, a number",
    "score": "give each detection its confidence as a finite number",
    "bbox": "write boxes as COCO's [x, y, width, height] in pixels",
    "keypoints": "write keypoints as COCO's flat [x, y, v, ...] list, 3 numbers for each keypoint of the category",
    "segm": "write masks as RLE of the image's size (pycocotools' encode) or as polygons",
}


def _record_fault(record: dict, coco_gt: COCO, iou_type: str, covered: dict) -> tuple[str, str] | None:
    """What is wrong with one record of a known category, or None: its kind (a key of REMEDIES) and what to say."""
    key = GEOMETRY[iou_type]
    lacking = [name for name in ("image_id", "category_id", "score", key) if name not in record]
    if lacking:
        return "fields", f"lack {', '.join(lacking)}"
    if not _hashable(record["category_id"]):
        return "category", "have a category_id that is no number"
    image = coco_gt.imgs.get(record["image_id"]) if _hashable(record["image_id"]) else None
    if image is None:
        return "image", "have an image_id that is no image of the annotation file"
    score = record["score"]
    if not (isinstance(score, (int, float)) and math.isfinite(score)):
        return "score", "have a score that is no finite number"
    if record["category_id"] not in coco_gt.cats:
        return UNKNOWN_CATEGORY
    return _geometry_fault(record[key], iou_type, image, coco_gt.cats[record["category_id"]], covered)


def _geometry_fault(geometry: object, iou_type: str, image: dict, category: dict, covered: dict
                    ) -> tuple[str, str] | None:
    """What is wrong with a record's box, keypoints or mask, as _record_fault says it, or None."""
    if iou_type == "bbox" and not (finite_box(geometry) and geometry[2] >= 0 and geometry[3] >= 0):
        return "bbox", "have a bbox that is not 4 finite numbers [x, y, width, height], width and height >= 0"
    if iou_type == "keypoints":
        count = 3 * len(category.get("keypoints", []))
        if not (isinstance(geometry, list) and len(geometry) == count and finite_coordinates(geometry)):
            return "keypoints", f"have keypoints that are not {count} numbers (x, y, v for each of the category's)"
    if iou_type == "segm":
        if isinstance(geometry, list) and not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                                                  for p in geometry or [None]):
            return "segm", "have a segmentation that is no polygons of 3 points or more (x, y, x, y, ...)"
        problem = segmentation_problem(geometry, image["height"], image["width"], covered)
        if problem:
            return "segm", f"have a segmentation that {problem}"
    return None


def _hashable(value: object) -> bool:
    """Whether an id can be looked up (a JSON number or string; not a list or object)."""
    return isinstance(value, (int, str, float))

"""A COCO results file (a JSON list of detections, as --test-only, tools/predict.py, Detectron2 and MMDetection
write them), read and checked against the annotation file it is scored on, as records per IoU type."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
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
    """A sound record as scoring takes it: its own fields alone, a mask as compressed RLE (an empty polygon list,
    as some exporters write an empty mask, as one of no pixels)."""
    key = GEOMETRY[iou_type]
    geometry = record[key]
    if iou_type == "segm":
        image = coco_gt.imgs[record["image_id"]]
        size = image["height"], image["width"]
        if geometry == []:
            rle = mask_utils.encode(np.zeros(size, dtype=np.uint8, order="F"))
        elif isinstance(geometry, dict) and isinstance(geometry["counts"], (str, bytes)):
            rle = geometry  # compressed RLE, checked already: as_compressed_rle would check its counts again
        else:
            rle = as_compressed_rle(geometry, *size)
        counts = rle["counts"]
        geometry = {"size": list(rle["size"]), "counts": counts.decode() if isinstance(counts, bytes) else counts}
    return {"image_id": record["image_id"], "category_id": record["category_id"], "score": record["score"],
            key: geometry}


UNKNOWN_CATEGORY = ("unknown", "")  # _record_fault's word for a sound record of no category of the file: left out
REMEDIES = {
    "fields": "each needs image_id, category_id, score and the geometry of the IoU type scored",
    "ids": "write the ids as the annotation file has them",
    "image": "score the predictions against the annotation file of the images they were made on",
    "score": "give each detection its confidence as a finite number",
    "bbox": "write boxes as COCO's [x, y, width, height] in pixels",
    "keypoints": "write keypoints as COCO's flat [x, y, v, ...] list, 3 numbers for each keypoint of the category",
    "segm": "write masks as RLE of the image's size (pycocotools' encode) or as polygons in the image",
}


def _record_fault(record: dict, coco_gt: COCO, iou_type: str, covered: dict) -> tuple[str, str] | None:
    """What is wrong with one record, or None: its kind (a key of REMEDIES, or UNKNOWN_CATEGORY) and what to
    say of it."""
    key = GEOMETRY[iou_type]
    lacking = [name for name in ("image_id", "category_id", "score", key) if name not in record]
    if lacking:
        return "fields", f"lack {', '.join(lacking)}"
    fault = _id_fault(record["image_id"], coco_gt.imgs, "an image_id") or \
        _id_fault(record["category_id"], coco_gt.cats, "a category_id")
    if fault:
        return fault
    if record["image_id"] not in coco_gt.imgs:
        return "image", "have an image_id that is no image of the annotation file"
    score = record["score"]
    if isinstance(score, bool) or not (isinstance(score, (int, float)) and math.isfinite(score)):
        return "score", "have a score that is no finite number"
    if record["category_id"] not in coco_gt.cats:
        return UNKNOWN_CATEGORY
    image = coco_gt.imgs[record["image_id"]]
    return _geometry_fault(record[key], iou_type, image, coco_gt.cats[record["category_id"]], covered)


def _id_fault(value: object, known: dict, name: str) -> tuple[str, str] | None:
    """An id that is no number or string, or one written as the other kind than the file's ("3" for 3)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return "ids", f"have {name} that is neither a whole number nor a string"
    if value in known:
        return None
    other = str(value) if isinstance(value, int) else int(value) if re.fullmatch(r"-?[0-9]+", value) else None
    if other is not None and other in known:
        kinds = {int: "a number", str: "a string"}
        return "ids", (f"have {name} written as {kinds[type(value)]} where the annotation file has "
                       f"{kinds[type(other)]} ({value!r} for {other!r})")
    return None


def _geometry_fault(geometry: object, iou_type: str, image: dict, category: dict, covered: dict
                    ) -> tuple[str, str] | None:
    """What is wrong with a record's box, keypoints or mask, as _record_fault says it, or None."""
    if iou_type == "bbox" and not (finite_box(geometry) and geometry[2] >= 0 and geometry[3] >= 0):
        return "bbox", "have a bbox that is not 4 finite numbers [x, y, width, height], width and height >= 0"
    if iou_type == "keypoints":
        count = 3 * len(category.get("keypoints", []))
        if not (isinstance(geometry, list) and len(geometry) == count and finite_coordinates(geometry)):
            return "keypoints", f"have keypoints that are not {count} numbers (x, y, v for each of the category's)"
    if iou_type == "segm" and geometry != []:
        height, width = image["height"], image["width"]
        problem = segmentation_problem(geometry, height, width, covered)
        if problem is None and isinstance(geometry, list):
            problem = _polygons_problem(geometry)
        if problem:
            return "segm", f"have a segmentation that {problem}"
    return None


def _polygons_problem(polygons: list[list]) -> str | None:
    """Why polygons that can be drawn (segmentation_problem) are no detection's outline: too few points."""
    if not all(len(polygon) >= 6 and len(polygon) % 2 == 0 for polygon in polygons):
        return "is no polygons of 3 points or more (x, y, x, y, ...)"
    return None

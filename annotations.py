"""COCO annotation files: read and checked for structure, and what is wrong in their content, as findings."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils

from errors import UserError

try:
    import msgspec
except ImportError:  # an install without it: the standard library's parser, slower
    msgspec = None


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """The cyclic garbage collector off for a block that makes millions of objects and no cycles (parsing a
    COCO file, indexing it): its passes over the growing heap would be a large share of the work."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def parse_json(raw: bytes) -> object:
    """raw's JSON value, by msgspec where installed (faster, and no larger at its peak); what it
    refuses (NaN and Infinity literals, numbers past a float's range, a byte-order mark) or cannot read, by the
    standard library's json, whose errors say why."""
    if msgspec is not None:
        try:
            return msgspec.json.decode(raw)
        except msgspec.DecodeError:
            pass
    return json.loads(raw)


def read_annotation_file(ann_file: Path) -> dict:
    """The JSON content of a COCO instances file, checked to hold 'images', 'annotations' and 'categories'."""
    try:
        with collection_paused():
            data = parse_json(Path(ann_file).read_bytes())
    except FileNotFoundError:
        raise UserError(f"annotation file {ann_file}: no such file; check the path") from None
    except OSError as e:
        raise UserError(f"annotation file {ann_file} cannot be read ({e.strerror}); check the path and that it is "
                        f"a readable file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"annotation file {ann_file} is not readable JSON ({e}); re-export or re-download it") from None
    if not isinstance(data, dict):
        raise UserError(f"annotation file {ann_file} holds no COCO object; it must be a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise UserError(f"annotation file {ann_file} has no '{key}' list; a COCO instances file needs "
                            f"'images', 'annotations' and 'categories'")
    return data


@dataclass(frozen=True)
class Finding:
    """One finding in a dataset: an error breaks a run, a warning is something the loader repairs or skips, a note
    is what a sound dataset may hold and the user should know (tools/check_dataset.py --strict passes it)."""

    level: str
    kind: str
    message: str


def image_path_problem(file_name: object) -> str | None:
    """Why an image's file_name cannot be read from inside its split's image folder, or None. Checked on the
    name alone, so that folders reached through symbolic links (a dataset root linked in) keep working."""
    if not isinstance(file_name, str) or not file_name:
        return "is not a file name"
    if file_name[1:3] in (":\\", ":/") and file_name[0].isascii() and file_name[0].isalpha():
        return "is a Windows path from a drive's root, not one inside the image folder"
    if os.path.isabs(file_name) or os.path.normpath(file_name).split(os.sep)[0] == os.pardir:
        return "leaves the image folder (remove an annotation tool's own folders, such as /data/upload/1/)"
    return None


# The kind of the errors that leave a file unreadable past them: the other checks, the report's counts and the
# loader read the ids, sizes and names these say are missing.
STRUCTURE = "file structure"


def _entry_findings(key: str, items: list) -> list[Finding]:
    """Entries of data[key] that are no JSON object or have no id, else ids used twice."""
    try:
        ids = [item.get("id") for item in items]
    except AttributeError:  # looked for only then, so that a sound file pays nothing for it
        index = next(i for i, item in enumerate(items) if not isinstance(item, dict))
        return [Finding("error", STRUCTURE, f"'{key}' entry {index} is {items[index]!r:.60}, not a JSON object; "
                        f"every entry of '{key}' must be one")]
    seen, repeated = set(), []
    for index, value in enumerate(ids):
        try:
            if value in seen:
                repeated.append(value)
            seen.add(value)
        except TypeError:  # a list or an object: no id can be looked up by it
            return [Finding("error", STRUCTURE, f"'{key}' entry {index} has id {value!r:.40}; an id is a number "
                            f"or a string")]
    if None in seen:
        return [Finding("error", STRUCTURE, f"'{key}' entry {ids.index(None)} has no 'id'; every image, "
                        f"annotation and category needs a unique one")]
    strings = [] if key == "annotations" else [value for value in seen if isinstance(value, str)]
    if strings and len(strings) < len(seen):  # image and category ids are sorted, and looked up by kind
        return [Finding("error", STRUCTURE, f"'{key}' ids mix numbers and strings (such as {strings[0]!r:.40}); "
                        f"give every entry of '{key}' an id of one kind")]
    if repeated and key == "annotations":  # used by scoring alone, which numbers them afresh
        return [Finding("warning", "annotation ids", f"{len(repeated)} annotations reuse an id (first: "
                        f"{repeated[0]!r}); COCOeval would look both up as one instance, so scoring numbers the "
                        f"annotations from 1 (the file stays as it is)")]
    if repeated:
        named = [item.get("file_name", item.get("name")) for item in items if item["id"] == repeated[0]]
        others = f" and {len(named) - 2} more" if len(named) > 2 else ""
        return [Finding("error", f"duplicate {key[:-1]} id", f"{len(repeated)} {key} reuse an id (first: "
                        f"{repeated[0]!r}, given to {named[0]!r} and {named[1]!r}{others}); give each its own")]
    return []


def _image_errors(images: list[dict]) -> list[Finding]:
    """Images without a size in pixels, and those whose file lies outside the image folder."""
    errors = []
    for image in images:
        width, height = image.get("width"), image.get("height")
        if not (is_pixel_count(width) and is_pixel_count(height)):
            errors.append(Finding("error", STRUCTURE, f"image {image['id']} ({image.get('file_name')}) has width "
                                  f"{width!r} and height {height!r}; each image needs 'width' and 'height' in "
                                  f"pixels, whole numbers above 0"))
        problem = image_path_problem(image.get("file_name"))
        if problem:
            errors.append(Finding("error", "image path", f"image {image.get('id')}: file_name "
                                  f"{image.get('file_name')!r} {problem}; file names are relative to the split's "
                                  f"image folder"))
    return errors


def is_pixel_count(value: object) -> bool:
    """A width or height: a whole number above 0, also written as a decimal (640.0, as some exporters do)."""
    return (type(value) is int or (type(value) is float and value.is_integer())) and value > 0


def _shared_file_warnings(images: list[dict]) -> list[Finding]:
    """Images whose entries name the same file: its instances are then trained and scored once for each."""
    first_id: dict = {}
    shared = []
    for img in images:
        name = img.get("file_name")
        if isinstance(name, str) and first_id.setdefault(name, img["id"]) != img["id"]:  # names as written
            shared.append((name, first_id[name], img["id"]))
    if not shared:
        return []
    name, first, again = shared[0]
    return [Finding("warning", "file listed twice", f"{len(shared)} image entries name a file another entry names "
                    f"(first: {name}, ids {first!r} and {again!r}); each entry's instances are trained and scored "
                    f"apart, so a duplicated image counts twice")]


def _shared_name_warnings(categories: list[dict]) -> list[Finding]:
    """Categories of one name (as merged datasets leave them): the model learns them as separate classes."""
    first_id: dict[str, object] = {}
    shared = [(cat["name"], first_id[cat["name"]], cat["id"]) for cat in categories
              if first_id.setdefault(cat["name"], cat["id"]) != cat["id"]]
    if not shared:
        return []
    name, first, again = shared[0]
    takes = "category takes" if len(shared) == 1 else "categories take"
    return [Finding("warning", "category name twice", f"{len(shared)} {takes} a name another category has "
                    f"(first: {name!r}, ids {first!r} and {again!r}); the model learns them as separate classes, "
                    f"which predictions name alike: give their instances one category id, or rename one")]


def _decimal_size_warnings(images: list[dict]) -> list[Finding]:
    """Sizes written as decimals, which the loader reads as the whole numbers they are."""
    decimal = [img for img in images if type(img["width"]) is float or type(img["height"]) is float]
    if not decimal:
        return []
    first = decimal[0]
    return [Finding("warning", "decimal size", f"{len(decimal)} images have a width or height written as a "
                    f"decimal (first: {first.get('file_name')}, {first['width']}x{first['height']}); they are read "
                    f"as whole pixels")]


def _id_findings(data: dict) -> list[Finding]:
    """Entries that are no object or have no id, ids used twice (annotations': a warning); images without a
    size or whose file lies outside the image folder; categories without a name."""
    found = [f for key in ("images", "annotations", "categories") for f in _entry_findings(key, data[key])]
    if any(f.kind == STRUCTURE for f in found):
        return found
    found += _image_errors(data["images"])
    found += [Finding("error", STRUCTURE, f"category {cat['id']} has no 'name'; each category needs one")
              for cat in data["categories"] if not isinstance(cat.get("name"), str)]
    return found


def annotation_findings(data: dict) -> list[Finding]:
    """What is wrong in a COCO instances file's content, errors first (no image file is opened); for a file whose
    structure is broken (kind STRUCTURE), only that."""
    found = _id_findings(data)
    if any(f.kind == STRUCTURE for f in found):
        return found
    errors = [f for f in found if f.level == "error"]
    warnings = [f for f in found if f.level == "warning"]
    images = {img["id"]: img for img in data["images"]}
    category_ids = {cat["id"] for cat in data["categories"]}
    annotated = set()
    covered = compressed_rles_covered(data["annotations"])
    # A COCO-sized file has 860k instances: this loop is most of the check, so each one costs a few lookups
    # and the messages (their "where") are made only for the instances that have something to say.
    for ann in data["annotations"]:
        image = images.get(ann.get("image_id"))
        if image is None:
            errors.append(Finding("error", "unknown image id", f"annotation {ann.get('id')} points at image id "
                                  f"{ann.get('image_id')!r}, which is not in 'images'"))
        elif ann.get("category_id") not in category_ids:
            annotated.add(image["id"])  # its image is annotated, if wrongly: not also said to have none
            errors.append(Finding("error", "unknown category id", f"annotation {ann.get('id')} has category id "
                                  f"{ann.get('category_id')!r}, which is not in 'categories'"))
        else:
            annotated.add(image["id"])
            found = _box_warnings(ann, image)
            found += _segmentation_warnings(ann, image, covered)
            if not is_area(ann.get("area")):
                found.append(Finding("warning", "no area", f"{_where(ann, image)}: no usable 'area' "
                                     f"({ann.get('area')!r:.20}); it is computed from the outline (or the box)"))
            if found:
                warnings += found
    errors += _box_format_errors(data["annotations"])
    crowd_flags = _crowd_flag_findings(data["annotations"])
    errors += [f for f in crowd_flags if f.level == "error"]
    warnings += [f for f in crowd_flags if f.level == "warning"]
    warnings += _scoring_field_warnings(data["annotations"]) + _decimal_size_warnings(data["images"])
    warnings += _shared_file_warnings(data["images"]) + _shared_name_warnings(data["categories"])
    warnings += _unused_category_warnings(data)
    federated = federated_findings(data)
    errors += [f for f in federated if f.level == "error"]
    warnings += [f for f in federated if f.level == "warning"]
    empty = [img for img in data["images"] if img["id"] not in annotated]
    # Background images are common in sound data (COCO's train2017 holds about a thousand): a note, not a warning.
    scored_as_lvis = any(f.level == "note" for f in federated)
    false = ("false positives of the categories each lists as checked (neg_category_ids), the others left out"
             if scored_as_lvis else "false positives")
    notes = [Finding("note", "image without annotations", f"{len(empty)} images have no annotations (first: "
                     f"{empty[0].get('file_name')}); training leaves them out, evaluation keeps them (detections there "
                     f"are {false})")] if empty else []
    return errors + warnings + [f for f in federated if f.level == "note"] + notes


# Each image's lists in a file annotated as LVIS's: the categories checked and absent, and those not all annotated;
# and its categories' frequency groups (rare, common, frequent), which LVIS's scoring averages apart.
FEDERATED_LISTS = ("neg_category_ids", "not_exhaustive_category_ids")
FREQUENCY_GROUPS = ("r", "c", "f")
PARTLY_FEDERATED = "partly federated"  # the kind of the finding that only some images carry the lists


# What scoring reads of each entry of an annotation file (outlines and keypoints aside: an outline corrected
# changes the area); LVIS's per-image lists are sets.
SCORED_FIELDS = {"images": ("id", "neg_category_ids", "not_exhaustive_category_ids"), "categories": ("id", "frequency"),
                 "annotations": ("id", "image_id", "category_id", "iscrowd", "bbox", "area")}
ID_SETS = ("neg_category_ids", "not_exhaustive_category_ids")


def scoring_digest(data: dict) -> str:
    """A short digest of what scoring reads of an annotation file (SCORED_FIELDS), the same for the file written
    otherwise: in another order of entries or keys, with 1 as 1.0."""
    digest = hashlib.sha256()
    for part, fields in SCORED_FIELDS.items():
        rows = (map(_scored_annotation, data[part]) if part == "annotations"
                else (_scored_row(entry, fields) for entry in data[part]))
        digest.update("\n".join([part, *sorted(rows)]).encode())
    return digest.hexdigest()[:16]


def _scored_row(entry: dict, fields: Sequence[str]) -> str:
    return repr(tuple(_as_scored(entry.get(f), f in ID_SETS) for f in fields))


def _as_scored(value: object, is_set: bool = False) -> object:
    """A value of SCORED_FIELDS as scoring reads it: numbers as floats, lists element by element (as sets)."""
    if isinstance(value, (int, float)):  # bools too: an iscrowd of True is 1
        return float(value)
    if isinstance(value, list):
        items = [_as_scored(v) for v in value]
        return tuple(sorted(items, key=repr) if is_set else items)
    return value


def _scored_annotation(ann: dict) -> str:
    """_scored_row of an annotation, written out for the usual one (a file may hold millions)."""
    try:
        return repr((ann.get("id"), ann.get("image_id"), ann.get("category_id"), float(ann.get("iscrowd", 0)),
                     tuple(map(float, ann["bbox"])), float(ann["area"])))
    except (TypeError, ValueError, KeyError):  # fields that are no numbers (the file check said so)
        return _scored_row(ann, SCORED_FIELDS["annotations"])


def is_id_list(value: object) -> bool:
    """Whether an LVIS list is what scoring reads: a list of integer category ids."""
    return isinstance(value, list) and all(type(i) is int for i in value)


def federated_findings(data: dict) -> list[Finding]:
    """For a file whose images carry LVIS's lists (scored as LVIS's evaluation scores it when every image does):
    lists that are no lists of category ids (errors: scoring fails on them), then images without them, ids of no
    category, negatives the image is annotated with, categories without a frequency (warnings), and what its
    scoring will be (a note)."""
    listed = [img for img in data["images"] if any(key in img for key in FEDERATED_LISTS)]
    errors = [Finding("error", "federated lists", f"image {img['id']!r}: {key} is {img.get(key)!r:.40}, not a list "
                      f"of category ids; give one (empty where none)")
              for img in listed for key in FEDERATED_LISTS
              if not is_id_list(img.get(key))]
    if not listed or errors:
        return errors
    present: dict = {}
    for ann in data["annotations"]:
        present.setdefault(ann.get("image_id"), set()).add(ann.get("category_id"))
    found = _federated_list_warnings(listed, {cat["id"] for cat in data["categories"]}, present)
    if len(listed) < len(data["images"]):
        return found + [Finding("warning", PARTLY_FEDERATED, f"{len(listed)} of the {len(data['images'])} images "
                                f"carry LVIS's {' and '.join(FEDERATED_LISTS)}, the others not: scored as COCO's; "
                                f"give every image both (empty where nothing was checked) to score it as LVIS's")]
    lacking = [cat["id"] for cat in data["categories"] if cat.get("frequency") not in FREQUENCY_GROUPS]
    if lacking:
        found.append(Finding("warning", "federated lists", f"{len(lacking)} categories have no LVIS 'frequency' "
                             f"(r, c or f; first: id {lacking[0]!r}), which scoring this file as LVIS's needs"))
    with_instances = set().union(*present.values())
    groups = Counter(cat.get("frequency") for cat in data["categories"] if cat["id"] in with_instances)
    return found + [Finding("note", "federated lists", f"the file is annotated as LVIS's (each image's "
                            f"{' and '.join(FEDERATED_LISTS)}): as a validation file, it is scored as LVIS's "
                            f"evaluation scores it; categories with instances by frequency: rare {groups['r']}, "
                            f"common {groups['c']}, frequent {groups['f']}")]


def _federated_list_warnings(listed: list[dict], category_ids: set, present: dict) -> list[Finding]:
    """Images whose LVIS lists name ids of no category, or name as checked and absent a category they have."""
    found = []
    for img in listed:
        unknown = sorted({*img["neg_category_ids"], *img["not_exhaustive_category_ids"]} - category_ids)
        if unknown:
            found.append(Finding("warning", "federated lists", f"image {img['id']!r} lists category ids {unknown} "
                                 f"that are not in 'categories'"))
        contradicted = sorted(set(img["neg_category_ids"]) & present.get(img["id"], set()))
        if contradicted:
            found.append(Finding("warning", "federated lists", f"image {img['id']!r} lists categories {contradicted} "
                                 f"as checked and absent (neg_category_ids), and has instances of them"))
    return found


def _unused_category_warnings(data: dict) -> list[Finding]:
    """Categories without instances, crowd regions aside; those that have only crowd regions are said apart, as
    annotation tools (CVAT's masks, for one) export instances as crowd regions."""
    used = {a.get("category_id") for a in data["annotations"] if not a.get("iscrowd")}
    unused = [c for c in data["categories"] if c["id"] not in used]
    if not unused:
        return []
    crowds = Counter(a.get("category_id") for a in data["annotations"] if a.get("iscrowd"))
    only_crowds = [c for c in unused if crowds[c["id"]]]
    said = (f"{len(unused)} {'category has' if len(unused) == 1 else 'categories have'} no instances (first: "
            f"{unused[0]['name']!r}, id {unused[0]['id']})")
    if only_crowds:
        first = only_crowds[0]
        said += (f", {len(only_crowds)} of them only crowd regions, which are not learned, nor scored as instances "
                 f"(first: {first['name']!r}, {crowds[first['id']]} regions with iscrowd 1; some tools export drawn "
                 f"masks so: set iscrowd to 0 for instances)")
    return [Finding("warning", "category without instances", f"{said}; training on this file learns none of "
                    f"them, and scoring against it leaves them out")]


# Box layouts that exporters write in COCO's bbox field, each as the box it gives a polygon's extent
# (left, top, right, bottom); COCO's is [x, y, width, height].
BOX_LAYOUTS = {
    "[x, y, width, height]": lambda left, top, right, bottom: (left, top, right - left, bottom - top),
    "[x1, y1, x2, y2] (corners)": lambda left, top, right, bottom: (left, top, right, bottom),
    "[centre x, centre y, width, height]": lambda left, top, right, bottom: (
        (left + right) / 2, (top + bottom) / 2, right - left, bottom - top),
}
COCO_LAYOUT = "[x, y, width, height]"


def box_layouts(annotations: list[dict], sample: int = 2000) -> tuple[int, Counter]:
    """Of the first `sample` instances with both a box and polygons: how many there are, and how many have a box
    that fits their polygons' extent in each of BOX_LAYOUTS (within 2 px, or 5% of the extent; an instance may
    fit several)."""
    compared, fits = 0, Counter()
    for ann in annotations:
        segmentation, bbox = ann.get("segmentation"), ann.get("bbox")
        if (ann.get("iscrowd") or not isinstance(segmentation, list) or not segmentation
                or not all(isinstance(p, list) and len(p) >= 6 and finite_coordinates(p) for p in segmentation)
                or not finite_box(bbox)):
            continue
        xs = [v for p in segmentation for v in p[0::2]]
        ys = [v for p in segmentation for v in p[1::2]]
        extent = (min(xs), min(ys), max(xs), max(ys))
        tolerance = max(2.0, 0.05 * max(extent[2] - extent[0], extent[3] - extent[1]))
        compared += 1
        for name, layout in BOX_LAYOUTS.items():
            if all(abs(b - e) <= tolerance for b, e in zip(bbox, layout(*extent))):
                fits[name] += 1
        if compared == sample:
            break
    return compared, fits


def _box_format_errors(annotations: list[dict]) -> list[Finding]:
    """Boxes written in another layout than COCO's, told from the polygons' extent: an error where, of 10 or
    more instances compared, fewer than half fit COCO's layout and nine in ten fit another (training would learn
    wrong boxes without a word)."""
    compared, fits = box_layouts(annotations)
    if compared < 10 or fits[COCO_LAYOUT] >= compared / 2:
        return []
    other, count = max(((name, n) for name, n in fits.items() if name != COCO_LAYOUT), key=lambda f: f[1],
                       default=(None, 0))
    if count < 0.9 * compared:
        return []
    return [Finding("error", "box layout", f"the boxes are written as {other}: {count} of the first {compared} "
                    f"instances with polygons have such a box around them, {fits[COCO_LAYOUT]} a COCO box; COCO's "
                    f"bbox is {COCO_LAYOUT} in pixels: convert the boxes")]


VISIBILITY_FLAGS = frozenset({0, 1, 2})  # not labelled, labelled but hidden, visible


def labelled_keypoints(points: list | None) -> int:
    """How many of a keypoint array's visibility flags are above 0 (labelled, as torchvision and COCOeval read
    them); none for a missing array."""
    return _counted_flags((points or [])[2::3])[0]


def _counted_flags(flags: list) -> tuple[int, bool]:
    """The flags above 0, and whether all are COCO's 0, 1 or 2."""
    if set(flags) <= VISIBILITY_FLAGS:  # a set and a count in C: a COCO-sized file has 262k persons
        return len(flags) - flags.count(0), True
    return sum(1 for v in flags if v > 0), False


def _unreadable_keypoints(points, length: int) -> str | None:
    """What keeps a keypoint array from the loader and COCOeval (`length` finite numbers), or None."""
    if not isinstance(points, list):
        return f"is {points!r:.30}"
    if len(points) != length:
        return f"is {len(points)} numbers"
    if not finite_coordinates(points):
        return f"holds {next(v for v in points if not finite_coordinates([v]))!r:.30}"
    return None


def keypoint_array_findings(annotations: list[dict], count: int) -> list[Finding]:
    """What is wrong in a keypoint file's instances, each of `count` keypoints (x, y, visibility): an error for
    the first array the loader and COCOeval cannot read; warnings for what is read another way (no 'keypoints'
    or [], read as none labelled; a 'num_keypoints' missing or other than labelled_keypoints, which scoring
    reads; flags other than 0, 1 and 2)."""
    absent, recounted, odd_flags = [], [], []
    for ann in annotations:
        points = ann.get("keypoints")
        if points is None or points == []:
            absent.append(ann)
            continue
        if problem := _unreadable_keypoints(points, 3 * count):
            return [Finding("error", "keypoints", f"annotation {ann.get('id')}: 'keypoints' {problem}, where "
                            f"{count} keypoints are {3 * count} finite numbers (x, y and a visibility flag for "
                            f"each); fix the file")]
        labelled, standard = _counted_flags(points[2::3])
        if not standard:
            odd_flags.append(ann)
        if ann.get("num_keypoints") != labelled:
            recounted.append(ann)
    return _keypoint_warnings(absent, recounted, odd_flags)


def _keypoint_warnings(absent: list[dict], recounted: list[dict], odd_flags: list[dict]) -> list[Finding]:
    found = []
    if absent:
        found.append(Finding("warning", "no keypoints", f"{len(absent)} instances have no 'keypoints' (first: "
                             f"annotation {absent[0].get('id')}); they are read as having none labelled"))
    if recounted:
        found.append(Finding("warning", "num_keypoints", f"{len(recounted)} instances have no 'num_keypoints' or "
                             f"one other than their labelled keypoints (first: annotation {recounted[0].get('id')}, "
                             f"{recounted[0].get('num_keypoints')!r:.20}); it is set to the count of visibility "
                             f"flags above 0, which keypoint scoring reads (instances of 0 are ignored)"))
    if odd_flags:
        flags = [v for v in odd_flags[0]["keypoints"][2::3] if v not in VISIBILITY_FLAGS]
        found.append(Finding("warning", "keypoint visibility", f"{len(odd_flags)} instances have visibility "
                             f"flags other than 0, 1 and 2 (first: annotation {odd_flags[0].get('id')}, flag "
                             f"{flags[0]!r}); flags above 0 are read as labelled, the others as not"))
    return found


def _scoring_field_warnings(annotations: list[dict]) -> list[Finding]:
    """Annotation ids that COCOeval cannot match by (it reads 0 and below as 'no match')."""
    found = []
    unusable_ids = [a["id"] for a in annotations if type(a["id"]) is not int or a["id"] < 1]
    if unusable_ids:
        found.append(Finding("warning", "annotation ids", f"{len(unusable_ids)} annotation ids are not positive "
                             f"integers (first: {unusable_ids[0]!r}); COCOeval would count their matches as "
                             f"misses, so scoring numbers the annotations from 1 (the file stays as it is)"))
    return found


def is_area(value: object) -> bool:
    """An annotation's 'area' as COCOeval reads it: a finite number, 0 or more."""
    return (type(value) is float or type(value) is int) and 0 <= value < math.inf


def _crowd_flag_findings(annotations: list[dict]) -> list[Finding]:
    """In one pass over the instances: a missing or null 'iscrowd' (pycocotools' COCOeval reads it unguarded;
    a warning, read as 0), and one other than 0 or 1 (an error: a string "0" would read as a crowd region)."""
    found = []
    unset, odd = [], []
    for ann in (a for a in annotations if a.get("iscrowd") not in (0, 1)):
        (unset if ann.get("iscrowd") is None else odd).append(ann)
    if odd:
        found.append(Finding("error", "iscrowd", f"{len(odd)} annotations have an 'iscrowd' other than 0 or 1 "
                             f"(first: annotation {odd[0].get('id')}: {odd[0].get('iscrowd')!r:.20}); write 0 for "
                             f"an instance, 1 for a crowd region"))
    if unset:
        found.append(Finding("warning", "no iscrowd", f"{len(unset)} annotations have no 'iscrowd' (or null; "
                             f"first: annotation {unset[0].get('id')}); they are read as 0, not crowd regions"))
    return found


def _where(ann: dict, image: dict) -> str:
    return f"{image.get('file_name')} annotation {ann.get('id')}"


def finite_box(bbox: object) -> bool:
    """Whether a box is a list of 4 finite numbers (bools count, as isinstance says), without a loop per value."""
    if not isinstance(bbox, list) or len(bbox) != 4:
        return False
    x, y, w, h = bbox
    try:
        return math.isfinite(x) and math.isfinite(y) and math.isfinite(w) and math.isfinite(h)
    except (TypeError, OverflowError):  # a string, null or list; an integer too large for a float
        return False


def _box_warnings(ann: dict, image: dict) -> list[Finding]:
    bbox = ann.get("bbox")
    if not finite_box(bbox):
        return [Finding("warning", "box not finite", f"{_where(ann, image)}: box {bbox} is not 4 finite numbers; "
                        f"training and scoring leave the instance out")]
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return [Finding("warning", "empty box", f"{_where(ann, image)}: box {bbox} has no extent; training "
                        f"leaves the instance out, and box scoring counts it as one no prediction can match")]
    tiny = w <= 1 or h <= 1
    leaves = x < -1 or y < -1 or x + w > image["width"] + 1 or y + h > image["height"] + 1
    if not (tiny or leaves):
        return []
    # What the loader's clipping to the image leaves of it: nothing drops the instance, however small the box.
    if not (min(x + w, image["width"]) > max(x, 0) and min(y + h, image["height"]) > max(y, 0)):
        return [Finding("warning", "box outside image", f"{_where(ann, image)}: box {bbox} leaves the "
                        f"{image['width']}x{image['height']} image; none of it is inside, so training leaves the "
                        f"instance out, and box scoring counts it as one no prediction can match")]
    if tiny:
        return [Finding("warning", "tiny box", f"{_where(ann, image)}: box {bbox} is 1 px or less across; it "
                        f"trains, but an image whose boxes are all this small trains as none")]
    return [Finding("warning", "box outside image", f"{_where(ann, image)}: box {bbox} leaves the "
                    f"{image['width']}x{image['height']} image; training clips it to the image")]


def is_flat_polygon(segmentation: object) -> bool:
    """Whether a segmentation is one polygon's coordinates not wrapped in a list (a common exporter mistake)."""
    return isinstance(segmentation, list) and bool(segmentation) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in segmentation)


NOT_NUMBERS = "has a polygon whose coordinates are not all finite numbers"


def finite_coordinates(polygon: list) -> bool:
    """Whether a polygon's entries are all finite numbers (their sum is, and it is taken in C)."""
    try:
        return math.isfinite(sum(polygon))
    except (TypeError, OverflowError):  # a string, None or list among them; an int too large for a float
        return False


def far_outside(height: int, width: int) -> str:
    """What a segmentation with polygon points too far from its image is, as segmentation_problem says it."""
    return f"has polygon points far outside the {width} x {height} image (more than its size beyond it)"


def polygons_problem(polygons: list[list], height: int, width: int) -> str | None:
    """Why lists of coordinates cannot be drawn on a height x width image, or None: entries that are not finite
    numbers, or points so far outside it that pycocotools' drawing, which walks every pixel of the outline,
    exhausts memory or crashes (from 1e8; within_reach)."""
    reach = 2.0 * max(height, width)
    if all(within_reach(polygon, reach) for polygon in polygons):
        return None
    return far_outside(height, width) if all(finite_coordinates(p) for p in polygons) else NOT_NUMBERS


def within_reach(polygon: list, reach: float) -> bool:
    """Whether a polygon's entries are finite numbers whose norm is at most reach times the root of their count:
    true of every polygon within reach of the origin, false only of one with a point beyond it, and a polygon that
    passes is drawn at a bounded cost. One pass in C, as cheap as a sum."""
    try:
        # nan and inf compare false; the margin covers the roundings of hypot and sqrt (a polygon whose every
        # entry is at reach would be refused one time in a few otherwise)
        return math.hypot(*polygon) <= reach * math.sqrt(len(polygon)) * (1 + 1e-9)
    except (TypeError, OverflowError):  # a string, None or list among them; an int too large for a float
        return False


def segmentation_problem(segmentation: object, height: int, width: int, covered: Mapping | None = None
                         ) -> str | None:
    """Why a non-empty segmentation cannot be drawn on a height x width image, or None: polygons are lists of
    coordinates, RLE is {'counts', 'size': [h, w]} of the image's size. covered: compressed_rle_pixels of the
    compressed strings, computed before for many at once (compressed_rles_covered)."""
    if isinstance(segmentation, list):
        if not all(isinstance(polygon, list) for polygon in segmentation):
            if all(isinstance(part, dict) and "counts" in part for part in segmentation):  # as some exporters write
                inner = segmentation_problem(segmentation[0], height, width)
                return ("is RLE inside a list; write the {'counts', 'size'} object itself"
                        + (f" (which then {inner})" if inner else ""))
            return "is neither a list of polygons (lists of coordinates) nor RLE"
        return polygons_problem(segmentation, height, width)
    if not isinstance(segmentation, dict) or "counts" not in segmentation:
        return "is neither polygons nor RLE {'counts', 'size': [h, w]}"
    size = segmentation.get("size")
    if not isinstance(size, list) or size != [height, width]:
        return f"is RLE of size {size}, not the image's [{height}, {width}]"
    return _rle_counts_problem(segmentation["counts"], height * width, covered or {})


def _rle_counts_problem(counts: object, pixels: int, covered: Mapping) -> str | None:
    """Why RLE counts do not cover an image of so many pixels, or None. Decoded, the pixels past too few counts
    would be whatever memory follows (a mask of values up to 255, another each run); too many fail in a loader
    worker."""
    if isinstance(counts, list):
        if not all(isinstance(c, int) and c >= 0 for c in counts):
            return "is uncompressed RLE whose counts are not all whole numbers of 0 or more"
        if sum(counts) != pixels:
            return f"is uncompressed RLE whose counts do not add up to the image's {pixels} pixels"
    elif not isinstance(counts, (str, bytes)):
        return "has RLE counts that are neither a list of numbers nor a compressed string"
    elif (covered[counts] if counts in covered else compressed_rle_pixels(counts)) != pixels:
        return (f"is compressed RLE whose counts do not cover the image's {pixels} pixels (as where its size was "
                f"changed without encoding the mask again)")
    return None


def compressed_rle_pixels(counts: str | bytes) -> int | None:
    """The pixels a compressed RLE string's counts cover, read as pycocotools reads them; None for one it cannot
    read."""
    return compressed_rle_pixels_all([counts])[0]


def compressed_rle_pixels_all(strings: Sequence[str | bytes]) -> list[int | None]:
    """compressed_rle_pixels of many strings at once (a file may hold millions, each of thousands of counts): the
    pixels pycocotools' area() counts in each mask plus those it counts in its complement, so that pycocotools'
    C code reads every count. Exact for counts an encoder writes; area() sums in 32 bits, so counts past the
    pixels by a multiple of 2**32 go unseen (the loader leaves out what decode then refuses). None for a string
    with characters outside pycocotools' alphabet or a last count left unfinished, which its reader would read
    past the end of (refused even where it would happen to read them)."""
    readable = [_readable(counts) for counts in strings]
    kept = [counts for counts in readable if counts is not None]
    ones = rle_areas([{"size": [1, 1], "counts": counts} for counts in kept])
    zeros = rle_areas([{"size": [1, 1], "counts": _complement(counts)} for counts in kept])
    totals = iter((ones.astype(np.int64) + zeros).tolist())
    return [None if counts is None else next(totals) for counts in readable]


RLE_ALPHABET = bytes(range(48, 112))  # the characters pycocotools writes counts with, "0" to "o"


def _readable(counts: str | bytes) -> bytes | None:
    """A compressed RLE string as bytes, or None where pycocotools' reader would go astray in it."""
    try:
        encoded = counts.encode("ascii") if isinstance(counts, str) else counts
    except UnicodeEncodeError:
        return None
    if encoded.translate(None, RLE_ALPHABET) or (encoded and (encoded[-1] - 48) & 0x20):  # 0x20: a count goes on
        return None
    return encoded


def _complement(counts: bytes) -> bytes:
    """The compressed RLE of the same counts after a first count of 0, the mask's complement: from the fourth count
    on each is written as a difference from the count two before, so only the first three are written anew."""
    first, read = _first_counts(counts, 3)
    return _compressed([0, *first]) + counts[read:]


def _first_counts(counts: bytes, wanted: int) -> tuple[list[int], int]:
    """The first counts of a compressed RLE string (as written: the first three are whole counts), and the
    characters they take."""
    found, value, groups, read = [], 0, 0, 0
    while read < len(counts) and len(found) < wanted:
        code = counts[read] - 48
        read += 1
        value |= (code & 0x1F) << (5 * groups)
        groups += 1
        if not code & 0x20:  # the count's last group: 0x10 makes it negative
            found.append(value - (1 << 5 * groups) if code & 0x10 else value)
            value, groups = 0, 0
    return found, read


def _compressed(counts: list[int]) -> bytes:
    """Counts as pycocotools writes them: 5-bit groups, lowest first, 0x20 where another follows, offset to "0";
    from the fourth count on, the difference from the count two before."""
    written = bytearray()
    for place, count in enumerate(counts):
        value = count - counts[place - 2] if place > 2 else count
        while True:
            group, value = value & 0x1F, value >> 5
            more = value != (-1 if group & 0x10 else 0)
            written.append(48 + (group | 0x20 if more else group))
            if not more:
                break
    return bytes(written)


AREAS_PER_CALL = 255  # pycocotools' area() counts its input in a uint8: NumPy 2 refuses 256 and more


def rle_areas(rles: list[dict]) -> np.ndarray:
    """The pixel count of each compressed RLE, as pycocotools' area() gives it, for any number of them."""
    parts = [mask_utils.area(rles[i:i + AREAS_PER_CALL]) for i in range(0, len(rles), AREAS_PER_CALL)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)


def compressed_rles_covered(anns: list) -> dict:
    """compressed_rle_pixels of every compressed RLE string in the annotations, by string, in one call (others,
    such as those of dict subclasses, are read one at a time)."""
    strings = list({seg["counts"] for ann in anns if type(seg := ann.get("segmentation")) is dict
                    and type(seg.get("counts")) in (str, bytes)})
    return dict(zip(strings, compressed_rle_pixels_all(strings)))


def _segmentation_warnings(ann: dict, image: dict, covered: Mapping) -> list[Finding]:
    """Crowd regions not in COCO's RLE form; instances with no outline, one that cannot be drawn, or polygons
    the loader repairs."""
    segmentation = ann.get("segmentation")
    if ann.get("iscrowd"):
        problem = segmentation_problem(segmentation, image["height"], image["width"], covered)
        if problem is None and isinstance(segmentation, list):
            problem = "is polygons, not RLE" if segmentation else "is empty"
        if problem:
            return [Finding("warning", "crowd format", f"{_where(ann, image)}: crowd region {problem}; COCO crowd "
                            f"regions are RLE {{'counts', 'size': [h, w]}} of the image's size")]
        return []
    if not segmentation:
        return [Finding("warning", "no segmentation", f"{_where(ann, image)}: instance without a segmentation; "
                        f"models that learn masks and mask scoring leave it out")]
    if isinstance(segmentation, list):
        try:
            return _polygon_warnings(segmentation, ann, image)
        except TypeError:  # an entry that is no list: looked at only then, so sound polygons pay nothing
            if is_flat_polygon(segmentation):  # read as the polygon it wraps, whose own faults count too
                return [Finding("warning", "flat polygon", f"{_where(ann, image)}: segmentation is one flat list of "
                                f"coordinates; it is read as one polygon [[x1, y1, ...]]"),
                        *_polygon_warnings([segmentation], ann, image)]
    problem = segmentation_problem(segmentation, image["height"], image["width"], covered)
    return [_undrawable(ann, image, problem)] if problem else []


def _undrawable(ann: dict, image: dict, problem: str) -> Finding:
    return Finding("warning", "segmentation format", f"{_where(ann, image)}: segmentation {problem}; models that "
                   f"learn masks and mask scoring leave it out")


def _polygon_warnings(polygons: list, ann: dict, image: dict) -> list[Finding]:
    """Polygons that cannot be drawn (polygons_problem), with an odd number of coordinates, or with fewer than 3
    points (TypeError where one is no list)."""
    odd = short = False
    drawable, height, width = True, image["height"], image["width"]
    reach = 2.0 * max(height, width)
    for polygon in polygons:
        if not isinstance(polygon, list):  # an RLE or a string inside the list: not a polygon, whatever its length
            raise TypeError(polygon)
        length = len(polygon)
        odd = odd or length % 2 == 1
        short = short or length - length % 2 < 6
        drawable = drawable and within_reach(polygon, reach)
    if not drawable:
        return [_undrawable(ann, image, polygons_problem(polygons, height, width))]
    found = []
    if odd:
        found.append(Finding("warning", "odd polygon", f"{_where(ann, image)}: polygon with an odd number of "
                             f"coordinates; its last coordinate is dropped"))
    if short:
        found.append(Finding("warning", "polygon under 3 points", f"{_where(ann, image)}: polygon with fewer "
                             f"than 3 points"))
    return found

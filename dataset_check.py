"""Check a COCO-format folder before a run: the annotation files' content and the image files behind them."""

from __future__ import annotations

import contextlib
import os
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from annotations import (
    STRUCTURE,
    Finding,
    annotation_findings,
    image_path_problem,
    keypoint_array_findings,
    read_annotation_file,
)
from coco_eval import COCO_MAX_DETECTIONS
from coco_utils import (
    IMAGE_READ_ERRORS,
    NO_OUTLINES,
    NOTHING_TO_SCORE,
    TOO_FEW_KEYPOINTS,
    check_person_keypoints,
    coco_keypoint_names,
    counts_for_scoring,
    counts_for_training,
    has_outline,
    lacking_categories,
    large_image_note,
    narrow_wide_maximum,
    orientation_undecided,
    renamed_categories,
    rgb_pixels,
    scored_instances_per_image,
    split_paths,
    trains_keypoints,
    turned_size,
    unreadable_reason,
    upright,
)
from errors import UserError
from utils import over_share


@dataclass
class SplitReport:
    """What was found in one split."""

    split: str
    images: int = 0
    annotations: int = 0
    findings: list[Finding] = field(default_factory=list)
    class_counts: dict[str, int] = field(default_factory=dict)
    crowd_regions: int = 0
    categories: dict = field(default_factory=dict)  # id -> name
    instances_by_category: dict = field(default_factory=dict)  # id -> instances (crowd regions aside)
    scored_instances: int = 0  # the instances detections are matched against (coco_utils.counts_for_scoring)
    most_instances: tuple[int, object] = (0, None)  # the most scored instances of one image, and its id
    most_of_one_category: tuple[int, object] = (0, None)  # ... of one category in one image, and the image's id

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]


def _image_problem(path: Path, width: int, height: int, decode: bool) -> tuple[str | None, list[Finding]]:
    """Why an image cannot be used, or None (missing, unreadable, or of another size than the JSON says), and
    warnings of one that can: a turn its JSON size cannot decide, a size that costs gigabytes to decode."""
    if not path.is_file():
        return "missing", []  # image_findings adds what may explain it
    notes = []
    try:
        with Image.open(path) as img:
            if img.size != (width, height) and turned_size(img) != (width, height):
                return f"is {img.size[0]}x{img.size[1]} but the JSON says {width}x{height}", []
            if orientation_undecided(img, (width, height)):
                notes.append(Finding("warning", "EXIF orientation", f"{path}: its EXIF orientation turns or mirrors "
                                     f"it, and the JSON's {width}x{height} fits either way; read as stored, as "
                                     f"torchvision reads it: if it was annotated as a viewer shows it, save it "
                                     f"upright without the tag"))
            if note := large_image_note(path, *img.size):
                notes.append(Finding("warning", "large image", note))
            if decode:
                rgb_pixels(upright(img, (width, height)))  # as the loader reads it
                if (largest := narrow_wide_maximum(img)) is not None:
                    notes.append(Finding("warning", "dim 16-bit image", f"{path}: its 16-bit pixels reach only "
                                         f"{largest} of 65535 (10- or 12-bit data?), so scaled to 8 bits it reads "
                                         f"nearly black (brightest {(largest + 128) // 257} of 255); stretch its "
                                         f"values to the 16-bit range, or save it with 8 bits"))
    except IMAGE_READ_ERRORS as e:
        return unreadable_reason(path, e), []
    return None, notes


def check_split(root: Path, dataset: str, split: str, decode: bool = True, max_bad_share: float = 0.01,
                workers: int = 8, paths: tuple[str | None, str | None] = (None, None),
                trained_categories: dict | None = None, trained_instances: dict | None = None) -> SplitReport:
    """Check one split's annotation file and images (decoded fully unless decode is False); paths: its image
    folder and annotation file where given apart from root's layout; trained_categories: the training file's
    categories (id -> name), which a val file's instances must be of, by the same names; trained_instances: its
    instances by category, so that categories never trained are noted."""
    report = SplitReport(split)
    try:
        image_dir, ann_file = split_paths(root, dataset, split, *paths)
    except UserError as e:  # a missing folder or file, said as train.py says it
        report.findings.append(Finding("error", "annotation file", str(e)))
        return report
    try:
        data = read_annotation_file(ann_file)
    except UserError as e:
        report.findings.append(Finding("error", "annotation file", f"not a readable COCO instances file: {e}"))
        return report
    report.images, report.annotations = len(data["images"]), len(data["annotations"])
    report.findings += annotation_findings(data)
    if any(f.kind == STRUCTURE for f in report.findings):
        return report  # the counts and the images' check read the ids, names and sizes that are missing
    names = {c["id"]: c.get("name", str(c["id"])) for c in data["categories"]}
    counts = Counter(a.get("category_id") for a in data["annotations"] if not a.get("iscrowd"))
    report.crowd_regions = len(data["annotations"]) - sum(counts.values())
    if per_image := scored_instances_per_image(data["annotations"]):
        image_id, most = per_image.most_common(1)[0]
        report.scored_instances, report.most_instances = sum(per_image.values()), (most, image_id)
        (image_id, _), most = scored_instances_per_image(data["annotations"], by_category=True).most_common(1)[0]
        report.most_of_one_category = (most, image_id)
    uses = Counter(names.values())
    report.class_counts = {names[i] if uses[names[i]] == 1 else f"{names[i]} (id {i})": counts.get(i, 0)
                           for i in sorted(names)}
    report.categories, report.instances_by_category = names, dict(counts)
    if trained_instances is not None and (untrained := [i for i in sorted(counts, key=str) if i in names
                                                         and counts[i] and not trained_instances.get(i)]):
        first = untrained[0]
        have = "category has" if len(untrained) == 1 else "categories have"
        report.findings.append(Finding("note", "categories never trained", f"{len(untrained)} {have} "
                                       f"{split} instances and none in training (first: {names[first]!r}, id "
                                       f"{first!r}); the model cannot learn them, and their AP of 0 counts in the "
                                       f"mean AP"))
    report.findings += training_findings(data) if split == "train" else validation_findings(data)
    report.findings += keypoint_findings(data, ann_file, split) if dataset == "coco_kp" else []
    if trained_categories is not None and (named := lacking_categories(data, trained_categories)):
        report.findings.append(Finding("error", "categories", f"instances of categories the training file lacks: "
                                                              f"{named}; list the same categories in both files"))
    elif trained_categories is not None and (renamed := renamed_categories(data, trained_categories)):
        report.findings.append(Finding("error", "categories", f"categories the training file names otherwise: "
                                                              f"{renamed}; give each category the same id and name "
                                                              f"in both files"))

    report.findings = image_findings(image_dir, data["images"], decode, max_bad_share, workers) + report.findings
    return report


def missing_reasons(image_dir: Path, names: Iterable[str]) -> dict[str, str]:
    """Why each of these files is missing, where the disk suggests a reason: folders separated with '\\'
    (a name written on Windows), a folder that is not there (a name that repeats the image folder's own), or a
    file whose name differs only in letter case or Unicode form. Each folder is listed once."""
    reasons, folders = {}, {}
    for name in names:
        if "\\" in name:
            climbs = image_path_problem(name.replace("\\", "/"))  # written on Windows, and from elsewhere too
            reasons[name] = ("missing (file_name separates folders with '\\', and read with '/' it leaves the "
                             "image folder: write it from the image folder, with '/')" if climbs else
                             "missing (file_name separates folders with '\\'; write '/')")
            continue
        folder, _, base = name.rpartition("/")
        if folder not in folders:
            folders[folder] = _names_by_spelling(image_dir / folder)
        on_disk = folders[folder]
        if on_disk is None:
            reasons[name] = f"missing (there is no folder {folder!r} in {image_dir}, which file_name is read from)"
        elif on_disk.get(_spelling(base)) == base:
            reasons[name] = "missing (a link to nothing, or a folder, has its name)"
        elif (near := on_disk.get(_spelling(base))) is not None:
            how = "letter case" if near.casefold() == base.casefold() else "Unicode form (NFC or NFD)"
            reasons[name] = f"missing (the folder has {near!r}, a name that differs in {how}; write it as on disk)"
        else:
            reasons[name] = "missing"
    return reasons


def _spelling(name: str) -> str:
    """A file name with letter case and Unicode composition set aside."""
    return unicodedata.normalize("NFC", name).casefold()


def _names_by_spelling(folder: Path) -> dict[str, str] | None:
    """A folder's file names keyed by _spelling, or None where there is no such folder."""
    try:
        with os.scandir(folder) as entries:
            return {_spelling(e.name): e.name for e in entries}
    except OSError:
        return None


def training_findings(data: dict) -> list[Finding]:
    """What keeps a training file from training, as train.py decides it: no image with a usable box (an error),
    no outline to learn masks from (an error for Mask R-CNN only, so a warning here)."""
    if not any(counts_for_training(a) for a in data["annotations"]):
        return [Finding("error", "nothing to train on", "no annotation has a box with extent (4 finite numbers, "
                                                        "width and height over 1 px), so no image trains")]
    images = {img["id"]: img for img in data["images"]}
    if not any(has_outline(a, images.get(a["image_id"])) for a in data["annotations"]):
        return [Finding("warning", "no outlines", f"{NO_OUTLINES}: models that learn masks (maskrcnn_*) stop on "
                                                  f"this file, box models train on it")]
    return []


def validation_findings(data: dict) -> list[Finding]:
    """What keeps a val file from scoring, as train.py decides it: no instance to score against."""
    if not any(counts_for_scoring(a) for a in data["annotations"]):
        return [Finding("error", "nothing to score", NOTHING_TO_SCORE)]
    return []


def keypoint_findings(data: dict, ann_file: Path, split: str) -> list[Finding]:
    """What keeps a file from --dataset coco_kp, as train.py decides it: a category other than COCO's person
    with its 17 keypoints, keypoint arrays it cannot read; for training, no image with enough labelled
    keypoints. Then what is read another way (keypoint_array_findings' warnings)."""
    try:
        check_person_keypoints(data["categories"], ann_file)
    except UserError as e:
        return [Finding("error", "keypoints", str(e))]
    arrays = keypoint_array_findings(data["annotations"], len(coco_keypoint_names()))
    if any(f.level == "error" for f in arrays):
        return arrays
    by_image = defaultdict(list)
    for ann in data["annotations"]:
        by_image[ann.get("image_id")].append(ann)
    if split == "train" and not any(trains_keypoints(anns) for anns in by_image.values()):
        return [Finding("error", "nothing to train on", TOO_FEW_KEYPOINTS)]
    return arrays


def missing_files(image_dir: Path, names: Iterable[str]) -> set[str]:
    """The names that are no file in image_dir. Each folder is listed once (COCO's train2017 is one folder of
    118k files, looked up one by one otherwise); a name not found in its folder's listing, such as one
    spelt another way ('a/./b.jpg'), is looked up on its own, so the answer is Path.is_file's."""
    by_folder: dict[str, set[str]] = defaultdict(set)
    for name in names:
        folder, _, base = name.rpartition("/")
        by_folder[folder].add(base)
    missing = set()
    for folder, bases in by_folder.items():
        try:
            with os.scandir(image_dir / folder) as entries:
                found = {e.name for e in entries if e.name in bases and e.is_file()}
        except OSError:
            found = set()
        for base in bases - found:
            name = f"{folder}/{base}" if folder else base
            if not (image_dir / name).is_file():
                missing.add(name)
    return missing


def image_findings(image_dir: Path, images: list[dict], decode: bool = True, max_bad_share: float = 0.01,
                   workers: int = 8) -> list[Finding]:
    """Images that cannot be used: one summary (an error when more than max_bad_share of them, else a
    warning), then a warning for each further one; then a warning for each usable image read in a way to check
    (an EXIF turn its JSON size cannot decide, many megapixels). Without decode, files are only looked up, each
    once however many images name it."""
    usable = [img for img in images if not image_path_problem(img.get("file_name"))]  # others: file errors
    if decode:
        def problem(img: dict) -> tuple[dict, str | None, list[Finding]]:
            return img, *_image_problem(image_dir / img["file_name"], img["width"], img["height"], decode)

        with contextlib.ExitStack() as stack:  # no workers: each image read in this thread
            mapper = stack.enter_context(ThreadPoolExecutor(max_workers=workers)).map if workers else map
            checked = list(mapper(problem, usable))
        bad = [(img, why) for img, why, _ in checked if why]
        notes = [note for _, _, found in checked for note in found]
    else:
        gone = missing_files(image_dir, {img["file_name"] for img in usable})
        bad = [(img, "missing") for img in usable if img["file_name"] in gone] if gone else []
        notes = []
    if not bad:
        return notes
    reasons = missing_reasons(image_dir, {img["file_name"] for img, why in bad if why == "missing"})
    bad = [(img, reasons.get(img["file_name"], why)) for img, why in bad]
    level = "error" if over_share(len(bad), max_bad_share, len(images)) else "warning"
    kinds = Counter("size differs from the JSON" if why.startswith("is ") else why.split(" (")[0] for _, why in bad)
    first = f"{image_dir / bad[0][0]['file_name']} {bad[0][1]}"
    counts = ", ".join(f"{kind}: {count}" for kind, count in kinds.items())
    summary = Finding(level, "unusable image", f"{len(bad)} of {len(images)} images cannot be used ({counts}); "
                      f"first: {first}")
    return [summary] + [Finding("warning", "unusable image", f"{image_dir / img['file_name']}: {why}")
                        for img, why in bad[1:]] + notes


# Up to this many categories the report lists each one's instances; beyond, the most common and a summary.
MOST_CATEGORIES_LISTED = 20
RCNN_DETECTIONS_PER_IMAGE = 100  # torchvision's R-CNNs' default box_detections_per_img


def category_balance(counts: dict[str, int]) -> str:
    """Each category's instances and share, in the file's order; for many categories (LVIS-like files) the 10
    most common, then how many of the others have none, one, 2-10 and more."""
    total = max(sum(counts.values()), 1)
    shown = list(counts.items())
    if len(shown) > MOST_CATEGORIES_LISTED:
        shown = sorted(shown, key=lambda item: -item[1])
        shown, rest = shown[:10], [count for _, count in shown[10:]]
    else:
        rest = []
    text = ", ".join(f"{name} {count} ({100 * count / total:.0f}%)" for name, count in shown)
    if rest:
        groups = (("none", sum(c == 0 for c in rest)), ("1", sum(c == 1 for c in rest)),
                  ("2-10", sum(2 <= c <= 10 for c in rest)), ("more", sum(c > 10 for c in rest)))
        text += f"; {len(rest)} more categories: " + ", ".join(f"{n} with {label}" for label, n in groups if n)
    return text


def instances_per_image(report: SplitReport) -> str:
    """The mean and the most instances of an image (for crowded images, of one category in one image too), with
    the limits such images exceed."""
    (most, image_id), (most_of_one, its_image) = report.most_instances, report.most_of_one_category
    text = f"{report.scored_instances / max(report.images, 1):.1f} on average, at most {most} (image {image_id})"
    if most > COCO_MAX_DETECTIONS and most_of_one < most:  # what the scoring's limit is compared with
        text += f", {most_of_one} of one category (image {its_image})"
    limits = []
    if most > RCNN_DETECTIONS_PER_IMAGE:
        limits.append(f"the R-CNNs keep {RCNN_DETECTIONS_PER_IMAGE} detections an image unless "
                      f"--detections-per-image raises it")
    if most_of_one > COCO_MAX_DETECTIONS:
        limits.append(f"COCO's scoring counts at most {COCO_MAX_DETECTIONS} per image and category unless "
                      f"--eval-max-dets raises it")
    return "; ".join([text, *limits])


def format_report(reports: list[SplitReport], limit: int = 5) -> str:
    """A human report: counts, then findings grouped by kind (the first few of each), then class balance."""
    lines = []
    for report in reports:
        lines.append(f"{report.split}: {report.images} images, {report.annotations} annotations, "
                     f"{len(report.errors)} errors, {len(report.warnings)} warnings")
        by_kind: dict[tuple[str, str], list[Finding]] = {}
        for finding in report.findings:
            by_kind.setdefault((finding.level, finding.kind), []).append(finding)
        for (level, kind), found in by_kind.items():
            count = f" ({len(found)})" if len(found) > 1 else ""  # one finding may count many (its message says)
            lines.append(f"  {level.upper()} {kind}{count}:")
            lines += [f"    {f.message}" for f in found[:limit]]
            if len(found) > limit:
                lines.append(f"    ... and {len(found) - limit} more")
        if report.class_counts:
            lines.append(f"  instances per category: {category_balance(report.class_counts)}")
        if report.most_instances[0]:
            lines.append(f"  instances per image: {instances_per_image(report)}")
        if report.crowd_regions:  # a tool that writes masks as RLE may mark every one a crowd region
            lines.append(f"  crowd regions (iscrowd 1): {report.crowd_regions}, not learned and not scored as "
                         f"instances")
    return "\n".join(lines)


def check_before_training(image_dir: Path, images: list[dict], split: str, max_bad_share: float) -> None:
    """The fast check every run does at its start (the annotation file was checked as it was read): stops
    when more images are missing than the run would tolerate, with a pointer to the full report."""
    findings = image_findings(image_dir, images, decode=False, max_bad_share=max_bad_share)
    if not any(f.level == "error" for f in findings):
        return
    if len(findings) == len(images):  # one finding per unusable image: none could train or score
        raise UserError(f"{split} data: {findings[0].message}; no image of the JSON is found, so check that its "
                        f"file_names are written relative to {image_dir}")
    # Training and evaluation skip unreadable samples up to --max-bad-samples: skipping this check alone would
    # stop the run at the same files later. Each process counts its share of the images it loads (training
    # loads only annotated ones), so the share to give is the user's to judge.
    unusable = sum(f.kind == "unusable image" for f in findings)
    raise UserError(f"{split} data: {findings[0].message}; fix them (python3 tools/check_dataset.py lists each), "
                    f"or raise --max-bad-samples ({max_bad_share:g}) above their share ({unusable} of {len(images)} "
                    f"here; each process counts its own) to go on without them")

"""Read a COCO-format folder into (image, target) samples, and map its category ids to model labels."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import pickle
import re
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torchvision
from PIL import Image, ImageOps
from pycocotools.coco import COCO

import utils
from annotations import (
    annotation_findings,
    collection_paused,
    finite_box,
    image_path_problem,
    is_area,
    is_flat_polygon,
    keypoint_array_findings,
    labelled_keypoints,
    read_annotation_file,
    segmentation_problem,
)
from errors import UserError
from transforms import image_size

# The layout of each --dataset: split name -> (image folder, annotation file), relative to --data-path.
DATASET_LAYOUTS = {
    "coco": {
        "train": ("train2017", "annotations/instances_train2017.json"),
        "val": ("val2017", "annotations/instances_val2017.json"),
    },
    "coco_kp": {
        "train": ("train2017", "annotations/person_keypoints_train2017.json"),
        "val": ("val2017", "annotations/person_keypoints_val2017.json"),
    },
}
# The Keypoint R-CNN recipe trains on images with at least this many labelled keypoints in all.
MIN_KEYPOINTS_PER_IMAGE = 10


@cache
def coco_keypoint_names() -> tuple[str, ...]:
    """COCO's 17 person keypoints, in order, as torchvision's keypoint weights name them."""
    from torchvision.models.detection import KeypointRCNN_ResNet50_FPN_Weights

    return tuple(KeypointRCNN_ResNet50_FPN_Weights.COCO_V1.meta["keypoint_names"])


def flip_order(names: tuple[str, ...]) -> list[int]:
    """For each keypoint, the one it becomes in a mirror image: left and right swap, the rest stay."""
    swapped = [n.replace("left", "\0").replace("right", "left").replace("\0", "right") for n in names]
    return [names.index(n) if n in names else i for i, n in enumerate(swapped)]


@cache
def coco_category_names() -> dict[int, str]:
    """COCO's own 80 categories, id -> name, as torchvision's COCO weights number them."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    names = MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    return {i: name for i, name in enumerate(names) if name not in ("__background__", "N/A")}


@dataclass(frozen=True)
class CategoryMap:
    """The annotation file's category ids and names, and the model labels they train as (0 is background).

    COCO's own categories keep their ids as labels (91 classes, so torchvision's COCO weights fit); any other
    category set is numbered 1..K in id order.
    """

    ids: tuple[int, ...]
    names: tuple[str, ...]
    keep_ids: bool

    @classmethod
    def from_categories(cls, categories: list[dict], dataset: str, keep_ids: bool | None = None) -> CategoryMap:
        """The map of a category list; keep_ids None decides by the names (COCO's own keep their ids)."""
        ordered = sorted(categories, key=lambda c: c["id"])
        own = {c["id"]: c.get("name", str(c["id"])) for c in ordered}  # the reference's own files name none
        if keep_ids is None:
            keep_ids = dataset == "coco" and own.items() <= coco_category_names().items()
        return cls(tuple(own), tuple(own.values()), keep_ids)

    @classmethod
    def of_checkpoint(cls, content: dict) -> CategoryMap | None:
        """The categories one of train.py's checkpoints was trained on; None for a file that keeps none."""
        if not content.get("categories"):
            return None
        return cls.from_categories(content["categories"], (content.get("args") or {}).get("dataset", "coco"),
                                   content.get("labels_are_category_ids"))

    @property
    def num_classes(self) -> int:
        return 91 if self.keep_ids else len(self.ids) + 1

    @property
    def fewest_classes(self) -> int:
        """The fewest classes a model of these labels can have: the largest label + 1 (0 is background)."""
        return (max(self.ids, default=0) if self.keep_ids else len(self.ids)) + 1

    def label(self, category_id: int) -> int:
        return category_id if self.keep_ids else self.ids.index(category_id) + 1

    def category_id(self, label: int) -> int | None:
        """The file's id of a model label; None for a label that is no category (a model with more classes than
        the files have categories)."""
        if self.keep_ids:
            return label if label in self.ids else None
        return self.ids[label - 1] if 1 <= label <= len(self.ids) else None

    def known(self, labels: torch.Tensor) -> torch.Tensor:
        """Which of a tensor of labels are categories."""
        return torch.tensor([self.category_id(label) is not None for label in labels.tolist()], dtype=torch.bool)

    def name(self, label: int) -> str:
        return dict(zip(self.ids, self.names)).get(self.category_id(label), str(label))

    def first_other_label(self, trained: CategoryMap) -> str | None:
        """Where a model trained on trained's categories predicts another category than this map names by a label
        (the first such label, in words); None where each of this map's labels names the same category there or
        none (a label it never learned to predict, as for a model of some of COCO's categories)."""
        theirs = {trained.label(i): n for i, n in zip(trained.ids, trained.names)}
        for category_id, name in zip(self.ids, self.names):
            label = self.label(category_id)
            if theirs.get(label, name) != name:
                return f"its label {label} is {theirs[label]!r}, here {name!r} (id {category_id!r})"
        return None

    def as_list(self) -> list[dict]:
        """Plain data for checkpoints: [{'id': ..., 'name': ...}, ...]."""
        return [{"id": i, "name": n} for i, n in zip(self.ids, self.names)]


def add_split_paths(parser: argparse.ArgumentParser) -> None:
    """The flags that place a split's images and annotation file apart from --data-path's COCO layout."""
    for split in ("train", "val"):
        parser.add_argument(f"--{split}-images", default=None, metavar="DIR",
                            help=f"the {split} images' folder (the JSON's file_names are relative to it), instead "
                                 f"of --data-path's")
        parser.add_argument(f"--{split}-annotations", default=None, metavar="FILE",
                            help=f"the {split} COCO JSON file, instead of --data-path's")


def json_files_note(root: Path, most: int = 3) -> str:
    """The JSON files within two folders of root, as a note for the error of a layout that is not COCO's (an
    annotation tool's export names its files its own way)."""
    found = sorted(path.relative_to(root).as_posix() for pattern in ("*.json", "*/*.json", "*/*/*.json")
                   for path in root.glob(pattern))
    if not found:
        return ""
    more = f" and {len(found) - most} more" if len(found) > most else ""
    return f" (JSON files there: {', '.join(found[:most])}{more})"


def split_paths(data_path: str | Path, dataset: str, split: str, images: str | Path | None = None,
                annotations: str | Path | None = None) -> tuple[Path, Path]:
    """The image folder and annotation file of a split, checked to exist: --data-path's COCO layout, or those
    given apart (--{split}-images, --{split}-annotations), which need no --data-path."""
    layout_images, layout_annotations = DATASET_LAYOUTS[dataset][split]
    root = Path(data_path)
    if (images is None or annotations is None) and not root.is_dir():
        raise UserError(f"--data-path {root} is not a folder; point it at a COCO-layout folder "
                        f"(annotations/, train2017/, val2017/), make one with tools/make_coco_dataset.py, or give "
                        f"--{split}-images and --{split}-annotations")
    if annotations is not None:
        ann_file = Path(annotations)
        if not ann_file.is_file():
            raise UserError(f"--{split}-annotations {ann_file} is no file; give the split's COCO JSON file")
    else:
        ann_file = root / layout_annotations
        if not ann_file.is_file():
            raise UserError(f"annotation file {ann_file} is missing; --data-path must hold the COCO layout "
                            f"({layout_annotations} and {layout_images}/), or give --{split}-annotations"
                            f"{json_files_note(root)}")
    if images is not None:
        image_dir = Path(images)
        if not image_dir.is_dir():
            raise UserError(f"--{split}-images {image_dir} is no folder; give the folder the JSON's file_names "
                            f"are relative to")
    else:
        image_dir = root / layout_images
        if not image_dir.is_dir():
            raise UserError(f"image folder {image_dir} is missing; --data-path must hold the COCO layout, or give "
                            f"--{split}-images")
    return image_dir, ann_file


# The check's findings on instances that the loader leaves out or repairs (and on crowd regions, which may not
# be drawable): COCOeval, pycocotools' and faster-coco-eval's alike, stops with a traceback on most of them.
LOADER_REPAIRS = frozenset({"box not finite", "no segmentation", "segmentation format", "polygon under 3 points",
                            "crowd format"})


class CocoIndex(COCO):
    """pycocotools' index of an annotation file as load_coco makes it; loader_repairs says whether the check found
    instances that the loader leaves out or repairs, which scoring must then read as the loader does, and
    renumbered whether scoring must number the annotations from 1; scoring_indexes keeps what scoring built;
    category_map is the labels of the dataset that reads it (labels_of)."""

    loader_repairs: bool = False
    renumbered: bool = False
    category_map: CategoryMap | None = None

    def __init__(self) -> None:
        super().__init__()
        self.scoring_indexes: dict[bool, COCO] = {}  # by whether the IoU type scores masks
        self.warned: dict[str, tuple[int, str]] = {}  # the check's findings by kind: their count, the first's message
        self.source: Path | None = None  # the annotation file


def load_coco(ann_file: Path) -> CocoIndex:
    """A pycocotools COCO index of an annotation file, checked for what every later step relies on."""
    with collection_paused():  # millions of objects, no cycles: the collector's passes would cost seconds
        data = read_annotation_file(ann_file)
        findings = annotation_findings(data)
        for finding in findings:
            if finding.level == "error":
                raise UserError(f"{ann_file}: {finding.message}; fix the file (tools/check_dataset.py lists every "
                                f"problem)")
        kinds = {f.kind for f in findings}
        if kinds & {"flat polygon", "no area", "no iscrowd", "decimal size"}:
            _complete(data)
        coco = CocoIndex()
        coco.dataset, coco.source = data, ann_file
        coco.loader_repairs = bool(kinds & LOADER_REPAIRS)
        for finding in findings:
            count, first = coco.warned.get(finding.kind, (0, finding.message))
            coco.warned[finding.kind] = (count + 1, first)
        coco.renumbered = "annotation ids" in kinds
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress we do not want per rank
            coco.createIndex()
    return coco


def _complete(data: dict) -> None:
    """Sizes written as decimals made whole numbers, flat polygons wrapped as one polygon, missing areas computed
    from the outline (else the box) and a missing iscrowd set to 0, in place: the loader and COCOeval then read
    them as COCO has them. Run only on files the check found such entries in."""
    for image in data["images"]:
        image["width"], image["height"] = int(image["width"]), int(image["height"])
    sizes = {image["id"]: (image["height"], image["width"]) for image in data["images"]}
    for ann in data["annotations"]:
        if is_flat_polygon(ann.get("segmentation")):
            ann["segmentation"] = [ann["segmentation"]]
        if not is_area(ann.get("area")):
            ann["area"] = _outline_area(ann, *sizes[ann["image_id"]])
        if ann.get("iscrowd") is None:
            ann["iscrowd"] = 0


def _outline_area(ann: dict, height: int, width: int) -> float:
    """The pixels of an annotation's outline as COCO counts its area; its box's area if it has no outline that
    can be drawn; 0 if neither."""
    segmentation = ann.get("segmentation")
    if segmentation and not segmentation_problem(segmentation, height, width):
        if isinstance(segmentation, list):
            segmentation = _repaired_polygons(segmentation, "", [])
        if segmentation:
            return float(mask_utils.area(as_compressed_rle(segmentation, height, width)))
    return float(ann["bbox"][2] * ann["bbox"][3]) if finite_box(ann.get("bbox")) else 0.0


class SampleError(Exception):
    """A sample that cannot be used (missing or unreadable image, size differing from the JSON)."""


# What PIL raises on a file it cannot read: an image over its pixel limit (its guard against decompression
# bombs) raises neither OSError nor ValueError.
IMAGE_READ_ERRORS = (OSError, ValueError, Image.DecompressionBombError)
_WIDE_GRAYSCALE = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def rgb_pixels(img: Image.Image) -> np.ndarray:
    """An opened image's pixels as (H, W, 3) uint8 RGB. 16-bit grayscale (and 32-bit integer, read as 16-bit) is
    scaled to 8 bits, where PIL's convert would clip it at 255; floating-point pixels are refused (ValueError)."""
    if img.mode == "RGB":
        return np.array(img)
    if img.mode in _WIDE_GRAYSCALE:
        gray = ((np.clip(np.asarray(img, dtype=np.int64), 0, 65535) + 128) // 257).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode == "F":
        raise ValueError("its pixels are floating-point numbers (mode F); save it with 8 or 16 bits per channel")
    return np.array(img.convert("RGB"))


# 16-bit pixels that never pass this come from 10- or 12-bit sensors: scaled to 8 bits they read nearly black.
NARROW_WIDE_MAXIMUM = 4095


def narrow_wide_maximum(img: Image.Image) -> int | None:
    """The largest pixel of a 16-bit (or 32-bit integer) grayscale image whose pixels stay within 12 bits, or
    None (another mode, or pixels using the wider range)."""
    if img.mode not in _WIDE_GRAYSCALE:
        return None
    _, largest = img.getextrema()
    return int(largest) if largest <= NARROW_WIDE_MAXIMUM else None


_EXIF_ORIENTATION = 0x0112
_QUARTER_TURNS = (5, 6, 7, 8)  # the orientations that swap width and height


def turned_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of img turned as its EXIF orientation asks."""
    orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    return (img.height, img.width) if orientation in _QUARTER_TURNS else img.size


def has_exif_turn(img: Image.Image) -> bool:
    """Whether img's EXIF orientation turns or mirrors it."""
    return img.getexif().get(_EXIF_ORIENTATION, 1) in range(2, 9)


def orientation_undecided(img: Image.Image, size: tuple[int, int]) -> bool:
    """Whether img carries an EXIF turn or mirror that the JSON's (width, height) cannot tell apart from the
    stored picture (a square one, a half turn, a mirror): upright then keeps the stored pixels."""
    return has_exif_turn(img) and img.size == size and turned_size(img) == size


def upright(img: Image.Image, size: tuple[int, int] | None) -> Image.Image:
    """img turned as its EXIF orientation asks, where the annotations see it so: always without a JSON size (a
    photo to predict on); with the JSON's (width, height), only when the turned picture has it and the stored
    one has not. Annotations of the stored picture (torchvision's reference reads it so) stay right."""
    if not has_exif_turn(img):
        return img
    if size is None or (img.size != size and turned_size(img) == size):
        return ImageOps.exif_transpose(img)
    return img


def unreadable_reason(path: Path, error: Exception) -> str:
    """Why PIL could not read an image file, in words: missing, empty, over PIL's size limit, or its message."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if path.is_file() and path.stat().st_size == 0:
        return "unreadable (the file is empty, 0 bytes)"
    if isinstance(error, Image.DecompressionBombError):
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(pixels[1]) / 1e6:.3g} megapixels; " if pixels else ""
        return (f"too large to decode ({size}PIL refuses more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.3g}, its "
                f"guard against decompression bombs); downscale it and its annotations")
    return f"unreadable ({str(error).strip()[:100]})"


# An image of more pixels than this is named (tools/check_dataset.py, a run's start): decoding it and its masks
# at full size takes gigabytes before the model shrinks it. PIL's own warning, at 89 megapixels, names no file.
LARGE_IMAGE_PIXELS = 50_000_000
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def large_image_note(path: Path, width: int, height: int) -> str | None:
    """What to say of an image over LARGE_IMAGE_PIXELS, or None."""
    if width * height <= LARGE_IMAGE_PIXELS:
        return None
    return (f"{path}: {width}x{height} ({width * height / 1e6:.3g} megapixels) is decoded, with its masks, at full "
            f"size before the model shrinks it; downscale it and its annotations to save memory and time")


def read_rgb(path: Path, size: tuple[int, int] | None = None, turned: list[Path] | None = None) -> torch.Tensor:
    """An image file as a uint8 CHW RGB tensor (grayscale, 16-bit and palette images converted), turned as its
    EXIF orientation asks where upright says so for the JSON's (width, height) size; a turned one's path is
    added to turned where given."""
    try:
        with Image.open(path) as img:
            turned_img = upright(img, size)
            if turned is not None and turned_img is not img:
                turned.append(path)
            pixels = rgb_pixels(turned_img)
    except IMAGE_READ_ERRORS as e:
        raise SampleError(f"{path}: image {unreadable_reason(path, e)}") from None
    return torch.from_numpy(pixels).permute(2, 0, 1)


def instance_masks(anns: list[dict], height: int, width: int) -> torch.Tensor:
    """(N, H, W) uint8 masks of annotations (polygons, or RLE compressed or not), as COCO.annToMask draws
    them, decoded in one call into one buffer."""
    if not anns:
        return torch.zeros((0, height, width), dtype=torch.uint8)
    rles = [as_compressed_rle(ann["segmentation"], height, width) for ann in anns]
    # decode gives (H, W, N) in column-major order: the (N, H, W) view of it costs nothing, while making it
    # row-major here would cost as much as the decoding; the engine does that on the device (to_device)
    return torch.from_numpy(mask_utils.decode(rles)).permute(2, 0, 1)


def _decoded(anns: list[dict], boxes: torch.Tensor, record: tuple, faults: list[str]
             ) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
    """The instances' masks, with the instances and boxes kept: one whose compressed RLE pycocotools refuses to
    decode is left out and noted. Its counts run past the image's pixels by a multiple of 2**32, which area(),
    summing in 32 bits, cannot tell (segmentation_problem): a string no encoder writes."""
    where, height, width = record[:3]
    try:
        return anns, boxes, instance_masks(anns, height, width)
    except ValueError:
        decodes = [_decodes(ann["segmentation"], height, width) for ann in anns]
    for ann in (a for a, ok in zip(anns, decodes) if not ok):
        faults.append(f"{where} annotation {ann['id']}: segmentation is compressed RLE whose counts go past the "
                      f"image's {height * width} pixels; instance dropped")
    kept = [a for a, ok in zip(anns, decodes) if ok]
    return kept, boxes[torch.tensor(decodes, dtype=torch.bool)], instance_masks(kept, height, width)


def _decodes(segmentation, height: int, width: int) -> bool:
    try:
        mask_utils.decode(as_compressed_rle(segmentation, height, width))
    except ValueError:
        return False
    return True


def as_compressed_rle(segmentation, height: int, width: int) -> dict:
    """A segmentation (polygons, or RLE compressed or not) as compressed RLE. RLE of another size than the
    image's is refused: decoded with the others, it would be read at the first one's size (an error, or a
    mask of whatever memory follows)."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    problem = segmentation_problem(segmentation, height, width)
    if problem:
        raise ValueError(f"segmentation {problem}")
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def _repaired_polygons(polygons: list[list[float]], where: str, faults: list[str]) -> list[list[float]]:
    """The polygons that can be drawn: an odd coordinate at the end dropped, those under 3 points removed; the
    list itself when each is sound."""
    if all(len(p) >= 6 and len(p) % 2 == 0 for p in polygons):
        return polygons  # no copy of every coordinate list: scoring's ground truth reads all of them
    even = [p[:len(p) - len(p) % 2] for p in polygons]
    if any(len(p) % 2 for p in polygons):
        faults.append(f"{where}: polygon with an odd number of coordinates; its last coordinate dropped")
    kept = [p for p in even if len(p) >= 6]
    if len(kept) < len(even):
        faults.append(f"{where}: polygon with fewer than 3 points removed")
    return kept


def _repaired_annotation(ann: dict, record: tuple, faults: list[str], with_masks: bool) -> dict | None:
    """The annotation of an image's (file name, height, width, ...) record with what cannot be used removed
    (None if nothing is left); each repair noted. Without masks, the outline does not matter. The one rule of
    what training reads and what scoring counts (scoring_ground_truth)."""
    where, height, width = record[:3]
    where = f"{where} annotation {ann['id']}"
    if not finite_box(ann.get("bbox")):
        faults.append(f"{where}: box {ann.get('bbox')} is not 4 finite numbers; instance dropped")
        return None
    segmentation = ann.get("segmentation")
    if not with_masks:
        return ann
    problem = segmentation_problem(segmentation, height, width) if segmentation else None
    if problem:
        faults.append(f"{where}: segmentation {problem}; instance dropped")
        return None
    if isinstance(segmentation, list) and segmentation:
        repaired = _repaired_polygons(segmentation, where, faults)
        if repaired is not segmentation:
            ann, segmentation = {**ann, "segmentation": repaired}, repaired
    if not segmentation:
        # An empty mask inside a real box would teach the mask head that the object is background.
        faults.append(f"{where}: no segmentation to learn a mask from; instance dropped")
        return None
    return ann


def _as_loaded(coco: COCO, with_masks: bool) -> Iterator[tuple[dict, str, dict | None]]:
    """Each annotation, its image's file name, and what the loader makes of it (None: left out), by the loader's
    own rule, _repaired_annotation's."""
    records = {image["id"]: (image.get("file_name"), image["height"], image["width"])
               for image in coco.dataset["images"]}
    for ann in coco.dataset["annotations"]:
        record = records[ann["image_id"]]
        yield ann, record[0], _repaired_annotation(ann, record, [], with_masks)


def instances_without_outline(coco: COCO) -> list[str]:
    """The instances (file and annotation id) with a usable box that the loader leaves out for a model that
    learns masks, for want of an outline it can draw."""
    return [f"{file_name} annotation {ann['id']}" for ann, file_name, loaded in _as_loaded(coco, with_masks=True)
            if loaded is None and not ann.get("iscrowd") and finite_box(ann.get("bbox"))]


def scoring_ground_truth(coco: COCO, iou_type: str) -> COCO:
    """The ground truth that predictions of one IoU type are scored against: the instances as the loader reads
    them, crowd regions alike. Without a usable box, an instance is left out of every type; without a drawable
    outline, out of 'segm' too. The index itself when load_coco's check found nothing the loader changes."""
    if not (isinstance(coco, CocoIndex) and (coco.loader_repairs or coco.renumbered)):
        return coco  # no pass over the annotations and the very same index: a sound file scores as ever
    with_masks = iou_type == "segm"
    if with_masks not in coco.scoring_indexes:  # built once a run: a pass over every annotation at COCO's size
        coco.scoring_indexes[with_masks] = _scoring_index(coco, with_masks)
    return coco.scoring_indexes[with_masks]


def _scoring_index(coco: CocoIndex, with_masks: bool) -> COCO:
    """scoring_ground_truth's index, built."""
    kept = coco.dataset["annotations"]
    if coco.loader_repairs:
        # Left out, not made crowd regions: both COCOevals take 'ignore' from 'iscrowd' alone, and a crowd
        # region still needs the box or outline these lack.
        kept = [loaded for _, _, loaded in _as_loaded(coco, with_masks) if loaded is not None]
    if coco.renumbered:
        kept = [{**ann, "id": number} for number, ann in enumerate(kept, start=1)]
    scored = COCO()
    scored.dataset = {**coco.dataset, "annotations": kept}
    with collection_paused(), contextlib.redirect_stdout(io.StringIO()):
        scored.createIndex()
    return scored


NO_OUTLINES = "no instance has an outline to learn a mask from (a 'segmentation'; crowd regions are not learned)"


TOO_FEW_KEYPOINTS = (f"no image has {MIN_KEYPOINTS_PER_IMAGE} or more labelled keypoints, which keypoint training "
                     f"asks of an image")


NOTHING_TO_SCORE = ("no instance (crowd regions aside) with a usable box to score predictions against, so every AP "
                    "would be -1; give a val file with annotations (tools/predict.py runs a model on images "
                    "without them)")


def counts_for_scoring(ann: dict) -> bool:
    """Whether box scoring matches predictions against the instance: one with a usable box that is not a crowd
    region."""
    return not ann.get("iscrowd") and finite_box(ann.get("bbox"))


def scored_instances_per_image(annotations: Iterable[dict], by_category: bool = False) -> Counter:
    """Each image's instances that detections are matched against (counts_for_scoring), by image id (what a
    model's detections per image must cover), or by (image id, category id) (what COCO's scoring counts)."""
    return Counter((a.get("image_id"), a.get("category_id")) if by_category else a.get("image_id")
                   for a in annotations if counts_for_scoring(a))


def counts_for_training(ann: dict) -> bool:
    """The recipe's filter: an image trains if any of its annotations, crowd regions included, has a box with
    extent (crowd regions then leave the targets, so such an image trains as background)."""
    if not finite_box(ann.get("bbox")):
        return False
    x, y, w, h = ann["bbox"]
    return not (w <= 1 or h <= 1)


def has_outline(ann: dict, image: dict | None) -> bool:
    """Whether a mask can be learned from the annotation of an image (None: not in the file): a training instance
    (no crowd region) that the loader keeps for a model that learns masks, by its own rule (_repaired_annotation;
    a flat polygon read as the polygon it wraps, as load_coco does)."""
    if ann.get("iscrowd") or not ann.get("segmentation") or not counts_for_training(ann) or image is None:
        return False
    if is_flat_polygon(ann["segmentation"]):
        ann = {**ann, "segmentation": [ann["segmentation"]]}
    return _repaired_annotation(ann, (image.get("file_name"), image["height"], image["width"]), [], True) is not None


def trains_keypoints(anns: list[dict]) -> bool:
    """Whether an image's annotations, crowd regions included, label enough keypoints for coco_kp training."""
    return sum(labelled_keypoints(a.get("keypoints")) for a in anns) >= MIN_KEYPOINTS_PER_IMAGE


class CocoDetection(torch.utils.data.Dataset):
    """Samples of (uint8 CHW RGB image, target) from a COCO index; targets hold labels, not category ids.

    With train=True, images are kept as torchvision's recipe keeps them (some annotation, crowd regions included,
    with a box of extent) and crowd regions are dropped from the targets, so an image of crowds alone trains as
    background; masks are decoded for training when the model learns them
    (masks=True). Evaluation samples carry no masks: scoring reads the annotation file, so decoding them
    would be wasted work (load_target draws them when asked). keypoints=True adds COCO person keypoints.

    A sample that cannot be read is replaced by the next readable one, so batches keep their size;
    target["faults"] says what was skipped or repaired, for the loop to log.
    Random augmentation is seeded by (seed, epoch, index): the same sample gets the same augmentation
    whichever worker loads it and whether or not the run was resumed.

    Samples are read from the COCO index (.coco, whose edits they see) until compact() moves what they need
    into a few NumPy arrays, as data.py does before its loaders start workers.
    """

    def __init__(self, image_dir: Path, coco: COCO, category_map: CategoryMap, transforms=None,
                 train: bool = False, seed: int = 0, masks: bool = True, keypoints: bool = False) -> None:
        self.image_dir = Path(image_dir)
        self.coco = coco
        self.category_map = category_map
        if isinstance(coco, CocoIndex) and coco.category_map is None:
            coco.category_map = category_map  # so that its predictions can be scored from the index alone
        self.transforms = transforms
        self.seed = seed
        self.epoch = 0
        self.train = train
        self.with_masks = train and masks
        self.with_keypoints = keypoints
        ids = sorted(coco.imgs)
        if train:
            ids = [i for i in ids if any(counts_for_training(a) for a in coco.imgToAnns[i])]
        if train and keypoints:
            ids = [i for i in ids if trains_keypoints(coco.imgToAnns[i])]
        self.ids = ids
        self._compact: CompactRecords | None = None

    def compact(self, release_index: bool = False) -> None:
        """Read samples from compact arrays from now on: per sample its file name, size and annotations (crowd
        regions aside), pickled into one byte buffer, and the ids as a NumPy array. Loader workers forked
        afterwards touch no Python object per image, so they copy none of the index's pages (a COCO index is
        millions of objects, which workers copy page by page as they touch their reference counts). Edits to
        .coco no longer reach samples; release_index also frees the index (.coco becomes None), for a split
        that nothing else reads."""
        if self._compact is not None:
            return
        self._compact = CompactRecords.of(self.coco, self.ids)
        self.ids = id_array(self.ids)
        if release_index:
            self.coco = None

    def __len__(self) -> int:
        return len(self.ids)

    def instances_read(self) -> tuple[int, int]:
        """The number of instances the samples read (crowd regions aside) and a checksum of every sample's record
        (file name, size and those instances), to tell copies of a dataset apart."""
        records = self._compact if self._compact is not None else CompactRecords.of(self.coco, list(self.ids))
        return int(records.category_offsets[-1]), zlib.crc32(records.buffer)

    def image_categories(self) -> list[set[int]]:
        """The categories of each sample's instances (crowd regions aside), from the annotation file."""
        if self._compact is not None:
            return self._compact.image_categories()
        return [{a["category_id"] for a in self.coco.imgToAnns[i] if not a.get("iscrowd", 0)} for i in self.ids]

    def aspect_ratios(self) -> list[float]:
        """Width / height of each sample, from the annotation file (no image is opened)."""
        if self._compact is not None:
            return self._compact.aspect_ratios()
        return [self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] for i in self.ids]

    def _record(self, image_id) -> tuple[str, int, int, list[dict]]:
        """An image's file name, height, width and annotations: from the compact arrays once there are some."""
        if self._compact is not None:
            return self._compact.record(self._compact.position(self.ids, image_id))
        info = self.coco.imgs[image_id]
        return info["file_name"], info["height"], info["width"], self.coco.imgToAnns[image_id]

    def image_path(self, image_id: int) -> Path:
        """Where an image's file is: always inside the image folder (a name that would leave it is refused)."""
        return self._path(image_id, self._record(image_id)[0])

    def _path(self, image_id: int, file_name: str) -> Path:
        problem = image_path_problem(file_name)
        if problem:
            raise SampleError(f"image {image_id}: file_name {file_name!r} {problem}")
        return self.image_dir / file_name

    def load_image(self, image_id: int) -> torch.Tensor:
        return self._image(image_id, self._record(image_id))

    def _image(self, image_id: int, record: tuple) -> torch.Tensor:
        file_name, height, width, _ = record
        path = self._path(image_id, file_name)
        image = read_rgb(path, (width, height))
        if tuple(image.shape[1:]) != (height, width):
            raise SampleError(f"{path}: image is {image.shape[2]}x{image.shape[1]} but the JSON says "
                              f"{width}x{height}")
        return image

    def load_target(self, image_id: int, faults: list[str], with_masks: bool = True) -> dict:
        """The image's instances; without masks (evaluation scores against the annotation file, not these)
        the masks are left out, which saves most of the work."""
        return self._target(plain_id(image_id), self._record(image_id), faults, with_masks)

    def _target(self, image_id: int, record: tuple, faults: list[str], with_masks: bool) -> dict:
        where, height, width, anns = record
        anns = [a for a in anns if not a.get("iscrowd", 0)]
        anns = [r for r in (_repaired_annotation(a, record, faults, with_masks) for a in anns) if r is not None]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(min=0, max=width)
        boxes[:, 1::2].clamp_(min=0, max=height)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        kept = keep.tolist()
        if self.train:  # scoring keeps such an instance, as one no prediction can match
            faults += [f"{where} annotation {a['id']}: box {a['bbox']} has no extent inside the {width}x{height} "
                       f"image; instance dropped" for a, k in zip(anns, kept) if not k]
        anns, boxes, masks = [a for a, k in zip(anns, kept) if k], boxes[keep], None
        if with_masks:
            anns, boxes, masks = _decoded(anns, boxes, record, faults)
        target = {
            "boxes": boxes,
            "labels": torch.tensor([self.category_map.label(a["category_id"]) for a in anns], dtype=torch.int64),
            "image_id": image_id,
            "area": torch.tensor([a["area"] for a in anns], dtype=torch.float32),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
        }
        if masks is not None:
            target["masks"] = masks
        if self.with_keypoints:
            points = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32)  # full arrays each
            # An image without persons (many of COCO's val2017) gives (0, 17, 3), as the model lays outputs out.
            target["keypoints"] = points.reshape(len(anns), len(coco_keypoint_names()), 3)
        return target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        faults: list[str] = []
        for attempt in range(len(self.ids)):
            image_id = plain_id(self.ids[(index + attempt) % len(self.ids)])
            record = self._record(image_id)
            try:
                image = self._image(image_id, record)
            except SampleError as e:
                faults.append(f"{e}; sample skipped")
                continue
            target = self._target(image_id, record, faults, self.with_masks)
            if self.transforms is not None:
                image, target = self.transforms(image, target, utils.generator_for(self.seed, self.epoch, index))
            target["faults"] = faults
            return image, target
        first = faults[0].removesuffix("; sample skipped")
        raise UserError(f"no image of {self.image_dir} can be used (the first: {first}); tools/check_dataset.py "
                        f"lists every one")


def id_array(ids: list) -> np.ndarray:
    """A file's ids as an array whose tolist() gives them back as the file has them: integers or strings as NumPy
    holds them, else (integers on both sides of 2**63, past 64 bits, or not whole) as Python objects, where NumPy
    would make floats of them, which merge neighbouring large ids and cut 1.5 to 1 in an int64 array."""
    array = np.asarray(ids)
    return array if array.dtype.kind in "iuU" or not len(ids) else np.array(ids, dtype=object)


def plain_id(image_id):
    """An image id as a Python value: as the annotation file has it (not a NumPy int from the compact ids), or a
    target's one-element tensor (torchvision's tutorial's datasets give those) as its number."""
    return image_id.item() if isinstance(image_id, (np.generic, torch.Tensor)) else image_id


def labels_of(coco: COCO) -> CategoryMap:
    """How a model's labels name the categories of a ground truth: as the dataset of this project that reads the
    index numbers them, else the category ids themselves (the datasets of torchvision's reference and tutorial)."""
    if isinstance(coco, CocoIndex) and coco.category_map is not None:
        return coco.category_map
    return CategoryMap.from_categories(coco.dataset.get("categories", []), "samples", keep_ids=True)


def coco_of_samples(dataset: torch.utils.data.Dataset) -> tuple[COCO, CategoryMap]:
    """The ground truth to score predictions on a dataset with, and how the model's labels name its categories:
    the annotation file's index of one of this project's datasets or of torchvision's CocoDetection itself (or a
    Subset of one), else samples_as_coco's reading of every sample."""
    inner = dataset
    while isinstance(inner, torch.utils.data.Subset):
        inner = inner.dataset
    if isinstance(inner, CocoDetection) and inner.coco is not None:
        return inner.coco, inner.category_map
    # torchvision's own class, whose samples are the file's annotations; a subclass may number or resize them
    # otherwise, so its samples are read
    if type(inner) is torchvision.datasets.CocoDetection:
        return inner.coco, labels_of(inner.coco)
    coco = samples_as_coco(dataset)
    return coco, labels_of(coco)


def samples_as_coco(dataset: torch.utils.data.Dataset) -> COCO:
    """The ground truth of every (image, target) sample read once, as a loader gives it, with its labels as
    category ids (the datasets of torchvision's tutorial, whose targets hold boxes in corners, labels, image_id,
    and optionally masks, keypoints, area and iscrowd)."""
    images, annotations, seen = [], [], {}
    for index in range(len(dataset)):
        image, target = dataset[index]
        height, width = image_size(image)
        image_id = plain_id(target["image_id"])
        if image_id in seen:
            raise UserError(f"samples {seen[image_id]} and {index} of the dataset have one image_id, {image_id!r}: "
                            f"scoring tells images apart by it; give each sample its own")
        seen[image_id] = index
        images.append({"id": image_id, "height": int(height), "width": int(width)})
        annotations += sample_annotations(image_id, target, first_id=len(annotations) + 1)
    categories = [{"id": label, "name": str(label)} for label in sorted({a["category_id"] for a in annotations})]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' progress lines
        coco.createIndex()
    return coco


def sample_annotations(image_id, target: dict, first_id: int) -> list[dict]:
    """A sample's target as COCO annotations numbered from first_id: boxes from corners to [x, y, w, h], masks as
    RLE, keypoints flat; area as the target gives it, else the mask's, else the box's; iscrowd 0 unless given."""
    boxes = torch.as_tensor(target["boxes"]).reshape(-1, 4).tolist()
    count = len(boxes)
    labels = torch.as_tensor(target["labels"]).reshape(-1).tolist()
    crowd = torch.as_tensor(target.get("iscrowd", torch.zeros(count))).reshape(-1).tolist()
    rles = []
    if "masks" in target:
        masks = np.asfortranarray(torch.as_tensor(target["masks"]).to(torch.uint8).permute(1, 2, 0).numpy())
        rles = mask_utils.encode(masks) if count else []
    if "area" in target:
        areas = torch.as_tensor(target["area"]).reshape(-1).tolist()
    elif rles:
        areas = mask_utils.area(rles).tolist()
    else:
        areas = [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes]
    annotations = []
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        ann = {"id": first_id + i, "image_id": image_id, "category_id": int(labels[i]),
               "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(areas[i]), "iscrowd": int(crowd[i])}
        if rles:
            ann["segmentation"] = rles[i]
        if "keypoints" in target:
            points = torch.as_tensor(target["keypoints"])[i]
            if len(points) != len(coco_keypoint_names()):  # COCOeval's per-keypoint tolerances are for COCO's
                raise UserError(f"image {image_id!r} has {len(points)} keypoints an instance; keypoints are scored "
                                f"as COCO's {len(coco_keypoint_names())} person keypoints only")
            ann["keypoints"] = points.flatten().tolist()
            ann["num_keypoints"] = int((points[:, 2] > 0).sum())
        annotations.append(ann)
    return annotations


@dataclass(frozen=True)
class CompactRecords:
    """What samples read, per image in the dataset's order, as NumPy arrays instead of Python objects: the
    pickled (file name, height, width, annotations without crowd regions) in one byte buffer with its offsets,
    the sizes, and the categories of each image's instances (for repeat-factor sampling)."""

    buffer: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    categories: np.ndarray
    category_offsets: np.ndarray

    @classmethod
    def of(cls, coco: COCO, ids: list) -> CompactRecords:
        """The records of the given images of a COCO index."""
        stream, offsets, sizes, categories, counts = io.BytesIO(), [0], [], [], []
        pickler = pickle.Pickler(stream, protocol=pickle.HIGHEST_PROTOCOL)
        with collection_paused():
            for image_id in ids:
                info = coco.imgs[image_id]
                anns = [a for a in coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
                pickler.dump((info["file_name"], info["height"], info["width"], anns))
                pickler.clear_memo()  # each record decodes on its own
                offsets.append(stream.tell())
                sizes.append((info["height"], info["width"]))
                categories += [a["category_id"] for a in anns]
                counts.append(len(anns))
        # The buffer is the stream's own memory (no copy of the largest array); nothing writes to it again.
        return cls(np.frombuffer(stream.getbuffer(), dtype=np.uint8), np.asarray(offsets), np.asarray(sizes),
                   id_array(categories), np.concatenate([[0], np.cumsum(counts)]))

    @staticmethod
    def position(ids: np.ndarray, image_id) -> int:
        """Where an image is in the (sorted) ids."""
        position = int(np.searchsorted(ids, image_id))
        if position == len(ids) or ids[position] != image_id:
            raise KeyError(image_id)
        return position

    def record(self, position: int) -> tuple[str, int, int, list[dict]]:
        return pickle.loads(self.buffer[self.offsets[position]:self.offsets[position + 1]])

    def aspect_ratios(self) -> list[float]:
        return (self.sizes[:, 1] / self.sizes[:, 0]).tolist() if len(self.sizes) else []

    def image_categories(self) -> list[set[int]]:
        starts, ends = self.category_offsets[:-1].tolist(), self.category_offsets[1:].tolist()
        flat = self.categories.tolist()
        return [set(flat[a:b]) for a, b in zip(starts, ends)]


def check_person_keypoints(categories: list[dict], ann_file: Path, needs: str = "--dataset coco_kp") -> None:
    """coco_kp trains and scores COCO's 17 person keypoints (their OKS sigmas are COCO's): one category with
    those keypoints, in that order. needs: what asks for them, as the error says."""
    names = coco_keypoint_names()
    if len(categories) != 1 or tuple(categories[0].get("keypoints", ())) != names:
        found = [(c.get("name"), len(c.get("keypoints", ()))) for c in categories]
        raise UserError(f"{ann_file}: {needs} needs one category with COCO's 17 person keypoints "
                        f"({', '.join(names[:3])}, ...), found (name, keypoints) {found}; use a COCO "
                        f"person_keypoints file or tools/make_coco_dataset.py --keypoints")


def lacking_categories(data: dict, known: set[int]) -> str | None:
    """The categories of a file's instances that are not known, as 'name (id N, K instances), ...', with the
    known id written as the other kind (a string "3" for a number 3) where there is one; categories listed
    without instances do not count (scoring leaves them out)."""
    unknown = {c["id"]: c.get("name", str(c["id"])) for c in data["categories"] if c["id"] not in known}
    counts = Counter(a.get("category_id") for a in data["annotations"] if a.get("category_id") in unknown)
    written = {str(i): i for i in known}

    def other_kind(i: object) -> str:
        there = written.get(str(i))
        return "" if there is None else f"; there id {there!r}, a {'string' if isinstance(there, str) else 'number'}"
    named = [f"{unknown[i]} (id {i!r}, {n} instances{other_kind(i)})" for i, n in sorted(counts.items())]
    return ", ".join(named) or None


def renamed_categories(data: dict, known: dict) -> str | None:
    """The categories of a file's instances whose id is known by another name (known: id -> name), as
    "id N: 'name' here, 'other' there, ..."; a val file exported apart may number the same names otherwise."""
    used = {a.get("category_id") for a in data["annotations"]}
    renamed = [(c["id"], c.get("name"), known[c["id"]]) for c in data["categories"]
               if c["id"] in used and c["id"] in known and c.get("name") != known[c["id"]]]
    return ", ".join(f"id {i}: {here!r} here, {there!r} there" for i, here, there in renamed) or None


def complete_keypoints(anns: list[dict], ann_file: Path) -> None:
    """A keypoint file's instances made what training and COCOeval read, in place: no 'keypoints' becomes none
    labelled, and 'num_keypoints' the count of labelled ones; an array neither can read stops the run."""
    count = len(coco_keypoint_names())
    findings = keypoint_array_findings(anns, count)
    for finding in findings:
        if finding.level == "error":
            raise UserError(f"{ann_file}: {finding.message}")
    if not findings:
        return
    for ann in anns:
        if not ann.get("keypoints"):
            ann["keypoints"] = [0] * (3 * count)
        ann["num_keypoints"] = labelled_keypoints(ann["keypoints"])


# Where a dataset's category map came from, when given: what the error says of it, and the way out.
FROM_CHECKPOINT = ("the checkpoint's categories", "a checkpoint's model knows the categories it was trained on; "
                   "to train on these, fine-tune it with --weights CHECKPOINT in a new --output-dir (its class "
                   "heads start afresh)")
FROM_TRAINING_FILE = ("the training file's categories", "list the same categories, with the same ids and names, "
                      "in both files")


def check_known_categories(coco: COCO, category_map: CategoryMap, ann_file: Path,
                           source: tuple[str, str] = FROM_TRAINING_FILE) -> None:
    """One clear error where a file's instances are of categories the model does not know, or knows by another
    name (their labels would be another category's); source names the map's origin and the way out."""
    known, remedy = source
    if named := lacking_categories(coco.dataset, set(category_map.ids)):
        raise UserError(f"{ann_file} has instances of categories that {known} lack: {named}; {remedy}")
    if renamed := renamed_categories(coco.dataset, dict(zip(category_map.ids, category_map.names))):
        raise UserError(f"{ann_file} names categories otherwise than {known}: {renamed}; {remedy}")


def build_dataset(data_path: str | Path, dataset: str, split: str, transforms,
                  category_map: CategoryMap | None = None, seed: int = 0, masks: bool = True,
                  keep_ids: bool | None = None, paths: tuple[str | None, str | None] = (None, None),
                  categories_from: tuple[str, str] = FROM_TRAINING_FILE) -> CocoDetection:
    """The dataset of one split; its category map comes from the file unless one is given (e.g. from a
    checkpoint), in which case the file must use the same categories. masks=False leaves training masks
    undecoded, for models that do not learn them; keep_ids True makes the file's ids the labels. paths: the
    split's image folder and annotation file where given apart from data_path's layout; categories_from: where
    category_map came from (coco_utils.FROM_CHECKPOINT or FROM_TRAINING_FILE), for the error of a file that
    does not fit it."""
    image_dir, ann_file = split_paths(data_path, dataset, split, *paths)
    coco = load_coco(ann_file)
    if dataset == "coco_kp":
        check_person_keypoints(coco.dataset["categories"], ann_file)
        complete_keypoints(coco.dataset["annotations"], ann_file)
    file_map = CategoryMap.from_categories(coco.dataset["categories"], dataset, keep_ids)
    if category_map is not None:
        check_known_categories(coco, category_map, ann_file, categories_from)
    ds = CocoDetection(image_dir, coco, category_map or file_map, transforms, train=split == "train", seed=seed,
                       masks=masks, keypoints=dataset == "coco_kp")
    if len(ds) == 0 and ds.with_keypoints and split == "train":
        raise UserError(f"{ann_file}: {TOO_FEW_KEYPOINTS}")
    if len(ds) == 0:
        what = "annotated image" if split == "train" else "image"
        raise UserError(f"{ann_file} has no usable {what}; check that 'images' and 'annotations' are filled in")
    if split == "val" and not any(counts_for_scoring(a) for a in coco.dataset["annotations"]):
        raise UserError(f"{ann_file}: {NOTHING_TO_SCORE}")
    if ds.with_masks and not any(has_outline(a, coco.imgs.get(a["image_id"])) for a in coco.dataset["annotations"]):
        raise UserError(f"{ann_file}: {NO_OUTLINES}, and the model learns masks; train a box model such as --model "
                        f"fasterrcnn_resnet50_fpn, or add the outlines")
    return ds


# The names scripts written against torchvision's reference (references/detection/coco_utils.py) call.

REFERENCE_MODES = {"instances": "coco", "person_keypoints": "coco_kp"}


def get_coco(root: str | Path, image_set: str, transforms, mode: str = "instances") -> CocoDetection:
    """The reference's call for a COCO folder's split ('train' or 'val'): build_dataset's dataset, whose
    transforms take this project's samples (a uint8 image tensor and a target of plain tensors: boxes in corners,
    labels, not category ids). Transforms of (image, target) alone, such as the reference's, are called so."""
    if mode not in REFERENCE_MODES:
        raise ValueError(f"mode {mode!r}: give one of {', '.join(REFERENCE_MODES)}")
    if transforms is not None and "generator" not in inspect.signature(transforms).parameters:
        transforms = UnseededTransforms(transforms)
    return build_dataset(root, REFERENCE_MODES[mode], image_set, transforms)


class UnseededTransforms:
    """Transforms of (image, target) alone, called as this project's are (with the sample's generator, which
    they leave aside: their randomness is their own)."""

    def __init__(self, transforms) -> None:
        self.transforms = transforms

    def __call__(self, image, target: dict, generator: torch.Generator | None = None) -> tuple:
        return self.transforms(image, target)


def get_coco_api_from_dataset(dataset: torch.utils.data.Dataset) -> COCO:
    """The ground truth of a dataset as pycocotools' COCO, for coco_eval.CocoEvaluator(coco, iou_types):
    coco_of_samples' index."""
    return coco_of_samples(dataset)[0]


convert_to_coco_api = samples_as_coco

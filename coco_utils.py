"""Read a COCO-format folder into (image, target) samples, and map its category ids to model labels."""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import torch
from PIL import Image
from pycocotools.coco import COCO

from utils import UserError

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
    def from_categories(cls, categories: list[dict], dataset: str) -> CategoryMap:
        ordered = sorted(categories, key=lambda c: c["id"])
        own = {c["id"]: c["name"] for c in ordered}
        keep_ids = dataset == "coco" and own.items() <= coco_category_names().items()
        return cls(tuple(own), tuple(own.values()), keep_ids)

    @property
    def num_classes(self) -> int:
        return 91 if self.keep_ids else len(self.ids) + 1

    def label(self, category_id: int) -> int:
        return category_id if self.keep_ids else self.ids.index(category_id) + 1

    def category_id(self, label: int) -> int:
        return label if self.keep_ids else self.ids[label - 1]

    def name(self, label: int) -> str:
        return dict(zip(self.ids, self.names)).get(self.category_id(label), str(label))

    def as_list(self) -> list[dict]:
        """Plain data for checkpoints: [{'id': ..., 'name': ...}, ...]."""
        return [{"id": i, "name": n} for i, n in zip(self.ids, self.names)]


def split_paths(data_path: str | Path, dataset: str, split: str) -> tuple[Path, Path]:
    """The image folder and annotation file of a split, checked to exist."""
    root = Path(data_path)
    if not root.is_dir():
        raise UserError(f"--data-path {root} is not a folder; point it at a COCO-layout folder "
                        f"(annotations/, train2017/, val2017/) or make one with tools/make_coco_dataset.py")
    image_dir, ann_file = (root / p for p in DATASET_LAYOUTS[dataset][split])
    if not ann_file.is_file():
        raise UserError(f"annotation file {ann_file} is missing; --data-path must hold the COCO layout "
                        f"({DATASET_LAYOUTS[dataset][split][1]} and {DATASET_LAYOUTS[dataset][split][0]}/)")
    if not image_dir.is_dir():
        raise UserError(f"image folder {image_dir} is missing; --data-path must hold the COCO layout")
    return image_dir, ann_file


@dataclass(frozen=True)
class Finding:
    """One problem in a dataset: an error breaks a run, a warning is something the loader repairs or skips."""

    level: str
    kind: str
    message: str


def _duplicates(values: list) -> list:
    seen, repeated = set(), []
    for v in values:
        if v in seen:
            repeated.append(v)
        seen.add(v)
    return repeated


def annotation_findings(data: dict) -> list[Finding]:
    """What is wrong in a COCO instances file's content, errors first (no image file is opened)."""
    errors, warnings = [], []
    for key in ("images", "annotations", "categories"):
        repeated = _duplicates([item.get("id") for item in data[key]])
        if repeated:
            errors.append(Finding("error", f"duplicate {key[:-1]} id",
                                  f"{len(repeated)} {key} reuse an id (first: {repeated[0]})"))
    images = {img["id"]: img for img in data["images"]}
    category_ids = {cat["id"] for cat in data["categories"]}
    annotated = set()
    for ann in data["annotations"]:
        ann_id, image = ann.get("id"), images.get(ann.get("image_id"))
        if image is None:
            errors.append(Finding("error", "unknown image id", f"annotation {ann_id} points at image id "
                                  f"{ann.get('image_id')}, which is not in 'images'"))
            continue
        if ann.get("category_id") not in category_ids:
            errors.append(Finding("error", "unknown category id", f"annotation {ann_id} has category id "
                                  f"{ann.get('category_id')}, which is not in 'categories'"))
            continue
        annotated.add(image["id"])
        where = f"{image.get('file_name')} annotation {ann_id}"
        warnings += _annotation_warnings(ann, image, where)
    empty = [img for img in data["images"] if img["id"] not in annotated]
    if empty:
        warnings.append(Finding("warning", "image without annotations",
                                f"{len(empty)} images have no annotations (first: {empty[0].get('file_name')}); "
                                f"training leaves them out"))
    return errors + warnings


def _annotation_warnings(ann: dict, image: dict, where: str) -> list[Finding]:
    found = []
    bbox = ann.get("bbox", [])
    if len(bbox) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
        found.append(Finding("warning", "box not finite", f"{where}: box {bbox} is not 4 finite numbers"))
    else:
        x, y, w, h = bbox
        if w <= 1 or h <= 1:
            found.append(Finding("warning", "empty box", f"{where}: box {bbox} has no extent"))
        elif x < -1 or y < -1 or x + w > image["width"] + 1 or y + h > image["height"] + 1:
            found.append(Finding("warning", "box outside image", f"{where}: box {bbox} leaves the "
                                 f"{image['width']}x{image['height']} image"))
    segmentation = ann.get("segmentation")
    if ann.get("iscrowd"):
        if not (isinstance(segmentation, dict) and "counts" in segmentation and
                list(segmentation.get("size", [])) == [image["height"], image["width"]]):
            found.append(Finding("warning", "crowd format", f"{where}: crowd region is not RLE of the image's "
                                 f"size; COCO crowd regions are RLE {{'counts', 'size': [h, w]}}"))
    elif isinstance(segmentation, list) and any(len(p) < 6 for p in segmentation):
        found.append(Finding("warning", "polygon under 3 points", f"{where}: polygon with fewer than 3 points"))
    return found


def load_coco(ann_file: Path) -> COCO:
    """A pycocotools COCO index of an annotation file, checked for what every later step relies on."""
    try:
        data = json.loads(ann_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"annotation file {ann_file} is not readable JSON ({e}); re-export or re-download it") from None
    if not isinstance(data, dict):
        raise UserError(f"annotation file {ann_file} holds no COCO object; it must be a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise UserError(f"annotation file {ann_file} has no '{key}' list; a COCO instances file needs "
                            f"'images', 'annotations' and 'categories'")
    for finding in annotation_findings(data):
        if finding.level == "error":
            raise UserError(f"{ann_file}: {finding.message}; fix the file (tools/check_dataset.py lists every "
                            f"problem)")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress we do not want per rank
        coco.createIndex()
    return coco


def _is_trainable(ann: dict) -> bool:
    """Crowd regions and boxes without extent give the model nothing to learn from."""
    x, y, w, h = ann["bbox"]
    return not ann.get("iscrowd", 0) and w > 1 and h > 1


def _labelled_keypoints(anns: list[dict]) -> int:
    return sum(v > 0 for a in anns if not a.get("iscrowd", 0) for v in a.get("keypoints", [])[2::3])


class SampleError(Exception):
    """A sample that cannot be used (missing or unreadable image, size differing from the JSON)."""


def read_rgb(path: Path) -> torch.Tensor:
    """An image file as a uint8 CHW RGB tensor (grayscale and palette images converted)."""
    try:
        with Image.open(path) as img:
            pixels = np.array(img if img.mode == "RGB" else img.convert("RGB"))
    except (OSError, ValueError) as e:
        reason = "missing" if not Path(path).exists() else f"unreadable ({str(e).strip()[:100]})"
        raise SampleError(f"{path}: image {reason}") from None
    return torch.from_numpy(pixels).permute(2, 0, 1)


def instance_masks(anns: list[dict], height: int, width: int) -> torch.Tensor:
    """(N, H, W) uint8 masks of annotations (polygons, or RLE compressed or not), as COCO.annToMask draws
    them, decoded in one call into one buffer."""
    if not anns:
        return torch.zeros((0, height, width), dtype=torch.uint8)
    rles = []
    for ann in anns:
        segmentation = ann["segmentation"]
        if isinstance(segmentation, list):
            rles.append(mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width)))
        elif isinstance(segmentation["counts"], list):
            rles.append(mask_utils.frPyObjects(segmentation, height, width))
        else:
            rles.append(segmentation)
    # decode gives (H, W, N) in column-major order: the (N, H, W) view of it costs nothing, while making it
    # row-major here would cost as much as the decoding; the engine does that on the device (to_device)
    return torch.from_numpy(mask_utils.decode(rles)).permute(2, 0, 1)


def _repaired_annotation(ann: dict, where: str, faults: list[str]) -> dict | None:
    """The annotation with what cannot be drawn removed (None if nothing is left); each repair noted."""
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in ann["bbox"]):
        faults.append(f"{where} annotation {ann['id']}: box {ann['bbox']} is not finite; instance dropped")
        return None
    segmentation = ann["segmentation"]
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6]
        if len(polygons) < len(segmentation):
            faults.append(f"{where} annotation {ann['id']}: polygon with fewer than 3 points removed")
        if not polygons:
            return None
        ann = {**ann, "segmentation": polygons}
    return ann


class CocoDetection(torch.utils.data.Dataset):
    """Samples of (uint8 CHW RGB image, target) from a COCO index; targets hold labels, not category ids.

    With train=True, images without a usable annotation are left out and crowd regions are dropped from the
    targets, as the Mask R-CNN recipe trains; masks are decoded for training when the model learns them
    (masks=True). Evaluation samples carry no masks: scoring reads the annotation file, so decoding them
    would be wasted work (load_target draws them when asked). keypoints=True adds COCO person keypoints.

    A sample that cannot be read is replaced by the next readable one, so batches keep their size;
    target["faults"] says what was skipped or repaired, for the loop to log.
    Random augmentation is seeded by (seed, epoch, index): the same sample gets the same augmentation
    whichever worker loads it and whether or not the run was resumed.
    """

    def __init__(self, image_dir: Path, coco: COCO, category_map: CategoryMap, transforms=None,
                 train: bool = False, seed: int = 0, masks: bool = True, keypoints: bool = False) -> None:
        self.image_dir = Path(image_dir)
        self.coco = coco
        self.category_map = category_map
        self.transforms = transforms
        self.seed = seed
        self.epoch = 0
        self.with_masks = train and masks
        self.with_keypoints = keypoints
        ids = sorted(coco.imgs)
        if train:
            ids = [i for i in ids if any(_is_trainable(a) for a in coco.imgToAnns[i])]
        if train and keypoints:
            ids = [i for i in ids if _labelled_keypoints(coco.imgToAnns[i]) >= MIN_KEYPOINTS_PER_IMAGE]
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def aspect_ratios(self) -> list[float]:
        """Width / height of each sample, from the annotation file (no image is opened)."""
        return [self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] for i in self.ids]

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def load_image(self, image_id: int) -> torch.Tensor:
        path = self.image_path(image_id)
        image = read_rgb(path)
        info = self.coco.imgs[image_id]
        if tuple(image.shape[1:]) != (info["height"], info["width"]):
            raise SampleError(f"{path}: image is {image.shape[2]}x{image.shape[1]} but the JSON says "
                              f"{info['width']}x{info['height']}")
        return image

    def load_target(self, image_id: int, faults: list[str], with_masks: bool = True) -> dict:
        """The image's instances; without masks (evaluation scores against the annotation file, not these)
        the masks are left out, which saves most of the work."""
        info = self.coco.imgs[image_id]
        height, width = info["height"], info["width"]
        where = info["file_name"]
        anns = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        anns = [r for r in (_repaired_annotation(a, where, faults) for a in anns) if r is not None]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(min=0, max=width)
        boxes[:, 1::2].clamp_(min=0, max=height)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        anns = [a for a, k in zip(anns, keep.tolist()) if k]
        masks = instance_masks(anns, height, width) if with_masks else None
        target = {
            "boxes": boxes[keep],
            "labels": torch.tensor([self.category_map.label(a["category_id"]) for a in anns], dtype=torch.int64),
            "image_id": image_id,
            "area": torch.tensor([a["area"] for a in anns], dtype=torch.float32),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
        }
        if masks is not None:
            target["masks"] = masks
        if self.with_keypoints:
            points = [a.get("keypoints") or [0.0] * 3 * len(coco_keypoint_names()) for a in anns]
            target["keypoints"] = torch.tensor(points, dtype=torch.float32).reshape(len(anns), -1, 3)
        return target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        faults: list[str] = []
        for attempt in range(len(self.ids)):
            image_id = self.ids[(index + attempt) % len(self.ids)]
            try:
                image = self.load_image(image_id)
            except SampleError as e:
                faults.append(f"{e}; sample skipped")
                continue
            target = self.load_target(image_id, faults, self.with_masks)
            if self.transforms is not None:
                generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) % 2**63)
                image, target = self.transforms(image, target, generator)
            target["faults"] = faults
            return image, target
        raise UserError(f"no image of {self.image_dir} can be read; check --data-path")


class FaultLog:
    """Prints each per-sample fault once per run, counts the distinct ones of each epoch, and stops the run
    when more than max_share of an epoch's samples could not be read."""

    def __init__(self, max_share: float) -> None:
        self.max_share = max_share
        self.seen: set[str] = set()
        self.epoch_faults: set[str] = set()

    def start_epoch(self) -> None:
        self.epoch_faults = set()

    @property
    def skipped(self) -> int:
        return sum(f.endswith("sample skipped") for f in self.epoch_faults)

    @property
    def repaired(self) -> int:
        return len(self.epoch_faults) - self.skipped

    def add(self, faults: list[str], samples_in_epoch: int) -> None:
        for fault in faults:
            self.epoch_faults.add(fault)
            if fault not in self.seen:
                self.seen.add(fault)
                print(f"data: {fault}", flush=True)
        if self.skipped > self.max_share * samples_in_epoch:
            raise UserError(f"{self.skipped} of {samples_in_epoch} samples could not be read this epoch, more "
                            f"than --max-bad-samples {self.max_share:g} allows; fix the files named above or "
                            f"raise --max-bad-samples")

    def summary(self) -> str:
        return f"{self.skipped} samples skipped, {self.repaired} annotations repaired"


def check_person_keypoints(categories: list[dict], ann_file: Path) -> None:
    """coco_kp trains and scores COCO's 17 person keypoints (their OKS sigmas are COCO's): one category with
    those keypoints, in that order."""
    names = coco_keypoint_names()
    if len(categories) != 1 or tuple(categories[0].get("keypoints", ())) != names:
        found = [(c.get("name"), len(c.get("keypoints", ()))) for c in categories]
        raise UserError(f"{ann_file}: --dataset coco_kp needs one category with COCO's 17 person keypoints "
                        f"({', '.join(names[:3])}, ...), found (name, keypoints) {found}; use a COCO "
                        f"person_keypoints file or tools/make_coco_dataset.py --keypoints")


def build_dataset(data_path: str | Path, dataset: str, split: str, transforms,
                  category_map: CategoryMap | None = None, seed: int = 0, masks: bool = True) -> CocoDetection:
    """The dataset of one split; its category map comes from the file unless one is given (e.g. from a
    checkpoint), in which case the file must use the same categories. masks=False leaves training masks
    undecoded, for models that do not learn them."""
    image_dir, ann_file = split_paths(data_path, dataset, split)
    coco = load_coco(ann_file)
    if dataset == "coco_kp":
        check_person_keypoints(coco.dataset["categories"], ann_file)
    file_map = CategoryMap.from_categories(coco.dataset["categories"], dataset)
    if category_map is not None and set(file_map.ids) - set(category_map.ids):
        raise UserError(f"{ann_file} has categories {sorted(set(file_map.ids) - set(category_map.ids))} that the "
                        f"model was not trained on; evaluate with a matching annotation file")
    ds = CocoDetection(image_dir, coco, category_map or file_map, transforms, train=split == "train", seed=seed,
                       masks=masks, keypoints=dataset == "coco_kp")
    if len(ds) == 0:
        what = "annotated image" if split == "train" else "image"
        raise UserError(f"{ann_file} has no usable {what}; check that 'images' and 'annotations' are filled in")
    return ds

"""Write a COCO-2017-layout instance segmentation dataset of coloured shapes on textured backgrounds.

The result has what real COCO has and what loaders trip over: non-contiguous category ids, polygons and
multi-part polygons, crowd regions stored as uncompressed RLE, images without annotations, grayscale JPEGs
and degenerate boxes. With --keypoints the shapes are stick figures of one category, person, whose 17 joints
are COCO's person keypoints (some occluded, some unlabelled), written as person_keypoints_*.json as well.

    python3 tools/make_coco_dataset.py ./datasets/shapes --train-images 200 --val-images 50 --size 160
    python3 tools/make_coco_dataset.py ./datasets/coco-like --coco-like
    python3 tools/make_coco_dataset.py ./datasets/figures --keypoints
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpoint import write_json_atomic  # noqa: E402
from coco_eval import run_lengths  # noqa: E402
from errors import UserError, exit_status  # noqa: E402

# Ids are spread out on purpose: COCO's own ids have gaps, and code that assumes 1..K breaks on them.
CATEGORIES = [
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 7, "name": "disc", "supercategory": "shape"},
    {"id": 12, "name": "triangle", "supercategory": "shape"},
    {"id": 25, "name": "domino", "supercategory": "shape"},
]
# The same shapes under COCO's own ids and names, for a dataset that COCO-trained tools (91 classes, labels =
# category ids) read as COCO: used to run torchvision's reference beside ours on the same data.
COCO_NAMED = {"square": (72, "tv"), "disc": (37, "sports ball"), "triangle": (38, "kite"), "domino": (84, "book")}

# A figure's joints in COCO's keypoint order, in a frame where the figure spans [-1, 1] both ways; the
# person's left side is drawn on the image's right, as for someone facing the camera.
FIGURE_JOINTS = {
    "nose": (0.0, -0.8), "left_eye": (0.12, -0.9), "right_eye": (-0.12, -0.9), "left_ear": (0.25, -0.82),
    "right_ear": (-0.25, -0.82), "left_shoulder": (0.4, -0.5), "right_shoulder": (-0.4, -0.5),
    "left_elbow": (0.6, -0.15), "right_elbow": (-0.6, -0.15), "left_wrist": (0.75, 0.2),
    "right_wrist": (-0.75, 0.2), "left_hip": (0.25, 0.15), "right_hip": (-0.25, 0.15), "left_knee": (0.3, 0.55),
    "right_knee": (-0.3, 0.55), "left_ankle": (0.35, 0.95), "right_ankle": (-0.35, 0.95),
}
# The silhouette, as joints in drawing order round the figure.
FIGURE_OUTLINE = ["left_eye", "left_ear", "left_shoulder", "left_elbow", "left_wrist", "left_hip", "left_knee",
                  "left_ankle", "right_ankle", "right_knee", "right_hip", "right_wrist", "right_elbow",
                  "right_shoulder", "right_ear", "right_eye"]
# COCO's skeleton: 1-based keypoint index pairs.
SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9], [8, 10],
            [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]
PERSON = {"id": 1, "name": "person", "supercategory": "person", "shape": "figure",
          "keypoints": list(FIGURE_JOINTS), "skeleton": SKELETON}


@dataclass
class DatasetSpec:
    """What to generate; sizes are in pixels, counts per split."""

    train_images: int = 64
    val_images: int = 16
    min_size: int = 160
    max_size: int = 160
    instances: int = 3
    radius: tuple[float, float] = (0.08, 0.2)  # shape size, as a share of the image's short side
    seed: int = 0
    crowd_share: float = 0.1
    empty_share: float = 0.05
    gray_share: float = 0.05
    degenerate_share: float = 0.03
    coco_categories: bool = False
    keypoints: bool = False
    occluded_share: float = 0.1  # keypoints: joints marked occluded (v=1), and as many left unlabelled (v=0)


def _figure_joints(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The joints of an upright figure of half-height r centred at (cx, cy), in COCO's keypoint order."""
    return [(cx + x * r * 0.6, cy + y * r) for x, y in FIGURE_JOINTS.values()]


def _shape_polygons(name: str, cx: float, cy: float, r: float, angle: float) -> list[list[float]]:
    """Polygons (one per part) of a shape of radius r centred at (cx, cy)."""
    if name == "figure":
        joints = dict(zip(FIGURE_JOINTS, _figure_joints(cx, cy, r)))
        return [[v for joint in FIGURE_OUTLINE for v in joints[joint]]]

    def ring(n: int, radius: float, phase: float, center: tuple[float, float]) -> list[float]:
        pts = []
        for k in range(n):
            t = phase + 2 * math.pi * k / n
            pts += [center[0] + radius * math.cos(t), center[1] + radius * math.sin(t)]
        return pts

    if name == "square":
        return [ring(4, r, angle + math.pi / 4, (cx, cy))]
    if name == "disc":
        return [ring(24, r, angle, (cx, cy))]
    if name == "triangle":
        return [ring(3, r, angle - math.pi / 2, (cx, cy))]
    # domino: two squares side by side with a gap, one instance in two parts
    dx, dy = math.cos(angle) * r * 0.55, math.sin(angle) * r * 0.55
    return [ring(4, r * 0.45, angle + math.pi / 4, (cx - dx, cy - dy)),
            ring(4, r * 0.45, angle + math.pi / 4, (cx + dx, cy + dy))]


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth colour field with fine grain, so that shapes are not found by a flat-colour threshold."""
    coarse = rng.uniform(60, 200, size=(4, 5, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.float32)
    grain = rng.normal(0, 12, size=(height, width, 1))
    return Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8))


def _polygon_area_and_bbox(polygons: list[list[float]], width: int, height: int) -> tuple[float, list[float]]:
    rles = mask_utils.frPyObjects(polygons, height, width)
    rle = mask_utils.merge(rles)
    xs = [v for p in polygons for v in p[0::2]]
    ys = [v for p in polygons for v in p[1::2]]
    x0, y0 = max(0.0, min(xs)), max(0.0, min(ys))
    x1, y1 = min(float(width), max(xs)), min(float(height), max(ys))
    return float(mask_utils.area(rle)), [x0, y0, x1 - x0, y1 - y0]


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a 0/1 mask, as evaluation writes detections' masks."""
    runs = run_lengths(torch.tensor(mask, dtype=torch.float32)[None, None])
    return {"counts": runs.counts[0].tolist(), "size": list(runs.size)}


def _place(rng: np.random.Generator, width: int, height: int, radius: float,
           taken: list[tuple[float, float, float]]) -> tuple[float, float] | None:
    """A centre whose disc of the given radius stays inside the image and clear of the shapes already placed."""
    for _ in range(30):
        cx = rng.uniform(radius + 1, width - radius - 1)
        cy = rng.uniform(radius + 1, height - radius - 1)
        if all(math.hypot(cx - x, cy - y) > radius + r + 2 for x, y, r in taken):
            return cx, cy
    return None


def _color(rng: np.random.Generator) -> tuple[int, int, int]:
    c = rng.uniform(0, 255, size=3)
    c[rng.integers(3)] = rng.choice([20.0, 235.0])  # one channel pushed to an extreme keeps shapes visible
    return tuple(int(v) for v in c)


def categories(spec: DatasetSpec) -> list[dict]:
    """The dataset's categories: the shapes' own ids, COCO's ids and names for them, or COCO's person."""
    if spec.keypoints:
        return [PERSON]
    if not spec.coco_categories:
        return CATEGORIES
    return [{"id": COCO_NAMED[c["name"]][0], "name": COCO_NAMED[c["name"]][1], "supercategory": "shape",
             "shape": c["name"]} for c in CATEGORIES]


def make_image(rng: np.random.Generator, spec: DatasetSpec, image_id: int, ann_ids: list[int]
               ) -> tuple[Image.Image, list[dict]]:
    """One generated image and its annotations (ids counted on from ann_ids[0], which it advances)."""
    width = int(rng.integers(spec.min_size, spec.max_size + 1))
    height = int(rng.integers(spec.min_size, spec.max_size + 1))
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    anns: list[dict] = []
    taken: list[tuple[float, float, float]] = []

    def add(category_id: int, segmentation, area: float, bbox: list[float], iscrowd: int,
            keypoints: list[float] | None = None) -> None:
        ann_ids[0] += 1
        anns.append({"id": ann_ids[0], "image_id": image_id, "category_id": category_id,
                     "segmentation": segmentation, "area": area,
                     "bbox": [round(v, 2) for v in bbox], "iscrowd": iscrowd})
        if spec.keypoints:
            keypoints = keypoints or [0] * 3 * len(FIGURE_JOINTS)
            anns[-1].update(keypoints=keypoints, num_keypoints=sum(v > 0 for v in keypoints[2::3]))

    if rng.random() < spec.empty_share:
        return image, anns

    short = min(width, height)
    count = max(1, int(rng.poisson(spec.instances)))
    for _ in range(count):
        radius = float(rng.uniform(*spec.radius) * short)
        center = _place(rng, width, height, radius, taken)
        if center is None:
            continue
        taken.append((center[0], center[1], radius))
        category = categories(spec)[int(rng.integers(len(categories(spec))))]
        polygons = _shape_polygons(category.get("shape", category["name"]), *center, radius,
                                   float(rng.uniform(0, 2 * math.pi)))
        polygons = [[round(v, 2) for v in p] for p in polygons]
        fill = _color(rng)
        for p in polygons:
            draw.polygon(p, fill=fill)
        area, bbox = _polygon_area_and_bbox(polygons, width, height)
        keypoints = _draw_joints(rng, draw, spec, *center, radius) if spec.keypoints else None
        add(category["id"], polygons, area, bbox, 0, keypoints)

    if rng.random() < spec.crowd_share:
        _add_crowd(rng, image, width, height, taken, add, categories(spec))

    if rng.random() < spec.degenerate_share:
        # A zero-height sliver, as real COCO has a few of: loaders must drop it from training targets.
        x, y = float(rng.uniform(1, width / 2)), float(rng.integers(1, height - 1))
        line = [x, y, x + 10.0, y, x + 20.0, y]
        add(categories(spec)[0]["id"], [line], 0.0, [x, y, 20.0, 0.0], 0)
    return image, anns


def _draw_joints(rng: np.random.Generator, draw: ImageDraw.ImageDraw, spec: DatasetSpec, cx: float, cy: float,
                 r: float) -> list[float]:
    """Draw a figure's bones and joints over its silhouette; its COCO keypoints [x, y, v, ...], with some
    joints marked occluded (v=1) and some left unlabelled (v=0, x=y=0)."""
    joints = _figure_joints(cx, cy, r)
    bone = _color(rng)
    for a, b in SKELETON:
        draw.line([joints[a - 1], joints[b - 1]], fill=bone, width=max(1, int(r / 12)))
    keypoints = []
    for x, y in joints:
        draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=(255, 255, 255))
        roll = rng.random()
        if roll < spec.occluded_share:
            keypoints += [0, 0, 0]
        else:
            keypoints += [round(x, 2), round(y, 2), 1 if roll < 2 * spec.occluded_share else 2]
    return keypoints


def _add_crowd(rng: np.random.Generator, image: Image.Image, width: int, height: int,
               taken: list[tuple[float, float, float]], add, category_list: list[dict]) -> None:
    """A cluster of small shapes of one category, annotated as a single crowd region in uncompressed RLE."""
    radius = 0.18 * min(width, height)
    center = _place(rng, width, height, radius, taken)
    if center is None:
        return
    taken.append((center[0], center[1], radius))
    category = category_list[int(rng.integers(len(category_list)))]
    layer = Image.new("L", (width, height), 0)
    layer_draw = ImageDraw.Draw(layer)
    draw = ImageDraw.Draw(image)
    fill = _color(rng)
    for _ in range(6):
        px = center[0] + rng.uniform(-0.6, 0.6) * radius
        py = center[1] + rng.uniform(-0.6, 0.6) * radius
        for p in _shape_polygons(category.get("shape", category["name"]), px, py, radius * 0.3,
                                 float(rng.uniform(0, 6.3))):
            draw.polygon(p, fill=fill)
            layer_draw.polygon(p, fill=1)
    mask = np.asarray(layer, dtype=np.uint8)
    ys, xs = np.nonzero(mask)
    bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
    add(category["id"], _uncompressed_rle(mask), float(mask.sum()), bbox, 1)


DESCRIPTION = "generated shapes"


def _write_split(root: Path, split: str, count: int, spec: DatasetSpec, first_image_id: int) -> dict:
    folder = root / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_ids = [first_image_id * 100]
    for index in range(count):
        rng = np.random.default_rng([spec.seed, 0 if split == "train" else 1, index])
        image_id = first_image_id + index * 7  # gaps, like COCO's ids
        image, anns = make_image(rng, spec, image_id, ann_ids)
        if rng.random() < spec.gray_share:
            image = image.convert("L")
        file_name = f"{image_id:012d}.jpg"
        image.save(folder / file_name, quality=90)
        images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
        annotations += anns
    written = {image["file_name"] for image in images}
    for stale in folder.glob("*.jpg"):  # an earlier, larger dataset's images, which no file would list
        if re.fullmatch(r"\d{12}\.jpg", stale.name) and stale.name not in written:
            stale.unlink()
    return {
        "info": {"description": DESCRIPTION, "version": "1.0", "year": 2017},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories(spec),
    }


def write_json(path: Path, data: dict) -> None:
    """data as JSON at path, atomically (checkpoint.write_atomic): the earlier file or the whole new one, never
    one cut short; a failed write is a UserError naming the file."""
    write_json_atomic(path, data, remedy="free space or allow writing there, or choose another folder, and run this "
                                         "again")


# Written into a dataset's folder before anything else: a folder that has it (or is empty) is this tool's to
# write again; any other would be overwritten (a real COCO linked at datasets/coco has the same file names).
MARKER = ".written_by_make_coco_dataset"


def check_ours_to_write(root: Path) -> None:
    """Refuse a folder that holds anything this tool did not write (UserError)."""
    if not root.exists():
        return
    if not root.is_dir():
        raise UserError(f"{root} is a file; give a folder to write the dataset into")
    # Hidden files and a file system's lost+found do not make a folder anyone's dataset.
    if all(p.name.startswith(".") or p.name == "lost+found" for p in root.iterdir()) or (root / MARKER).is_file():
        return
    try:  # datasets written before the marker: their training file starts with this tool's description
        with open(root / "annotations" / "instances_train2017.json", encoding="utf-8") as f:
            if f'"description": "{DESCRIPTION}"' in f.read(200):
                return
    except OSError:
        pass
    raise UserError(f"{root} holds files this tool did not write (a dataset of yours?), which it would overwrite; "
                    f"give a new or empty folder")


def generate_dataset(root: str | Path, spec: DatasetSpec) -> Path:
    """Write `root/{train2017,val2017}` and `root/annotations/instances_{train,val}2017.json` (with keypoints,
    also `person_keypoints_{train,val}2017.json`), into a folder that is new, empty or this tool's.
    instances_val2017.json is written last, and each JSON atomically, so its presence means a finished dataset
    (tools/demo.py relies on this)."""
    root = Path(root)
    check_ours_to_write(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make {root} ({e.strerror}); choose another folder") from None
    (root / MARKER).touch()
    (root / "annotations").mkdir(exist_ok=True)
    for split, count, first_id in (("train", spec.train_images, 1000), ("val", spec.val_images, 500000)):
        data = _write_split(root, split, count, spec, first_id)
        if spec.keypoints:
            write_json(root / "annotations" / f"person_keypoints_{split}2017.json", data)
            drop = ("keypoints", "num_keypoints", "skeleton", "shape")
            data = {**data, "annotations": [{k: v for k, v in a.items() if k not in drop} for a in data["annotations"]],
                    "categories": [{k: v for k, v in c.items() if k not in drop} for c in data["categories"]]}
        write_json(root / "annotations" / f"instances_{split}2017.json", data)
    return root


def get_args_parser() -> argparse.ArgumentParser:
    """The command line: where to write, how many images, of which sizes and kinds."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="folder to write the dataset into")
    parser.add_argument("--train-images", type=int, default=None,
                        help="images in train2017 (default 64; 500 with --coco-like)")
    parser.add_argument("--val-images", type=int, default=None,
                        help="images in val2017 (default 16; 500 with --coco-like)")
    parser.add_argument("--size", type=int, default=None,
                        help="fixed side length in pixels (default 160; --coco-like varies 440-640)")
    parser.add_argument("--min-size", type=int, default=None, help="smallest side length when sizes vary")
    parser.add_argument("--max-size", type=int, default=None, help="largest side length when sizes vary")
    parser.add_argument("--instances", type=int, default=None,
                        help="mean shapes per image (default 3; 7 with --coco-like)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--coco-categories", action="store_true",
                        help="name the shapes with COCO's ids and names (tv, sports ball, kite, book)")
    parser.add_argument("--keypoints", action="store_true",
                        help="stick figures with COCO's 17 person keypoints (for --dataset coco_kp)")
    parser.add_argument("--coco-like", action="store_true",
                        help="COCO-like defaults for benchmarks: 500 train and 500 val images, sides of 440-640 px "
                             "(as COCO's up to 640), ~7 instances")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)

    spec = DatasetSpec(train_images=500, val_images=500, min_size=440, max_size=640, instances=7) \
        if args.coco_like else DatasetSpec()
    spec.seed = args.seed
    spec.coco_categories = args.coco_categories
    spec.keypoints = args.keypoints
    for flag, value, least in (("--train-images", args.train_images, 1), ("--val-images", args.val_images, 1),
                               ("--instances", args.instances, 1), ("--seed", args.seed, 0)):
        if value is not None and value < least:
            parser.error(f"{flag} {value} must be at least {least}")
    if args.size is not None and (args.min_size is not None or args.max_size is not None):
        parser.error("--size fixes every side; give it, or --min-size and --max-size, not both")
    for field, value in (("train_images", args.train_images), ("val_images", args.val_images),
                         ("min_size", args.size), ("max_size", args.size), ("min_size", args.min_size),
                         ("max_size", args.max_size), ("instances", args.instances)):
        if value is not None:
            setattr(spec, field, value)
    if args.size is not None and args.size < 32:
        parser.error(f"--size {args.size} must be at least 32")
    if spec.min_size > spec.max_size or spec.min_size < 32:
        parser.error("sizes must satisfy 32 <= --min-size <= --max-size")

    def generate() -> None:
        root = generate_dataset(args.root, spec)
        print(f"wrote {spec.train_images} train and {spec.val_images} val images to {root}")

    return exit_status(generate, f"the dataset in {args.root} is not finished; run the command again")


if __name__ == "__main__":
    sys.exit(main())

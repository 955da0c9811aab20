"""Run a trained model on images: pictures with masks, boxes and labels, one COCO-results JSON
(predictions.json) and the images it covers (images.json).

    python3 tools/predict.py --checkpoint output/model_best.pth path/to/images/ --output-dir predictions
    python3 tools/predict.py --weights MaskRCNN_ResNet50_FPN_Weights.COCO_V1 'photos/*.jpg' --score-thresh 0.7
    python3 tools/predict.py --onnx model.onnx photos/    # a model exported by tools/export.py, on onnxruntime

Inputs are image files, folders or glob patterns. Image ids in the JSON come from --annotations (a COCO file
naming the images), else from COCO-style numeric file names (000000000139.jpg is 139), else 1, 2, ... in
file-name order; category ids are the training file's own. predictions.json holds COCO results, which
pycocotools' loadRes reads: per detection a score with, for Mask R-CNN, the model's box and a mask as RLE; for
Keypoint R-CNN, the keypoints (COCO's keypoint results); for box models, the box. A call stopped by Ctrl-C or
SIGTERM writes both files for the images done; one killed outright leaves predictions.partial.jsonl, the
journal of the images done (a line each, written as they are done); --resume continues either.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deploy  # noqa: E402
import speedups  # noqa: E402
from annotations import read_annotation_file  # noqa: E402
from checkpoint import (  # noqa: E402
    load_file,
    prepare_output_dir,
    remove_quietly,
    write_atomic,
    write_json_atomic,
    writing,
)
from coco_eval import to_coco_results  # noqa: E402
from coco_utils import CategoryMap, SampleError, coco_category_names, read_rgb  # noqa: E402
from devices import pick_device  # noqa: E402
from engine import padded_size, same_size_batches, to_device  # noqa: E402
from errors import UserError, exit_status  # noqa: E402
from freed_memory import NOT_KEPT_WARNING, reuse_freed_memory_checked, reuse_wanted  # noqa: E402
from models import (  # noqa: E402
    MODELS,
    build_from_checkpoint,
    build_model,
    check_size_order,
    drop_detections_below,
    iou_types,
    model_options,
)
from utils import counted  # noqa: E402
from visualize import PALETTE, draw_instances, save_jpeg  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
DEFAULT_MODEL = "maskrcnn_resnet50_fpn"


def is_image_file(path: Path) -> bool:
    """A file (not a folder, not a broken link) whose suffix, in any case, is an image format's."""
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def files_under(folder: Path) -> Iterator[Path]:
    """Every file under folder, in subfolders and linked folders too, each real folder walked once (so a link
    to a folder above ends)."""
    walked = set()
    for parent, subfolders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(parent)
        if real in walked:
            subfolders[:] = []
            continue
        walked.add(real)
        yield from (Path(parent, name) for name in files)


def find_images(inputs: list[str], skip: Path | None = None) -> list[Path]:
    """The image files named by paths, folders (and their subfolders, linked ones too) and glob patterns, sorted,
    each once; none from under skip (the output folder, where an earlier run's pictures are)."""
    found: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found |= {p for p in files_under(path) if is_image_file(p)}
        elif path.is_file():
            found.add(path)
        elif matches := glob.glob(item):
            found |= {Path(p) for p in matches if is_image_file(Path(p))}
        else:
            raise UserError(f"{item}: no such file or folder, and no file matches it as a pattern; check the path")
    if not found:
        raise UserError(f"no images found in {' '.join(inputs)}; give image files, folders or glob patterns")
    if skip is not None:
        skipped = skip.resolve()
        found = {p for p in found if skipped not in p.resolve().parents}
        if not found:
            raise UserError(f"every image found lies in --output-dir {skip}, where the pictures go; give another "
                            f"--output-dir")
    return sorted(found)


def first_images(folder: Path, count: int) -> list[Path]:
    """The first count image files under folder, its subfolders walked in name order; a large tree is not listed
    past them."""
    found: list[Path] = []
    for parent, subfolders, files in os.walk(folder):
        subfolders.sort()
        found += [path for path in (Path(parent, name) for name in sorted(files)) if is_image_file(path)]
        if len(found) >= count:
            return found[:count]
    if not found:
        raise UserError(f"no images found in {folder}; give a folder that holds images")
    return found


def listed_image(path: Path, by_name: dict) -> dict | None:
    """The JSON's record of the image whose file_name is the path's longest tail ('imgs/a.jpg' for
    .../val2017/imgs/a.jpg)."""
    parts = path.parts
    return next((by_name[tail] for tail in ("/".join(parts[k:]) for k in range(len(parts))) if tail in by_name),
                None)


def image_records(paths: list[Path], annotations: str | None) -> list[tuple[int, tuple[int, int] | None]]:
    """Each image's (id, size): from --annotations where given, with the JSON's (width, height), which decides
    an EXIF turn as in training; else ids from numeric file names or 1..N, and no size (photos are turned)."""
    if annotations:
        # As the loader finds them: "./a.jpg" and "imgs//a.jpg" name imgs' a.jpg too.
        by_name = {Path(img["file_name"]).as_posix(): img for img in read_annotation_file(Path(annotations))["images"]
                   if isinstance(img.get("file_name"), str)}
        listed = [listed_image(p, by_name) for p in paths]
        missing = [p for p, image in zip(paths, listed) if image is None]
        if missing:
            raise UserError(f"--annotations {annotations} does not list {missing[0]} (as its name, or its path "
                            f"from an image folder); give the matching file")
        return [(image["id"], (image["width"], image["height"]) if "width" in image and "height" in image else None)
                for image in listed]
    if all(p.stem.isdigit() for p in paths) and len({int(p.stem) for p in paths}) == len(paths):
        return [(int(p.stem), None) for p in paths]
    return [(i, None) for i in range(1, len(paths) + 1)]


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, CategoryMap, str]:
    """The model, its categories and its name, from one of train.py's checkpoints or whole-model weights."""
    settings = {"min_size": args.min_size, "max_size": args.max_size,
                "detections_per_image": args.detections_per_image}
    if args.checkpoint:
        checkpoint = load_file(args.checkpoint, "--checkpoint")
        if not isinstance(checkpoint, dict) or "categories" not in checkpoint:
            raise UserError(f"--checkpoint {args.checkpoint} is not a train.py checkpoint; use --weights for "
                            f"plain weights")
        saved = checkpoint["args"]
        settings = {k: saved.get(k) if v is None else v for k, v in settings.items()}
        name = saved.get("model", DEFAULT_MODEL)
        if args.model not in (None, name):
            raise UserError(f"--model {args.model}: --checkpoint {args.checkpoint} holds a {name}; leave --model out")
        # As its run evaluated it: the score thresholds are inference settings of the run (predict then sets the
        # box's by its own --score-thresh; an export keeps the run's).
        options = model_options(name, rpn_score_thresh=saved.get("rpn_score_thresh"),
                                box_score_thresh=saved.get("box_score_thresh"), **settings)
        model = build_from_checkpoint(checkpoint, f"--checkpoint {args.checkpoint}", **options)
        if "model_ema" in checkpoint:
            print(f"--checkpoint {args.checkpoint}: predicting with the weights' moving average (model_ema)")
        return model, CategoryMap.of_checkpoint(checkpoint), name
    name = args.model or DEFAULT_MODEL
    # COCO's categories, as torchvision's COCO weights have them: keypoint models know persons only.
    keypoints = "keypoints" in iou_types(name)
    names = {1: "person"} if keypoints else coco_category_names()
    category_map = CategoryMap.from_categories([{"id": i, "name": n} for i, n in names.items()],
                                               "coco_kp" if keypoints else "coco")
    try:  # the file's class heads must fit: fresh ones would predict at random
        model = build_model(name, category_map.num_classes, args.weights, None, None, new_class_heads=False,
                            categories=category_map, **model_options(name, **settings))
    except UserError as e:
        raise UserError(f"{e}. --weights takes whole-model COCO weights ({category_map.num_classes} classes with "
                        f"background); a checkpoint of train.py goes to --checkpoint") from None
    return model, category_map, name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint written by train.py (model_best.pth, checkpoint.pth)")
    source.add_argument("--weights", help="COCO weights: a torchvision name read from the hub cache, or a .pth")
    source.add_argument("--onnx", help="a model exported by tools/export.py, run by onnxruntime on the CPU")
    parser.add_argument("--model", choices=MODELS, metavar="MODEL",
                        help=f"with --weights: the model ({', '.join(MODELS)}; default {DEFAULT_MODEL})")
    parser.add_argument("--output-dir", default="predictions", help="where pictures and predictions.json go")
    parser.add_argument("--score-thresh", type=float, default=0.5,
                        help="draw and keep detections scoring at least this (default 0.5); a PyTorch model drops "
                             "the others before pasting masks (the same detections, less memory and time)")
    parser.add_argument("--device", default="cuda",
                        help="cuda or cpu (cuda falls back to the CPU; --onnx runs on the CPU)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"images run together, those the model pads to one size (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--min-size", type=int, default=None, help="default: the checkpoint's, else the model's")
    parser.add_argument("--max-size", type=int, default=None, help="default: the checkpoint's, else the model's")
    parser.add_argument("--detections-per-image", type=int, default=None,
                        help="the most detections kept per image; default: the checkpoint's, else the model's (100 "
                             "for R-CNNs); with --onnx, at most the file's (its highest scores)")
    parser.add_argument("--annotations", help="a COCO file whose 'images' give the image ids")
    parser.add_argument("--no-pictures", action="store_true",
                        help="write predictions.json and images.json only, without drawing a picture per image")
    parser.add_argument("--no-labels", action="store_true",
                        help="pictures with masks and boxes only, without each detection's category and score "
                             "(readable where detections are many and small)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted call into the same --output-dir: the images its images.json "
                             "lists keep their detections and are not predicted again")
    parser.add_argument("--no-speedups", action="store_true", help="run torchvision's plain model (as train.py)")
    parser.add_argument("--reuse-freed-memory", action=argparse.BooleanOptionalAction, default=None,
                        help="keep freed memory for the model's next tensors, as train.py does (default: on the CPU)")
    args = parser.parse_args(argv)
    return exit_status(lambda: predict(args), "every file written is whole")


DEFAULT_BATCH_SIZE = 4


def check_args(args: argparse.Namespace) -> None:
    """Flags that would be ignored or fail late, refused before anything loads."""
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} must be at least 1")
    check_sizes_and_score(args)
    if not args.resume:
        refuse_a_killed_calls_journal(Path(args.output_dir))
    if args.no_labels and args.no_pictures:
        raise UserError("--no-labels changes the pictures, which --no-pictures leaves out; give one of them")
    if args.onnx and (args.model or args.min_size or args.max_size):
        raise UserError("--model, --min-size and --max-size were fixed when the ONNX model was exported "
                        "(tools/export.py); leave them out with --onnx")
    if args.onnx and (args.no_speedups or args.batch_size is not None):
        raise UserError("--no-speedups and --batch-size apply to a PyTorch model, and onnxruntime runs the --onnx "
                        "file one image at a time; leave them out with --onnx")
    if args.batch_size is None:
        args.batch_size = 1 if args.onnx else DEFAULT_BATCH_SIZE


def check_sizes_and_score(args: argparse.Namespace) -> None:
    """--min-size, --max-size and --detections-per-image, where given, are at least 1, and --score-thresh a score
    (for export.py too)."""
    for flag in ("min_size", "max_size", "detections_per_image"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} {value} must be at least 1")
    check_size_order(args.min_size, args.max_size)
    if not 0 <= args.score_thresh <= 1:
        raise UserError(f"--score-thresh {args.score_thresh} must be a score between 0 and 1")


def warn_of_earlier_pictures(out: Path, pictures: list[str]) -> None:
    """An earlier call's pictures that this one does not replace would stay beside files that list only this
    call's images: say so (they are left as they are)."""
    if not (out / "images.json").is_file():
        return
    kept = sorted(set(p.name for p in out.glob("*.jpg")) - set(pictures))
    if kept:
        print(f"warning: --output-dir {out} holds {counted(len(kept), 'picture')} of an earlier "
              f"call that this one does not replace (first: {kept[0]}); they stay, and images.json and "
              f"predictions.json will list this call's images only: give a new --output-dir to keep calls apart",
              file=sys.stderr)


def picture_names(paths: list[Path]) -> list[str]:
    """A picture's file name per image: its own stem, numbered from the second image of the same stem on; never
    a name already given (a.png's a_2.jpg beside an a_2.jpg), in any case (for filesystems that ignore it)."""
    taken: set[str] = set()
    names = []
    for path in paths:
        name, number = f"{path.stem}.jpg", 1
        while name.lower() in taken:
            number += 1
            name = f"{path.stem}_{number}.jpg"
        taken.add(name.lower())
        names.append(name)
    return names


def kept_detections(output: dict, category_map: CategoryMap, score_thresh: float) -> tuple[dict, int]:
    """An image's detections at or above score_thresh whose labels are categories, and how many at or above it
    were left out for a label that is no category."""
    above = output["scores"] >= score_thresh
    known = category_map.known(output["labels"])
    return {k: v[above & known] for k, v in output.items()}, int((above & ~known).sum())


@dataclass
class ReadingNotes:
    """What reading the images found, said once the detections are written: why each image left out could not
    be read, the photos turned upright by EXIF for want of a JSON size, and the images of another size than
    --annotations says."""

    unreadable: list[str] = field(default_factory=list)
    turned: list[Path] = field(default_factory=list)
    other_size: list[str] = field(default_factory=list)

    def say(self, annotations: str | None) -> None:
        if self.turned:
            were = "was" if len(self.turned) == 1 else "were"
            remedy = f"give their width and height in {annotations}" if annotations else "give --annotations"
            print(f"note: {counted(len(self.turned), 'image')} {were} turned upright as EXIF asks (first: "
                  f"{self.turned[0]}); the predictions are of the turned pictures, as images.json's sizes are. To "
                  f"read them as a COCO file's sizes say (as training does), {remedy}")
        if self.other_size:
            print(f"warning: {counted(len(self.other_size), 'image')} of another size than --annotations says "
                  f"(first: {self.other_size[0]}): the detections are in the image files' pixels, as images.json's "
                  f"sizes are, and scoring them against the annotations would be off (training refuses such "
                  f"images); give the annotation file of these images", file=sys.stderr)


def readable_images(paths: list[Path], records: list, indices: list[int], notes: ReadingNotes
                    ) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, image) of every image of the given indices that can be read; what reading them found goes into
    notes."""
    for index in indices:
        path, size = paths[index], records[index][1]
        try:
            image = read_rgb(path, size, notes.turned if size is None else None)
        except SampleError as e:
            notes.unreadable.append(str(e))
            continue
        if size is not None and (image.shape[2], image.shape[1]) != size:
            width_by_height = f"{image.shape[2]}x{image.shape[1]} (width x height)"
            notes.other_size.append(f"{path} is {width_by_height}, the JSON says {size[0]}x{size[1]}")
        yield index, image


def load_predictor(args: argparse.Namespace
                   ) -> tuple[torch.nn.Module | deploy.OnnxModel, torch.device, CategoryMap, str]:
    """What predicts, the device it runs on, its categories and its model's name: the ONNX file (categories from
    its metadata; onnxruntime runs on the CPU), or the checkpoint's model with detections below --score-thresh
    dropped before their masks are pasted, and the speed-ups."""
    if args.onnx:
        model = deploy.OnnxModel(args.onnx, args.detections_per_image)
        if model.score_thresh is not None and args.score_thresh < model.score_thresh:
            print(f"note: {args.onnx} keeps detections scoring above {model.score_thresh:g}, its model's threshold "
                  f"when exported, so none under that is written for --score-thresh {args.score_thresh:g}; "
                  f"predict.py --checkpoint gives them")
        return model, torch.device("cpu"), model.category_map, model.name
    device = pick_device(args.device)
    model, category_map, name = load_model(args)
    drop_detections_below(model, args.score_thresh)
    model = speedups.for_inference(model.to(device), device, speedups.SpeedupConfig(enabled=not args.no_speedups))
    return model, device, category_map, name


def predict(args: argparse.Namespace) -> int:
    check_args(args)
    out = Path(args.output_dir)
    paths = find_images(args.inputs, skip=out)
    records = image_records(paths, args.annotations)
    model, device, category_map, name = load_predictor(args)
    prepare_output_dir(out)
    if reuse_wanted(args.reuse_freed_memory, device.type) and not reuse_freed_memory_checked():
        print(NOT_KEPT_WARNING, file=sys.stderr)
    done = begin_call(args, out, paths, records)
    pictures = None if args.no_pictures else picture_names(paths)
    if pictures is not None and not args.resume:
        warn_of_earlier_pictures(out, pictures)
    to_do = [i for i in range(len(paths)) if i not in done.images]
    kind = iou_types(name)[-1]  # masks or keypoints where the model gives them, else boxes
    notes = ReadingNotes()
    dropped = 0
    progress = ProgressLine(len(paths), already=len(done.images))
    try:
        images_read = readable_images(paths, records, to_do, notes)
        for batch in same_size_batches(images_read, args.batch_size, lambda item: padded_size(model, item[1])):
            with torch.inference_mode():
                outputs = model(to_device([image for _, image in batch], [], device)[0])
            for (index, image), output in zip(batch, outputs):
                output, unknown = kept_detections({k: v.cpu() for k, v in output.items()}, category_map,
                                                  args.score_thresh)
                dropped += unknown
                done.add(index, result_records(records[index][0], output, category_map, kind),
                         {"id": records[index][0], "file_name": str(paths[index]), "height": image.shape[-2],
                          "width": image.shape[-1]})
                if pictures is not None:
                    save_jpeg(picture_of(image, output, category_map, not args.no_labels), out / pictures[index])
            progress.show(len(done.images) + len(notes.unreadable))
        progress.show(len(done.images) + len(notes.unreadable), last=True)  # counting unreadable images at the end
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: what was predicted is kept, and --resume goes on from it
        progress.end()
        if not done.images:  # an earlier call's files there stay as they are
            print(f"Stopped before the first image was done: nothing was written to {out}", file=sys.stderr,
                  flush=True)
            raise
        done.write(out)
        print(f"Wrote the detections of the images done, {len(done.images)} of {len(paths)}, to {out}; the same "
              f"command with --resume predicts the others", file=sys.stderr, flush=True)
        raise
    finally:
        progress.end()  # before an error's line too
    report_left_out(notes.unreadable, len(paths), dropped, category_map)
    notes.say(args.annotations)
    detections = done.write(out)
    drawn = f"{counted(len(to_do) - len(notes.unreadable), 'picture')} and " if pictures is not None else ""
    print(f"Wrote {drawn}{counted(detections, 'detection')} of {counted(len(done.images), 'image')} to {out}")
    return 0


def picture_of(image: torch.Tensor, output: dict, category_map: CategoryMap, with_labels: bool = True
               ) -> torch.Tensor:
    """An image with its kept detections drawn: masks, boxes, keypoints, and (with_labels) each one's category
    and score."""
    labels = output["labels"].tolist()
    names = ([f"{category_map.name(i)} {s:.2f}" for i, s in zip(labels, output["scores"].tolist())]
             if with_labels else None)
    return draw_instances(image, output["boxes"], names, output.get("masks"),
                          [PALETTE[i % len(PALETTE)] for i in labels], output.get("keypoints"))


# What decides a call's detections, recorded for a later --resume to compare with: beside the files written, and
# as the first line of the journal (marked so), each with what it describes.
CALL_RECORD = "predict_args.json"
RESULTS = "predictions.json"
SETTINGS_MARK = b"#settings\t"
JOURNAL = "predictions.partial.jsonl"  # a line per image as it is done: what a killed call leaves for --resume
RESULTS_REMEDY = "free space in --output-dir or choose another"
JOURNAL_REMEDY = "free space in --output-dir; the images done are kept, and the same command with --resume goes on"


class Done:
    """The images predicted so far, by their index among the inputs: COCO's "images" entries in memory, and their
    detections in the journal in --output-dir, a line an image (its entry, a tab, its detection count, a tab, its
    detections) written as it is done, after a line of the call's settings. So a call killed outright (out of
    memory, SIGKILL) leaves its work for --resume, and memory does not grow with the detections."""

    def __init__(self, out: Path, settings: dict) -> None:
        self.journal = out / JOURNAL
        self.settings = settings  # what decides the detections (detection_settings)
        self.images: dict[int, dict] = {}
        self._lines: dict[int, int] = {}  # index: where its line starts in the journal
        self._counts: dict[int, int] = {}  # index: its detections
        self._file: BinaryIO | None = None  # opened at the first line: a call that does nothing leaves none

    def continue_journal(self, entries: list[tuple[int, dict, int, int]], end: int) -> None:
        """Take the killed call's journal as it is: its (index, image, count, start) lines, and append after the
        last whole one (end), dropping a line the kill cut short."""
        for index, image, count, start in entries:
            self.images[index], self._counts[index], self._lines[index] = image, count, start
        with writing(self.journal, JOURNAL_REMEDY):
            self._file = open(self.journal, "r+b")  # noqa: SIM115 (open for the whole call)
            self._file.truncate(end)
            self._file.seek(end)
            if end == 0:  # nothing whole in it, not even the settings
                self._write_settings()

    def add(self, index: int, detections: list[dict], image: dict) -> None:
        with writing(self.journal, JOURNAL_REMEDY):
            if self._file is None:
                self._file = open(self.journal, "wb")  # noqa: SIM115 (open for the whole call)
                self._write_settings()
            start = self._file.tell()
            # JSON text holds no raw tab or newline, so a line splits exactly; the detections are copied unparsed.
            self._file.write(f"{json.dumps(image)}\t{len(detections)}\t{json.dumps(detections)}\n".encode())
            self._file.flush()  # a killed process loses none of it (a power cut may, the last few)
        # Only a whole line counts: a Ctrl-C part-way through leaves this image out of the files written.
        self.images[index], self._counts[index], self._lines[index] = image, len(detections), start

    def _write_settings(self) -> None:
        self._file.write(SETTINGS_MARK + json.dumps(self.settings).encode() + b"\n")

    def _copy_detections(self, f: BinaryIO) -> None:
        """Every image's detections from the journal, in input order, as one JSON list."""
        f.write(b"[")
        written = 0
        with open(self.journal, "rb") as journal:
            for index in sorted(self._lines):
                if self._counts[index]:
                    journal.seek(self._lines[index])
                    listed = journal.readline().rstrip(b"\n").split(b"\t", 2)[2]
                    f.write((b", " if written else b"") + listed[1:-1])
                    written += 1
        f.write(b"]")

    def write(self, out: Path) -> int:
        """predictions.json and images.json of the images done, in input order, then no journal; the detections
        written."""
        if self._file is not None:
            self._file.close()
        write_json_atomic(out / CALL_RECORD, self.settings, RESULTS_REMEDY)  # first: the journal is kept till last
        if self._lines:
            write_atomic(out / RESULTS, self._copy_detections, RESULTS_REMEDY)
        else:
            write_json_atomic(out / RESULTS, [], RESULTS_REMEDY)
        write_json_atomic(out / "images.json", [self.images[i] for i in sorted(self.images)], RESULTS_REMEDY)
        remove_quietly(self.journal)
        return sum(self._counts.values())


def refuse_a_killed_calls_journal(out: Path) -> None:
    """A call without --resume would replace the journal a killed call left: refused, so nothing is lost."""
    if (out / JOURNAL).is_file():
        raise UserError(f"--output-dir {out} holds {JOURNAL}, the work of a call that was killed: give --resume to "
                        f"go on from it, or delete the file to start afresh")


def read_journal(journal: Path) -> tuple[dict | None, list[tuple[dict, int, int]], int]:
    """A killed call's journal: its settings (None from a version that wrote none), each whole line's (image
    entry, detection count, start), its detections left unread, and where the last whole line ends (a line the
    kill cut short is predicted again)."""
    settings, entries, start = None, [], 0
    try:
        with open(journal, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.endswith(b"\n"):
                    break
                try:
                    if number == 1 and line.startswith(SETTINGS_MARK):
                        settings = json.loads(line[len(SETTINGS_MARK):])
                        if not isinstance(settings, dict):
                            raise ValueError
                    else:
                        entries.append((*_journal_entry(line), start))
                except ValueError:
                    raise UserError(f"--resume: line {number} of {journal} is not an image's detections as "
                                    f"predict.py writes them; delete the file and leave --resume out to start "
                                    f"afresh") from None
                start += len(line)
    except OSError as e:
        raise UserError(f"--resume: cannot read {journal} ({e.strerror}); leave --resume out to start afresh") from None
    return settings, entries, start


def _journal_entry(line: bytes) -> tuple[dict, int]:
    """A journal line's image entry and detection count; ValueError where it is no such line."""
    image, count, listed = line.split(b"\t", 2)
    image, count = json.loads(image), int(count)
    if not (isinstance(image, dict) and {"id", "file_name"} <= image.keys()
            and listed.startswith(b"[") and listed.endswith(b"]\n")):
        raise ValueError
    return image, count


def earlier_results(done: Done, out: Path, paths: list[Path], records: list) -> Done:
    """--resume: done with the images an earlier call into out predicted (its journal where it was killed, else
    its images.json and predictions.json), by index among this call's inputs; refused where that call's ids are
    not this call's (other inputs, or none)."""
    index_of = {str(path.resolve()): i for i, path in enumerate(paths)}  # the same files, however named

    def index(image: dict, source: Path) -> int:
        found = index_of.get(str(Path(image["file_name"]).resolve()))
        if found is None or records[found][0] != image["id"]:
            raise UserError(f"--resume: {source} lists {image['file_name']} as image {image['id']}, which this "
                            f"call's inputs do not give it; give the interrupted call's inputs, or a new "
                            f"--output-dir without --resume")
        return found

    if done.journal.is_file():
        settings, entries, end = read_journal(done.journal)
        if end:  # a kill within its first line left nothing to compare: not an earlier version's journal
            check_same_settings(settings, done.settings, out)
        done.continue_journal([(index(image, done.journal), image, count, start) for image, count, start in entries],
                              end)
    else:
        if not (out / "images.json").is_file() and not (out / RESULTS).is_file():
            raise UserError(f"--resume: {out} holds no earlier call to continue (no journal, images.json or "
                            f"predictions.json); check --output-dir, or leave --resume out")
        check_same_settings(recorded_settings(out), done.settings, out)
        try:
            images = json.loads((out / "images.json").read_text())
            detections = json.loads((out / RESULTS).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"--resume continues a call whose predictions.json and images.json are in {out}, and "
                            f"they cannot be read ({e}); leave --resume out to start afresh") from None
        by_id: dict[int, list[dict]] = {}
        for detection in detections:
            by_id.setdefault(detection["image_id"], []).append(detection)
        indices = [index(image, out / "images.json") for image in images]  # all checked before a journal is begun
        for found, image in zip(indices, images):
            done.add(found, by_id.get(image["id"], []), image)
    print(f"Resuming: {len(done.images)} of {len(paths)} images were predicted in {out}")
    return done


DETECTION_FLAGS = ("model", "score_thresh", "min_size", "max_size", "detections_per_image")


def detection_settings(args: argparse.Namespace) -> dict:
    """The flags that decide an image's detections, and the model: its file's path, size and modification time
    (a checkpoint written again at the same path is another model), or a torchvision weights name."""
    settings = {flag: getattr(args, flag) for flag in DETECTION_FLAGS}
    source = args.checkpoint or args.onnx or args.weights
    if Path(source).is_file():
        stat = Path(source).stat()
        source = [str(Path(source).resolve()), stat.st_size, stat.st_mtime_ns]
    return {"model_file": source, **settings}


def begin_call(args: argparse.Namespace, out: Path, paths: list[Path], records: list) -> Done:
    """The images done: with --resume, those of the interrupted call, whose detections must have been made as
    this call's will be; else none."""
    done = Done(out, detection_settings(args))
    return earlier_results(done, out, paths, records) if args.resume else done


def recorded_settings(out: Path) -> dict | None:
    """The settings recorded beside the files a call wrote; None where a version before the record wrote them."""
    try:
        earlier = json.loads((out / CALL_RECORD).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"--resume: cannot read {out / CALL_RECORD} ({e}); leave --resume out to start "
                        f"afresh") from None
    if not isinstance(earlier, dict):
        raise UserError(f"--resume: {out / CALL_RECORD} is not a record of predict.py's settings; leave --resume "
                        f"out to start afresh")
    return earlier


def check_same_settings(earlier: dict | None, settings: dict, out: Path) -> None:
    """One clear error where the interrupted call made its detections otherwise (another model, score floor,
    size or count): predictions.json would mix the two. A call of a version that kept no record is taken, said."""
    if earlier is None:
        print(f"note: the interrupted call in {out} recorded no settings (an earlier version of predict.py): "
              f"they are not compared with this call's")
        return
    differ = [key for key in settings if earlier.get(key) != settings[key]]
    if differ:
        said = "; ".join(f"{key.replace('_', '-')} {earlier.get(key)} there, {settings[key]} here" for key in differ)
        raise UserError(f"--resume: the interrupted call in {out} made its detections otherwise ({said}): give its "
                        f"model and flags again, or a new --output-dir without --resume")


def result_records(image_id: int, output: dict, category_map: CategoryMap, kind: str) -> list[dict]:
    """An image's detections as COCO result records of kind; masks keep the model's box, which COCO's loadRes
    would otherwise replace by the box of the mask's pixels (and the file's box AP would not be the model's)."""
    if kind != "segm":
        return to_coco_results(image_id, output, category_map, (kind,))[kind]
    records = to_coco_results(image_id, output, category_map, ("bbox", "segm"))
    for mask, box in zip(records["segm"], records["bbox"]):
        mask["bbox"] = box["bbox"]
    return records["segm"]


class ProgressLine:
    """Images done and the rate: one line rewritten in place on a terminal; in a log, a line for each tenth, and
    at least one every LOG_SECONDS. already: images done by an earlier call (--resume), left out of the rate."""

    LOG_SECONDS = 30.0

    def __init__(self, total: int, on_terminal: bool | None = None, already: int = 0) -> None:
        self.total, self.already, self.started = total, already, time.time()
        self.on_terminal = sys.stdout.isatty() if on_terminal is None else on_terminal
        self.every = max(1, -(-total // 10))  # a tenth, rounded up
        self.printed, self.printed_at = already, self.started  # the count on the last line printed, and when

    def show(self, done: int, last: bool = False) -> None:
        now = time.time()
        text = f"[{done}/{self.total}] {(done - self.already) / max(now - self.started, 1e-9):.1f} img/s"
        if self.on_terminal:
            print(f"\r{text}", end="", flush=True)
        elif done != self.printed and (last or done >= self.printed + self.every
                                       or now - self.printed_at >= self.LOG_SECONDS):
            print(text, flush=True)
            self.printed, self.printed_at = done, now

    def end(self) -> None:
        if self.on_terminal and self.printed is not None:
            print()  # ends the line rewritten in place, once
            self.printed = None


def report_left_out(unreadable: list[str], total: int, dropped: int, category_map: CategoryMap) -> None:
    """Say which images could not be read (an error when none could) and how many detections had no category."""
    if len(unreadable) == total:
        raise UserError(f"none of the {total} images could be read; the first: {unreadable[0]}")
    for why in unreadable:
        print(f"warning: {why}: left out", file=sys.stderr)
    if dropped:
        print(f"{dropped} detections had labels that are no category of the model's ({len(category_map.ids)} "
              f"categories) and were left out")


if __name__ == "__main__":
    sys.exit(main())

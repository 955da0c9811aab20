"""Export a trained detector to ONNX, then check the file against the PyTorch model with onnxruntime.

    python3 tools/export.py --checkpoint output/model_best.pth --output model.onnx
    python3 tools/export.py --weights MaskRCNN_ResNet50_FPN_Weights.COCO_V1 --output maskrcnn.onnx --data-path data/

The ONNX model takes one image, `image`: uint8 (3, H, W) RGB of any height and width (float32 in 0-1 with
--input-dtype float32). The model's own resizing, normalisation and post-processing are inside the graph, so it
returns what torchvision's model returns for that image, in its pixels: boxes (N, 4) x0 y0 x1 y1, labels (N,),
scores (N,), and for Mask R-CNN masks (N, 1, H, W) probabilities pasted at image size, for Keypoint R-CNN
keypoints (N, K, 3) and keypoints_scores (N, K). The category ids and names are in the file's metadata.

The check runs both models on a few images: the export's sample, images of other sizes (the first 3 readable ones
from --data-path where given, an unreadable one left out with a warning, and a generated portrait one) and a blank
one; it says which image of another size had detections and
which had none above --score-thresh (the empty output). It prints the largest differences per image and exits 1
when they are beyond the tolerances it states. The file is written beside --output and moved there only once the
check passes, so a failed check leaves an earlier file as it was.

Limits, with torch 2.14.1 and torchvision 0.29.1: torch's dynamo-based exporter stops at torchvision's NMS
(a shape that depends on the data), so the TorchScript-based exporter is the default (--exporter dynamo tries the
other). One image per call. Images with no detection give empty outputs (masks (0, 1, H, W)), which works,
and so do images on which the model proposes no region. The export is tested for Faster R-CNN, Mask R-CNN and
Keypoint R-CNN; other families are exported when torch can and the check says whether the result holds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deploy  # noqa: E402
import speedups  # noqa: E402
from checkpoint import remove_quietly  # noqa: E402
from coco_utils import SampleError, read_rgb  # noqa: E402
from errors import UserError, exit_status  # noqa: E402
from models import MODELS  # noqa: E402
from tools.make_coco_dataset import DatasetSpec, make_image  # noqa: E402
from tools.predict import check_sizes_and_score, first_images, load_model  # noqa: E402

DATA_IMAGES = 3  # images taken from --data-path
DATA_IMAGES_TRIED = 10  # more images tried there where some cannot be read
BLANK_GRAY = 128
DEFAULT_MODEL = "maskrcnn_resnet50_fpn"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    tol = deploy.TOLERANCES
    epilog = (f"tolerances per matched detection: box coordinates {tol['box']} px, scores {tol['score']}, mask IoU "
              f"at least {tol['mask_iou']} (pixels within {deploy.MASK_BAND} of the 0.5 cut left out), keypoints "
              f"{tol['keypoint']} px")
    parser = argparse.ArgumentParser(description=__doc__, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint written by train.py (model_best.pth, checkpoint.pth)")
    source.add_argument("--weights", help="COCO weights: a torchvision name read from the hub cache, or a .pth")
    parser.add_argument("--model", choices=MODELS, metavar="MODEL",
                        help=f"with --weights: the model ({', '.join(MODELS)}; default {DEFAULT_MODEL})")
    parser.add_argument("--output", default="model.onnx", help="the ONNX file to write")
    parser.add_argument("--min-size", type=int, default=None, help="default: the checkpoint's, else the model's")
    parser.add_argument("--max-size", type=int, default=None, help="default: the checkpoint's, else the model's")
    parser.add_argument("--detections-per-image", type=int, default=None,
                        help="the most detections the exported model keeps per image; default: the checkpoint's, "
                             "else the model's (100 for R-CNNs)")
    parser.add_argument("--input-dtype", default="uint8", choices=("uint8", "float32"),
                        help="what the graph takes: uint8 0-255 (default) or float32 0-1")
    parser.add_argument("--data-path", help="check on images from here too (a COCO-layout root's val2017/, or a "
                                            "folder of images)")
    parser.add_argument("--score-thresh", type=float, default=0.5,
                        help="detections at or above this must match between the two runtimes")
    parser.add_argument("--exporter", default="torchscript", choices=deploy.EXPORTERS,
                        help="torch's exporter; dynamo fails on torchvision's detectors with torch 2.14.1")
    parser.add_argument("--opset", type=int, default=deploy.OPSET, help="ONNX opset (16 or more)")
    parser.add_argument("--benchmark", type=int, default=0, metavar="ROUNDS",
                        help="also time onnxruntime and PyTorch, taking turns, on the sample at the trained size")
    args = parser.parse_args(argv)
    if args.weights and args.model is None:  # left unset with --checkpoint, which names its own model
        args.model = DEFAULT_MODEL
    return args


def trained_size(model: torch.nn.Module) -> tuple[int, int]:
    """(height, width) of a 4:3 landscape image at the size the model resizes to."""
    transform = model.transform
    height = transform.min_size[-1]
    return height, min(round(height * 4 / 3), transform.max_size)


def shapes_image(height: int, width: int, seed: int, keypoints: bool) -> torch.Tensor:
    """A generated image of coloured shapes (stick figures for keypoints), as tools/make_coco_dataset.py draws."""
    side = max(height, width)
    spec = DatasetSpec(min_size=side, max_size=side, crowd_share=0.0, empty_share=0.0, degenerate_share=0.0,
                       keypoints=keypoints)
    image, _ = make_image(np.random.default_rng([seed, 7]), spec, 1, [0])
    return torch.from_numpy(np.asarray(image.crop((0, 0, width, height))).copy()).permute(2, 0, 1)


def data_images(data_path: str) -> list[tuple[str, torch.Tensor]]:
    root = Path(data_path)
    if not root.is_dir():
        raise UserError(f"--data-path {data_path} is not a folder; give a COCO-layout root or a folder of images")
    folder = root / "val2017" if (root / "val2017").is_dir() else root
    images, unreadable = [], []
    # As predict.py: an image that cannot be read is left out with a warning, and the next one taken.
    for path in first_images(folder, DATA_IMAGES + DATA_IMAGES_TRIED):
        try:
            images.append((path.name, read_rgb(path)))
        except SampleError as e:
            unreadable.append(str(e))
            print(f"warning: --data-path: {e}; the check leaves it out", file=sys.stderr)
        if len(images) == DATA_IMAGES:
            break
    if not images:
        raise UserError(f"--data-path: none of the first {len(unreadable)} images in {folder} could be read (the "
                        f"first: {unreadable[0]}); give a folder of readable images")
    return images


def check_images(args: argparse.Namespace, name: str, height: int, width: int) -> list[tuple[str, torch.Tensor]]:
    """The export's sample (at the trained size), images of other sizes, and a blank one, as (label, image)."""
    keypoints = name.startswith("keypointrcnn")
    sample = ("generated (export sample)", shapes_image(height, width, 0, keypoints))
    tall = (round(height * 1.25), round(height * 0.75))  # another size, whatever sizes --data-path's images have
    others = [*(data_images(args.data_path) if args.data_path else []),
              ("generated, portrait", shapes_image(*tall, 1, keypoints))]
    blank = ("blank gray", torch.full((3, round(height * 0.8), height), BLANK_GRAY, dtype=torch.uint8))
    return [sample, *others, blank]


def coverage(comparisons: list[deploy.Comparison]) -> list[str]:
    """Whether the check covered an image of another size than the sample with detections, and one without."""
    sample = comparisons[0].size
    other = next((c for c in comparisons if c.size != sample and c.torch_count > 0), None)
    empty = next((c for c in comparisons if c.torch_count == 0), None)
    lines = [f"checked an image of another size than the export's sample: {other.image} ({other.width_by_height})"
             if other else "note: no image of another size than the sample's had detections to compare"]
    lines.append(f"checked an image without detections above the threshold: {empty.image}" if empty else
                 "note: every image had detections above the threshold; the empty output was not checked")
    return lines


def run_benchmark(model: torch.nn.Module, onnx_model: deploy.OnnxModel, image: torch.Tensor, rounds: int) -> None:
    fast = speedups.for_inference(model, torch.device("cpu"), speedups.SpeedupConfig())
    runs = {"onnxruntime": onnx_model,
            "PyTorch (torchvision's model)": lambda images: model([i.float() / 255 for i in images]),
            "PyTorch (with speedups/)": lambda images: fast([i.float() / 255 for i in images])}
    rates = deploy.benchmark(runs, image, rounds)
    print(f"speed at {image.shape[2]}x{image.shape[1]} (width x height), median of {rounds} rounds taking turns, "
          f"{torch.get_num_threads()} torch threads:")
    base = rates["PyTorch (torchvision's model)"]
    for runtime, rate in rates.items():
        print(f"  {runtime:<30} {rate:8.3g} images/s  {1 / rate:7.2f} s/image  {rate / base:5.2f}x torchvision's")


def check_output(output: Path) -> None:
    """--output names a file that can be written, before minutes of work, not after: in its folder, or where a
    folder that does not exist yet would be made (make_output_folder, once the model is exported)."""
    existing = next(folder for folder in output.parents if folder.exists())
    if not existing.is_dir():
        raise UserError(f"--output {output}: {existing} is a file, not a folder; choose another --output")
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; give a file name such as {output / 'model.onnx'}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"--output {output}: cannot write in {existing} ({e.strerror.lower()}); choose "
                        f"another --output") from None


def make_output_folder(output: Path) -> None:
    """--output's folder, made where it does not exist, as train.py and predict.py make theirs."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output {output}: cannot make {output.parent} ({e.strerror.lower()}); choose "
                        f"another --output") from None


def export_and_check(args: argparse.Namespace) -> int:
    """Export to a temporary file beside --output, check it, and move it into place only if the check passes."""
    output = Path(args.output)
    if args.opset < 16:
        raise UserError(f"--opset {args.opset} is too old for torchvision's RoIAlign; give 16 or more")
    if args.benchmark < 0:
        raise UserError(f"--benchmark {args.benchmark} must be 0 (no timing) or more rounds")
    check_output(output)
    check_sizes_and_score(args)
    for module in ("onnx", "onnxruntime"):  # before minutes of work, not after
        deploy.require(module)
    model, category_map, name = load_model(args)
    model.eval()
    if note := deploy.supported_note(name):
        print(note)
    images = check_images(args, name, *trained_size(model))
    meta = deploy.metadata(name, category_map, model, args.input_dtype, args.exporter)
    sample = images[0][1] if args.input_dtype == "uint8" else images[0][1].float() / 255
    # Same folder, so the final rename is atomic; a file that fails the check never replaces a good one.
    make_output_folder(output)
    unchecked = output.with_name(f".{output.name}.{os.getpid()}.unchecked")
    try:
        seconds = deploy.export(model, name, sample, unchecked, meta, args.exporter, args.opset)
        print(f"exported {name} ({unchecked.stat().st_size / 1e6:.1f} MB) in {seconds:.1f} s with torch "
              f"{torch.__version__}'s {args.exporter} exporter, opset {args.opset}; "
              f"{len(category_map.ids)} categories in its metadata")
        onnx_model = deploy.OnnxModel(unchecked)
        comparisons = deploy.verify(model, onnx_model, images, args.score_thresh)
        print("\n".join(deploy.report(comparisons, args.score_thresh) + coverage(comparisons)))
        if args.benchmark:
            run_benchmark(model, onnx_model, images[0][1], args.benchmark)
        problems = [p for c in comparisons for p in c.problems()]
        if problems:
            kept = "the file there is unchanged" if output.exists() else "nothing was written"
            print(f"error: verification FAILED, so {output} was not written ({kept}): {'; '.join(problems[:3])}; "
                  f"the table above shows where; run the model with PyTorch (tools/predict.py) instead",
                  file=sys.stderr)
            return 1
        try:
            os.replace(unchecked, output)
        except OSError as e:
            raise UserError(f"could not move the checked export to {output}: {e.strerror}; choose another "
                            f"--output") from None
    finally:
        remove_quietly(unchecked)
    print(passed(comparisons, args.score_thresh, output))
    return 0


def passed(comparisons: list[deploy.Comparison], score_thresh: float, output: Path) -> str:
    """The last line of a passed check: what it compared."""
    if not any(c.matched for c in comparisons):
        return (f"verification passed on counts only: no detection at or above --score-thresh {score_thresh:g} on "
                f"any image, so none was compared; wrote {output}; a lower --score-thresh compares detections")
    return f"verification passed: onnxruntime gives PyTorch's detections within the tolerances; wrote {output}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_status(lambda: export_and_check(args), "--output was not written (a file there is unchanged)")


if __name__ == "__main__":
    sys.exit(main())

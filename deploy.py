"""Export a trained detector to ONNX with its own pre- and post-processing inside the graph, run the result with
onnxruntime, and compare it with the PyTorch model. onnx and onnxruntime (requirements-export.txt) are imported
only here and only when used, so training never needs them."""

from __future__ import annotations

import importlib
import io
import json
import re
import time
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.onnx.operators
import torchvision
from torch import nn
from torchvision.ops import box_iou

from checkpoint import write_atomic
from coco_utils import CategoryMap
from errors import UserError
from models import detections_per_image, family, iou_types, score_threshold

# The families whose export is checked by the tests; the others (RetinaNet, FCOS, SSD) are exported when torch can.
TESTED_FAMILIES = "Faster R-CNN, Mask R-CNN and Keypoint R-CNN"
OUTPUTS = {"bbox": ("boxes", "labels", "scores"), "segm": ("masks",), "keypoints": ("keypoints", "keypoints_scores")}
OPSET = 17  # torchvision's RoIAlign (aligned) exports at 16 or more
# The TorchScript-based exporter comes first: with torch 2.14.1 the dynamo-based one (torch.export) stops, after
# minutes, at torchvision's batched_nms, whose output size depends on the data (GuardOnDataDependentSymNode at
# torchvision/ops/boxes.py:86 or :103, seen with Mask and Faster R-CNN; every family runs that NMS). Tracing works
# because torchvision's detection code has ONNX paths of its own (NMS, RoIAlign, mask pasting, keypoint decoding),
# so no graph surgery is needed.
EXPORTERS = ("torchscript", "dynamo")
# Largest differences the verification accepts between onnxruntime and PyTorch, per matched detection.
TOLERANCES = {"box": 0.5, "score": 0.01, "mask_iou": 0.9, "keypoint": 2.0}
MASK_BAND = 0.01  # mask pixels this close to the 0.5 cut are left out of the IoU
MATCH_IOU = 0.5  # boxes of one label overlapping this much are the same detection
INSTALL_HINT = "install the export set: .venv/bin/pip install -r requirements-export.txt -c constraints.txt"


def output_names(name: str) -> tuple[str, ...]:
    """The graph's outputs, in order: boxes, labels, scores, then masks or keypoints where the model gives them."""
    return tuple(out for iou_type in iou_types(name) for out in OUTPUTS[iou_type])


class ImageInGraph(nn.Module):
    """torchvision's model on one CHW image (uint8 0-255 or float 0-1) returning its outputs as a tuple in
    output_names order: what the ONNX graph computes, resizing, normalisation and mask pasting included."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if image.dtype == torch.uint8:  # known when tracing: the graph holds one of the two branches
            image = image.float() / 255
        output = self.model([image])[0]
        return tuple(output[n] for n in self.names)


def traced_resize_size(image: torch.Tensor, min_size: float, max_size: float) -> torch.Tensor:
    """(height, width) as torchvision's eager resize gives them, floor(side x scale) in float64, as graph ops: the
    exporter would otherwise compute the scale in float32, and onnxruntime then makes 1 pixel less of some sizes
    (375x500 to 799x1066 where PyTorch makes 800x1066 at --min-size 800), which moves every detection a little."""
    side = torch.onnx.operators.shape_as_tensor(image)[-2:].to(torch.float64)
    limits = torch.tensor([min_size, max_size], dtype=torch.float64)  # tensors: a Python number becomes float32
    scale = torch.min(limits / torch.stack([side.min(), side.max()]))
    return torch.floor(side * scale).to(torch.int64)


@contextmanager
def exact_resize_while_tracing():
    """torchvision's resize (detection.transform._resize_image_and_masks), made to compute its output size as
    in eager mode while a graph is traced: one of the two changes export makes to torchvision's model (with
    traceable_box_decoding), and only to the graph (eager calls and fixed-size or target-carrying resizes go to
    torchvision's own)."""
    module = torchvision.models.detection.transform
    original = getattr(module, "_resize_image_and_masks", None)
    if original is None:  # a torchvision that resizes otherwise: its own code is traced, as it is
        print("note: this torchvision has no detection.transform._resize_image_and_masks, so the graph resizes "
              "by torchvision's traced code, which can make some image sizes 1 pixel smaller than PyTorch does")
        yield
        return

    def resize(image, self_min_size, self_max_size, target=None, fixed_size=None):
        if not torch.jit.is_tracing() or target is not None or fixed_size is not None:
            return original(image, self_min_size, self_max_size, target, fixed_size)
        size = traced_resize_size(image, float(self_min_size), float(self_max_size))
        return F.interpolate(image[None], size=[size[0], size[1]], mode="bilinear", align_corners=False)[0], None

    module._resize_image_and_masks = resize
    try:
        yield
    finally:
        module._resize_image_and_masks = original


def decode_any_count(box_coder, rel_codes: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
    """torchvision's BoxCoder.decode as graph ops without its branch on whether there are any boxes: traced, that
    branch keeps the sample's case only, and the graph then fails on images of the other (regions proposed on
    one, none on the other, as a barely trained model or --rpn-score-thresh gives)."""
    concat_boxes = torch.cat(boxes, dim=0)
    # (boxes, classes x 4) already, from both of torchvision's callers; the class count is the graph's constant.
    classes = int(rel_codes.shape[-1]) // 4
    return box_coder.decode_single(rel_codes, concat_boxes).reshape(concat_boxes.shape[0], classes, 4)


@contextmanager
def traceable_box_decoding():
    """torchvision's BoxCoder.decode, made to hold for any number of boxes while a graph is traced (eager calls go
    to torchvision's own)."""
    coder = torchvision.models.detection._utils.BoxCoder
    original = coder.decode

    def decode(self, rel_codes, boxes):
        if not torch.jit.is_tracing():
            return original(self, rel_codes, boxes)
        return decode_any_count(self, rel_codes, boxes)

    coder.decode = decode
    try:
        yield
    finally:
        coder.decode = original


def require(module: str):
    """An optional module of the export set, or one line saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{module} is not installed; {INSTALL_HINT}") from None


def _torchscript_proto(wrapper: ImageInGraph, sample: torch.Tensor, opset: int):
    """The graph from torch's TorchScript-based exporter (tracing, with torchvision's own ONNX paths for NMS,
    RoIAlign, mask pasting and keypoint decoding), as an onnx ModelProto."""
    onnx = require("onnx")
    axes = {"image": {1: "height", 2: "width"}, **{n: {0: "detections"} for n in wrapper.names}}
    if "masks" in wrapper.names:
        axes["masks"].update({2: "height", 3: "width"})
    buffer = io.BytesIO()
    # The warnings silenced are the tracer's and deprecations about torchvision's code, not the user's.
    with warnings.catch_warnings(), exact_resize_while_tracing(), traceable_box_decoding():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (sample,), buffer, dynamo=False, opset_version=opset, input_names=["image"],
                          output_names=list(wrapper.names), dynamic_axes=axes)
    return onnx.load_model_from_string(buffer.getvalue())


def _dynamo_proto(wrapper: ImageInGraph, sample: torch.Tensor, opset: int):
    """The graph from torch's torch.export-based exporter, as an onnx ModelProto."""
    require("onnxscript")
    dim = torch.export.Dim.DYNAMIC
    # torch.export prints whole graphs while it tries; the user gets the outcome, in one line if it fails.
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, (sample,), dynamo=True, opset_version=max(opset, 18),
                                    input_names=["image"], output_names=list(wrapper.names),
                                    dynamic_shapes={"image": {1: dim, 2: dim}}, verbose=False)
    return program.model_proto


def _summary(error: Exception) -> str:
    """An exporter's error in one line: torch.onnx's own summary (the error and the line of code that caused it)
    where it wrote one, else the first line."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]
    summary = next((line for line in lines if line.startswith("<class '")), None)
    if summary is None:
        return (lines[0] if lines else type(error).__name__)[:300]
    cause = next((line for line in lines if line.startswith("Caused by:")), "")
    kind, _, message = summary.partition("'>: ")
    return f"{kind.split('.')[-1]}: {message[:200]} {cause}".strip()


def export(model: nn.Module, name: str, sample: torch.Tensor, path: Path, metadata: dict[str, str],
           exporter: str = "torchscript", opset: int = OPSET) -> float:
    """Write model (torchvision's own, in eval mode) to path as ONNX, traced on sample, with metadata; the
    seconds the export took. A failed export is one line naming what is supported."""
    wrapper = ImageInGraph(model.eval(), output_names(name)).eval()
    started = time.perf_counter()
    try:
        with torch.no_grad():
            proto = (_dynamo_proto if exporter == "dynamo" else _torchscript_proto)(wrapper, sample, opset)
    except UserError:
        raise
    except Exception as e:  # the exporters fail in many types; each is the same news for the user
        other = "" if exporter == "torchscript" else "; try --exporter torchscript"
        raise UserError(f"torch {torch.__version__}'s {exporter} exporter could not export {name}: {_summary(e)} "
                        f"(export is tested for {TESTED_FAMILIES}){other}") from None
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    data = proto.SerializeToString()
    write_atomic(path, lambda f: f.write(data), remedy="choose another --output")
    return time.perf_counter() - started


def metadata(name: str, category_map: CategoryMap, model: nn.Module, input_dtype: str, exporter: str
             ) -> dict[str, str]:
    """What travels in the ONNX file: the categories (ids and names, and how labels map to them), the model, its
    sizes and the most detections it keeps per image, the input and outputs, and the versions that made it."""
    transform = getattr(model, "transform", None)
    return {
        "model": name,
        "categories": json.dumps(category_map.as_list()),
        "labels_are_category_ids": json.dumps(category_map.keep_ids),
        "input": f"image: {input_dtype} CHW RGB, {'0-255' if input_dtype == 'uint8' else '0-1'}, any height and "
                 f"width",
        "input_dtype": input_dtype,
        "outputs": json.dumps(output_names(name)),
        "min_size": json.dumps(list(getattr(transform, "min_size", ()))),
        "max_size": json.dumps(getattr(transform, "max_size", None)),
        "detections_per_image": json.dumps(detections_per_image(model)),
        "score_thresh": json.dumps(score_threshold(model)),
        "exporter": f"torch {torch.__version__} {exporter}, torchvision {torchvision.__version__}",
    }


class OnnxRunFailed(UserError):
    """onnxruntime could not run a file on an image: one line, which export's check words as its own failure."""

    def __init__(self, path: str | Path, image: torch.Tensor, cause: str) -> None:
        self.size, self.cause = f"{image.shape[2]}x{image.shape[1]}", cause
        super().__init__(f"onnxruntime could not run {path} on a {self.size} image ({cause}); export the model "
                         f"again with this version's tools/export.py, which checks the file on images with and "
                         f"without detections")


class OnnxModel:
    """An exported model run by onnxruntime on the CPU, called as torchvision's model in eval mode is: a list of
    CHW images (uint8, or float in 0-1) in, a list of dicts of tensors out. Its categories come from the file."""

    def __init__(self, path: str | Path, detections_per_image: int | None = None):
        ort = require("onnxruntime")
        if not Path(path).is_file():
            raise UserError(f"--onnx {path}: no such file; give a file written by tools/export.py")
        options = ort.SessionOptions()
        options.log_severity_level = 4  # a failed run is said once, by run_one's error, not also in onnxruntime's log
        self.path = path
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types for missing, truncated and foreign files
            raise UserError(f"--onnx {path} could not be loaded by onnxruntime ({str(e).strip()[:200]}); give a "
                            f"file written by tools/export.py") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if not {"model", "categories", "input_dtype"} <= meta.keys():
            raise UserError(f"--onnx {path} carries no model and category metadata; export it with tools/export.py")
        self.name = meta["model"]
        self.category_map = CategoryMap.from_categories(json.loads(meta["categories"]), "coco",
                                                        json.loads(meta.get("labels_are_category_ids", "null")))
        self.uint8 = meta["input_dtype"] == "uint8"
        self.names = [o.name for o in self.session.get_outputs()]
        self.keep = self._checked_keep(path, detections_per_image, json.loads(meta.get("detections_per_image", "null")))
        self.score_thresh = json.loads(meta.get("score_thresh", "null"))  # None: an older export, which kept none

    @staticmethod
    def _checked_keep(path: str | Path, wanted: int | None, exported: int | None) -> int | None:
        """How many of an image's detections to keep (None: all): fewer than the file's own cap is a cut of the
        highest scores; more cannot be had without exporting again."""
        if wanted is None:
            return None
        if exported is None:
            raise UserError(f"--detections-per-image {wanted}: --onnx {path} does not record how many detections it "
                            f"keeps (an older export); export it again with tools/export.py")
        if wanted > exported:
            raise UserError(f"--detections-per-image {wanted}: --onnx {path} keeps at most {exported} per image; ask "
                            f"for {exported} or fewer, or export again with tools/export.py --detections-per-image "
                            f"{wanted}")
        return wanted

    def __call__(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [self.run_one(image) for image in images]

    def run_one(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        image = image.cpu()
        if self.uint8 and image.is_floating_point():  # images from a 0-1 pipeline: back to their bytes
            image = image.mul(255).round_().to(torch.uint8)
        elif not self.uint8 and not image.is_floating_point():
            image = image.float().div_(255)
        try:
            outputs = self.session.run(None, {"image": image.contiguous().numpy()})
        except Exception as e:  # onnxruntime's own error types, none of them a RuntimeError
            raise OnnxRunFailed(self.path, image, _summary(e)) from None
        # The outputs come sorted by score, highest first: a cut keeps the best.
        return {n: torch.from_numpy(v)[:self.keep] for n, v in zip(self.names, outputs)}


@dataclass
class Comparison:
    """One image run both ways: its detections at or above the threshold on each side, those of them without a
    counterpart in the other runtime, and the largest differences over the matched pairs (None where none)."""

    image: str
    torch_count: int
    onnx_count: int
    unmatched: int = 0
    matched: int = 0  # pairs with at least one side at or above the threshold: the differences are over these
    at_cut: int = 0  # ones without a counterpart scoring no higher than a full other side's last (tied_at_cut)
    size: tuple[int, int] = (0, 0)  # (height, width), as the image tensor has them
    box: float | None = None
    score: float | None = None
    mask_iou: float | None = None  # the smallest IoU of two matched masks (cut at 0.5)
    keypoint: float | None = None

    @property
    def width_by_height(self) -> str:
        """The size as the dataset check prints sizes: width x height."""
        return f"{self.size[1]}x{self.size[0]}"

    def problems(self) -> list[str]:
        """What is beyond TOLERANCES, in words."""
        found = [f"{self.unmatched} detections without a counterpart"] if self.unmatched else []
        for key, text in (("box", "box coordinates differ by {:.3g} px"), ("score", "scores differ by {:.3g}"),
                          ("keypoint", "keypoints differ by {:.3g} px")):
            value = getattr(self, key)
            if value is not None and value > TOLERANCES[key]:
                found.append(text.format(value) + f" (tolerance {TOLERANCES[key]})")
        if self.mask_iou is not None and self.mask_iou < TOLERANCES["mask_iou"]:
            found.append(f"a mask IoU of {self.mask_iou:.3f} (tolerance {TOLERANCES['mask_iou']})")
        return [f"{self.image}: {p}" for p in found]


def match(a: dict, b: dict) -> list[tuple[int, int]]:
    """Pairs (i, j): each of a's detections, in a's score order, with the one of b not yet taken that has the same
    label and the highest box IoU, where that is at least MATCH_IOU."""
    if not len(a["boxes"]) or not len(b["boxes"]):
        return []
    iou = box_iou(a["boxes"], b["boxes"])
    iou[a["labels"][:, None] != b["labels"][None, :]] = 0
    pairs = []
    for i in a["scores"].argsort(descending=True).tolist():
        j = int(iou[i].argmax())
        if iou[i, j] >= MATCH_IOU:
            pairs.append((i, j))
            iou[:, j] = 0
    return pairs


def mask_iou(expected: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """IoU of masks (N, H, W) cut at 0.5, over the pixels that PyTorch puts at least MASK_BAND away from the cut
    (float rounding alone can put the others on either side); 1 where both are empty."""
    decided = (expected - 0.5).abs() >= MASK_BAND
    e, a = (expected > 0.5) & decided, (actual > 0.5) & decided
    union = (e | a).flatten(1).sum(1)
    return torch.where(union > 0, (e & a).flatten(1).sum(1) / union.clamp(min=1), 1.0)


def tied_at_cut(scores: torch.Tensor, other_scores: torch.Tensor, cap: int | None) -> torch.Tensor:
    """Which of scores are no higher than the other side's last kept score (within the score tolerance) where that
    side holds its full cap of detections: among equal scores either runtime may keep a different one."""
    if cap is None or len(other_scores) < cap or not len(other_scores):
        return torch.zeros_like(scores, dtype=torch.bool)
    return scores <= other_scores.min() + TOLERANCES["score"]


def compare(image: str, expected: dict, actual: dict, score_thresh: float, cap: int | None = None) -> Comparison:
    """PyTorch's output (expected) against onnxruntime's (actual) for one image. Every detection at or above
    score_thresh on either side must have a counterpart (one just under the threshold on the other side counts),
    and the differences are measured over these pairs. Under the threshold, near-equal scores of overlapping
    boxes (a blank image, an untrained model) let float rounding pick other survivors of NMS, so those
    detections are not compared; nor, where a side holds cap detections (the model's most per image), are the
    other side's scoring no higher than its last kept one (within the score tolerance), as float rounding orders
    near-equal scores."""
    above_e, above_a = expected["scores"] >= score_thresh, actual["scores"] >= score_thresh
    pairs = [(i, j) for i, j in match(expected, actual) if above_e[i] or above_a[j]]
    i, j = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).T
    alone_e, alone_a = above_e.clone(), above_a.clone()
    alone_e[i], alone_a[j] = False, False
    cut_e = alone_e & tied_at_cut(expected["scores"], actual["scores"], cap)
    cut_a = alone_a & tied_at_cut(actual["scores"], expected["scores"], cap)
    at_cut = int(cut_e.sum() + cut_a.sum())
    result = Comparison(image, int(above_e.sum()), int(above_a.sum()), int(alone_e.sum() + alone_a.sum()) - at_cut,
                        matched=len(pairs), at_cut=at_cut)
    if not pairs:
        return result
    result.box = (expected["boxes"][i] - actual["boxes"][j]).abs().max().item()
    result.score = (expected["scores"][i] - actual["scores"][j]).abs().max().item()
    if "masks" in expected:
        result.mask_iou = mask_iou(expected["masks"][i, 0], actual["masks"][j, 0]).min().item()
    if "keypoints" in expected:
        result.keypoint = (expected["keypoints"][i, :, :2] - actual["keypoints"][j, :, :2]).abs().max().item()
    return result


def verify(model: nn.Module, onnx_model: OnnxModel, images: list[tuple[str, torch.Tensor]], score_thresh: float
           ) -> list[Comparison]:
    """Each (label, uint8 CHW image) through the PyTorch model and the ONNX one, compared."""
    comparisons = []
    for label, image in images:
        with torch.inference_mode():
            expected = model.eval()([image.float() / 255])[0]
        try:
            actual = onnx_model.run_one(image)
        except OnnxRunFailed as e:
            raise UserError(f"verification FAILED: onnxruntime could not run the exported graph on {label} "
                            f"({e.size}: {e.cause}), so --output was not written; run the model with PyTorch "
                            f"(tools/predict.py) instead") from None
        comparison = compare(label, expected, actual, score_thresh, detections_per_image(model))
        comparison.size = tuple(image.shape[-2:])
        comparisons.append(comparison)
    return comparisons


def _cell(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


def report(comparisons: list[Comparison], score_thresh: float) -> list[str]:
    """The verification as printed: a line per image, then the largest differences against the tolerances."""
    lines = [f"{'image':<26} {'size':>10} {f'>= {score_thresh:g} torch/onnx':>20} {'matched':>7} {'box px':>8} "
             f"{'score':>9} {'mask IoU':>8} {'kpt px':>7}"]
    for c in comparisons:
        lines.append(f"{c.image:<26} {c.width_by_height:>10} {f'{c.torch_count}/{c.onnx_count}':>20} "
                     f"{c.matched:>7} {_cell(c.box, '8.4f')} {_cell(c.score, '9.2e')} {_cell(c.mask_iou, '8.4f')} "
                     f"{_cell(c.keypoint, '7.3f')}")
    largest = {key: [getattr(c, key) for c in comparisons if getattr(c, key) is not None] for key in TOLERANCES}
    parts = [f"box coordinates {max(largest['box']):.4f} px (tolerance {TOLERANCES['box']})"] if largest["box"] else []
    if largest["score"]:
        parts.append(f"scores {max(largest['score']):.2e} ({TOLERANCES['score']})")
    if largest["mask_iou"]:
        parts.append(f"smallest mask IoU {min(largest['mask_iou']):.4f} (at least {TOLERANCES['mask_iou']})")
    if largest["keypoint"]:
        parts.append(f"keypoints {max(largest['keypoint']):.3f} px ({TOLERANCES['keypoint']})")
    lines.append("largest differences: " + (", ".join(parts) if parts else f"none compared: no detection at or above "
                                            f"{score_thresh:g} on any image (a lower --score-thresh compares more)"))
    if at_cut := sum(c.at_cut for c in comparisons):
        lines.append(f"not compared: {at_cut} detections without a counterpart scoring no higher than the other "
                     f"runtime's last kept one (within the score tolerance) where it kept the most detections per "
                     f"image: of near-equal scores either may keep another")
    return lines


def benchmark(runs: dict[str, object], image: torch.Tensor, rounds: int) -> dict[str, float]:
    """Images per second of each runtime (a callable on a list of images) on one image, the runtimes taking
    turns round by round so that a busy machine slows them alike; the median round of each."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for run in runs.values():  # one warm-up each: first-call allocations and kernels' choices
            run([image])
        for _ in range(rounds):
            for name, run in runs.items():
                started = time.perf_counter()
                run([image])
                times[name].append(time.perf_counter() - started)
    return {name: 1.0 / sorted(t)[len(t) // 2] for name, t in times.items()}


def supported_note(name: str) -> str | None:
    """A line about a model family whose export the tests do not check, or None."""
    if family(name) == "rcnn":
        return None
    return (f"note: {name} is exported if torch can; the tests check the export of {TESTED_FAMILIES}, and the "
            f"verification below says whether this one holds")

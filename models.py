"""Build any torchvision detection model by name, reading every weights file from local files only: the torch
hub cache or a path. The models are torchvision's own; speedups/ changes how they run."""

from __future__ import annotations

import inspect
import math
import os
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models._api import WeightsEnum

from checkpoint import load_file, load_model_weights
from coco_utils import CategoryMap
from errors import UserError
from utils import print_once

MODELS = tuple(torchvision.models.list_models(module=torchvision.models.detection))
COCO_CLASSES = 91
DEFAULT_BACKBONE_WEIGHTS = "ResNet50_Weights.IMAGENET1K_V1"
# Which of train.py's model options each family of builders takes; SSD's input size is fixed.
FAMILY_OPTIONS = {
    "rcnn": ("min_size", "max_size", "rpn_score_thresh", "box_batch_size_per_image", "detections_per_image",
             "box_score_thresh"),
    "retinanet": ("min_size", "max_size", "detections_per_image", "box_score_thresh"),
    "fcos": ("min_size", "max_size", "detections_per_image", "box_score_thresh"),
    "ssd": ("detections_per_image", "box_score_thresh"),
}
OPTION_FLAGS = {"min_size": "--min-size", "max_size": "--max-size", "rpn_score_thresh": "--rpn-score-thresh",
                "box_batch_size_per_image": "--rois-per-image", "detections_per_image": "--detections-per-image",
                "box_score_thresh": "--box-score-thresh"}
# The builders' own names for options they spell otherwise, by family.
BUILDER_KEYWORDS = {"rcnn": {"detections_per_image": "box_detections_per_img"},
                    **{one_stage: {"detections_per_image": "detections_per_img", "box_score_thresh": "score_thresh"}
                       for one_stage in ("retinanet", "fcos", "ssd")}}


def model_options(name: str, **options) -> dict:
    """The options given (not None) as builder keyword arguments; one the model does not take is an error."""
    given = {k: v for k, v in options.items() if v is not None}
    for key in given:
        if key not in FAMILY_OPTIONS[family(name)]:
            raise UserError(f"{OPTION_FLAGS[key]} does not apply to --model {name}; leave it out")
    return {BUILDER_KEYWORDS[family(name)].get(key, key): value for key, value in given.items()}


def detections_per_image(model: nn.Module) -> int:
    """The most detections the model keeps per image (torchvision's R-CNNs hold it in their RoI heads)."""
    heads = getattr(model, "roi_heads", model)
    return heads.detections_per_img


def evaluation_settings(model: nn.Module) -> dict:
    """What the model evaluates with, its builder's defaults included: the size images are resized to, the most
    detections it keeps per image, the RPN's score floor (None for a model without an RPN) and the score a
    detection must be above."""
    rpn = getattr(model, "rpn", None)
    return {"min_size": model.transform.min_size[-1], "max_size": model.transform.max_size,
            "detections_per_image": detections_per_image(model),
            "rpn_score_thresh": rpn.score_thresh if rpn is not None else None,
            "box_score_thresh": score_threshold(model)}


def drop_detections_below(model: nn.Module, score: float) -> None:
    """Have the model keep the detections scoring at least score, decided before its NMS, masks and keypoints
    rather than by its caller: above its own threshold, the same detections at or above score (NMS suppresses by
    higher scores, and the cut to the most per image keeps the highest), up to float rounding of an overlap within
    ~1e-3 of NMS's IoU threshold (torchvision's batched NMS offsets boxes by the largest coordinate among its
    candidates), and fewer masks pasted at image size; below it (0.05 for the R-CNNs), lower-scoring ones too."""
    heads = getattr(model, "roi_heads", model)
    # The model keeps scores above its threshold, callers those at score too: the float32 just below it.
    heads.score_thresh = torch.nextafter(torch.tensor(score), torch.tensor(-1.0)).item()


def score_threshold(model: nn.Module) -> float:
    """The lowest score of a detection the model keeps (the R-CNNs keep those above 0.05 unless told)."""
    return float(getattr(model, "roi_heads", model).score_thresh)


def check_size_order(min_size: int | None, max_size: int | None) -> None:
    """Sizes given on one command line with --max-size below --min-size are refused: the resize holds each long
    side to --max-size, so --min-size would do nothing (a checkpoint's saved sizes are not checked: the model
    resizes as they say)."""
    if min_size is not None and max_size is not None and max_size < min_size:
        raise UserError(f"--max-size {max_size} is below --min-size {min_size}: each image's long side would be "
                        f"held to {max_size} px, so no short side reaches {min_size}; give --max-size at least "
                        f"--min-size")


def family(name: str) -> str:
    """rcnn (Faster, Mask and Keypoint R-CNN), retinanet, fcos or ssd (SSD and SSDlite)."""
    return next(f for f in FAMILY_OPTIONS if f in name)


def iou_types(name: str) -> tuple[str, ...]:
    """What a model predicts, as COCOeval names it: boxes always, then masks or keypoints."""
    if name.startswith("maskrcnn"):
        return ("bbox", "segm")
    if name.startswith("keypointrcnn"):
        return ("bbox", "keypoints")
    return ("bbox",)


def iou_types_of(model: nn.Module) -> tuple[str, ...]:
    """iou_types of a built model (in DDP or not), by its heads: boxes always, masks or keypoints where its RoI
    heads predict them."""
    heads = getattr(getattr(model, "module", model), "roi_heads", None)
    if heads is not None and heads.has_mask():
        return ("bbox", "segm")
    if heads is not None and heads.has_keypoint():
        return ("bbox", "keypoints")
    return ("bbox",)


def backbone_weights_class(name: str) -> type[WeightsEnum]:
    """The ImageNet weights enum a model's backbone takes (ResNet50_Weights, VGG16_Weights, ...)."""
    annotation = inspect.signature(torchvision.models.get_model_builder(name)).parameters["weights_backbone"]
    return typing.get_args(annotation.annotation)[0]


def default_backbone_weights(name: str) -> str:
    """The ImageNet weights torchvision's COCO recipes start each model's backbone from."""
    weights_class = backbone_weights_class(name)
    member = "IMAGENET1K_FEATURES" if weights_class.__name__ == "VGG16_Weights" else "IMAGENET1K_V1"
    return f"{weights_class.__name__}.{member}"


def hub_cache_path(url: str) -> Path:
    """Where torch.hub keeps the file of a download address ($TORCH_HOME/hub/checkpoints/<name>)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


# What torchvision.models.get_weight raises for a name that is not of weights ("resnet50.tar" reaches
# issubclass with a function: TypeError).
WEIGHT_NAME_ERRORS = (ValueError, KeyError, AttributeError, TypeError)


def _is_path(spec: str) -> bool:
    """Whether a --weights value names a file rather than a torchvision weights name: a name that looks like a
    path does (so that a missing one is reported as a file), and so does any other existing file (such as
    five.pth.tar) unless torchvision has weights of that name, which a stray file cannot shadow."""
    if Path(spec).suffix in (".pth", ".pt") or os.sep in spec or bool(os.altsep and os.altsep in spec):
        return True
    try:
        torchvision.models.get_weight(spec)
        return False
    except WEIGHT_NAME_ERRORS:
        return Path(spec).expanduser().is_file()


def resolve_weights(spec: str, flag: str, kind: type[WeightsEnum] | None = None) -> Path:
    """The local file behind a torchvision weights enum name (in the hub cache) or a path, checked to exist;
    a name must be of the given kind of weights when one is given."""
    path = Path(spec).expanduser()
    if _is_path(spec):
        if path.is_dir():
            raise UserError(f"{flag} {spec} is a folder; give a .pth file in it")
        if not path.is_file():
            raise UserError(f"{flag} {spec}: no such file; give an existing .pth file or a torchvision "
                            f"weights name such as {DEFAULT_BACKBONE_WEIGHTS}")
        return path
    try:
        weights = torchvision.models.get_weight(spec)
    except WEIGHT_NAME_ERRORS:
        raise UserError(f"{flag} {spec}: neither a file nor a torchvision weights name "
                        f"(for example {DEFAULT_BACKBONE_WEIGHTS})") from None
    if kind is not None and not isinstance(weights, kind):
        raise UserError(f"{flag} {spec} does not fit the model, which takes {kind.__name__} (for example "
                        f"{next(iter(kind))}) or a .pth path")
    path = hub_cache_path(weights.url)
    if not path.is_file():
        from_scratch = f", or use {flag} none to start from random weights" if flag == "--weights-backbone" else ""
        raise UserError(f"{flag} {spec}: {path} is missing and this run does not download. Download "
                        f"{weights.url} into {path.parent}/ (or set TORCH_HOME) or pass a local .pth path to "
                        f"{flag}{from_scratch}")
    return path


def check_weights_name_fits(name: str, weights: str) -> None:
    """A torchvision weights name of another model is one line naming the model it is for (its tensors would
    otherwise be a shape error that sends the user looking at class counts)."""
    if _is_path(weights):
        return
    try:
        enum = torchvision.models.get_weight(weights)
    except WEIGHT_NAME_ERRORS:
        return  # resolve_weights says what it is not
    if isinstance(enum, torchvision.models.get_model_weights(name)):
        return
    owner = next((m for m in MODELS if isinstance(enum, torchvision.models.get_model_weights(m))), None)
    if owner is None:
        raise UserError(f"--weights {weights} are not a whole detection model's weights (backbone weights go to "
                        f"train.py's --weights-backbone)")
    raise UserError(f"--weights {weights} are weights of {owner}, not of --model {name}: give --model {owner}")


def evaluated_state(checkpoint: dict) -> dict:
    """The weights a checkpoint is evaluated and used with: their moving average when it keeps one."""
    return checkpoint["model_ema"]["model"] if "model_ema" in checkpoint else checkpoint["model"]


def _weights_file(path: Path, flag: str) -> tuple[dict, dict | None]:
    """A file's state dict: a plain one, or the weights of one of our checkpoints (their moving average when it
    keeps one); and the whole checkpoint where it is one of ours, with its run's arguments (None for
    torchvision's and other plain weights)."""
    content = load_file(path, flag)
    state = (evaluated_state(content) if "model" in content else content) if isinstance(content, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{flag} {path} holds no state dict of tensors; give a weights file or a checkpoint")
    return state, content if "model" in content and isinstance(content.get("args"), dict) else None


def trained_pretrained(run_args: dict) -> bool:
    """Whether a checkpoint's run built its model with the pretrained layout: as it recorded (layout_of), or
    for older checkpoints and torchvision's reference, whether it started from weights."""
    if "pretrained_layout" in run_args:
        return bool(run_args["pretrained_layout"])
    return bool(run_args.get("weights") or run_args.get("weights_backbone"))


def layout_of(weights: str | None, weights_backbone: str | None, trainable_backbone_layers: int | None
              ) -> tuple[bool, int | None]:
    """The layout build_model gives these flags: whether pretrained, and the trainable backbone stages (None:
    the builder's default). Weights of one of our checkpoints bring its run's layout (stages unless given)."""
    ours = None
    if weights and _is_path(weights):  # only a file can be one of ours: torchvision's named weights are not read
        ours = _weights_file(resolve_weights(weights, "--weights"), "--weights")[1]
    if ours is None:
        return bool(weights or weights_backbone), trainable_backbone_layers
    return _layout_of_run(ours["args"], trainable_backbone_layers)


def _layout_of_run(run_args: dict, trainable_backbone_layers: int | None) -> tuple[bool, int | None]:
    """A checkpoint's run's layout, for weights read from it: pretrained or not, and its trainable stages
    unless given."""
    if trainable_backbone_layers is None:
        trainable_backbone_layers = run_args.get("trainable_backbone_layers")
    return trained_pretrained(run_args), trainable_backbone_layers


@contextmanager
def _weights_read_by(reader: Callable[[WeightsEnum], dict]) -> Iterator[list[WeightsEnum]]:
    """torchvision's builders fetch every weights enum through WeightsEnum.get_state_dict, which downloads when
    the hub cache lacks the file; while this is active they get reader(enum) instead. Yields the list of enums
    read, so the caller can check that the builder did read through it."""
    original = WeightsEnum.get_state_dict
    reads: list[WeightsEnum] = []

    def read(self, *args, **kwargs) -> dict:
        reads.append(self)
        return reader(self)

    WeightsEnum.get_state_dict = read
    try:
        yield reads
    finally:
        WeightsEnum.get_state_dict = original


def _fresh_state(weights: WeightsEnum) -> dict:
    """A state dict of the network a weights enum is for, of the right shapes and no particular values: the
    pretrained layout without reading the file (the weights that matter come from elsewhere). Made on the
    meta device, so no time goes into initialising values that are overwritten."""
    with torch.device("meta"):
        network = torchvision.models.get_model(type(weights).__name__.removesuffix("_Weights").lower())
    return network.to_empty(device="cpu").state_dict()


def _backbone_weights(name: str, weights: str | None, weights_backbone: str | None, pretrained_layout: bool
                      ) -> tuple[WeightsEnum | None, Callable[[WeightsEnum], dict]]:
    """The weights enum to hand torchvision's builder (None: no pretrained layout) and what reading it gives:
    the file --weights-backbone names, or (for a layout whose values come from elsewhere) a fresh state dict."""
    backbone_enum = torchvision.models.get_weight(default_backbone_weights(name))
    if weights is None and weights_backbone is not None:
        source = resolve_weights(weights_backbone, "--weights-backbone", backbone_weights_class(name))
        if not _is_path(weights_backbone):
            backbone_enum = torchvision.models.get_weight(weights_backbone)
        return backbone_enum, lambda _: _weights_file(source, "--weights-backbone")[0]
    if weights is None and not pretrained_layout:
        return None, _fresh_state
    return backbone_enum, _fresh_state


def _run_builder(name: str, backbone_enum: WeightsEnum | None, reader: Callable[[WeightsEnum], dict],
                 weights_backbone: str | None, **kwargs) -> nn.Module:
    """torchvision's builder with weights read by reader; its errors about the flags become one clear line, and
    a builder that bypasses the reader (a backbone file the user named would be ignored) is an error."""
    try:
        with _weights_read_by(reader) as reads:
            model = torchvision.models.get_model(name, weights=None, weights_backbone=backbone_enum, **kwargs)
    except (TypeError, ValueError) as e:
        flag = "--weights-backbone" if "weights" in str(e).lower() else "--trainable-backbone-layers"
        raise UserError(f"{flag} does not fit --model {name}: {str(e).strip().splitlines()[0].strip()}") from None
    except RuntimeError as e:  # the builder's load_state_dict of a backbone file of another layout
        if weights_backbone is None:
            raise
        first_problem = str(e).strip().splitlines()[-1].strip().split(", ")[0]  # the kind and its first key
        raise UserError(f"--weights-backbone {weights_backbone} does not fit the backbone of {name}: "
                        f"{first_problem}") from None
    if weights_backbone is not None and not reads:
        raise UserError(f"torchvision {torchvision.__version__}'s {name} builder did not read its backbone weights "
                        f"through WeightsEnum.get_state_dict, so --weights-backbone {weights_backbone} would be "
                        f"ignored; use the torchvision version in constraints.txt")
    return model


def init_mask_logits(model: nn.Module, num_classes: int) -> bool:
    """Start a Mask R-CNN's fresh mask logits at the scale torchvision gives COCO's 91 classes, whatever the class
    count. torchvision initialises the last mask layer by its fan-out, so the logits' scale grows as 1/sqrt of the
    class count, and a few-class model starts with a far larger mask loss. Nothing changes at 91 classes. Returns
    whether it re-initialised them (it checks that the new scale took)."""
    logits = getattr(getattr(getattr(model, "roi_heads", None), "mask_predictor", None), "mask_fcn_logits", None)
    if not isinstance(logits, nn.Conv2d) or num_classes == COCO_CLASSES:
        return False
    std = math.sqrt(2 / (COCO_CLASSES * logits.kernel_size[0] * logits.kernel_size[1]))  # fan-out of 91 classes
    with torch.no_grad():
        nn.init.normal_(logits.weight, std=std)  # the bias's default scale does not depend on the class count
    if not 0.5 < float(logits.weight.detach().std()) / std < 2:
        raise RuntimeError("the mask logits' new initialisation did not take")
    return True


def build_model(name: str, num_classes: int, weights: str | None, weights_backbone: str | None,
                trainable_backbone_layers: int | None, pretrained_layout: bool = False, mask_init: bool = False,
                new_class_heads: bool = True, categories: CategoryMap | None = None, **model_kwargs) -> nn.Module:
    """A torchvision detection model laid out exactly as its builder lays it out, with weights from local files.

    weights (a whole model: a torchvision name or a path) wins over weights_backbone (ImageNet weights of the
    backbone). A pretrained model gets the builder's pretrained layout (frozen batch norm where it uses it, 3
    trainable backbone stages by default); from scratch, every stage trains. pretrained_layout gives the
    pretrained layout without reading any weights (for a checkpoint that will overwrite them). mask_init starts
    fresh mask logits at a scale that does not depend on the class count (init_mask_logits). new_class_heads
    lets weights whose class heads are of another size start those heads fresh (fine-tuning); without it (to
    predict) that is an error. categories: what the labels name in this run; weights of one of our checkpoints
    trained on categories that they name otherwise are treated as heads of another size.
    """
    if name not in MODELS:
        raise UserError(f"--model {name} is not available; choose from {', '.join(MODELS)}")
    if weights is not None:
        check_weights_name_fits(name, weights)
    state, ours = _weights_file(resolve_weights(weights, "--weights"), "--weights") if weights else (None, None)
    if ours is not None:  # one of our checkpoints: laid out as its run was, from scratch or pretrained
        pretrained, trainable_backbone_layers = _layout_of_run(ours["args"], trainable_backbone_layers)
        backbone_enum, reader = _backbone_weights(name, None, None, pretrained)
    else:
        backbone_enum, reader = _backbone_weights(name, weights, weights_backbone, pretrained_layout)
    kwargs = dict(model_kwargs, num_classes=num_classes)
    if trainable_backbone_layers is not None:
        kwargs["trainable_backbone_layers"] = trainable_backbone_layers
    model = _run_builder(name, backbone_enum, reader, weights_backbone if weights is None else None, **kwargs)
    fresh_heads = True
    if weights is not None:
        other = _other_categories(ours, categories)
        kept_fresh = category_layers(name, num_classes, **model_kwargs) if other and new_class_heads else ()
        fresh = load_model_weights(model, state, f"--weights {weights}", new_class_heads, kept_fresh)
        if other and not new_class_heads:  # heads of the right size (others are refused above, said as such)
            raise UserError(f"--weights {weights} was trained on other categories than this run's ({other}): it "
                            f"would predict them under these names")
        fresh_heads = bool(fresh)
        if fresh:
            print_once(f"--weights {weights}: class heads start fresh for {num_classes} classes ({len(fresh)} "
                       f"tensors)" + (f", as it was trained on other categories ({other})" if other else ""))
    if mask_init and fresh_heads:
        init_mask_logits(model, num_classes)
    return model


def category_layers(name: str, num_classes: int, **model_kwargs) -> set[str]:
    """The tensors of a model whose rows stand for its classes: those whose shapes differ in a copy of one class
    more, built on the meta device (no memory, no weights read)."""
    with torch.device("meta"):
        shapes = [{key: value.shape for key, value in torchvision.models.get_model(
            name, weights=None, weights_backbone=None, **model_kwargs, num_classes=count).state_dict().items()}
            for count in (num_classes, num_classes + 1)]
    return {key for key, shape in shapes[0].items() if shapes[1][key] != shape}


def _other_categories(checkpoint: dict | None, categories: CategoryMap | None) -> str | None:
    """Where one of our checkpoints was trained on categories that its labels name otherwise than categories do
    (the first such label, in words); None where they agree, or either is not known."""
    trained = CategoryMap.of_checkpoint(checkpoint) if checkpoint is not None else None
    return categories.first_other_label(trained) if trained is not None and categories is not None else None


def build_from_checkpoint(checkpoint: dict, source: str, **model_kwargs) -> nn.Module:
    """The model of one of train.py's checkpoints, laid out as its run was, with the weights it is evaluated
    with (no other weights file is read)."""
    saved = checkpoint["args"]
    model = build_model(saved.get("model", "maskrcnn_resnet50_fpn"), checkpoint["num_classes"], None, None,
                        saved.get("trainable_backbone_layers"),
                        pretrained_layout=trained_pretrained(saved), **model_kwargs)
    load_model_weights(model, evaluated_state(checkpoint), source)
    return model

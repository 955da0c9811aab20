"""Build any torchvision detection model by name, reading every weights file from local files only: the torch
hub cache or a path."""

from __future__ import annotations

import inspect
import os
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models._api import WeightsEnum

from anchor_cache import cache_anchors
from checkpoint import load_file
from mask_paste import use_device_paste
from norm_folding import fold_frozen_norms
from sparse_roi_align import use_sparse_roi_align
from utils import UserError

MODELS = tuple(torchvision.models.list_models(module=torchvision.models.detection))
DEFAULT_BACKBONE_WEIGHTS = "ResNet50_Weights.IMAGENET1K_V1"
# The class heads: the only tensors whose shapes depend on the number of classes (or keypoints).
CLASS_HEAD_PREFIXES = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.",
                       "roi_heads.keypoint_predictor.", "head.classification_head.")
# Which of train.py's model options each family of builders takes; SSD's input size is fixed.
FAMILY_OPTIONS = {
    "rcnn": ("min_size", "max_size", "rpn_score_thresh", "box_batch_size_per_image"),
    "retinanet": ("min_size", "max_size"),
    "fcos": ("min_size", "max_size"),
    "ssd": (),
}
OPTION_FLAGS = {"min_size": "--min-size", "max_size": "--max-size", "rpn_score_thresh": "--rpn-score-thresh",
                "box_batch_size_per_image": "--rois-per-image"}


def model_options(name: str, **options) -> dict:
    """The options given (not None) as builder keyword arguments; one the model does not take is an error."""
    given = {k: v for k, v in options.items() if v is not None}
    for key in given:
        if key not in FAMILY_OPTIONS[family(name)]:
            raise UserError(f"{OPTION_FLAGS[key]} does not apply to --model {name}; leave it out")
    return given


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


def _is_path(spec: str) -> bool:
    return Path(spec).suffix in (".pth", ".pt") or os.sep in spec


def resolve_weights(spec: str, flag: str, kind: type[WeightsEnum] | None = None) -> Path:
    """The local file behind a torchvision weights enum name (in the hub cache) or a path, checked to exist;
    a name must be of the given kind of weights when one is given."""
    path = Path(spec).expanduser()
    if _is_path(spec):
        if not path.is_file():
            raise UserError(f"{flag} {spec}: no such file; give an existing .pth file or a torchvision "
                            f"weights name such as {DEFAULT_BACKBONE_WEIGHTS}")
        return path
    try:
        weights = torchvision.models.get_weight(spec)
    except (ValueError, KeyError, AttributeError):
        raise UserError(f"{flag} {spec}: neither a file nor a torchvision weights name "
                        f"(for example {DEFAULT_BACKBONE_WEIGHTS})") from None
    if kind is not None and not isinstance(weights, kind):
        raise UserError(f"{flag} {spec} does not fit the model, which takes {kind.__name__} (for example "
                        f"{next(iter(kind))}) or a .pth path")
    path = hub_cache_path(weights.url)
    if not path.is_file():
        raise UserError(f"{flag} {spec}: {path} is missing and this run does not download. Download "
                        f"{weights.url} into {path.parent}/ (or set TORCH_HOME), pass a local .pth path to "
                        f"{flag}, or use {flag} none to start from random weights")
    return path


def load_model_weights(model: nn.Module, state: dict, source: str, new_class_heads: bool = False) -> list[str]:
    """Load a state dict; any missing, unexpected or differently shaped tensor is an error naming the first.

    With new_class_heads (fine-tuning on other categories), class heads of another size keep their fresh
    values instead, and are named in the result.
    """
    own = model.state_dict()
    reinitialised = []
    for key, value in own.items():
        if key not in state and not key.endswith("num_batches_tracked"):
            raise UserError(f"{source} does not fit this model: it has no tensor {key}; "
                            f"check --model and that the file is a checkpoint of it")
        if key in state and state[key].shape != value.shape:
            if new_class_heads and key.startswith(CLASS_HEAD_PREFIXES):
                reinitialised.append(key)
                continue
            raise UserError(f"{source} does not fit this model: {key} has shape {tuple(state[key].shape)}, the "
                            f"model needs {tuple(value.shape)}; check --model and --num-classes")
    # Frozen batch norm keeps no batch counter, so files saved with ordinary batch norm carry a spare one.
    unexpected = sorted(k for k in set(state) - set(own) if not k.endswith("num_batches_tracked"))
    if unexpected:
        raise UserError(f"{source} does not fit this model: unexpected tensor {unexpected[0]}; check --model")
    model.load_state_dict({k: v for k, v in state.items() if k not in reinitialised}, strict=False)
    return reinitialised


def _state_dict_of(path: Path, flag: str) -> dict:
    """A file's state dict: a plain one, or the 'model' entry of one of our checkpoints."""
    content = load_file(path, flag)
    state = content.get("model", content) if isinstance(content, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{flag} {path} holds no state dict of tensors; give a weights file or a checkpoint")
    return state


@contextmanager
def _weights_read_by(reader: Callable[[WeightsEnum], dict]) -> Iterator[None]:
    """torchvision's builders fetch every weights enum through WeightsEnum.get_state_dict, which downloads when
    the hub cache lacks the file; while this is active they get reader(enum) instead."""
    original = WeightsEnum.get_state_dict
    WeightsEnum.get_state_dict = lambda self, *args, **kwargs: reader(self)
    try:
        yield
    finally:
        WeightsEnum.get_state_dict = original


def _fresh_state(weights: WeightsEnum) -> dict:
    """A state dict of the network a weights enum is for, of the right shapes and no particular values: the
    pretrained layout without reading the file (the weights that matter come from elsewhere). Made on the
    meta device, so no time goes into initialising values that are overwritten."""
    with torch.device("meta"):
        network = torchvision.models.get_model(type(weights).__name__.removesuffix("_Weights").lower())
    return network.to_empty(device="cpu").state_dict()


def build_model(name: str, num_classes: int, weights: str | None, weights_backbone: str | None,
                trainable_backbone_layers: int | None, pretrained_layout: bool = False, **model_kwargs
                ) -> nn.Module:
    """A torchvision detection model laid out exactly as its builder lays it out, with weights from local files.

    weights (a whole model: a torchvision name or a path) wins over weights_backbone (ImageNet weights of the
    backbone). A pretrained model gets the builder's pretrained layout (frozen batch norm where it uses it, 3
    trainable backbone stages by default); from scratch, every stage trains. pretrained_layout gives the
    pretrained layout without reading any weights (for a checkpoint that will overwrite them).
    """
    if name not in MODELS:
        raise UserError(f"--model {name} is not available; choose from {', '.join(MODELS)}")
    backbone_enum = torchvision.models.get_weight(default_backbone_weights(name))
    reader = _fresh_state
    if weights is None and weights_backbone is not None:
        source = resolve_weights(weights_backbone, "--weights-backbone", backbone_weights_class(name))
        if not _is_path(weights_backbone):
            backbone_enum = torchvision.models.get_weight(weights_backbone)

        def reader(_: WeightsEnum) -> dict:
            return _state_dict_of(source, "--weights-backbone")
    elif weights is None and not pretrained_layout:
        backbone_enum = None
    kwargs = dict(model_kwargs, num_classes=num_classes)
    if trainable_backbone_layers is not None:
        kwargs["trainable_backbone_layers"] = trainable_backbone_layers
    try:
        with _weights_read_by(reader):
            model = torchvision.models.get_model(name, weights=None, weights_backbone=backbone_enum, **kwargs)
    except (TypeError, ValueError) as e:
        flag = "--weights-backbone" if "weights" in str(e).lower() else "--trainable-backbone-layers"
        raise UserError(f"{flag} does not fit --model {name}: {str(e).splitlines()[0]}") from None
    except RuntimeError as e:  # the builder's load_state_dict of a backbone file of another layout
        if weights_backbone is None:
            raise
        first_problem = str(e).strip().splitlines()[-1].strip().split(", ")[0]  # the kind and its first key
        raise UserError(f"--weights-backbone {weights_backbone} does not fit the backbone of {name}: "
                        f"{first_problem}") from None
    if weights is not None:
        state = _state_dict_of(resolve_weights(weights, "--weights"), "--weights")
        fresh = load_model_weights(model, state, f"--weights {weights}", new_class_heads=True)
        if fresh:
            print(f"--weights {weights}: class heads start fresh for {num_classes} classes ({len(fresh)} tensors)")
    return use_sparse_roi_align(use_device_paste(contiguous_keypoint_logits(cache_anchors(fold_frozen_norms(model)))))


def _contiguous(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return output.contiguous()


def contiguous_keypoint_logits(model: nn.Module) -> nn.Module:
    """Make a Keypoint R-CNN's heatmap logits contiguous: torchvision's keypoint loss flattens them with view,
    which fails on the channels-last tensors a channels-last model gives."""
    predictor = getattr(getattr(model, "roi_heads", None), "keypoint_predictor", None)
    if predictor is not None:
        predictor.register_forward_hook(_contiguous)
    return model


def build_from_checkpoint(checkpoint: dict, source: str, **model_kwargs) -> nn.Module:
    """The model of one of train.py's checkpoints, laid out as its run was, with the checkpoint's weights
    (no other weights file is read)."""
    saved = checkpoint["args"]
    model = build_model(saved.get("model", "maskrcnn_resnet50_fpn"), checkpoint["num_classes"], None, None,
                        saved.get("trainable_backbone_layers"),
                        pretrained_layout=bool(saved.get("weights") or saved.get("weights_backbone")),
                        **model_kwargs)
    load_model_weights(model, checkpoint["model"], source)
    return model

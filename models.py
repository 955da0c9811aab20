"""Build the detection model and load its weights from local files only: the torch hub cache or a path."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

from checkpoint import load_file
from mask_paste import use_device_paste
from utils import UserError

MODELS = ("maskrcnn_resnet50_fpn",)
DEFAULT_BACKBONE_WEIGHTS = "ResNet50_Weights.IMAGENET1K_V1"
# The class heads: the only tensors whose shapes depend on the number of classes.
CLASS_HEAD_PREFIXES = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")


def hub_cache_path(url: str) -> Path:
    """Where torch.hub keeps the file of a download address ($TORCH_HOME/hub/checkpoints/<name>)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def resolve_weights(spec: str, flag: str) -> Path:
    """The local file behind a torchvision weights enum name (in the hub cache) or a path, checked to exist."""
    path = Path(spec).expanduser()
    if path.suffix in (".pth", ".pt") or os.sep in spec:
        if not path.is_file():
            raise UserError(f"{flag} {spec}: no such file; give an existing .pth file or a torchvision "
                            f"weights name such as {DEFAULT_BACKBONE_WEIGHTS}")
        return path
    try:
        weights = torchvision.models.get_weight(spec)
    except (ValueError, KeyError, AttributeError):
        raise UserError(f"{flag} {spec}: neither a file nor a torchvision weights name "
                        f"(for example {DEFAULT_BACKBONE_WEIGHTS})") from None
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


def build_model(name: str, num_classes: int, weights: str | None, weights_backbone: str | None,
                trainable_backbone_layers: int | None, pretrained_layout: bool = False, **model_kwargs
                ) -> nn.Module:
    """Mask R-CNN with a ResNet-50 FPN backbone, laid out exactly as torchvision's builder lays it out.

    weights (a whole model) wins over weights_backbone (ImageNet ResNet-50); both are read from local files.
    A pretrained backbone gets frozen batch norm and, by default, its 3 last stages trainable; a backbone from
    scratch trains all 5 stages with ordinary batch norm, as torchvision does. pretrained_layout gives the
    pretrained layout without reading any weights (for a checkpoint that will overwrite them).
    """
    if name not in MODELS:
        raise UserError(f"--model {name} is not available; choose from {', '.join(MODELS)}")
    backbone_state = None
    if weights is None and weights_backbone is not None:
        backbone_state = _state_dict_of(resolve_weights(weights_backbone, "--weights-backbone"),
                                        "--weights-backbone")
    pretrained = pretrained_layout or weights is not None or backbone_state is not None
    if trainable_backbone_layers is None:
        trainable_backbone_layers = 3 if pretrained else 5
    if not 0 <= trainable_backbone_layers <= 5:
        raise UserError(f"--trainable-backbone-layers {trainable_backbone_layers} is out of range; use 0 to 5")
    norm_layer = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    resnet = torchvision.models.resnet50(weights=None, norm_layer=norm_layer)
    if backbone_state is not None:
        load_model_weights(resnet, backbone_state, f"--weights-backbone {weights_backbone}")
    backbone = _resnet_fpn_extractor(resnet, trainable_backbone_layers)
    model = use_device_paste(MaskRCNN(backbone, num_classes=num_classes, **model_kwargs))
    if weights is not None:
        state = _state_dict_of(resolve_weights(weights, "--weights"), "--weights")
        fresh = load_model_weights(model, state, f"--weights {weights}", new_class_heads=True)
        if fresh:
            print(f"--weights {weights}: class heads start fresh for {num_classes} classes ({len(fresh)} tensors)")
    return model


def build_from_checkpoint(checkpoint: dict, source: str, **model_kwargs) -> nn.Module:
    """The model of one of train.py's checkpoints, laid out as its run was, with the checkpoint's weights
    (no other weights file is read)."""
    saved = checkpoint["args"]
    model = build_model(saved.get("model", MODELS[0]), checkpoint["num_classes"], None, None,
                        saved.get("trainable_backbone_layers"),
                        pretrained_layout=bool(saved.get("weights") or saved.get("weights_backbone")),
                        **model_kwargs)
    load_model_weights(model, checkpoint["model"], source)
    return model

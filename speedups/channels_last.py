"""Convolutions in the channels-last memory format.

What it changes: the model's 4-D parameters and buffers are laid out channels-last, so the convolutions run in
that layout (oneDNN's own on CPUs, where it is faster; on GPUs it depends on the precision, so it is off there
by default). Keypoint R-CNN's heatmap logits are made contiguous again after the predictor, because
torchvision's keypoint loss flattens them with `view`, which a channels-last tensor does not allow.
"""

from __future__ import annotations

import torch
from torch import nn


def _contiguous(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return output.contiguous()


def to_channels_last(model: nn.Module) -> nn.Module:
    """Lay model out channels-last, in place; returns it."""
    model.to(memory_format=torch.channels_last)
    predictor = getattr(getattr(model, "roi_heads", None), "keypoint_predictor", None)
    if predictor is not None:
        predictor.register_forward_hook(_contiguous)
    return model


def self_check() -> str | None:
    """Nothing of torchvision's is relied on beyond modules being ordinary torch modules."""
    return None

"""Pad training batches and region batches to a few sizes, so that the convolutions see shapes they have seen.

What it changes: cuDNN builds an execution plan for every new input shape of a convolution, which costs far more
host time than running it. Images of assorted sizes give almost every training batch a new shape (the model pads
each batch only to a multiple of 32), and the mask head sees a new number of regions every step. Here each side
of a training batch is padded further, to the next rung of a ladder of sizes (min_size x 1.125^k, rounded up to
32), and the regions given to a mask or keypoint head to a multiple of 32, so a few dozen shapes recur. Each
region is computed on its own, so the region padding changes numbers by float rounding at most (cuDNN may pick
other kernels for another batch size), and it stays on in evaluation; a head with batch norm, whose training
statistics would count the empty regions, is padded in evaluation only. The image padding changes features near
the right and bottom edges, as any padding does, and adds up to one rung (12.5%) of pixels per side, so
evaluation keeps the model's own padding. GPUs only by default: on a CPU the padding is only extra arithmetic.
It relies on the transform's forward giving (ImageList, targets) and on the heads' module names; `self_check`
verifies the first on a small transform.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.image_list import ImageList

RUNG_RATIO = 1.125
SIZE_MULTIPLE = 32
REGION_MULTIPLE = 32


def _round_up(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple)) * multiple


def bucket_length(length: int, anchor: int, cap: int) -> int:
    """The padded length of a batch side of length pixels: the smallest rung >= length of the ladder
    anchor x 1.125^k (each rung rounded up to 32), at most cap (the largest side the model's resize gives,
    padded), and never less than length."""
    k = math.floor(math.log(max(length, 1) / anchor, RUNG_RATIO)) - 1
    while _round_up(anchor * RUNG_RATIO**k, SIZE_MULTIPLE) < length:
        k += 1
    return max(length, min(_round_up(anchor * RUNG_RATIO**k, SIZE_MULTIPLE), cap))


class BatchPadding:
    """A forward hook for the model's transform: in training, pads its batched images on the right and bottom
    to the ladder's sizes (the image sizes it reports stay the images' own)."""

    def __init__(self, anchor: int, cap: int) -> None:
        self.anchor = anchor
        self.cap = cap

    def __call__(self, module: nn.Module, inputs, output: tuple[ImageList, list | None]):
        if not module.training:
            return output
        images, targets = output
        height, width = images.tensors.shape[-2:]
        padded_height = bucket_length(height, self.anchor, self.cap)
        padded_width = bucket_length(width, self.anchor, self.cap)
        if (padded_height, padded_width) == (height, width):
            return output
        tensors = F.pad(images.tensors, (0, padded_width - width, 0, padded_height - height))
        return ImageList(tensors, images.image_sizes), targets


class RegionPadding:
    """Hooks around a region head and its predictor: the head's input is padded with empty regions to a
    multiple of 32 and the predictor's output cut back to the regions given. Not in training for a head
    with batch norm, whose batch statistics would count the empty regions."""

    def __init__(self, batch_statistics: bool = False) -> None:
        self.batch_statistics = batch_statistics
        self.regions = 0

    def pad(self, module: nn.Module, inputs: tuple[torch.Tensor]) -> tuple[torch.Tensor] | None:
        (features,) = inputs
        self.regions = len(features)
        if self.batch_statistics and module.training:
            return None
        padded = features.new_zeros((_round_up(max(self.regions, 1), REGION_MULTIPLE), *features.shape[1:]))
        # In the features' own memory layout: a channels-last model's convolutions would otherwise convert it.
        if features.dim() == 4 and not features.is_contiguous() and features.is_contiguous(
                memory_format=torch.channels_last):
            padded = padded.contiguous(memory_format=torch.channels_last)
        padded[:self.regions] = features
        return (padded,)

    def cut(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return output[:self.regions]


def self_check() -> str | None:
    """None when torchvision's transform gives (ImageList, targets) with the settings the ladder reads."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    transform = GeneralizedRCNNTransform(64, 96, [0.5] * 3, [0.2] * 3)
    try:
        images, targets = transform([torch.zeros(3, 40, 50)])
        settings = (transform.min_size, transform.max_size, transform.fixed_size)
    except (AttributeError, TypeError, ValueError) as e:
        return f"torchvision's GeneralizedRCNNTransform changed ({type(e).__name__}: {e})"
    if not isinstance(images, ImageList) or targets is not None or not isinstance(settings[0], (tuple, list)):
        return "torchvision's GeneralizedRCNNTransform no longer gives (ImageList, targets)"
    return None


def pad_to_shape_buckets(model: nn.Module) -> nn.Module:
    """Pad model's training image batches (unless its images have a fixed size, as SSD's) and the regions of
    its mask and keypoint heads to recurring sizes, with hooks: no parameter, buffer or state-dict key
    changes."""
    transform = model.transform
    if transform.fixed_size is None:
        cap = _round_up(transform.max_size, SIZE_MULTIPLE)
        transform.register_forward_hook(BatchPadding(max(transform.min_size), cap))
    roi_heads = getattr(model, "roi_heads", None)
    if roi_heads is not None:
        pad_head_regions(roi_heads)
    return model


def pad_head_regions(roi_heads: nn.Module) -> None:
    """Hooks that pad the regions given to roi_heads' mask and keypoint heads (those it has) with empty ones after
    them, and cut their predictors' outputs back to the regions given."""
    for kind in ("mask", "keypoint"):
        head = getattr(roi_heads, f"{kind}_head", None)
        if head is not None:
            padding = RegionPadding(any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in head.modules()))
            head.register_forward_pre_hook(padding.pad)
            getattr(roi_heads, f"{kind}_predictor").register_forward_hook(padding.cut)

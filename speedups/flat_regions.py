"""The box head of the inference copy reads channels-last regions as they are.

What it changes: torchvision's box heads flatten each region in (channel, row, column) order before their first
fully connected layer (TwoMLPHead's fc6 in v1 R-CNNs, the Linear after FastRCNNConvFCHead's convolutions in v2).
The sparse RoIAlign's regions, and convolutions of them, are channels-last, so that flatten copies every region
(1,000 of 256x7x7 an image in evaluation). Here the inference copy's head reads the regions' memory in (row,
column, channel) order as a view, and multiplies it by the layer's weight with its columns put in that order, a
copy kept while the weight is unchanged. Only where that weight takes no gradient (the inference copy): training
would pay a copy of the weight each step instead. Sums run in another order, so outputs differ by float
rounding; other layouts and exports run torchvision's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead

from .mixins import exporting, give_mixin, kept_while_unchanged


def _rows_columns_channels(weight: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    """weight (out, channels * height * width) with its columns in (row, column, channel) order."""
    return weight.view(-1, channels, height, width).permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def in_place_linear(owner: nn.Module, x: torch.Tensor, linear: nn.Linear) -> torch.Tensor | None:
    """linear(x.flatten(1)) for channels-last regions x, read as a view, with linear's weight reordered and kept
    on owner; None where torchvision's flatten must run (another layout, a weight that takes gradients, export)."""
    weight = linear.weight
    if (x.dim() != 4 or weight.requires_grad or x.is_contiguous()
            or not x.is_contiguous(memory_format=torch.channels_last) or exporting()):
        return None
    n, channels, height, width = x.shape
    reordered = kept_while_unchanged(owner, "_kept_reordered_weight", (channels, height, width), weight,
                                     lambda w: _rows_columns_channels(w, channels, height, width))
    return F.linear(x.permute(0, 2, 3, 1).reshape(n, -1), reordered, linear.bias)


class FlatRegionsMixin:
    """Mixed into TwoMLPHead (v1 R-CNNs): fc6 reads channels-last regions in place where it can."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = in_place_linear(self, x, self.fc6)
        if first is None:
            return super().forward(x)
        return F.relu(self.fc7(F.relu(first)))


class FlatConvRegionsMixin:
    """Mixed into FastRCNNConvFCHead (v2 R-CNNs): the Linear after its Flatten reads the convolutions' channels-last
    output in place where it can."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = list(self)  # not a slice of self, which would build a new head of this class
        flatten = next(i for i, layer in enumerate(layers) if isinstance(layer, nn.Flatten))
        for layer in layers[:flatten]:
            x = layer(x)
        first = in_place_linear(self, x, layers[flatten + 1])
        x = layers[flatten + 1](layers[flatten](x)) if first is None else first
        for layer in layers[flatten + 2:]:
            x = layer(x)
        return x


def _flattens_into_a_linear(head: nn.Module) -> bool:
    layers = list(head)
    return any(isinstance(a, nn.Flatten) and isinstance(b, nn.Linear) for a, b in zip(layers, layers[1:]))


def read_regions_in_place(model: nn.Module) -> nn.Module:
    """Give an R-CNN's box head, torchvision's TwoMLPHead or FastRCNNConvFCHead, its mixin, in place; returns
    model."""
    head = getattr(getattr(model, "roi_heads", None), "box_head", None)
    if type(head) is TwoMLPHead:
        give_mixin(head, FlatRegionsMixin, "ReadingRegionsInPlace")
    elif type(head) is FastRCNNConvFCHead and _flattens_into_a_linear(head):
        give_mixin(head, FlatConvRegionsMixin, "ReadingRegionsInPlace")
    return model


def self_check() -> str | None:
    """None when both mixed heads give torchvision's heads' outputs for channels-last regions, read in place."""
    generator = torch.Generator().manual_seed(0)
    regions = torch.rand((6, 5, 3, 4), generator=generator).to(memory_format=torch.channels_last)
    try:
        heads = ((TwoMLPHead(5 * 3 * 4, 8), FlatRegionsMixin),
                 (FastRCNNConvFCHead((5, 3, 4), [5], [8], norm_layer=nn.BatchNorm2d), FlatConvRegionsMixin))
        for head, mixin in heads:
            head.eval().requires_grad_(False)
            expected = head(regions)
            give_mixin(head, mixin, "ReadingRegionsInPlace")
            got = head(regions)
            if "_kept_reordered_weight" not in vars(head):
                return f"{mixin.__name__} did not take channels-last regions in place"
            if not torch.allclose(got, expected, atol=1e-6):
                return f"{mixin.__name__} gave other outputs than torchvision's box head"
    except (AttributeError, TypeError, RuntimeError, StopIteration, IndexError) as e:
        return f"torchvision's box heads changed ({type(e).__name__}: {e})"
    return None

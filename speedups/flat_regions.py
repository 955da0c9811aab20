"""The box head of the inference copy reads channels-last regions as they are.

What it changes: torchvision's TwoMLPHead flattens each pooled region in (channel, row, column) order before its
first layer, fc6. The sparse RoIAlign's regions are channels-last, so that flatten copies every region (1,000
regions of 256x7x7 an image in evaluation). Here the inference copy's head reads the regions' memory in (row,
column, channel) order as a view, and multiplies it by fc6's weight with its columns put in that order, a copy
kept while the weight is unchanged. Only where fc6's weight takes no gradient (the inference copy): training
would pay a copy of the weight each step instead. Sums run in another order, so outputs differ by float
rounding; other layouts and exports run torchvision's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.faster_rcnn import TwoMLPHead

from .mixins import exporting, give_mixin, kept_while_unchanged


def _rows_columns_channels(weight: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    """weight (out, channels * height * width) with its columns in (row, column, channel) order."""
    return weight.view(-1, channels, height, width).permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


class FlatRegionsMixin:
    """Mixed into TwoMLPHead: channels-last regions go into fc6 without a copy when fc6 takes no gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.fc6.weight
        if (x.dim() != 4 or weight.requires_grad or x.is_contiguous()
                or not x.is_contiguous(memory_format=torch.channels_last) or exporting()):
            return super().forward(x)
        n, channels, height, width = x.shape
        reordered = kept_while_unchanged(self, "_kept_fc6_weight", (channels, height, width), weight,
                                         lambda w: _rows_columns_channels(w, channels, height, width))
        x = F.relu(F.linear(x.permute(0, 2, 3, 1).reshape(n, -1), reordered, self.fc6.bias))
        return F.relu(self.fc7(x))


def read_regions_in_place(model: nn.Module) -> nn.Module:
    """Give an R-CNN's TwoMLPHead box head the mixin, in place; returns model."""
    head = getattr(getattr(model, "roi_heads", None), "box_head", None)
    if type(head) is TwoMLPHead:
        give_mixin(head, FlatRegionsMixin, "ReadingRegionsInPlace")
    return model


def self_check() -> str | None:
    """None when the mixed head gives torchvision's TwoMLPHead's output for channels-last regions."""
    generator = torch.Generator().manual_seed(0)
    try:
        plain = TwoMLPHead(5 * 3 * 4, 8).requires_grad_(False)
        regions = torch.rand((6, 5, 3, 4), generator=generator).to(memory_format=torch.channels_last)
        expected = plain(regions)
        give_mixin(plain, FlatRegionsMixin, "ReadingRegionsInPlace")
        got = plain(regions)
    except (AttributeError, TypeError, RuntimeError) as e:
        return f"torchvision's TwoMLPHead changed ({type(e).__name__}: {e})"
    if "_kept_fc6_weight" not in vars(plain):
        return "the box head did not take channels-last regions in place"
    if not torch.allclose(got, expected, atol=1e-6):
        return "the box head's output differs from torchvision's TwoMLPHead's"
    return None

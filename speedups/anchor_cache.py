"""Anchors built once per batch shape and kept, rather than built again at every forward.

What it changes: torchvision's AnchorGenerator builds the anchors of every pyramid level at each call, though
they depend only on the batch's padded size, the feature maps' sizes, their type and device. Where shapes recur
(every step, with shape_buckets.py's padding) the same few anchor sets come back: the most recent ones are kept
per generator, and every image of a batch gets the same tensor, as it gets equal ones from torchvision. It relies
on AnchorGenerator.forward(image_list, feature_maps) giving one equal tensor per image; `self_check` verifies it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from .exact import same_tensors

# Anchor sets kept per generator: one is ~4 MB for an 800 x 1344 batch, and a few shapes of the ladder's
# (shape_buckets.py) make most batches of a run.
CACHE_SIZE = 16


class CachedAnchorGenerator(AnchorGenerator):
    """torchvision's AnchorGenerator with its results kept per shape, type, device and inference mode (tensors
    made in inference mode cannot take part in autograd later)."""

    def forward(self, image_list: ImageList, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        key = (tuple(image_list.tensors.shape[-2:]), tuple(tuple(f.shape[-2:]) for f in feature_maps),
               feature_maps[0].dtype, feature_maps[0].device, torch.is_inference_mode_enabled())
        cache: OrderedDict = self.__dict__.setdefault("anchor_cache", OrderedDict())
        anchors = cache.get(key)
        if anchors is None:
            anchors = super().forward(ImageList(image_list.tensors, image_list.image_sizes[:1]), feature_maps)[0]
            cache[key] = anchors
            if len(cache) > CACHE_SIZE:
                cache.popitem(last=False)
        else:
            cache.move_to_end(key)
        return [anchors] * len(image_list.image_sizes)


def self_check() -> str | None:
    """None when a cached generator gives torchvision's anchors for a small batch, twice."""
    sizes, ratios = ((16,), (32,)), ((0.5, 1.0, 2.0),) * 2
    images = ImageList(torch.zeros(2, 3, 64, 96), [(64, 90), (50, 96)])
    features = [torch.zeros(2, 4, 16, 24), torch.zeros(2, 4, 8, 12)]
    try:
        expected = AnchorGenerator(sizes, ratios)(images, features)
        cached = cache_anchors(nn.Sequential(AnchorGenerator(sizes, ratios)))[0]
        for got in (cached(images, features), cached(images, features)):
            if not same_tensors(got, expected):
                return "torchvision's AnchorGenerator no longer gives one equal set of anchors per image"
    except (AttributeError, TypeError, RuntimeError, ValueError) as e:
        return f"torchvision's AnchorGenerator changed ({type(e).__name__}: {e})"
    return None


def cache_anchors(model: nn.Module) -> nn.Module:
    """Give every anchor generator of model the cache (no parameters or buffers involved)."""
    for module in model.modules():
        if type(module) is AnchorGenerator:
            module.__class__ = CachedAnchorGenerator
    return model

"""The region poolers' pyramid levels found with one wait for the device instead of one a level.

What it changes: torchvision's MultiScaleRoIAlign assigns each region a pyramid level, then, level by level, finds
that level's regions by torch.where, whose nonzero makes the host wait for a GPU, and pools them with roi_align.
Here the regions' count per level is read once, and a stable sort of the regions by level, split by those counts,
gives each level's regions in ascending order, the indices torch.where gives. roi_align then runs
on exactly torchvision's inputs, so the pooled features and their gradients are the same to the bit. The first
call of a pooler runs torchvision's own forward, which settles the levels' scales from that batch's maps and
image sizes. It relies on MultiScaleRoIAlign's level rule (map_levels), its regions' format and its settings;
`self_check` compares pooling and gradients with torchvision's. On the CPU the sparse pooler
(sparse_roi_align.py) comes first and keeps its own forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign, roi_align

from .exact import same_tensors
from .mixins import exporting, mix_into


def regions(boxes: list[Tensor], all_boxes: Tensor) -> Tensor:
    """(R, 5) regions as roi_align takes them: each box of all_boxes (the images' boxes, concatenated) after its
    image's index in the batch."""
    images = [torch.full_like(b[:, :1], index) for index, b in enumerate(boxes)]
    return torch.cat([torch.cat(images), all_boxes], dim=1)


def grouped_levels(levels: Tensor, count: int) -> Tensor:
    """Each region's level, or `count` for a region that has none of the `count` levels (a box of NaNs)."""
    return torch.where((levels >= 0) & (levels < count), levels, count)


class LevelsReadOnceMixin:
    """forward with one read of the regions' levels, in front of torchvision's MultiScaleRoIAlign."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = [feature for name, feature in x.items() if name in self.featmap_names]  # in x's order
        if self.scales is None or self.map_levels is None or len(features) == 1 or exporting():
            return super().forward(x, boxes, image_shapes)
        all_boxes = torch.cat(boxes)
        # The batch's boxes as one list: the same levels, with one area computation instead of one an image.
        levels = grouped_levels(self.map_levels([all_boxes]), len(features))
        # Counted by comparison: bincount would read the largest level on the host first, a wait of its own.
        groups = torch.arange(len(features) + 1, device=levels.device)
        counts = (levels == groups[:, None]).sum(dim=1).tolist()  # the one wait for the device
        rois = regions(boxes, all_boxes)
        first = features[0]
        pooled = torch.zeros((len(rois), first.shape[1], *self.output_size), dtype=first.dtype, device=first.device)
        # The last group, regions of no level, is left unpooled (zeros), as torchvision's loop leaves them.
        for feature, scale, chosen in zip(features, self.scales, torch.argsort(levels, stable=True).split(counts)):
            level_pooled = roi_align(feature, rois[chosen], output_size=self.output_size, spatial_scale=scale,
                                     sampling_ratio=self.sampling_ratio)
            # The levels' maps can differ in type under autocast: each is written in the first's, as torchvision's.
            pooled[chosen] = level_pooled.to(pooled.dtype)
        return pooled


def _eligible(module: nn.Module) -> bool:
    """A pooler that pools by torchvision's forward (the sparse pooler and other subclasses keep their own)."""
    return isinstance(module, MultiScaleRoIAlign) and type(module).forward is MultiScaleRoIAlign.forward


def read_levels_once(model: nn.Module) -> nn.Module:
    """Give model's torchvision region poolers the pooling with one read of the levels, in place."""
    return mix_into(model, LevelsReadOnceMixin, _eligible, "LevelsReadOnce")


def example_pooling(generator: torch.Generator) -> tuple[dict[str, Tensor], list[Tensor], list[tuple[int, int]]]:
    """Four levels of maps of two images and boxes from 2 to 250 pixels a side, so that every level pools some
    and the smallest boxes clamp to the first level, the largest to the last."""
    maps = {str(k): torch.rand((2, 3, 64 // 2**k, 96 // 2**k), generator=generator, requires_grad=True)
            for k in range(4)}
    boxes = []
    for count in (9, 14):
        corners = torch.rand((count, 2), generator=generator) * 150
        sides = 2 + torch.rand((count, 1), generator=generator) ** 2 * 250
        boxes.append(torch.cat([corners, corners + sides * torch.tensor([[1.0, 0.7]])], dim=1))
    return maps, boxes, [(250, 380), (256, 300)]


def pooled_both_ways(pooler: MultiScaleRoIAlign, maps: dict[str, Tensor], boxes: list[Tensor],
                     image_shapes: list[tuple[int, int]]) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """The pooled features and the maps' gradients (of a fixed weighting of them) by pooler's own forward and by
    torchvision's, after one call of torchvision's forward has settled the scales."""
    MultiScaleRoIAlign.forward(pooler, maps, boxes, image_shapes)
    results = []
    for forward in (type(pooler).forward, MultiScaleRoIAlign.forward):
        pooled = forward(pooler, maps, boxes, image_shapes)
        weights = torch.linspace(-1, 1, pooled.numel()).reshape(pooled.shape)
        results.append((pooled, *torch.autograd.grad((pooled * weights).sum(), list(maps.values()))))
    return results[0], results[1]


def self_check() -> str | None:
    """None when the pooling and its gradients equal torchvision's MultiScaleRoIAlign's exactly."""
    maps, boxes, image_shapes = example_pooling(torch.Generator().manual_seed(0))
    pooler = read_levels_once(MultiScaleRoIAlign(list(maps), (5, 4), 2, canonical_scale=56))
    try:
        got, want = pooled_both_ways(pooler, maps, boxes, image_shapes)
    except (AttributeError, TypeError, RuntimeError, ValueError, KeyError) as e:
        return f"torchvision's MultiScaleRoIAlign changed ({type(e).__name__}: {e})"
    if not same_tensors(got, want):
        return "the pooling differs from torchvision's MultiScaleRoIAlign"
    return None

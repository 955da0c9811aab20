"""RoIAlign on the CPU as weighted sums of gathered pixels, one call per pyramid level.

What it changes: an R-CNN's region poolers (MultiScaleRoIAlign) become SparseMultiScaleRoIAlign, which on the
CPU pools by torch's embedding_bag instead of torchvision's roi_align kernel, whose backward adds each sample's
gradient into the feature map one value at a time on one thread. Each pooled value is a fixed weighted sum of at
most 4 x sampling_ratio^2 feature values (a row of a sparse matrix, built with torchvision's sampling rule), so
pooling a level's regions is one embedding_bag over that level's pixels, a map's channels-last memory read as
one row per pixel without a copy; its gradient is the transposed sum. Both run on every core, and the pooled
features come back channels-last. On GPUs torchvision's own kernels run. It relies on MultiScaleRoIAlign's
settings and level rule; `self_check` compares pooling and gradients with torchvision's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import MultiScaleRoIAlign, box_area
from torchvision.ops.poolers import _setup_scales

# Added before rounding a box's level down, as torchvision does, so that a side of exactly 224 * 2^k lands on
# its own level whatever log2's rounding.
_LEVEL_EPS = 1e-6


def _axis_samples(start: torch.Tensor, extent: torch.Tensor, bins: int, ratio: int, size: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Along one axis, for R regions starting at `start` with `extent` pixels on maps of `size` pixels: the
    (R, bins * ratio) sample points' lower and upper pixel indices and their bilinear weights. As torchvision
    samples: points more than a pixel outside the map weigh nothing, the rest are clamped onto it."""
    bin_size = extent / bins
    index = torch.arange(bins * ratio, device=start.device)
    bin_start = (index // ratio).to(start.dtype)[None, :] * bin_size[:, None]
    offset = ((index % ratio).to(start.dtype) + 0.5)[None, :] * bin_size[:, None] / ratio
    position = start[:, None] + bin_start + offset
    last = (size - 1)[:, None]
    inside = (position >= -1.0) & (position <= size[:, None].to(start.dtype))
    position = position.clamp(min=0)
    # Clamped again as integers: a diverged run's NaN or infinite box must not index outside the maps (its
    # weights stay NaN, so its loss shows it).
    low = position.to(torch.int64).clamp(min=0)
    at_edge = low >= last
    low = torch.where(at_edge, last, low)
    position = torch.where(at_edge, low.to(start.dtype), position)
    high = torch.where(at_edge, low, low + 1)
    fraction = position - low.to(start.dtype)
    return low, high, (1 - fraction) * inside, fraction * inside


def _levels_have_maps(scales: list[float]) -> bool:
    """Whether every box's level by torchvision's rule has its map here: maps of consecutive pyramid levels, or
    maps of one scale (MobileNet's FPN: torchvision's rule puts every box on the first)."""
    levels = 1 + round(math.log2(scales[0] / scales[-1]))
    return levels in (1, len(scales))


def _region_levels(boxes: torch.Tensor, scales: list[float], canonical_scale: int, canonical_level: int
                   ) -> torch.Tensor:
    """Index into the pyramid of the map each box pools from, by torchvision's rule."""
    first, last = -round(math.log2(scales[0])), -round(math.log2(scales[-1]))
    side = torch.sqrt(box_area(boxes))
    level = torch.floor(canonical_level + torch.log2(side / canonical_scale) + torch.tensor(_LEVEL_EPS,
                                                                                          dtype=side.dtype))
    return level.nan_to_num(nan=first).clamp(min=first, max=last).to(torch.int64) - first


def multiscale_roi_align(features: list[torch.Tensor], boxes: list[torch.Tensor], scales: list[float],
                         output_size: tuple[int, int], sampling_ratio: int, canonical_scale: int = 224,
                         canonical_level: int = 4) -> torch.Tensor:
    """(R, C, *output_size) pooled features of every image's boxes from consecutive pyramid levels of the
    given scales, in channels-last memory, equal to torchvision's MultiScaleRoIAlign (aligned=False,
    sampling_ratio > 0) to float rounding."""
    channels, device, dtype = features[0].shape[1], features[0].device, features[0].dtype
    all_boxes = torch.cat(boxes)
    image = torch.cat([torch.full((len(b),), i, dtype=torch.int64, device=device) for i, b in enumerate(boxes)])
    level = _region_levels(all_boxes, scales, canonical_scale, canonical_level)

    heights = torch.tensor([f.shape[-2] for f in features], device=device)
    widths = torch.tensor([f.shape[-1] for f in features], device=device)
    scale = torch.tensor(scales, dtype=dtype, device=device)[level]
    height, width = heights[level], widths[level]

    corners = all_boxes * scale[:, None]
    extent = (corners[:, 2:] - corners[:, :2]).clamp(min=1.0)
    bins_y, bins_x = output_size
    y_low, y_high, y_lower, y_upper = _axis_samples(corners[:, 1], extent[:, 1], bins_y, sampling_ratio, height)
    x_low, x_high, x_lower, x_upper = _axis_samples(corners[:, 0], extent[:, 0], bins_x, sampling_ratio, width)

    # Every (sample row, sample column, corner) of a region, laid out so that a bin's entries are contiguous;
    # a pixel's index counts within its level's maps.
    regions = len(all_boxes)
    per_region = (regions, 1, 1, 1, 1, 1)
    y_index = torch.stack([y_low, y_low, y_high, y_high], -1).view(regions, bins_y, sampling_ratio, 1, 1, 4)
    x_index = torch.stack([x_low, x_high, x_low, x_high], -1).view(regions, 1, 1, bins_x, sampling_ratio, 4)
    y_weight = torch.stack([y_lower, y_lower, y_upper, y_upper], -1).view(regions, bins_y, sampling_ratio, 1, 1, 4)
    x_weight = torch.stack([x_lower, x_upper, x_lower, x_upper], -1).view(regions, 1, 1, bins_x, sampling_ratio, 4)
    base = (image * height * width).view(per_region)
    per_bin = sampling_ratio * sampling_ratio * 4
    pixels = (base + y_index * width.view(per_region) + x_index).permute(0, 1, 3, 2, 4, 5).reshape(-1, per_bin)
    weights = (y_weight * x_weight / sampling_ratio**2).permute(0, 1, 3, 2, 4, 5).reshape(-1, per_bin)

    pooled = corners.new_empty((regions, bins_y, bins_x, channels))
    bins = torch.arange(bins_y * bins_x, device=device)
    for index, feature in enumerate(features):  # a level without regions too: its map's gradient is zeros
        chosen = (level == index).nonzero().squeeze(1)
        rows = (chosen[:, None] * len(bins) + bins).view(-1)
        sums = F.embedding_bag(pixels[rows], feature.permute(0, 2, 3, 1).reshape(-1, channels), mode="sum",
                               per_sample_weights=weights[rows])
        pooled.index_copy_(0, chosen, sums.view(len(chosen), bins_y, bins_x, channels))
    return pooled.permute(0, 3, 1, 2)


class SparseMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign, pooling by multiscale_roi_align where that is faster and equal to float
    rounding: maps on the CPU, a fixed sampling ratio and consecutive levels (or one); elsewhere torchvision's
    own kernels.
    Half-precision maps (autocast) pool in float32 and come back in their own precision, as torchvision's kernel
    does them."""

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        features = [v for k, v in x.items() if k in self.featmap_names]
        first = features[0]
        if first.device.type != "cpu" or not first.is_floating_point() or self.sampling_ratio <= 0:
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:  # as torchvision's: settled by the first batch
            self.scales, self.map_levels = _setup_scales(features, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        scales = self.scales
        if not _levels_have_maps(scales):
            return super().forward(x, boxes, image_shapes)
        dtype = first.dtype if first.dtype == torch.float64 else torch.float32
        with torch.autocast("cpu", enabled=False):  # the products stay in float32 under autocast too
            pooled = multiscale_roi_align([f.to(dtype) for f in features], [b.to(dtype) for b in boxes], scales,
                                          self.output_size, self.sampling_ratio, self.canonical_scale,
                                          self.canonical_level)
        return pooled.to(first.dtype)


def self_check() -> str | None:
    """None when a small pooling and its gradient equal torchvision's MultiScaleRoIAlign's."""
    generator = torch.Generator().manual_seed(0)
    maps = {str(k): torch.rand((1, 3, 32 // 2**k, 48 // 2**k), generator=generator, requires_grad=True)
            for k in range(3)}
    corners = torch.rand((6, 2), generator=generator) * 40
    boxes = [torch.cat([corners, corners + 2 + torch.rand((6, 2), generator=generator) * 60], 1)]
    try:
        plain = MultiScaleRoIAlign(list(maps), 4, 2, canonical_scale=16)
        sparse = SparseMultiScaleRoIAlign(plain.featmap_names, plain.output_size, plain.sampling_ratio,
                                          canonical_scale=plain.canonical_scale,
                                          canonical_level=plain.canonical_level)
        pooled = [pooler(maps, boxes, [(128, 192)]) for pooler in (plain, sparse)]
        grads = [torch.autograd.grad(p.square().sum(), list(maps.values())) for p in pooled]
    except (AttributeError, TypeError, RuntimeError, ValueError) as e:
        return f"torchvision's MultiScaleRoIAlign changed ({type(e).__name__}: {e})"
    if not torch.allclose(*pooled, atol=1e-5) or not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(*grads)):
        return "pooling differs from torchvision's MultiScaleRoIAlign"
    return None


def use_sparse_roi_align(model: torch.nn.Module) -> torch.nn.Module:
    """Swap an R-CNN model's region poolers for SparseMultiScaleRoIAlign (same settings; no weights involved)."""
    heads = getattr(model, "roi_heads", None)
    for name in ("box_roi_pool", "mask_roi_pool", "keypoint_roi_pool"):
        pooler = getattr(heads, name, None)
        if type(pooler) is MultiScaleRoIAlign:
            setattr(heads, name, SparseMultiScaleRoIAlign(
                pooler.featmap_names, pooler.output_size, pooler.sampling_ratio,
                canonical_scale=pooler.canonical_scale, canonical_level=pooler.canonical_level))
    return model

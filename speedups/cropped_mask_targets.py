"""In training on the CPU, each positive region's mask target pooled from a crop of its matched mask.

What it changes: torchvision's `project_masks_on_boxes` makes a float copy of all of an image's ground-truth masks
at the image's full size (instances x height x width floats) and pools each positive region's 28x28 target from
it by RoIAlign; the copy is made while the forward's activations are held, so on images of many instances it
raises the step's peak memory, and on such images making it is most of the targets' time. Here each region's
target is pooled from a float copy of only the rows and columns of its matched mask that RoIAlign's samples read
(`read_span`), on images whose masks hold many pixels per region (`crops_pay`; on others torchvision's copy is
cheaper). The samples' positions are then computed from the crop's corner, so the targets equal torchvision's to
the rounding of those positions (to 1e-12 in float64). The crops' bounds are read on the host, which on a GPU would
wait for the device: there torchvision's code runs. It replaces the matched-class mask branch's `mask_targets`,
so it needs that speed-up; `self_check` compares the targets with torchvision's `project_masks_on_boxes`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.models.detection import roi_heads as torchvision_roi_heads
from torchvision.ops import roi_align

from .matched_class_masks import MatchedClassMasksMixin
from .mixins import mix_into


def read_span(start: float, end: float, size: int) -> tuple[int, int]:
    """The pixels [first, last) of an axis of `size` pixels that RoIAlign reads for a box side from start to end
    (at least a pixel long, as RoIAlign makes it): either side of each sample, one more past the last."""
    reach = max(end, start + 1)
    # A sample past the image's edge reads zero and one on it the last pixel: where samples come that far, the
    # crop starts where the image does, so that their positions round exactly as torchvision's.
    first = 0 if reach > size else math.floor(start)
    return min(max(first, 0), size), min(max(math.ceil(reach) + 1, 0), size)


# Masks of this many pixels per region and more are cropped: about where a region's own RoIAlign call costs less than
# its share of torchvision's float copy of the masks (docs/PERFORMANCE.md, stop 50).
CROP_ABOVE_PIXELS_PER_REGION = 100_000


def crops_pay(masks: Tensor, boxes: Tensor) -> bool:
    """Whether an image's regions' targets are cheaper from crops than from a float copy of all its masks."""
    return masks.numel() >= CROP_ABOVE_PIXELS_PER_REGION * len(boxes)


def cropped_mask_targets(masks: Tensor, boxes: Tensor, matched: Tensor, size: int) -> Tensor:
    """(R, size, size) RoIAlign targets of R boxes (R, 4) on the masks (N, H, W) of their matched instances
    (R,), each pooled from its crop, in the boxes' dtype; torchvision's project_masks_on_boxes to rounding."""
    height, width = masks.shape[-2:]
    targets = boxes.new_zeros((len(boxes), size, size))
    for row, ((x1, y1, x2, y2), instance) in enumerate(zip(boxes.tolist(), matched.tolist())):
        left, right = read_span(x1, x2, width)
        top, bottom = read_span(y1, y2, height)
        if right <= left or bottom <= top:
            continue  # a box wholly before the image starts reads no pixel: torchvision's target is zeros too
        crop = masks[instance, top:bottom, left:right].to(boxes.dtype)[None, None]
        region = torch.tensor([[0.0, x1 - left, y1 - top, x2 - left, y2 - top]], dtype=boxes.dtype)
        targets[row] = roi_align(crop, region, (size, size), 1.0)[0, 0]
    return targets


class CroppedMaskTargetsMixin:
    """In front of the matched-class RoI heads: mask targets from crops of the matched masks."""

    def mask_targets(self, masks: Tensor, boxes: Tensor, matched: Tensor, size: int) -> Tensor:
        if masks.device.type != "cpu" or not crops_pay(masks, boxes):
            return super().mask_targets(masks, boxes, matched, size)
        return cropped_mask_targets(masks, boxes, matched, size)


def _eligible(module: nn.Module) -> bool:
    return isinstance(module, MatchedClassMasksMixin)


def crop_mask_targets(model: nn.Module) -> nn.Module:
    """Give model's matched-class RoI heads mask targets pooled from crops, in place."""
    return mix_into(model, CroppedMaskTargetsMixin, _eligible, "CroppedMaskTargets")


def example_targets(generator: torch.Generator, dtype: torch.dtype, height: int = 45, width: int = 61
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Masks of 6 instances on an image of height x width, and 40 boxes matched to them: some past the edges,
    some under a pixel on a side, one at each edge, one off the image."""
    masks = (torch.rand((6, height, width), generator=generator) > 0.5).to(torch.uint8)
    corners = torch.rand((40, 2), generator=generator, dtype=torch.float64) * torch.tensor([width, height]) - 3
    extents = torch.rand((40, 2), generator=generator, dtype=torch.float64) ** 2 * 40
    boxes = torch.cat([corners, corners + extents], 1)
    boxes[:4, 2] = boxes[:4, 0] + 0.3
    boxes[4] = torch.tensor([width - 0.4, 2.0, width, 9.5], dtype=torch.float64)
    boxes[5] = torch.tensor([3.0, height - 0.7, 11.2, height], dtype=torch.float64)
    boxes[6] = torch.tensor([0.0, 0.0, 0.6, 0.2], dtype=torch.float64)
    boxes[7] = torch.tensor([width + 2.0, 4.0, width + 9.0, 8.0], dtype=torch.float64)
    matched = torch.randint(0, 6, (40,), generator=generator)
    return masks, boxes.to(dtype), matched


def self_check() -> str | None:
    """None when the cropped targets equal torchvision's project_masks_on_boxes' in float64."""
    masks, boxes, matched = example_targets(torch.Generator().manual_seed(0), torch.float64)
    try:
        want = torchvision_roi_heads.project_masks_on_boxes(masks, boxes, matched, 14)
        got = cropped_mask_targets(masks, boxes, matched, 14)
    except (AttributeError, TypeError, RuntimeError, ValueError) as e:
        return f"torchvision's project_masks_on_boxes changed ({type(e).__name__}: {e})"
    if got.shape != want.shape or not torch.allclose(got, want, rtol=0, atol=1e-12):
        return "the cropped mask targets differ from torchvision's project_masks_on_boxes"
    return None

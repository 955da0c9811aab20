"""The RPN's proposals filtered for the whole batch at once, rather than image by image.

What it changes: torchvision's RegionProposalNetwork.filter_proposals keeps each pyramid level's best-scoring
boxes, then, in a Python loop over the images, clips them to the image, drops the tiny and the low-scoring ones
(each cut a nonzero that makes the host wait for a GPU) and runs NMS per level: some forty operators and three
waits an image. Here the clipping and both cuts are done for the batch in a few operators, a stable sort moves
the boxes each image keeps to the front of its row in their order, and one copy of the counts to the host says
where each row ends. NMS then sees each image's boxes, scores and levels exactly as torchvision's loop gives
them, so the proposals are the same to the bit. It relies on filter_proposals' rules (per-level top-n, clip,
min_size, score_thresh, NMS per level, post-NMS top-n); `self_check` compares with torchvision's own method.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import boxes as box_ops

from .exact import same_tensor_lists
from .mixins import exporting, mix_into


def best_per_level(objectness: Tensor, per_level: list[int], limit: int) -> tuple[Tensor, Tensor]:
    """(B, K) indices of each level's `limit` highest scores (all of a smaller level's), level after level, and
    the (K,) level of each column."""
    indices, levels, start = [], [], 0
    for level, scores in enumerate(objectness.split(per_level, dim=1)):
        count = min(limit, scores.shape[1])
        indices.append(scores.topk(count, dim=1).indices + start)
        levels.append(torch.full((count,), level, dtype=torch.int64, device=objectness.device))
        start += scores.shape[1]
    return torch.cat(indices, dim=1), torch.cat(levels)


def clipped(boxes: Tensor, image_shapes: list[tuple[int, int]]) -> Tensor:
    """(B, K, 4) boxes clipped to their images' (height, width)."""
    limits = torch.tensor([[w, h, w, h] for h, w in image_shapes], dtype=boxes.dtype)
    # Copied without waiting: a blocking copy to a GPU would wait for everything queued before it.
    limits = limits.to(boxes.device, non_blocking=True)[:, None, :]
    return torch.minimum(boxes.clamp(min=0), limits)


def kept(boxes: Tensor, scores: Tensor, min_size: float, score_thresh: float) -> Tensor:
    """(B, K) whether each box is at least min_size on both sides and scores at least score_thresh."""
    widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    return (widths >= min_size) & (heights >= min_size) & (scores >= score_thresh)


class BatchedProposalsMixin:
    """filter_proposals for the whole batch, in front of torchvision's RegionProposalNetwork."""

    def filter_proposals(self, proposals: Tensor, objectness: Tensor, image_shapes: list[tuple[int, int]],
                         num_anchors_per_level: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        if exporting():
            return super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)
        images = proposals.shape[0]
        objectness = objectness.detach().reshape(images, -1)
        top, levels = best_per_level(objectness, num_anchors_per_level, self.pre_nms_top_n())
        rows = torch.arange(images, device=proposals.device)[:, None]
        boxes = clipped(proposals[rows, top], image_shapes)
        scores = objectness[rows, top].sigmoid()
        keep = kept(boxes, scores, self.min_size, self.score_thresh)
        counts = keep.sum(dim=1).tolist()  # the one wait for the device besides NMS's
        order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices  # kept first, in their order
        boxes, scores, levels = boxes[rows, order], scores[rows, order], levels[order]
        final_boxes, final_scores = [], []
        for image_boxes, image_scores, image_levels, count in zip(boxes, scores, levels, counts):
            image_boxes, image_scores = image_boxes[:count], image_scores[:count]
            best = box_ops.batched_nms(image_boxes, image_scores, image_levels[:count], self.nms_thresh)
            best = best[:self.post_nms_top_n()]
            final_boxes.append(image_boxes[best])
            final_scores.append(image_scores[best])
        return final_boxes, final_scores


def _eligible(module: nn.Module) -> bool:
    """An RPN that filters by torchvision's method and top-n rule (a subclass with its own keeps them)."""
    return (isinstance(module, RegionProposalNetwork)
            and type(module).filter_proposals is RegionProposalNetwork.filter_proposals
            and type(module)._get_top_n_idx is RegionProposalNetwork._get_top_n_idx)


def use_batched_proposals(model: nn.Module) -> nn.Module:
    """Give model's torchvision RPNs the batched proposal filtering, in place."""
    return mix_into(model, BatchedProposalsMixin, _eligible, "BatchedProposals")


def example_rpn(score_thresh: float = 0.0) -> RegionProposalNetwork:
    """torchvision's RPN (no layers: only its filtering is used) with small top-n limits, so that levels are
    both cut and kept whole."""
    return RegionProposalNetwork(None, None, 0.7, 0.3, 256, 0.5, {"training": 60, "testing": 40},
                                 {"training": 200, "testing": 30}, 0.7, score_thresh)


def example_proposals(generator: torch.Generator, images: int = 3
                      ) -> tuple[Tensor, Tensor, list[tuple[int, int]], list[int]]:
    """Proposals and objectness of `images` images of different sizes over levels of 120, 70 and 24 anchors:
    boxes that cross the image's edges, tiny ones, and near-duplicates for NMS to remove."""
    per_level = [120, 70, 24]
    corners = torch.rand(images, sum(per_level), 2, generator=generator) * 110 - 10
    sides = torch.rand(images, sum(per_level), 2, generator=generator) * 40
    sides[:, ::7] *= 1e-4  # below min_size
    boxes = torch.cat([corners, corners + sides], dim=2)
    boxes[:, 1::5] = boxes[:, ::5][:, :boxes[:, 1::5].shape[1]] + 0.5  # overlapping neighbours
    objectness = torch.randn(images, sum(per_level), generator=generator) * 3
    shapes = [(80, 100), (100, 64), (60, 90), (100, 100)][:images]
    return boxes, objectness.reshape(-1, 1), shapes, per_level


def proposals_both_ways(rpn: RegionProposalNetwork, boxes: Tensor, objectness: Tensor,
                        shapes: list[tuple[int, int]], per_level: list[int]
                        ) -> tuple[tuple[list[Tensor], list[Tensor]], tuple[list[Tensor], list[Tensor]]]:
    """The proposals by rpn's own filter_proposals, and by torchvision's."""
    return (rpn.filter_proposals(boxes, objectness, shapes, per_level),
            RegionProposalNetwork.filter_proposals(rpn, boxes, objectness, shapes, per_level))


def self_check() -> str | None:
    """None when the batched filtering gives torchvision's proposals exactly, in training and in evaluation."""
    boxes, objectness, shapes, per_level = example_proposals(torch.Generator().manual_seed(0))
    for training, score_thresh in ((True, 0.0), (False, 0.3)):
        rpn = use_batched_proposals(example_rpn(score_thresh)).train(training)
        try:
            got, want = proposals_both_ways(rpn, boxes, objectness, shapes, per_level)
        except (AttributeError, TypeError, RuntimeError, ValueError) as e:
            return f"torchvision's RegionProposalNetwork changed ({type(e).__name__}: {e})"
        if not same_tensor_lists(got, want):
            return "the batched filtering gives other proposals than torchvision's filter_proposals"
    return None

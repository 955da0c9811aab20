"""Training targets of the RPN and the box head for a batch of images at once, rather than image by image.

What it changes: torchvision's RegionProposalNetwork matches anchors to ground-truth boxes, and its RoIHeads
match proposals to them, in Python loops over the images: some sixty operators an image for the RPN and forty for
the box head, four or five of which (a nonzero, boolean-mask writes) make the host wait for a GPU to finish what
it was given. Here each group of images has its boxes padded to the most boxes any of them has, one IoU tensor
computed with torchvision's arithmetic in its order, and the matcher's rules (thresholds, low-quality matches with
ties) applied with masks and `where`, none of which waits for the device: the same labels, matched boxes and
matched indices, exactly. A group's IoU tensor holds at most MAX_IOU_ELEMENTS values (one crowded image at a large
batch would otherwise pad every image to its count). It relies on both heads measuring overlap with
torchvision's `box_iou` and matching with torchvision's `Matcher`; heads that do otherwise keep their loops, and
`self_check` compares both ways on torchvision's own code. Sampling stays torchvision's, image by image, so the
random draws are the same too.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torchvision.models.detection import roi_heads
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import boxes as box_ops

from .exact import same_tensor_lists

# 2**25 float32 values are 128 MB, and the matching holds up to about five such tensors at once: a batch of 4 at
# 800 x 1344 (~270,000 anchors an image) with up to 31 boxes an image is one group.
MAX_IOU_ELEMENTS = 2**25


def batched_box_iou(gt_boxes: Tensor, candidates: Tensor) -> Tensor:
    """(B, G, N): the IoU of each image's G boxes (B, G, 4) with its N candidates (B or 1, N, 4), computed as
    torchvision's box_iou computes it, so that equal boxes give equal values to the last bit."""
    gt_area = box_ops.box_area(gt_boxes.flatten(0, 1)).view(gt_boxes.shape[:2])
    candidate_area = box_ops.box_area(candidates.flatten(0, 1)).view(candidates.shape[:2])
    gt, candidate = gt_boxes[:, :, None, :], candidates[:, None, :, :]
    width = torch.min(gt[..., 2], candidate[..., 2]).sub_(torch.max(gt[..., 0], candidate[..., 0])).clamp_(min=0)
    height = torch.min(gt[..., 3], candidate[..., 3]).sub_(torch.max(gt[..., 1], candidate[..., 1])).clamp_(min=0)
    inter = width.mul_(height)
    union = (gt_area[:, :, None] + candidate_area[:, None, :]).sub_(inter)
    return inter.div_(union)


def match_batch(matcher: Matcher, iou: Tensor, has_box: Tensor) -> Tensor:
    """(B, N) matched box indices (or the matcher's negative codes) from (B, G, N) IoUs, where has_box (B, G)
    marks the rows that are boxes rather than padding; torchvision's Matcher rules, without host syncs."""
    iou = iou.masked_fill(~has_box[:, :, None], -1.0)  # below every real IoU, so never a match or a maximum
    matched_iou, matches = iou.max(dim=1)
    codes = torch.where(matched_iou < matcher.low_threshold, matcher.BELOW_LOW_THRESHOLD, matcher.BETWEEN_THRESHOLDS)
    below_high = matched_iou < matcher.high_threshold
    if matcher.allow_low_quality_matches:
        # A candidate that is the best (ties included) of some real box keeps its best box, however low.
        best_of_a_box = ((iou == iou.max(dim=2, keepdim=True).values) & has_box[:, :, None]).any(dim=1)
        below_high &= ~best_of_a_box
    return torch.where(below_high, codes, matches)


def _groups(box_counts: list[int], candidate_count: int) -> list[range]:
    """Consecutive images whose padded IoU tensor stays within MAX_IOU_ELEMENTS (an image alone may exceed it)."""
    groups, start, most = [], 0, 0
    for i, count in enumerate(box_counts):
        if i > start and (i + 1 - start) * max(most, count) * candidate_count > MAX_IOU_ELEMENTS:
            groups.append(range(start, i))
            start, most = i, 0
        most = max(most, count)
    groups.append(range(start, len(box_counts)))
    return groups


def _padded(tensors: list[Tensor]) -> Tensor:
    """The tensors stacked, the shorter ones padded with zeros at the end, to one row at least: a group of images
    without boxes then has a padding row (which matches nothing), where a max or gather over no rows fails."""
    if all(t.shape[0] == 0 for t in tensors):
        return tensors[0].new_zeros((len(tensors), 1, *tensors[0].shape[1:]))
    if len({t.shape[0] for t in tensors}) == 1:
        return torch.stack(tensors)
    return nn.utils.rnn.pad_sequence(tensors, batch_first=True)


def _unpadded(padded: Tensor, candidates: list[Tensor]) -> list[Tensor]:
    """Each row of padded cut to its image's number of candidates (views, no copies)."""
    return [row[:c.shape[0]] for row, c in zip(padded.unbind(0), candidates)]


def _stacked_candidates(candidates: list[Tensor]) -> Tensor:
    """(b, N, 4), or (1, N, 4) for the IoU to broadcast where every image has the same tensor (the RPN's anchors
    from anchor_cache): no copy of them, and their areas computed once."""
    if all(c is candidates[0] for c in candidates):
        return candidates[0][None]
    return _padded(candidates)


def matches_by_group(matcher: Matcher, gt_boxes: list[Tensor], candidates: list[Tensor]
                     ) -> Iterator[tuple[range, Tensor, Tensor]]:
    """For each group of images: its range, its boxes padded (b, G, 4), and the (b, N) matches of its candidates
    padded to the most any image has (padding candidates get matches too, for the caller to drop)."""
    most_candidates = max(c.shape[0] for c in candidates)
    for group in _groups([b.shape[0] for b in gt_boxes], most_candidates):
        boxes = [gt_boxes[i] for i in group]
        padded = _padded(boxes)
        # Built on the device: a blocking copy of the box counts from the host would wait for the device's queue.
        has_box = _padded([torch.ones(b.shape[0], dtype=torch.bool, device=b.device) for b in boxes])
        iou = batched_box_iou(padded, _stacked_candidates([candidates[i] for i in group]))
        yield group, padded, match_batch(matcher, iou, has_box)


def _batchable(matcher: Matcher, box_similarity) -> bool:
    """Whether a head matches with torchvision's IoU and Matcher (whose rules the batched code repeats)."""
    return box_similarity is box_ops.box_iou and type(matcher) is Matcher


def _nothing_to_batch(gt_boxes: list[Tensor], candidates: list[Tensor]) -> bool:
    """No boxes in any image, or no candidates: torchvision's loop handles (or refuses) these."""
    return all(b.numel() == 0 for b in gt_boxes) or any(c.shape[0] == 0 for c in candidates)


class BatchedTargetsRPN(RegionProposalNetwork):
    """torchvision's RegionProposalNetwork whose anchor targets are assigned to groups of images at once."""

    def assign_targets_to_anchors(self, anchors: list[Tensor], targets: list[dict[str, Tensor]]
                                  ) -> tuple[list[Tensor], list[Tensor]]:
        gt_boxes = [t["boxes"] for t in targets]
        if not _batchable(self.proposal_matcher, self.box_similarity) or _nothing_to_batch(gt_boxes, anchors):
            return super().assign_targets_to_anchors(anchors, targets)
        labels, matched_boxes = [], []
        for group, padded, matches in matches_by_group(self.proposal_matcher, gt_boxes, anchors):
            group_anchors = [anchors[i] for i in group]
            # Labels: 1 object, 0 background, -1 ignored. An image without boxes has every anchor below the low
            # threshold: background, matched to the zeros of its padding, as torchvision gives it.
            group_labels = torch.where(matches == self.proposal_matcher.BETWEEN_THRESHOLDS, -1.0,
                                       (matches >= 0).float())
            group_boxes = padded.gather(1, matches.clamp(min=0)[:, :, None].expand(-1, -1, 4))
            labels += _unpadded(group_labels, group_anchors)
            matched_boxes += _unpadded(group_boxes, group_anchors)
        return labels, matched_boxes


class BatchedTargetsRoIHeads(RoIHeads):
    """torchvision's RoIHeads whose proposals are matched to the boxes of groups of images at once."""

    def assign_targets_to_proposals(self, proposals: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor]
                                    ) -> tuple[list[Tensor], list[Tensor]]:
        # torchvision's loop calls box_iou itself, not self.box_similarity.
        if not _batchable(self.proposal_matcher, roi_heads.box_ops.box_iou) or _nothing_to_batch(gt_boxes,
                                                                                                  proposals):
            return super().assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
        matched_idxs, labels = [], []
        for group, _, matches in matches_by_group(self.proposal_matcher, gt_boxes, proposals):
            clamped = matches.clamp(min=0)
            # An image without boxes gathers the zeros of its padding: background, as torchvision gives it.
            group_labels = _padded([gt_labels[i] for i in group]).gather(1, clamped).to(torch.int64)
            group_labels = torch.where(matches == self.proposal_matcher.BELOW_LOW_THRESHOLD, 0, group_labels)
            group_labels = torch.where(matches == self.proposal_matcher.BETWEEN_THRESHOLDS, -1, group_labels)
            group_proposals = [proposals[i] for i in group]
            matched_idxs += _unpadded(clamped, group_proposals)
            labels += _unpadded(group_labels, group_proposals)
        return matched_idxs, labels


def use_batched_targets(model: nn.Module) -> nn.Module:
    """Give model's torchvision RPN and RoI heads (those it has) the batched target assignment, in place."""
    for module in model.modules():
        if type(module) is RegionProposalNetwork:
            module.__class__ = BatchedTargetsRPN
        elif type(module) is RoIHeads:
            module.__class__ = BatchedTargetsRoIHeads
    return model


def example_targets(generator: torch.Generator) -> tuple[list[Tensor], list[Tensor]]:
    """Candidates (each image's own number) and boxes of three images (one without boxes, a tiny box that no
    candidate covers well, duplicated boxes for ties, candidates close to some boxes) that exercise every rule
    of the matchers."""
    box_corners = torch.rand(7, 2, generator=generator) * 70
    boxes = torch.cat([box_corners, box_corners + 5 + torch.rand(7, 2, generator=generator) * 20], 1)
    boxes = torch.cat([boxes, boxes[:2], torch.tensor([[40.0, 40.0, 41.0, 41.0]])])
    corners = torch.rand(300, 2, generator=generator) * 80
    candidates = torch.cat([corners, corners + 4 + torch.rand(300, 2, generator=generator) * 30], 1)
    candidates = torch.cat([candidates, boxes[:4] + 0.5])
    return [candidates, candidates[:250], candidates[20:]], [boxes, torch.zeros((0, 4)), boxes[3:6]]


def example_heads(allow_low_quality: bool) -> tuple[RegionProposalNetwork, RoIHeads]:
    """Torchvision's two heads (no layers: only their matching is used), the RPN's thresholds its default, the
    box head's with a gap (its default has none) so that proposals can be ignored, the matchers' low-quality rule
    as given."""
    rpn = RegionProposalNetwork(None, None, 0.7, 0.3, 256, 0.5, {"training": 1}, {"training": 1}, 0.7)
    heads = RoIHeads(None, None, None, 0.5, 0.3, 512, 0.25, None, 0.05, 0.5, 100)
    for head, (high, low) in ((rpn, (0.7, 0.3)), (heads, (0.5, 0.3))):
        head.proposal_matcher = Matcher(high, low, allow_low_quality_matches=allow_low_quality)
    return rpn, heads


def targets_both_ways(rpn: RegionProposalNetwork, heads: RoIHeads, candidates: list[Tensor],
                      boxes: list[Tensor]) -> list[tuple[list[Tensor], list[Tensor]]]:
    """The two heads' targets by their own methods and by torchvision's loops: (RPN's, loop's, RoI's, loop's)."""
    labels = [torch.arange(1, b.shape[0] + 1) for b in boxes]
    return [rpn.assign_targets_to_anchors(candidates, [{"boxes": b} for b in boxes]),
            RegionProposalNetwork.assign_targets_to_anchors(rpn, candidates, [{"boxes": b} for b in boxes]),
            heads.assign_targets_to_proposals(candidates, boxes, labels),
            RoIHeads.assign_targets_to_proposals(heads, candidates, boxes, labels)]


def self_check() -> str | None:
    """None when the batched assignments give torchvision's targets exactly, with and without low-quality
    matches."""
    candidates, boxes = example_targets(torch.Generator().manual_seed(3))
    for allow_low_quality in (True, False):
        heads = use_batched_targets(nn.ModuleList(example_heads(allow_low_quality)))
        try:
            rpn_got, rpn_want, roi_got, roi_want = targets_both_ways(*heads, candidates, boxes)
        except (AttributeError, TypeError, RuntimeError, ValueError) as e:
            return f"torchvision's detection heads changed ({type(e).__name__}: {e})"
        for name, got, want in (("RPN", rpn_got, rpn_want), ("RoI heads", roi_got, roi_want)):
            if not same_tensor_lists(got, want):
                return f"torchvision's {name} assign other targets than the batched rules give"
    return None

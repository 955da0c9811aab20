"""Training targets for the whole batch: torchvision's RPN and RoI-head targets exactly, without host syncs."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import boxes as box_ops

from conftest import with_speedups
from models import build_model
from speedups import batched_targets
from speedups.batched_targets import (
    BatchedTargetsRoIHeads,
    BatchedTargetsRPN,
    batched_box_iou,
    example_heads,
    example_targets,
    targets_both_ways,
    use_batched_targets,
)


def batched_heads(allow_low_quality: bool = True):
    return use_batched_targets(torch.nn.ModuleList(example_heads(allow_low_quality)))


def assert_same_targets(candidates, boxes, allow_low_quality: bool = True):
    """Both heads' targets equal torchvision's loops' in value, type and length; returns (RPN's, RoI's)."""
    rpn_got, rpn_want, roi_got, roi_want = targets_both_ways(*batched_heads(allow_low_quality), candidates, boxes)
    for got, want in ((rpn_got, rpn_want), (roi_got, roi_want)):
        for got_list, want_list in zip(got, want, strict=True):
            assert len(got_list) == len(want_list) == len(candidates)
            for a, b in zip(got_list, want_list):
                assert a.dtype == b.dtype and torch.equal(a, b)
    return rpn_got, roi_got


@pytest.mark.parametrize("allow_low_quality", [True, False])
def test_the_example_exercises_every_rule_and_matches_exactly(allow_low_quality):
    candidates, boxes = example_targets(torch.Generator().manual_seed(3))
    (labels, matched), (_, roi_labels) = assert_same_targets(candidates, boxes, allow_low_quality)
    assert all(set(torch.unique(labels[i]).tolist()) == {-1.0, 0.0, 1.0} for i in (0, 2))
    assert torch.equal(labels[1], torch.zeros(250)) and torch.equal(matched[1], torch.zeros(250, 4))
    assert all({-1, 0, 1} <= set(roi_labels[i].tolist()) for i in (0, 2)) and not roi_labels[1].any()
    if allow_low_quality:  # some anchors are objects only because they are a box's best, however poor
        strict_labels = assert_same_targets(candidates, boxes, False)[0][0]
        assert (labels[0] != strict_labels[0]).any()


def random_batch(seed: int, box_counts: list[int], candidate_counts: list[int] | None = None):
    """Candidates and boxes of len(box_counts) images; every image has the same candidates unless counts given."""
    generator = torch.Generator().manual_seed(seed)

    def boxes(n: int, largest: float):
        corners = torch.rand(n, 2, generator=generator) * 200
        return torch.cat([corners, corners + 1 + torch.rand(n, 2, generator=generator) * largest], 1)

    shared = boxes(2000, 120)
    candidates = ([boxes(n, 120) for n in candidate_counts] if candidate_counts
                  else [shared.clone() for _ in box_counts])
    return candidates, [boxes(n, 80) for n in box_counts]


@pytest.mark.parametrize("box_counts, candidate_counts", [([3, 17, 1, 9], None), ([0, 5], None), ([40], None),
                                                           ([2, 0, 0, 2], None), ([6, 2, 11], [2004, 1780, 2011])])
def test_random_batches_match_exactly(box_counts, candidate_counts):
    assert_same_targets(*random_batch(len(box_counts), box_counts, candidate_counts))


def test_half_precision_anchors_as_under_autocast_match_exactly():
    candidates, boxes = random_batch(5, [3, 8, 0])
    assert_same_targets([c.half() for c in candidates], boxes)


def test_groups_bound_the_iou_tensor_and_keep_the_order(monkeypatch):
    monkeypatch.setattr(batched_targets, "MAX_IOU_ELEMENTS", 2000 * 20)
    assert batched_targets._groups([3, 17, 1, 9, 30, 2], 2000) == [range(0, 1), range(1, 2), range(2, 4),
                                                                   range(4, 5), range(5, 6)]
    assert_same_targets(*random_batch(7, [3, 17, 1, 9, 30, 2]))


def test_a_group_of_images_without_boxes_matches_exactly(monkeypatch):
    """A crowded image beside empty ones (crowd-only images train as empty): the empty ones form a group."""
    monkeypatch.setattr(batched_targets, "MAX_IOU_ELEMENTS", 2000 * 40)
    for counts in ([30, 0], [0, 30], [30, 0, 0, 0]):
        assert any(all(counts[i] == 0 for i in group) for group in batched_targets._groups(counts, 2000))
        assert_same_targets(*random_batch(8, counts))


def test_one_anchor_tensor_for_every_image_is_not_copied_and_matches_exactly():
    candidates, boxes = random_batch(4, [3, 0, 12])
    shared = [candidates[0]] * len(boxes)  # as anchor_cache hands them out
    assert batched_targets._stacked_candidates(shared).shape == (1, 2000, 4)
    assert batched_targets._stacked_candidates(candidates).shape == (3, 2000, 4)
    assert_same_targets(shared, boxes)


def test_batched_iou_is_torchvisions_to_the_bit():
    candidates, boxes = random_batch(1, [6, 11])
    iou = batched_box_iou(torch.nn.utils.rnn.pad_sequence(boxes, batch_first=True), torch.stack(candidates))
    for i, image_boxes in enumerate(boxes):
        assert torch.equal(iou[i, :len(image_boxes)], box_ops.box_iou(image_boxes, candidates[i]))


class OperatorCounter(TorchDispatchMode):
    """Counts the operators that launch work (not views), and those that make the host wait for a GPU's result
    (indexing by a boolean mask needs a nonzero)."""

    VIEWS = ("select", "slice", "view", "unsqueeze", "expand", "unbind", "_unsafe_view", "lift_fresh", "detach")
    SYNCS = ("nonzero", "_local_scalar_dense", "masked_select")

    def __init__(self):
        super().__init__()
        self.syncs, self.launches = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func).split(".")[1]
        self.launches += name not in self.VIEWS
        masked = name.startswith("index") and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                                  for i in args[1])
        self.syncs += name in self.SYNCS or masked
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("head", [0, 1])
def test_fewer_operators_and_no_host_syncs(head):
    allow_low_quality = head == 0  # as the two heads are built
    candidates, boxes = random_batch(2, [4, 9, 2, 7, 3, 5, 6, 1])
    counts = []
    for module in (example_heads(allow_low_quality)[head], batched_heads(allow_low_quality)[head]):
        with OperatorCounter() as counter:
            if head == 0:
                module.assign_targets_to_anchors(candidates, [{"boxes": b} for b in boxes])
            else:
                module.assign_targets_to_proposals(candidates, boxes, [torch.ones(len(b), dtype=torch.int64)
                                                                       for b in boxes])
        counts.append(counter)
    assert counts[0].syncs >= 4 * 8 and counts[1].syncs == 0
    assert counts[1].launches < counts[0].launches / 2


def test_other_matchers_keep_torchvisions_loops(monkeypatch):
    rpn, heads = batched_heads()
    for head in (rpn, heads):
        head.proposal_matcher = type("OwnMatcher", (Matcher,), {})(0.7, 0.3, True)
    monkeypatch.setattr(batched_targets, "match_batch", None)  # would fail if called
    candidates, boxes = random_batch(3, [5, 2])
    rpn.assign_targets_to_anchors(candidates, [{"boxes": b} for b in boxes])
    heads.assign_targets_to_proposals(candidates, boxes, [torch.ones(len(b), dtype=torch.int64) for b in boxes])


def test_self_check_finds_a_different_rule(monkeypatch):
    assert batched_targets.self_check() is None
    original = batched_targets.match_batch

    def without_low_quality(matcher, iou, has_box):
        strict = Matcher(matcher.high_threshold, matcher.low_threshold, allow_low_quality_matches=False)
        return original(strict, iou, has_box)

    monkeypatch.setattr(batched_targets, "match_batch", without_low_quality)
    assert "RPN assign other targets" in batched_targets.self_check()


@pytest.mark.parametrize("name", ["maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn"])
def test_two_stage_models_get_both_heads(name):
    model = with_speedups(build_model(name, 3, None, None, None))
    assert isinstance(model.rpn, BatchedTargetsRPN) and isinstance(model.roi_heads, BatchedTargetsRoIHeads)
    plain = build_model(name, 3, None, None, None)
    assert type(plain.rpn) is RegionProposalNetwork and type(plain.roi_heads) is RoIHeads

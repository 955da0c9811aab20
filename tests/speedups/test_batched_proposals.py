"""The RPN's proposals filtered for the whole batch: torchvision's proposals exactly, with one wait for the host
instead of two an image."""

import sys

import pytest
import torch
import torchvision
from torchvision.models.detection.rpn import RegionProposalNetwork

from conftest import ROOT, with_speedups
from models import build_model
from speedups import batched_proposals
from speedups.batched_proposals import (
    BatchedProposalsMixin,
    example_proposals,
    example_rpn,
    proposals_both_ways,
    use_batched_proposals,
)
from speedups.batched_targets import BatchedTargetsRPN

sys.path.insert(0, str(ROOT / "bench"))
from bench_train import OperatorCounter  # noqa: E402


def assert_same(rpn, boxes, objectness, shapes, per_level):
    """Equal boxes and scores, image by image, to torchvision's; returns each image's number of proposals."""
    got, want = proposals_both_ways(rpn, boxes, objectness, shapes, per_level)
    for got_list, want_list in zip(got, want, strict=True):
        assert len(got_list) == len(want_list) == boxes.shape[0]
        for a, b in zip(got_list, want_list):
            assert a.dtype == b.dtype and torch.equal(a, b)
    return [len(b) for b in got[0]]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("training, score_thresh", [(True, 0.0), (False, 0.0), (False, 0.3)])
def test_the_same_proposals_as_torchvision(seed, training, score_thresh):
    rpn = use_batched_proposals(example_rpn(score_thresh)).train(training)
    counts = assert_same(rpn, *example_proposals(torch.Generator().manual_seed(seed), images=4))
    limit = rpn.post_nms_top_n()
    # The example reaches every rule: some images keep fewer than the limit after NMS, or all reach it.
    assert all(0 < c <= limit for c in counts) and (training or min(counts) == limit)
    if training:
        assert len(set(counts)) > 1


def test_the_example_has_boxes_that_each_cut_removes():
    boxes, objectness, shapes, per_level = example_proposals(torch.Generator().manual_seed(0))
    top, _ = batched_proposals.best_per_level(objectness.reshape(3, -1), per_level, example_rpn().pre_nms_top_n())
    rows = torch.arange(3)[:, None]
    clipped = batched_proposals.clipped(boxes[rows, top], shapes)
    large = torch.tensor([0.0, 0.0, 5.0, 5.0]).expand_as(clipped)
    scores = objectness.reshape(3, -1)[rows, top].sigmoid()
    assert not torch.equal(clipped, boxes[rows, top])
    assert not batched_proposals.kept(clipped, torch.ones_like(scores), 1e-3, 0.3).all()  # tiny boxes
    assert not batched_proposals.kept(large, scores, 1e-3, 0.3).all()  # low scores


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_under_autocast(dtype):
    boxes, objectness, shapes, per_level = example_proposals(torch.Generator().manual_seed(5))
    rpn = use_batched_proposals(example_rpn())
    with torch.autocast("cpu", dtype=dtype):  # where torchvision's CPU NMS takes half precision
        assert_same(rpn, boxes.to(dtype), objectness.to(dtype), shapes, per_level)


def test_images_left_without_proposals():
    boxes, objectness, shapes, per_level = example_proposals(torch.Generator().manual_seed(6))
    boxes[1] = boxes[1] - 500  # wholly outside its image: clipped to nothing
    rpn = use_batched_proposals(example_rpn())
    assert assert_same(rpn, boxes, objectness, shapes, per_level)[1] == 0
    assert assert_same(use_batched_proposals(example_rpn(1.0)), boxes, objectness, shapes, per_level) == [0] * 3


def test_many_boxes_an_image_take_the_cpus_other_nms_path():
    """torchvision's batched_nms loops over the levels on the CPU above 1,000 boxes: both paths are exact."""
    generator = torch.Generator().manual_seed(7)
    per_level = [3000, 800, 200]
    corners = torch.rand(2, sum(per_level), 2, generator=generator) * 600
    boxes = torch.cat([corners, corners + torch.rand(2, sum(per_level), 2, generator=generator) * 90], dim=2)
    objectness = torch.randn(2 * sum(per_level), 1, generator=generator)
    rpn = use_batched_proposals(RegionProposalNetwork(None, None, 0.7, 0.3, 256, 0.5, {"training": 2000},
                                                      {"training": 2000}, 0.7))
    assert all(c > 250 for c in assert_same(rpn, boxes, objectness, [(600, 640), (500, 700)], per_level))


def test_one_wait_for_the_batch_and_fewer_operators():
    boxes, objectness, shapes, per_level = example_proposals(torch.Generator().manual_seed(0), images=4)
    counters = []
    for rpn in (example_rpn(), use_batched_proposals(example_rpn())):
        with OperatorCounter() as counter:
            counter.active = True
            rpn.filter_proposals(boxes, objectness, shapes, per_level)
        counters.append(counter)
    theirs, ours = counters
    assert theirs.host_syncs() == 2 * 4 and ours.host_syncs() == 1  # a nonzero for each cut, each image; a tolist
    assert sum(ours.counts.values()) < 0.7 * sum(theirs.counts.values())


def test_an_exported_graph_keeps_torchvisions_code(monkeypatch):
    monkeypatch.setattr(torchvision, "_is_tracing", lambda: True)
    monkeypatch.setattr(batched_proposals, "best_per_level", None)  # would fail if called
    assert_same(use_batched_proposals(example_rpn()), *example_proposals(torch.Generator().manual_seed(1)))


def test_self_check_finds_a_different_rule(monkeypatch):
    assert batched_proposals.self_check() is None
    monkeypatch.setattr(batched_proposals, "kept", lambda boxes, scores, min_size, score_thresh:
                        (boxes[..., 2] - boxes[..., 0] >= min_size) & (scores >= score_thresh))
    assert "other proposals" in batched_proposals.self_check()


def test_an_rpn_with_its_own_filtering_keeps_it():
    own = type("OwnFilteringRPN", (RegionProposalNetwork,), {"filter_proposals": lambda self, *a: None})
    rpn = own(None, None, 0.7, 0.3, 256, 0.5, {"training": 1}, {"training": 1}, 0.7)
    assert type(use_batched_proposals(rpn)) is own


@pytest.mark.parametrize("name", ["maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn"])
def test_two_stage_models_get_it_with_batched_targets_and_without_speedups_not(name):
    model = with_speedups(build_model(name, 3, None, None, None))
    assert isinstance(model.rpn, BatchedProposalsMixin) and isinstance(model.rpn, BatchedTargetsRPN)
    assert type(build_model(name, 3, None, None, None).rpn) is RegionProposalNetwork

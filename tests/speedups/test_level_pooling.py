"""The region poolers' levels read once: torchvision's pooled features and gradients exactly, with one wait for
the host instead of one a level."""

import sys

import pytest
import torch
import torchvision
from torchvision.ops import MultiScaleRoIAlign

import speedups
from conftest import ROOT
from models import build_model
from speedups import level_pooling
from speedups.level_pooling import LevelsReadOnceMixin, example_pooling, pooled_both_ways, read_levels_once
from speedups.sparse_roi_align import SparseMultiScaleRoIAlign

sys.path.insert(0, str(ROOT / "bench"))
from bench_train import OperatorCounter  # noqa: E402


def pooler(output_size=(5, 4), sampling_ratio=2, canonical_scale=56) -> MultiScaleRoIAlign:
    return read_levels_once(MultiScaleRoIAlign(["0", "1", "2", "3"], output_size, sampling_ratio,
                                               canonical_scale=canonical_scale))


def assert_same(got, want):
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("output_size, sampling_ratio", [((5, 4), 2), ((7, 7), 0), ((3, 3), 1)])
def test_the_same_pooling_and_gradients_as_torchvision(seed, output_size, sampling_ratio):
    maps, boxes, shapes = example_pooling(torch.Generator().manual_seed(seed))
    assert_same(*pooled_both_ways(pooler(output_size, sampling_ratio), maps, boxes, shapes))


def test_the_example_pools_on_every_level():
    maps, boxes, shapes = example_pooling(torch.Generator().manual_seed(0))
    one = pooler()
    one(maps, boxes, shapes)
    assert (torch.bincount(one.map_levels(boxes), minlength=4) > 0).all()


def test_levels_without_regions_and_images_without_boxes():
    maps, boxes, shapes = example_pooling(torch.Generator().manual_seed(1))
    small = [b[(b[:, 2:] - b[:, :2]).amin(1) < 10] for b in boxes]
    assert_same(*pooled_both_ways(pooler(), maps, [small[0], boxes[1][:0]], shapes))
    assert_same(*pooled_both_ways(pooler(), maps, [boxes[0][:0], boxes[1][:0]], shapes))


def test_a_box_of_nans_is_left_unpooled_as_torchvision_leaves_it():
    maps, boxes, shapes = example_pooling(torch.Generator().manual_seed(2))
    boxes[1][3] = float("nan")
    got, want = pooled_both_ways(pooler(), maps, boxes, shapes)
    assert_same(got, want)
    assert not got[0][9 + 3].any() and got[0][9 + 2].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_maps_under_autocast(dtype):
    maps, boxes, shapes = example_pooling(torch.Generator().manual_seed(3))
    maps = {k: v.detach().to(dtype).requires_grad_() for k, v in maps.items()}
    with torch.autocast("cpu", dtype=dtype):
        assert_same(*pooled_both_ways(pooler(), maps, boxes, shapes))


def test_the_first_call_settles_the_scales_by_torchvisions_forward(monkeypatch):
    maps, boxes, shapes = example_pooling(torch.Generator().manual_seed(0))
    one = pooler()
    monkeypatch.setattr(level_pooling, "regions", None)  # would fail if called
    one(maps, boxes, shapes)
    assert one.scales == [2.0**-2, 2.0**-3, 2.0**-4, 2.0**-5]


def test_one_wait_for_the_levels_and_fewer_operators():
    maps, boxes, shapes = example_pooling(torch.Generator().manual_seed(0))
    one = pooler()
    one(maps, boxes, shapes)
    counters = []
    for forward in (MultiScaleRoIAlign.forward, type(one).forward):
        with OperatorCounter() as counter:
            counter.active = True
            forward(one, maps, boxes, shapes)
        counters.append(counter)
    theirs, ours = counters
    assert theirs.host_syncs() == 4 and ours.host_syncs() == 1  # a nonzero a level; a tolist
    assert sum(ours.counts.values()) < sum(theirs.counts.values())


def test_an_exported_graph_keeps_torchvisions_code(monkeypatch):
    maps, boxes, shapes = example_pooling(torch.Generator().manual_seed(1))
    one = pooler()
    one(maps, boxes, shapes)
    monkeypatch.setattr(torchvision, "_is_tracing", lambda: True)
    monkeypatch.setattr(level_pooling, "regions", None)  # would fail if called
    with torch.no_grad():
        assert torch.equal(one(maps, boxes, shapes), MultiScaleRoIAlign.forward(one, maps, boxes, shapes))


def test_self_check_finds_a_different_rule(monkeypatch):
    assert level_pooling.self_check() is None
    original = level_pooling.regions
    monkeypatch.setattr(level_pooling, "regions", lambda boxes, all_boxes: original(boxes[::-1], all_boxes))
    assert "differs" in level_pooling.self_check()


def test_the_sparse_pooler_and_other_subclasses_keep_their_own_forward():
    own = type("OwnPooler", (MultiScaleRoIAlign,), {"forward": lambda self, *a: None})
    holder = torch.nn.Module()
    holder.own = own(["0"], 7, 2)
    holder.sparse = SparseMultiScaleRoIAlign(["0"], 7, 2)
    read_levels_once(holder)
    assert type(holder.own) is own and type(holder.sparse) is SparseMultiScaleRoIAlign


@pytest.mark.parametrize("name", ["maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn"])
def test_every_pooler_of_a_model_chosen_for_a_gpu_gets_it_and_on_the_cpu_the_sparse_one(name):
    config = speedups.SpeedupConfig(channels_last=False)
    for device, kind in (("cuda", LevelsReadOnceMixin), ("cpu", SparseMultiScaleRoIAlign)):
        model = speedups.for_training(build_model(name, 3, None, None, None), torch.device(device), config)
        poolers = [m for m in model.modules() if isinstance(m, MultiScaleRoIAlign)]
        assert len(poolers) == 2 and all(isinstance(p, kind) for p in poolers)

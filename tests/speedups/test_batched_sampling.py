"""The heads' training samples drawn for the whole batch: torchvision's masks exactly, from the same random
numbers, with one wait for the host instead of two an image."""

import sys

import pytest
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

from conftest import ROOT, with_speedups
from models import build_model
from speedups import batched_sampling
from speedups.batched_sampling import (
    BatchedSamplingMixin,
    example_matches,
    positions_of,
    samples_both_ways,
    use_batched_sampling,
)
from speedups.exact import same_tensor_lists
from speedups.mixins import give_mixin

sys.path.insert(0, str(ROOT / "bench"))
from bench_train import OperatorCounter  # noqa: E402


def batched(batch_size_per_image: int = 16, positive_fraction: float = 0.5) -> BalancedPositiveNegativeSampler:
    sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
    give_mixin(sampler, BatchedSamplingMixin, "Batched")
    return sampler


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.int64, torch.float32])
@pytest.mark.parametrize("batch_size_per_image, positive_fraction", [(16, 0.5), (8, 0.25), (512, 0.25), (7, 0.3)])
def test_the_same_masks_as_torchvision(seed, dtype, batch_size_per_image, positive_fraction):
    matches = example_matches(torch.Generator().manual_seed(seed), dtype)
    got, want = samples_both_ways(batched(batch_size_per_image, positive_fraction), matches, seed)
    assert same_tensor_lists(got, want)
    for masks in got:
        assert [m.dtype for m in masks] == [torch.uint8] * 5 and [len(m) for m in masks] == [len(m) for m in matches]


def test_the_example_reaches_every_rule():
    """Positives cut to the quota, fewer than it, none; negatives cut to fill the rest, too few to, none."""
    matches = example_matches(torch.Generator().manual_seed(0))
    available = [(int((m >= 1).sum()), int((m == 0).sum())) for m in matches]
    assert available == [(55, 21), (3, 28), (0, 4), (0, 0), (0, 0)] and len(matches[4]) > 0
    (positives, negatives), _ = samples_both_ways(batched(16, 0.5), matches, 0)
    assert [int(p.sum()) for p in positives] == [8, 3, 0, 0, 0]
    assert [int(n.sum()) for n in negatives] == [8, 13, 4, 0, 0]


def test_the_random_sequence_after_a_draw_is_torchvisions():
    matches = example_matches(torch.Generator().manual_seed(3))
    after = []
    for draw in (batched().__call__, lambda m: BalancedPositiveNegativeSampler.__call__(batched(), m)):
        torch.manual_seed(0)
        draw(matches)
        after.append(torch.rand(4))
    assert torch.equal(*after)


def test_positions_of_ranks_are_the_ascending_indices():
    is_kind = torch.rand(200, generator=torch.Generator().manual_seed(0)) > 0.7
    ranks = torch.arange(int(is_kind.sum()))
    assert torch.equal(positions_of(is_kind.cumsum(0), ranks), torch.where(is_kind)[0])
    assert torch.equal(positions_of(is_kind.cumsum(0), ranks[[5, 0, 9]]), torch.where(is_kind)[0][[5, 0, 9]])
    assert positions_of(torch.zeros(5, dtype=torch.int64), ranks[:0]).numel() == 0


def test_an_empty_batch_gives_no_masks():
    assert batched()([]) == ([], [])


def test_one_wait_for_the_batch_and_no_more_operators():
    matches = [torch.randint(-1, 3, (3000,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    counters = []
    for draw in (BalancedPositiveNegativeSampler.__call__, type(batched()).__call__):
        with OperatorCounter() as counter:
            counter.active = True
            draw(batched(256, 0.5), matches)
        counters.append(counter)
    theirs, ours = counters
    assert theirs.host_syncs() == 2 * 4 and ours.host_syncs() == 1  # a nonzero for each kind, each image; a tolist
    assert sum(ours.counts.values()) <= sum(theirs.counts.values())


def test_self_check_finds_a_different_rule(monkeypatch):
    assert batched_sampling.self_check() is None
    monkeypatch.setattr(batched_sampling, "positions_of", lambda running, ranks:
                        torch.searchsorted(running, ranks))
    assert "other samples" in batched_sampling.self_check()


def test_a_sampler_with_its_own_draw_keeps_it_and_one_mixin_is_enough():
    own = type("OwnSampler", (BalancedPositiveNegativeSampler,), {"__call__": lambda self, matched: None})
    holder = torch.nn.Module()
    holder.fg_bg_sampler = own(16, 0.5)
    assert type(use_batched_sampling(holder).fg_bg_sampler) is own
    holder.fg_bg_sampler = BalancedPositiveNegativeSampler(16, 0.5)
    use_batched_sampling(use_batched_sampling(holder))
    assert type(holder.fg_bg_sampler).__mro__[1:] == (BatchedSamplingMixin, BalancedPositiveNegativeSampler, object)


@pytest.mark.parametrize("name", ["maskrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn"])
def test_both_heads_of_two_stage_models_get_it_and_without_speedups_not(name):
    model = with_speedups(build_model(name, 3, None, None, None))
    assert isinstance(model.rpn.fg_bg_sampler, BatchedSamplingMixin)
    assert isinstance(model.roi_heads.fg_bg_sampler, BatchedSamplingMixin)
    plain = build_model(name, 3, None, None, None)
    assert type(plain.rpn.fg_bg_sampler) is type(plain.roi_heads.fg_bg_sampler) is BalancedPositiveNegativeSampler

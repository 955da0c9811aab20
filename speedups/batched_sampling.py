"""The training samples of the RPN and the RoI heads drawn for the whole batch, with one wait for the device
instead of two an image.

What it changes: torchvision's BalancedPositiveNegativeSampler finds each image's positive and negative candidates
by torch.where, whose nonzero makes the host wait for a GPU, then keeps a random part of each by torch.randperm.
Here both kinds are counted for the whole batch and the counts are read once. Knowing them, the host makes
torchvision's randperm calls, with the same sizes and in the same order, so the same random numbers are drawn:
each picks ranks among an image's candidates of a kind in torchvision's ascending order. A rank's candidate is
found by searchsorted on the kind's running count (the k-th sits where that count first reaches k), without
waiting, and the masks are the same to the bit. It relies on the sampler's rule (candidates >= 1 positive and
== 0 negative, a positive quota of batch_size_per_image * positive_fraction, negatives filling the rest, uint8
masks); `self_check` compares with torchvision's own sampler.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

from .exact import same_tensor_lists
from .mixins import give_mixin, mix_into_held


def positions_of(running: Tensor, ranks: Tensor) -> Tensor:
    """The indices of the candidates of given ranks (0 for the first) among those of one kind, from the kind's
    running count: the candidate of rank r is where that count first reaches r + 1."""
    return torch.searchsorted(running, ranks + 1)


class BatchedSamplingMixin:
    """The sampler's draw for the whole batch, in front of torchvision's BalancedPositiveNegativeSampler."""

    def __call__(self, matched_idxs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        if not matched_idxs:
            return [], []
        sizes, device = [len(m) for m in matched_idxs], matched_idxs[0].device
        matched = torch.cat(matched_idxs)
        kinds = (matched >= 1, matched == 0)  # positives, negatives
        per_image = torch.stack([torch.stack([part.sum() for part in kind.split(sizes)]) for kind in kinds], dim=1)
        counts = per_image.tolist()  # each image's [positives, negatives]: the one wait for the device
        quota = int(self.batch_size_per_image * self.positive_fraction)
        # Each image's draws as torchvision's: ranks among the image's candidates of a kind, counted from the
        # batch's first image on.
        ranks: tuple[list[Tensor], list[Tensor]] = ([], [])
        starts = [0, 0]
        for positives, negatives in counts:
            kept_positives = min(positives, quota)
            kept_negatives = min(negatives, self.batch_size_per_image - kept_positives)
            for kind, available, kept in ((0, positives, kept_positives), (1, negatives, kept_negatives)):
                ranks[kind].append(torch.randperm(available, device=device)[:kept] + starts[kind])
                starts[kind] += available
        masks = torch.zeros((2, matched.numel()), dtype=torch.uint8, device=device)
        for kind, is_kind in enumerate(kinds):
            masks[kind, positions_of(is_kind.cumsum(0), torch.cat(ranks[kind]))] = 1
        return list(masks[0].split(sizes)), list(masks[1].split(sizes))


def _eligible(sampler: object) -> bool:
    """A sampler that draws by torchvision's method (a subclass with its own keeps it)."""
    return (isinstance(sampler, BalancedPositiveNegativeSampler)
            and type(sampler).__call__ is BalancedPositiveNegativeSampler.__call__)


def use_batched_sampling(model: nn.Module) -> nn.Module:
    """Give the torchvision samplers of model's RPNs and RoI heads the batched draw, in place."""
    return mix_into_held(model, "fg_bg_sampler", BatchedSamplingMixin, _eligible, "Batched")


def example_matches(generator: torch.Generator, dtype: torch.dtype = torch.int64) -> list[Tensor]:
    """Matches of five images as the heads give them (-1 ignored, 0 background, >= 1 a box): plenty of both
    kinds; fewer positives than a quota of 8; no positives and few negatives; no candidates; ignored ones only."""
    sizes = (90, 40, 25, 0, 12)
    matches = [torch.randint(-1, 4, (size,), generator=generator).to(dtype) for size in sizes]
    matches[2][matches[2] >= 1] = -1
    matches[1][matches[1] >= 1] = 0
    matches[1][:3] = 2
    matches[4][:] = -1
    return matches


def samples_both_ways(sampler: BalancedPositiveNegativeSampler, matches: list[Tensor], seed: int
                      ) -> tuple[tuple[list[Tensor], list[Tensor]], tuple[list[Tensor], list[Tensor]]]:
    """The masks by sampler's own draw, and by torchvision's, each after seeding torch's generator with seed."""
    results = []
    for draw in (type(sampler).__call__, BalancedPositiveNegativeSampler.__call__):
        torch.manual_seed(seed)
        results.append(draw(sampler, matches))
    return results[0], results[1]


def self_check() -> str | None:
    """None when the batched draw gives torchvision's masks exactly, for integer and float matches."""
    sampler = BalancedPositiveNegativeSampler(16, 0.5)
    give_mixin(sampler, BatchedSamplingMixin, "Batched")
    for dtype in (torch.int64, torch.float32):  # the RoI heads' labels, the RPN's
        try:
            got, want = samples_both_ways(sampler, example_matches(torch.Generator().manual_seed(0), dtype), 0)
        except (AttributeError, TypeError, RuntimeError, ValueError) as e:
            return f"torchvision's BalancedPositiveNegativeSampler changed ({type(e).__name__}: {e})"
        if not same_tensor_lists(got, want):
            return "the batched draw gives other samples than torchvision's BalancedPositiveNegativeSampler"
    return None

"""Repeat-factor sampling for long-tailed data (LVIS's recipe): images of rare categories are seen more often.

Each training image gets a repeat factor r = max over its categories c of max(1, sqrt(t / f_c)), where f_c is the
share of training images that contain c and t the threshold (--repeat-factor-threshold). An epoch holds each image
floor(r) times, and once more with probability r - floor(r), drawn for each epoch from the run's seed, so an
epoch's content depends only on (seed, epoch) and a resumed run replays it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch


def _images_per_category(image_categories: Sequence[set[int]]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for categories in image_categories:
        for c in categories:
            counts[c] = counts.get(c, 0) + 1
    return counts


def repeat_factors(image_categories: Sequence[set[int]], threshold: float) -> np.ndarray:
    """The repeat factor of each image, given the categories each contains."""
    counts = _images_per_category(image_categories)
    total = max(len(image_categories), 1)
    category_factor = {c: max(1.0, math.sqrt(threshold / (n / total))) for c, n in counts.items()}
    return np.array([max((category_factor[c] for c in categories), default=1.0) for categories in image_categories])


def rarest_share(image_categories: Sequence[set[int]]) -> float:
    """The share of images holding the rarest category (1 where no image holds any): a threshold at or under it
    repeats nothing."""
    counts = _images_per_category(image_categories).values()
    return min(counts, default=len(image_categories)) / max(len(image_categories), 1)


class RepeatFactorSampler(torch.utils.data.Sampler):
    """Dataset indices of one epoch, repeated by their factors, shuffled, and sharded over the processes as
    DistributedSampler shards (the list padded to a multiple of them). `set_epoch` chooses the epoch.

    The k-th copy of image i is yielded as the key i + k * len(dataset): the dataset reads key mod its length
    and seeds the augmentation from the key, so each copy is augmented differently.
    """

    def __init__(self, factors: np.ndarray, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        self.whole, self.fraction = np.floor(factors).astype(np.int64), factors - np.floor(factors)
        self.seed, self.num_replicas, self.rank = seed, num_replicas, rank
        self.epoch = 0
        self._lengths: dict[int, int] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _counts(self, epoch: int) -> np.ndarray:
        """How often each image appears in an epoch: its whole part, plus one with the fraction's probability."""
        draws = np.random.default_rng([self.seed, epoch]).random(len(self.fraction))
        return self.whole + (draws < self.fraction)

    def length(self, epoch: int) -> int:
        """Indices this process gets in an epoch (every process gets as many)."""
        if epoch not in self._lengths:  # the run's clock asks for every epoch's length, often
            self._lengths[epoch] = math.ceil(int(self._counts(epoch).sum()) / self.num_replicas)
        return self._lengths[epoch]

    def expected_length(self) -> float:
        """The mean number of indices per process and epoch."""
        return float((self.whole + self.fraction).sum()) / self.num_replicas

    def __iter__(self) -> Iterator[int]:
        counts = self._counts(self.epoch)
        indices = np.repeat(np.arange(len(self.whole)), counts)
        copy_number = np.arange(len(indices)) - np.repeat(np.cumsum(counts) - counts, counts)
        indices = indices + copy_number * len(self.whole)
        order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        # Padded by repeating the list from its start, as often as it takes when it is shorter than the padding.
        padded = np.resize(indices[order.numpy()], self.length(self.epoch) * self.num_replicas).tolist()
        return iter(padded[self.rank::self.num_replicas])

    def __len__(self) -> int:
        return self.length(self.epoch)

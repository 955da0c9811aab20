"""Repeat-factor sampling: LVIS's formula, and epochs whose counts match it, sharded and replayable."""

import math
from collections import Counter

import numpy as np
import pytest

from repeat_factors import RepeatFactorSampler, rarest_share, repeat_factors


def long_tailed(seed: int = 0) -> list[set[int]]:
    """600 images: category 1 in nearly all, 2 in a tenth, 3 in 1 in 100, 4 in 1 in 300."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(600):
        categories = {1} if rng.random() < 0.95 else set()
        categories |= {2} if i % 10 == 0 else set()
        categories |= {3} if i % 100 == 1 else set()
        categories |= {4} if i % 300 == 2 else set()
        images.append(categories or {1})
    return images


def test_factors_follow_the_formula():
    images = long_tailed()
    threshold = 0.05
    shares = {c: sum(c in image for image in images) / len(images) for c in (1, 2, 3, 4)}
    factors = repeat_factors(images, threshold)
    for image, factor in zip(images, factors):
        expected = max(max(1.0, math.sqrt(threshold / shares[c])) for c in image)
        assert factor == pytest.approx(expected)
    assert factors[2] == pytest.approx(math.sqrt(threshold / shares[4])) and factors[2] > 3
    assert factors[5] == 1.0


def test_each_image_appears_as_often_as_its_factor_on_average():
    factors = repeat_factors(long_tailed(), 0.05)
    sampler = RepeatFactorSampler(factors, seed=3)
    epochs = 200
    counts = np.zeros(len(factors))
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        indices = list(sampler)
        assert len(indices) == sampler.length(epoch)
        counts += np.bincount(np.array(indices) % len(factors), minlength=len(factors))
    fraction = factors - np.floor(factors)
    # Each image's count per epoch is floor(r) + Bernoulli(r - floor(r)): mean r, variance f(1 - f).
    standard_error = np.sqrt(fraction * (1 - fraction) / epochs)
    assert np.all(np.abs(counts / epochs - factors) <= 4 * standard_error + 1e-9)
    assert sampler.expected_length() == pytest.approx(factors.sum())


def test_epochs_are_replayable_and_shards_cover_the_epoch_once():
    factors = repeat_factors(long_tailed(), 0.05)
    shards = [RepeatFactorSampler(factors, seed=1, num_replicas=3, rank=r) for r in range(3)]
    for shard in shards:
        shard.set_epoch(4)
    lists = [list(shard) for shard in shards]
    assert len({len(x) for x in lists}) == 1, "every process gets as many"
    whole = RepeatFactorSampler(factors, seed=1)
    whole.set_epoch(4)
    sharded, unsharded = Counter(i for x in lists for i in x), Counter(whole)
    assert not unsharded - sharded, "every index of the epoch reaches a process"
    assert sum((sharded - unsharded).values()) < 3, "padded to a multiple of the processes only"
    again = RepeatFactorSampler(factors, seed=1, num_replicas=3, rank=0)
    again.set_epoch(4)
    assert list(again) == lists[0], "an epoch depends on the seed and the epoch alone"
    again.set_epoch(5)
    assert list(again) != lists[0]


def test_fewer_indices_than_processes_still_give_every_process_as_many():
    shards = [list(RepeatFactorSampler(np.array([1.0, 1.0]), num_replicas=5, rank=r)) for r in range(5)]
    assert [len(x) for x in shards] == [1] * 5
    assert {i for x in shards for i in x} == {0, 1}


def test_each_copy_of_a_repeated_image_has_its_own_key():
    """Copies are keyed image + k * len(dataset), so that each draws its own augmentation."""
    factors = np.array([1.0, 3.0, 2.0])
    keys = list(RepeatFactorSampler(factors, seed=0))
    assert sorted(keys) == [0, 1, 2, 4, 5, 7]


def test_a_threshold_under_every_categorys_share_is_said_to_repeat_nothing(capsys):
    import argparse

    import data

    class Images:
        def __init__(self, categories):
            self.categories = categories

        def __len__(self):
            return len(self.categories)

        def image_categories(self):
            return self.categories

    images = Images([{1}, {1, 2}, {1}, {2}, {3}, set()])
    assert rarest_share(images.categories) == pytest.approx(1 / 6) and rarest_share([]) == 0
    data.train_sampler(argparse.Namespace(repeat_factor_threshold=0.1, seed=0), images)
    assert ("note: no image repeats: the rarest category is in a share of 0.167 of the training images, at or above "
            "--repeat-factor-threshold 0.1") in capsys.readouterr().out
    data.train_sampler(argparse.Namespace(repeat_factor_threshold=0.3, seed=0), images)
    assert "no image repeats" not in capsys.readouterr().out

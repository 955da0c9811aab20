"""Aspect-ratio batching: every index once (the last batch filled up), full batches from one group."""

import math
import random

import torch

from coco_utils import build_dataset
from group_by_aspect_ratio import GroupedBatchSampler, compute_aspect_ratios, create_aspect_ratio_groups


def test_groups_split_portrait_square_landscape():
    groups = create_aspect_ratio_groups([0.3, 0.75, 1.0, 1.33, 4.0], k=3)
    assert groups == sorted(groups) and len(set(groups)) == 5


def test_every_index_once_and_full_batches_homogeneous():
    rng = random.Random(0)
    ratios = [rng.choice([0.6, 1.0, 1.5]) for _ in range(53)]
    groups = create_aspect_ratio_groups(ratios, k=3)
    order = list(range(53))
    rng.shuffle(order)
    sampler = GroupedBatchSampler(order, groups, batch_size=4)
    batches = list(sampler)
    assert len(batches) == len(sampler) == math.ceil(53 / 4) and all(len(b) == 4 for b in batches)
    assert sorted(i for b in batches for i in b) == sorted(list(range(53)) + [i + 53 for i in order[:3]]), (
        "the last batch filled up with copies of the epoch's first images, keyed past the dataset")
    leftover_batches = math.ceil(len(set(groups)) * 3 / 4)  # at most batch_size - 1 left over per group
    assert all(len({groups[i] for i in b}) == 1 for b in batches[:-leftover_batches])


def test_factor_zero_makes_two_groups_split_at_square():
    assert create_aspect_ratio_groups([0.5, 0.99, 1.0, 1.01, 2.0, 4.0], k=0) == [0, 0, 1, 1, 1, 1]


def test_a_repeated_images_key_is_grouped_by_its_image():
    groups = create_aspect_ratio_groups([0.5, 2.0], k=1)
    batches = list(GroupedBatchSampler([0, 1, 2, 3, 4, 5], groups, batch_size=3))  # keys of 3 copies of 2 images
    assert sorted(sorted(b) for b in batches) == [[0, 2, 4], [1, 3, 5]]


def test_no_batch_is_short_so_no_image_trains_alone():
    """torchvision's reference fills its last batch too: SSDlite's training batch norms refuse one image."""
    groups = create_aspect_ratio_groups([1.0] * 7, k=3)
    assert list(GroupedBatchSampler([6, 5, 4, 3, 2, 1, 0], groups, batch_size=2))[-1] == [0, 6 + 7]
    assert list(GroupedBatchSampler([1], [0, 0], batch_size=3)) == [[1, 1 + 2, 1 + 4]], "each copy keyed apart"
    assert list(GroupedBatchSampler([3, 8, 0], [0, 0, 0], batch_size=2))[-1] == [0, 0 + 9], (
        "past the repeat-factor copies' keys too")
    assert list(GroupedBatchSampler([], [0], batch_size=2)) == []


def test_a_datasets_aspect_ratios_come_without_reading_an_image_where_it_says_them(dataset):
    from torchvision.datasets import CocoDetection as TorchvisionCoco

    ours = build_dataset(dataset, "coco", "train", None)
    ratios = ours.aspect_ratios()
    assert compute_aspect_ratios(ours) == ratios and len(set(ratios)) > 1
    assert compute_aspect_ratios(torch.utils.data.Subset(ours, [2, 0])) == [ratios[2], ratios[0]]
    assert create_aspect_ratio_groups(ours, k=3) == create_aspect_ratio_groups(ratios, k=3), "the reference's call"
    theirs = TorchvisionCoco(dataset / "train2017", dataset / "annotations" / "instances_train2017.json")
    assert compute_aspect_ratios(theirs, [0]) == [theirs.coco.imgs[theirs.ids[0]]["width"] /
                                                 theirs.coco.imgs[theirs.ids[0]]["height"]]

    class Sized(torch.utils.data.Dataset):
        """The reference's protocol for a dataset of one's own: (height, width) without the image."""

        def __len__(self):
            return 2

        def __getitem__(self, index):
            raise AssertionError("no sample is read")

        def get_height_and_width(self, index):
            return (100, 50) if index == 0 else (50, 100)

    sized = Sized()
    sized.aspect_ratios = [3.0, 3.0]  # a dataset may keep a list under that name: not this project's method
    assert compute_aspect_ratios(sized) == [0.5, 2.0] and create_aspect_ratio_groups(sized, k=0) == [0, 1]


def test_a_dataset_that_cannot_say_its_sizes_is_read_and_says_so(capsys):
    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            return torch.zeros(3, 40, 20 if index == 0 else 80), {}

    assert create_aspect_ratio_groups(Plain(), k=0) == [0, 1]
    assert "Plain has no aspect_ratios() or get_height_and_width(i), so each of its 2 samples is read" in (
        capsys.readouterr().out)

"""Batch samplers: batches of similar aspect ratio, so that padding to the largest image wastes little, and
epochs that can resume part-way."""

from __future__ import annotations

import bisect
import itertools
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch.utils.data
import torchvision

import utils
from transforms import image_size


def create_aspect_ratio_groups(aspect_ratios: Sequence[float] | torch.utils.data.Dataset, k: int = 3) -> list[int]:
    """Group id of each aspect ratio (or of each sample of a dataset, as torchvision's reference calls it): 2k
    bins spaced evenly in log2 between 1/2 and 2, plus the two tails; k=0 makes two groups, below 1 and from 1
    on (the reference does the same)."""
    if isinstance(aspect_ratios, torch.utils.data.Dataset) or hasattr(aspect_ratios, "get_height_and_width"):
        aspect_ratios = compute_aspect_ratios(aspect_ratios)
    edges = [2 ** (i / k - 1) for i in range(2 * k + 1)] if k > 0 else [1.0]
    return [bisect.bisect_right(edges, r) for r in aspect_ratios]


def compute_aspect_ratios(dataset: torch.utils.data.Dataset, indices: Sequence[int] | None = None) -> list[float]:
    """Width / height of each sample (those of indices, else all), from what the dataset knows without reading
    images where it can: a Subset's dataset, get_height_and_width(i) (what the reference asks of a dataset of
    one's own), this project's aspect_ratios(), torchvision's CocoDetection's annotation file; else every image."""
    indices = range(len(dataset)) if indices is None else indices
    if isinstance(dataset, torch.utils.data.Subset):
        return compute_aspect_ratios(dataset.dataset, [dataset.indices[i] for i in indices])
    if callable(getattr(dataset, "get_height_and_width", None)):
        return [width / height for height, width in map(dataset.get_height_and_width, indices)]
    if callable(getattr(dataset, "aspect_ratios", None)):
        ratios = dataset.aspect_ratios()
        return [ratios[i] for i in indices]
    if isinstance(dataset, torchvision.datasets.CocoDetection):
        images = [dataset.coco.imgs[dataset.ids[i]] for i in indices]
        return [image["width"] / image["height"] for image in images]
    utils.print_once(f"{type(dataset).__name__} has no aspect_ratios() or get_height_and_width(i), so each of its "
                     f"{len(indices)} samples is read for its image size: this can take a while")
    return [width / height for height, width in (image_size(dataset[i][0]) for i in indices)]


class GroupedBatchSampler(torch.utils.data.Sampler):
    """Batches drawn from sampler's order, each from one group; what is left at the end is batched mixed, and the
    last batch is filled up with copies of the epoch's first images (every batch full, as torchvision's reference
    makes them: an image alone would stop a model whose batch norms train, such as SSDlite). A copy's key is its
    image's plus a multiple of the dataset's size past every key of the epoch, as repeat-factor copies are keyed,
    so that it is augmented apart.

    Every index of the sampler appears once, in ceil(len(sampler) / batch_size) batches.
    """

    def __init__(self, sampler: torch.utils.data.Sampler, group_ids: Sequence[int], batch_size: int) -> None:
        self.sampler = sampler
        self.group_ids = group_ids
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        pending: dict[int, list[int]] = defaultdict(list)
        first: list[int] = []
        largest = 0
        for index in self.sampler:
            if len(first) < self.batch_size:
                first.append(index)
            largest = max(largest, index)
            group = pending[self.group_ids[index % len(self.group_ids)]]  # a repeated image's key is past the end
            group.append(index)
            if len(group) == self.batch_size:
                yield group.copy()
                group.clear()
        leftover = [i for group in pending.values() for i in group]
        for start in range(0, len(leftover), self.batch_size):
            batch = leftover[start:start + self.batch_size]
            yield batch + self._copies(first, self.batch_size - len(batch), largest)

    def _copies(self, first: list[int], count: int, largest: int) -> list[int]:
        """Keys of count copies of the first images (cycled, where an epoch has fewer), each past largest."""
        size = len(self.group_ids)
        return [first[k % len(first)] % size + size * (largest // size + 1 + k // len(first)) for k in range(count)]

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)


class ResumableBatchSampler(torch.utils.data.Sampler):
    """The batches of a training epoch, which can start part-way (after the steps already trained on: the order
    of an epoch depends only on the seed and the epoch number, so it can be replayed), and the run's clock: how
    many optimizer steps each epoch has (accumulation_steps batches each; a last, incomplete group is left out)
    and how many came before."""

    def __init__(self, batch_sampler, accumulation_steps: int = 1) -> None:
        self.batch_sampler = batch_sampler
        self.batch_size = batch_sampler.batch_size
        self.accumulation_steps = accumulation_steps
        self.skip = 0
        # Set on resume where earlier epochs had another count of steps (another batch size or number of
        # processes): what they counted, less what this layout counts for them.
        self.step_offset = 0

    @property
    def sampler(self):
        return self.batch_sampler.sampler

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.skip = start_step * self.accumulation_steps

    def batches(self, epoch: int) -> int:
        """Batches in an epoch: the batch sampler's count for that epoch's number of samples."""
        length = getattr(self.sampler, "length", None)
        samples = length(epoch) if length is not None else len(self.sampler)
        if getattr(self.batch_sampler, "drop_last", False):
            return samples // self.batch_size
        return math.ceil(samples / self.batch_size)

    def steps(self, epoch: int) -> int:
        """Optimizer steps in an epoch."""
        return self.batches(epoch) // self.accumulation_steps

    def global_step(self, epoch: int, step: int) -> int:
        """Optimizer steps since the run began, after `step` steps of `epoch`: the x axis of every record."""
        if getattr(self.sampler, "length", None) is None:  # every epoch alike
            return self.step_offset + epoch * self.steps(epoch) + step
        return self.step_offset + sum(self.steps(e) for e in range(epoch)) + step

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.batch_sampler), self.skip, None)

    def __len__(self) -> int:
        return len(self.batch_sampler) - self.skip

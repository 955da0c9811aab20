"""data: the loaders a run builds collate through ReleasingCollate (the copy-paste one too), unless
--no-release-freed-memory."""

from __future__ import annotations

import pytest
import torch

import data
import presets
import train
import utils
from freed_memory import ReleasingCollate


def _loaded(dataset, *options: str) -> data.Data:
    args = train.get_args_parser().parse_args(["--data-path", str(dataset), "--device", "cpu", "-j", "0", "-b", "2",
                                               "--val-loss", *options])
    args.device = torch.device("cpu")
    return data.load_data(args, None)


@pytest.mark.parametrize("copy_paste", [False, True])
def test_loaders_release_freed_memory_after_each_batch(tiny_dataset, copy_paste):
    loaded = _loaded(tiny_dataset, *(["--data-augmentation", "lsj", "--use-copypaste"] if copy_paste else []))
    for loader in (loaded.train_loader, loaded.val_loader, loaded.val_loss_loader):
        assert isinstance(loader.collate_fn, ReleasingCollate)
    wrapped = loaded.train_loader.collate_fn.collate
    assert isinstance(wrapped, presets.CopyPasteCollate) if copy_paste else wrapped is utils.collate_fn
    assert loaded.val_loader.collate_fn.collate is utils.collate_fn
    images, targets = next(iter(loaded.train_loader))
    assert len(images) == len(targets) == 2


def test_loaders_keep_freed_memory_when_asked(tiny_dataset):
    loaded = _loaded(tiny_dataset, "--no-release-freed-memory")
    for loader in (loaded.train_loader, loaded.val_loader, loaded.val_loss_loader):
        assert loader.collate_fn is utils.collate_fn

"""data: the loaders a run builds collate through ReleasingCollate (the copy-paste one too), unless
--no-release-freed-memory; their workers go back to glibc's malloc settings where the main process reuses freed
memory."""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

import data
import presets
import train
import utils
from conftest import ROOT
from errors import UserError
from freed_memory import ReleasingCollate
from preemption import ignore_stop_signals


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


def test_loaders_leave_freed_memory_to_malloc_when_asked(tiny_dataset):
    loaded = _loaded(tiny_dataset, "--no-release-freed-memory")
    for loader in (loaded.train_loader, loaded.val_loader, loaded.val_loss_loader):
        assert loader.collate_fn is utils.collate_fn


@pytest.mark.parametrize("reuse", [True, False])
def test_workers_start_with_malloc_defaults_where_the_main_process_reuses_freed_memory(tiny_dataset, reuse):
    loaded = _loaded(tiny_dataset, "--reuse-freed-memory" if reuse else "--no-reuse-freed-memory")
    expected = data.start_worker_with_malloc_defaults if reuse else ignore_stop_signals
    for loader in (loaded.train_loader, loaded.val_loader, loaded.val_loss_loader):
        assert loader.worker_init_fn is expected


def test_a_val_category_a_resumed_checkpoint_lacks_is_named_as_the_checkpoints(tiny_dataset, tmp_path):
    """The training file lists the category without instances, so it passes; the message must not blame it."""
    root = tmp_path / "extra"
    shutil.copytree(tiny_dataset, root)
    categories = json.loads((root / "annotations" / "instances_train2017.json").read_text())["categories"]
    for split in ("train", "val"):
        path = root / "annotations" / f"instances_{split}2017.json"
        content = json.loads(path.read_text())
        content["categories"].append({"id": 99, "name": "star"})
        if split == "val":
            content["annotations"][0]["category_id"] = 99
        path.write_text(json.dumps(content))
    args = train.get_args_parser().parse_args(["--data-path", str(root), "--device", "cpu", "-j", "0"])
    args.device = torch.device("cpu")
    with pytest.raises(UserError, match=r"lack: star .*; a checkpoint's model knows the categories it was trained on"):
        data.load_data(args, {"categories": categories, "labels_are_category_ids": None})


def test_the_training_order_is_shuffled_anew_each_epoch_and_by_the_seed(tiny_dataset):
    orders = {}
    for seed in (0, 1):
        loaded = _loaded(tiny_dataset, "--seed", str(seed))
        sampler = loaded.train_loader.batch_sampler.sampler
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            orders[seed, epoch] = list(sampler)
    assert all(sorted(order) == list(range(8)) for order in orders.values()), "each image once an epoch"
    assert orders[0, 0] != orders[0, 1] and orders[0, 0] != orders[1, 0]
    assert list(range(8)) not in orders.values()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_worker_started_with_malloc_defaults_refaults_freed_blocks_again():
    # In a fresh interpreter, whose malloc settings may change: a worker inherits its main process's.
    probe = """
import torch, data, freed_memory, preemption
class Probe(torch.utils.data.Dataset):
    def __len__(self):
        return 1
    def __getitem__(self, index):
        return freed_memory.refaults_freed_blocks()
freed_memory.reuse_freed_memory()
for start in (data.start_worker_with_malloc_defaults, preemption.ignore_stop_signals):
    print(next(iter(torch.utils.data.DataLoader(Probe(), num_workers=1, worker_init_fn=start,
                                                collate_fn=lambda batch: batch[0]))))
"""
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "False"]


def test_copies_of_a_repeated_image_are_augmented_apart(tiny_dataset):
    loaded = _loaded(tiny_dataset, "--repeat-factor-threshold", "1.0", "--data-augmentation", "lsj")
    seen: dict = {}
    for images, targets in loaded.train_loader:
        for image, target in zip(images, targets):
            seen.setdefault(target["image_id"], []).append(image)
    repeated = [copies for copies in seen.values() if len(copies) > 1]
    assert repeated, "threshold 1.0 repeats every image of a category that some images lack"
    for first, second, *_ in repeated:
        assert first.shape != second.shape or not torch.equal(first, second)


def test_a_split_of_images_of_many_megapixels_is_one_line_at_the_start(tiny_dataset, monkeypatch, capsys):
    import coco_utils

    monkeypatch.setattr(coco_utils, "LARGE_IMAGE_PIXELS", 64 * 64 - 1)  # every image of the dataset is 64 x 64
    _loaded(tiny_dataset)
    printed = capsys.readouterr().out
    assert "note: 8 train images of over 0 megapixels; the largest: " in printed
    assert "note: 2 val images of over 0 megapixels; the largest: " in printed
    assert printed.count("is decoded, with its masks, at full size before the model shrinks it") == 2


def test_what_the_training_file_holds_that_the_model_does_not_learn_is_said_at_the_start(tiny_dataset, tmp_path,
                                                                                         capsys):
    """As annotation tools export them: one category's instances all crowd regions (CVAT's drawn masks), and
    instances without an outline (rectangles) beside outlined ones, which Mask R-CNN leaves out."""
    root = tmp_path / "exported"
    shutil.copytree(tiny_dataset, root)
    path = root / "annotations" / "instances_train2017.json"
    content = json.loads(path.read_text())
    crowded = content["categories"][0]
    anns = content["annotations"]
    for ann in anns:
        if ann["category_id"] == crowded["id"]:
            ann["iscrowd"] = 1
    rectangles = [ann for ann in anns if ann["category_id"] != crowded["id"]][:3]
    for ann in rectangles[:2]:
        ann["segmentation"] = []
    x, y, w, h = rectangles[2]["bbox"]
    rectangles[2]["segmentation"] = [[x, y, x + w, y + h]]  # a line: no polygon of 3 points is left
    path.write_text(json.dumps(content))
    crowd_count = sum(ann["category_id"] == crowded["id"] for ann in anns)
    _loaded(root)
    printed = capsys.readouterr().out
    assert re.search(rf"note: {re.escape(str(path))}: \d+ categories have no instances \(first: .*\), 1 of them only "
                     rf"crowd regions, which are not learned, nor scored as instances \(first: {crowded['name']!r}, "
                     rf"{crowd_count} regions with iscrowd 1; ", printed), printed
    assert (f"note: {path}: 3 instances have no outline to learn a mask from, so maskrcnn_resnet50_fpn leaves them "
            f"out and their objects train as background wherever they show; give them outlines, or train a box "
            f"model such as --model fasterrcnn_resnet50_fpn (the first: ") in printed
    _loaded(root, "--model", "fasterrcnn_resnet50_fpn")
    printed = capsys.readouterr().out
    assert "only crowd regions" in printed and "no outline to learn a mask from" not in printed
    _loaded(tiny_dataset)
    printed = capsys.readouterr().out
    assert "only crowd regions" not in printed and "no outline" not in printed

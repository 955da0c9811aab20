"""agreement.py: what every process of a job must share (flags, data read, checkpoint found)."""

import argparse
from pathlib import Path

import numpy as np
import pytest

import agreement
from conftest import in_two_processes
from errors import UserError


def test_the_data_every_process_read_is_compared_by_every_image_id(monkeypatch):
    """check_same_data's wiring: what it compares across ranks differs for 2,000 compact ids that differ in the
    middle."""
    compared = []
    monkeypatch.setattr(agreement.utils, "get_world_size", lambda: 2)
    monkeypatch.setattr(agreement.utils, "all_gather_object", lambda value: [value])
    monkeypatch.setattr(agreement.utils, "first_other_rank", lambda read: compared.append(read))
    ids = np.arange(2000)
    changed = ids.copy()
    changed[1000] = -1
    for read, checksum in ((ids, 7), (changed, 8)):
        splits = [argparse.Namespace(ids=read[:-k], instances_read=lambda k=k, checksum=checksum: (k, checksum))
                  for k in (1, 2)]
        agreement.check_same_data(argparse.Namespace(data_path="d"), argparse.Namespace(
            train_set=splits[0], val_set=splits[1], category_map=argparse.Namespace(ids=[1])))
    for part in ("training images", "validation images", "training instances", "validation instances"):
        assert compared[0][part] != compared[1][part], part
    assert compared[0]["training instances"] == (1, 7) and compared[0]["validation instances"] == (2, 7)
    assert compared[0]["training images"][0] == 1999 and compared[0]["validation images"][0] == 1998


def test_ranks_that_read_other_instances_of_the_same_images_stop_with_one_line(monkeypatch):
    """As where one node's copy of the annotation file was edited: the same images, other labels."""
    monkeypatch.setattr(agreement.utils, "get_world_size", lambda: 2)
    monkeypatch.setattr(agreement.utils, "all_gather_object", lambda value: [value, f"{value}2"])
    monkeypatch.setattr(agreement.utils, "first_other_rank", lambda read: (1, {
        **read, "training instances": (57, 1), "validation instances": (9, 1)}, read))
    split = argparse.Namespace(ids=[1, 2], instances_read=lambda: (57, 2))
    said = (r"^rank 1 read other training instances and validation instances than rank 0 \(57 training instances "
            r"on both, with other labels, boxes or outlines \(or their images' file names or sizes\); 9 validation "
            r"instances against 57; its --data-path d2, rank 0's d\): every node must read the same files$")
    with pytest.raises(UserError, match=said):
        agreement.check_same_data(argparse.Namespace(data_path="d"), argparse.Namespace(
            train_set=split, val_set=split, category_map=argparse.Namespace(ids=[1])))


def test_the_image_ids_digest_covers_every_id_of_the_compact_array():
    """check_same_data compares digests of the ids, which the compact dataset keeps as a NumPy array: one id
    changed in the middle of 5,000 must change it (NumPy's repr shows only an array's ends)."""
    ids = np.arange(5000)
    changed = ids.copy()
    changed[2000] = 99999
    assert agreement.ids_digest(changed) != agreement.ids_digest(ids)
    assert agreement.ids_digest(ids) == agreement.ids_digest(list(range(5000))), "before compacting and after alike"
    assert agreement.ids_digest(np.asarray(["a", "b"])) == agreement.ids_digest(["a", "b"])
    assert agreement.ids_digest([1, 2**63 + 1]) != agreement.ids_digest([1, 2**63 + 2]), "not as floats"


def test_ranks_that_find_different_checkpoints_to_resume_stop_with_one_line(tmp_path):
    """A node that cannot see the output folder (not shared) would start afresh beside ranks that resume."""
    def work(rank: int) -> str:
        found = {"epoch": 0, "step": 10} if rank == 0 else None
        agreement.check_same_on_every_rank(found, "auto")
        return "resumed alike"

    said = in_two_processes(tmp_path, work)
    assert said[0] == said[1] and "the processes found different checkpoints (rank 0: epoch 0 step 10; rank 1: " \
        "none); every node must read the same file" in said[0], said
    assert in_two_processes(tmp_path / "again", lambda rank: agreement.check_same_on_every_rank(
        {"epoch": 1, "step": None}, "auto") or "resumed alike") == {0: "resumed alike", 1: "resumed alike"}
    said = in_two_processes(tmp_path / "ends", lambda rank: agreement.check_same_on_every_rank(
        {"epoch": rank, "step": None}, "auto"))
    assert "(rank 0: epoch 0; rank 1: epoch 1)" in said[0], said
    # Two runs' checkpoints at the same epoch: each rank would take its own run's settings.
    said = in_two_processes(tmp_path / "runs", lambda rank: agreement.check_same_on_every_rank(
        {"epoch": 3, "step": None, "args": {"eval_max_dets": 100 + 200 * rank, "min_size": 800}}, "a.pth"))
    assert "(rank 0: epoch 3 of run 1; rank 1: epoch 3 of run 2)" in said[0], said
    assert in_two_processes(tmp_path / "copies", lambda rank: agreement.check_same_on_every_rank(
        {"epoch": 3, "step": None, "args": {"eval_max_dets": 300, "output_dir": Path("out")}}, "a.pth")
        or "resumed alike") == {0: "resumed alike", 1: "resumed alike"}, "copies of one file"


def test_one_process_reads_no_digest_of_its_data(monkeypatch):
    """Nothing to compare with: the digests' seconds at COCO's size are spent only where there are other ranks."""
    def unwanted():
        raise AssertionError("digest computed on one process")

    split = argparse.Namespace(ids=[1, 2], instances_read=unwanted)
    agreement.check_same_data(argparse.Namespace(data_path="d"), argparse.Namespace(
        train_set=split, val_set=split, category_map=argparse.Namespace(ids=[1])))

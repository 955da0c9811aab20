"""agreement.py: what every process of a job must share (flags, data read, checkpoint found)."""

import argparse

import numpy as np

import agreement
from conftest import in_two_processes


def test_the_data_every_process_read_is_compared_by_every_image_id(monkeypatch):
    """check_same_data's wiring: what it compares across ranks differs for 2,000 compact ids that differ in the
    middle."""
    compared = []
    monkeypatch.setattr(agreement.utils, "all_gather_object", lambda value: [value])
    monkeypatch.setattr(agreement.utils, "first_other_rank", lambda read: compared.append(read))
    ids = np.arange(2000)
    changed = ids.copy()
    changed[1000] = -1
    for read in (ids, changed):
        split = argparse.Namespace(ids=read)
        agreement.check_same_data(argparse.Namespace(data_path="d"), argparse.Namespace(
            train_set=split, val_set=split, category_map=argparse.Namespace(ids=[1])))
    assert compared[0]["training images"] != compared[1]["training images"]
    assert compared[0]["validation images"] != compared[1]["validation images"]


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

"""Checkpoints are written whole or not at all, and read without running code."""

import os
import pickle

import pytest
import torch

from checkpoint import load_file, save_atomic
from utils import UserError


def test_round_trip_leaves_no_temporary_files(tmp_path):
    save_atomic({"a": torch.arange(3), "epoch": 2, "args": {"lr": 0.1}}, tmp_path / "c.pth")
    assert load_file(tmp_path / "c.pth", "--resume")["epoch"] == 2
    assert os.listdir(tmp_path) == ["c.pth"]


def test_failed_save_keeps_previous_file(tmp_path):
    save_atomic({"epoch": 1}, tmp_path / "c.pth")

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        save_atomic({"epoch": 2, "bad": Unsaveable()}, tmp_path / "c.pth")
    assert load_file(tmp_path / "c.pth", "--resume")["epoch"] == 1
    assert os.listdir(tmp_path) == ["c.pth"]


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": _Payload(str(marker))}, f)
    with pytest.raises(UserError, match="refused"):
        load_file(tmp_path / "evil.pth", "--resume")
    assert not marker.exists()


def test_truncated_and_missing_files(tmp_path):
    save_atomic({"w": torch.zeros(1000)}, tmp_path / "c.pth")
    data = (tmp_path / "c.pth").read_bytes()
    (tmp_path / "t.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_file(tmp_path / "t.pth", "--resume")
    with pytest.raises(UserError, match="no such file"):
        load_file(tmp_path / "none.pth", "--resume")

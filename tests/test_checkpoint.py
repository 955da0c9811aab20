"""Checkpoints are written whole or not at all, and read without running code."""

import os
import pickle
import time

import pytest
import torch

from checkpoint import load_file, save_atomic
from conftest import TINY, run_cli, start_cli
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


def _kill_when(process, output_dir, moment):
    """SIGKILL the run at a moment: a number of seconds after start, or 'save' (while a checkpoint is being
    written). Returns once the process is gone."""
    deadline = time.time() + 240
    started = time.time()
    while process.poll() is None and time.time() < deadline:
        if moment == "save":
            if any(output_dir.glob(".*.pth.*.tmp")):
                break
            time.sleep(0.005)
        elif time.time() - started >= moment:
            break
        else:
            time.sleep(0.02)
    process.kill()
    process.communicate()


def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    args = ["--data-path", str(tiny_dataset), "--output-dir", str(out), *TINY, "--epochs", "3",
            "--resume", "auto"]
    moments = ["save", 7, "save", 9, 11, "save", 6, 13, "save", 8]
    interrupted_saves = 0
    for moment in moments:
        process = start_cli("train.py", *args)
        _kill_when(process, out, moment)
        interrupted_saves += any(out.glob(".*.pth.*.tmp"))
        if (out / "checkpoint.pth").exists():
            checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
            assert {"model", "optimizer", "epoch"} <= set(checkpoint)
    assert interrupted_saves >= 2, "some kills must land during a save"
    result = run_cli("train.py", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 2
    assert not list(out.glob(".*.pth.*.tmp")), "temporaries of killed saves are cleaned up"

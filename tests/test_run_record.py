"""run_record.py: args.json, each start of training in a folder and how the latest ended."""

import argparse
import datetime
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torchvision

import errors
import run_record
import utils
from conftest import ROOT
from errors import UserError


def test_args_json_is_strict_json_whatever_the_arguments_hold(tmp_path):
    args = argparse.Namespace(clip_grad_norm=float("inf"), device=torch.device("cpu"), lr_steps=[16, 22],
                              data_path=Path("/data"), amp=None, lr=0.02)
    run_record.write_arguments(tmp_path, args, resumed_here=False)
    written = json.loads((tmp_path / "args.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert written["args"] == {"clip_grad_norm": "inf", "device": "cpu", "lr_steps": [16, 22], "data_path": "/data",
                               "amp": None, "lr": 0.02}


def test_args_json_keeps_the_folders_earlier_starts_and_the_software_that_ran(tmp_path, monkeypatch):
    monkeypatch.setattr(run_record.sys, "argv", ["train.py", "--lr", "0.02"])
    run_record.write_arguments(tmp_path, argparse.Namespace(lr=0.02, seed=0), resumed_here=False)  # a start that failed
    run_record.write_arguments(tmp_path, argparse.Namespace(lr=0.02, seed=1), resumed_here=False)  # a fresh run
    first = json.loads((tmp_path / "args.json").read_text())
    assert first["earlier_starts"] == [], "a fresh run's args.json replaces one of a start that trained nothing"
    monkeypatch.setattr(run_record.sys, "argv", ["train.py", "--lr", "0.01", "--resume", "auto"])
    run_record.write_arguments(tmp_path, argparse.Namespace(lr=0.01, seed=5), resumed_here=True)
    run_record.write_arguments(tmp_path, argparse.Namespace(lr=0.01, seed=6), resumed_here=True)
    written = json.loads((tmp_path / "args.json").read_text())
    assert written["args"] == {"lr": 0.01, "seed": 6}
    assert [start["args"]["seed"] for start in written["earlier_starts"]] == [1, 5]
    assert written["earlier_starts"][0]["command"] == "train.py --lr 0.02"
    assert "earlier_starts" not in written["earlier_starts"][0], "one list, not nested ones"
    software = written["software"]
    assert (software["torch"], software["torchvision"]) == (torch.__version__, torchvision.__version__)
    if (ROOT / ".git").exists():  # a clone, as CI's
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert software["git_commit"] == head.stdout.strip() and software["git_changed_files"] in (True, False)
        status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True)
        assert software["git_changed_files"] == bool(status.stdout.strip())
    assert written["working_directory"] == os.getcwd()
    assert datetime.datetime.fromisoformat(written["started"]).tzinfo is not None, "a time with its zone"
    (tmp_path / "args.json").write_text('["not", "ours"]')
    run_record.write_arguments(tmp_path, argparse.Namespace(lr=0.01), resumed_here=True)
    assert json.loads((tmp_path / "args.json").read_text())["earlier_starts"] == []


def test_args_json_says_a_lost_peer_as_the_console_does(tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "get_world_size", lambda: 2)
    run_record.write_arguments(tmp_path, argparse.Namespace(lr=0.02), resumed_here=False)
    with pytest.raises(RuntimeError), run_record.outcome_recorded(tmp_path / "args.json", argparse.Namespace(
            stopped_early=False)):
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:59609")
    assert json.loads((tmp_path / "args.json").read_text())["outcome"] == (
        "error: another process of the job stopped answering or ended; --resume auto continues")


@pytest.mark.parametrize("error, outcome", [
    (SystemExit(143), "stopped by a signal (exit status 143); --resume auto continues"),
    (errors.Terminated(), "interrupted by SIGTERM"), (KeyboardInterrupt(), "interrupted by Ctrl-C"),
    (UserError("loss is nan at epoch 2 step 7"), "error: loss is nan at epoch 2 step 7"),
    (RuntimeError("NCCL timeout"), "failed: RuntimeError: NCCL timeout")])
def test_args_json_says_how_training_ended(tmp_path, error, outcome):
    run_record.write_arguments(tmp_path, argparse.Namespace(lr=0.02), resumed_here=False)
    state = argparse.Namespace(stopped_early=False)
    with pytest.raises(type(error)), run_record.outcome_recorded(tmp_path / "args.json", state):
        raise error
    written = json.loads((tmp_path / "args.json").read_text())
    assert written["outcome"] == outcome and written["args"] == {"lr": 0.02}
    assert datetime.datetime.fromisoformat(written["ended"]) >= datetime.datetime.fromisoformat(written["started"])
    state.stopped_early = True
    with run_record.outcome_recorded(tmp_path / "args.json", state):
        pass
    assert json.loads((tmp_path / "args.json").read_text())["outcome"] == "stopped early (--patience)"
    with run_record.outcome_recorded(None, state):  # another rank's: nothing written
        (tmp_path / "args.json").unlink()
    assert not (tmp_path / "args.json").exists()

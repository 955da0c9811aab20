"""A stop signal mid-epoch saves the position; the resumed run replays exactly what was left."""

import re
import signal
import time

import pytest
import torch

import preemption
from conftest import TINY, read_metrics, run_cli, start_cli
from preemption import StopRequest
from tools.make_coco_dataset import DatasetSpec, generate_dataset

FLAGS = [*TINY, "--epochs", "2", "--use-deterministic-algorithms", "--seed", "7", "--vis-images", "0",
         "--no-tensorboard"]


def _train_records(output_dir):
    return [(r["epoch"], r["step"], r["loss"], r["lr"]) for r in read_metrics(output_dir) if r["type"] == "train"]


def _stop_at(process, output_dir, epoch, step, sig):
    """Send sig once the run has logged (epoch, step); wait for it to end."""
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if any((r["epoch"], r["step"]) >= (epoch, step) for r in read_metrics(output_dir) if r["type"] == "train"):
            process.send_signal(sig)
            break
        time.sleep(0.05)
    output, _ = process.communicate(timeout=300)
    return output


def test_a_stop_signal_saves_the_position_and_the_resumed_run_replays_the_rest(tiny_dataset, tmp_path, uninterrupted):
    """Ctrl-C here; SIGTERM in the test below, which also compares the final weights."""
    expected = uninterrupted["records"]
    assert len(expected) == 8
    args = ["--data-path", str(tiny_dataset), "--output-dir", str(tmp_path), *FLAGS, "--resume", "auto"]
    process = start_cli("train.py", *args)
    output = _stop_at(process, tmp_path, epoch=0, step=2, sig=signal.SIGINT)
    assert process.returncode == 128 + signal.SIGINT.value, output
    assert "Stopped by SIGINT at epoch 0 step" in output
    assert f"--resume auto: no {tmp_path / 'checkpoint.pth'}, so this is a new run" in output
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 0 and 2 <= checkpoint["step"] < 4
    assert not (tmp_path / "model_0.pth").exists(), "only complete epochs get a model_{epoch}.pth"

    result = run_cli("train.py", *args)
    assert result.returncode == 0, result.stderr
    assert f"Resumed from {tmp_path / 'checkpoint.pth'} (epoch 0 step {checkpoint['step']})" in result.stdout
    resumed = _train_records(tmp_path)
    assert [r[:2] for r in resumed] == [r[:2] for r in expected], "each step logged once"
    assert [r[3] for r in resumed] == [r[3] for r in expected], "same learning rates"
    assert [r[2] for r in resumed] == pytest.approx([r[2] for r in expected], rel=1e-5), "same losses"
    epochs, expected_epochs = _epoch_records(tmp_path), uninterrupted["epochs"]
    assert [r[:3] for r in epochs] == [r[:3] for r in expected_epochs], "each epoch's record over all its steps"
    assert [r[3] for r in epochs] == pytest.approx([r[3] for r in expected_epochs], rel=1e-5)


def _final_weights(output_dir):
    return torch.load(output_dir / "checkpoint.pth", weights_only=True)["model"]


def _largest_difference(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def _wait_for(process, output_dir, epoch, step):
    """Until the run has logged (epoch, step); then SIGKILL it, as a lost machine would end it."""
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if any((r["epoch"], r["step"]) >= (epoch, step) for r in read_metrics(output_dir) if r["type"] == "train"):
            break
        time.sleep(0.05)
    process.kill()
    process.communicate()


@pytest.fixture(scope="module")
def uninterrupted(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run_cli("train.py", "--data-path", str(tiny_dataset), "--output-dir", str(out), *FLAGS)
    assert result.returncode == 0, result.stderr
    weights = _final_weights(out)
    for path in out.glob("*.pth"):
        path.unlink()
    return {"weights": weights, "records": _train_records(out), "epochs": _epoch_records(out)}


def _epoch_records(output_dir):
    return [(r["epoch"], r["steps"], r["first_step"], r["loss"]) for r in read_metrics(output_dir)
            if r["type"] == "epoch"]


@pytest.mark.parametrize("how", ["SIGKILL after an epoch", "SIGTERM mid-epoch"])
def test_a_resumed_run_ends_with_the_uninterrupted_runs_weights_to_the_bit(tiny_dataset, tmp_path, uninterrupted,
                                                                             how):
    args = ["--data-path", str(tiny_dataset), "--output-dir", str(tmp_path), *FLAGS, "--resume", "auto"]
    process = start_cli("train.py", *args)
    if how.startswith("SIGKILL"):
        _wait_for(process, tmp_path, epoch=1, step=2)  # the last checkpoint is epoch 0's
        assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["step"] is None
    else:
        _stop_at(process, tmp_path, epoch=0, step=2, sig=signal.SIGTERM)
        assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["step"] is not None
    result = run_cli("train.py", *args)
    assert result.returncode == 0, result.stderr
    difference = _largest_difference(uninterrupted["weights"], _final_weights(tmp_path))
    print(f"{how}: largest difference of the final weights from the uninterrupted run's: {difference}")
    assert difference == 0.0


@pytest.fixture(scope="module")
def long_validation(tmp_path_factory):
    """Four training images and many validation images: an evaluation long enough to be stopped during."""
    spec = DatasetSpec(train_images=4, val_images=8, min_size=64, max_size=64, instances=2, seed=5,
                       crowd_share=0.0, empty_share=0.0, gray_share=0.0, degenerate_share=0.0)
    return generate_dataset(tmp_path_factory.mktemp("long_validation"), spec)


def _stop_during_evaluation(process, sig):
    """Send sig once the run has logged its first evaluation step; wait for it to end. Returns what it printed."""
    printed = []
    for line in process.stdout:
        printed.append(line)
        if re.match(r"Test:  \[ *1/", line):
            process.send_signal(sig)
            break
    rest, _ = process.communicate(timeout=300)
    return "".join(printed) + rest


def test_a_stop_during_evaluation_exits_at_once_and_the_resumed_run_evaluates_that_epoch_first(long_validation,
                                                                                               tmp_path):
    """The epoch's checkpoint and validation losses are written before its evaluation starts: the stop keeps
    them and records no evaluation, and the resumed run evaluates that epoch before anything else, even when it
    was the last, without computing its losses again. A fresh run in the same folder then sets those records
    aside."""
    args = ["--data-path", str(long_validation), "--output-dir", str(tmp_path), *FLAGS, "--epochs", "1",
            "--val-loss", "--resume", "auto"]
    process = start_cli("train.py", *args)
    output = _stop_during_evaluation(process, signal.SIGTERM)
    assert process.returncode == 128 + signal.SIGTERM.value, output
    assert "Stopped by SIGTERM during epoch 0's evaluation" in output
    assert "Test:  [8/8]" not in output, "the evaluation ended unfinished"
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"]) == (0, None)
    epoch_end, validation = [r for r in read_metrics(tmp_path) if r["type"] != "train"]
    assert (epoch_end["type"], validation["type"]) == ("epoch", "val")

    result = run_cli("train.py", *args)
    assert result.returncode == 0, result.stderr
    assert "Evaluating epoch 0 first: the run stopped after saving it, before its evaluation ended" in result.stdout
    assert "Test:  [8/8]" in result.stdout
    evaluations = [r for r in read_metrics(tmp_path) if r["type"] not in ("train", "epoch")]
    assert [(r["type"], r["epoch"]) for r in evaluations] == [("val", 0), ("eval", 0)]
    assert evaluations[0] == validation, "the validation losses kept, not computed again"
    assert [r for r in read_metrics(tmp_path) if r["type"] == "epoch"] == [epoch_end], "the epoch's record, once"
    again = run_cli("train.py", *args)
    assert "Evaluating epoch 0 first" not in again.stdout, "once evaluated, not again"
    test_only = tmp_path / "test_only"  # a Ctrl-C there: Python's default signal handling, one line, no traceback
    process = start_cli("train.py", *args[:-2], "--output-dir", str(test_only), "--test-only", "--resume",
                        str(tmp_path / "checkpoint.pth"))
    output = _stop_during_evaluation(process, signal.SIGINT)
    assert process.returncode == 128 + signal.SIGINT.value, output
    assert output.endswith("interrupted by Ctrl-C: the evaluation did not end, and no predictions were written\n")
    assert "Traceback" not in output and not list(test_only.glob("predictions_*"))
    fresh = run_cli("train.py", *args[:-2])
    assert fresh.returncode == 0, fresh.stderr
    assert "held another run's outputs" in fresh.stdout and "New best mask AP" in fresh.stdout
    kept, = (tmp_path / "previous_runs").iterdir()
    assert {"checkpoint.pth", "model_0.pth", "metrics.jsonl", "model_best.pth"} <= {p.name for p in kept.iterdir()}
    assert [r["epoch"] for r in read_metrics(tmp_path) if r["type"] == "eval"] == [0], "the new run's only"


def test_ranks_agree_on_the_signal_one_of_them_received(monkeypatch):
    monkeypatch.setattr(preemption.utils, "max_over_ranks", lambda values: [max(values[0], signal.SIGTERM.value)])
    quiet = StopRequest()
    assert quiet.agreed() and quiet.signal_name == "SIGTERM" and quiet.exit_code == 143
    interrupted = StopRequest()
    interrupted.signal_name = "SIGINT"  # a terminal's Ctrl-C here, a launcher's SIGTERM on another rank
    assert interrupted.agreed() and interrupted.exit_code == 143, "every rank exits alike"


def test_a_second_ctrl_c_stops_at_once_and_a_second_sigterm_does_not(capsys):
    pressed = StopRequest()
    pressed._handle(signal.SIGINT, None)
    assert pressed.requested() and "SIGINT received" in capsys.readouterr().out
    with pytest.raises(KeyboardInterrupt):
        pressed._handle(signal.SIGINT, None)
    passed_on = StopRequest()  # a launcher passes the terminal's Ctrl-C on as SIGTERM too
    passed_on._handle(signal.SIGINT, None)
    passed_on._handle(signal.SIGTERM, None)
    terminated = StopRequest()
    terminated._handle(signal.SIGTERM, None)
    terminated._handle(signal.SIGTERM, None)
    assert passed_on.signal_name == "SIGINT" and terminated.signal_name == "SIGTERM"

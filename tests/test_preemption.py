"""A stop signal mid-epoch saves the position; the resumed run replays exactly what was left."""

import signal
import time

import pytest
import torch

from conftest import TINY, read_metrics, run_cli, start_cli

FLAGS = [*TINY, "--epochs", "2", "--use-deterministic-algorithms", "--seed", "7"]


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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_resumed_run_matches_uninterrupted_run(tiny_dataset, tmp_path, sig):
    straight = tmp_path / "straight"
    result = run_cli("train.py", "--data-path", str(tiny_dataset), "--output-dir", str(straight), *FLAGS)
    assert result.returncode == 0, result.stderr
    expected = _train_records(straight)
    assert len(expected) == 8

    stopped = tmp_path / "stopped"
    args = ["--data-path", str(tiny_dataset), "--output-dir", str(stopped), *FLAGS, "--resume", "auto"]
    process = start_cli("train.py", *args)
    output = _stop_at(process, stopped, epoch=0, step=2, sig=sig)
    assert process.returncode == 128 + sig.value, output
    assert f"Stopped by {sig.name} at epoch 0 step" in output
    checkpoint = torch.load(stopped / "checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 0 and 2 <= checkpoint["step"] < 4
    assert not (stopped / "model_0.pth").exists(), "only complete epochs get a model_{epoch}.pth"

    result = run_cli("train.py", *args)
    assert result.returncode == 0, result.stderr
    assert f"Resumed from {stopped / 'checkpoint.pth'} (epoch 0 step {checkpoint['step']})" in result.stdout
    resumed = _train_records(stopped)
    assert [r[:2] for r in resumed] == [r[:2] for r in expected], "each step logged once"
    assert [r[3] for r in resumed] == [r[3] for r in expected], "same learning rates"
    assert [r[2] for r in resumed] == pytest.approx([r[2] for r in expected], rel=1e-5), "same losses"

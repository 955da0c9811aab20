"""The trainer's features through the real CLI: accumulation, EMA, validation loss, early stopping, epoch files."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import TINY, read_metrics, run_cli


@pytest.fixture(scope="module")
def trainer_features_run(tiny_dataset, tmp_path_factory):
    """--grad-accum-steps 2 --model-ema --val-loss --patience 2 for up to 5 epochs, at a learning rate of 0 so
    that the AP of the first evaluation is never improved on and the run stops after its third."""
    out = tmp_path_factory.mktemp("features")
    result = run_cli("train.py", "--data-path", str(tiny_dataset), "--output-dir", str(out), *TINY, "-b", "1",
                     "--epochs", "5", "--grad-accum-steps", "2", "--model-ema", "--model-ema-steps", "1",
                     "--val-loss", "--patience", "2", "--vis-images", "1", "--lr", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_accumulation_average_validation_loss_and_patience_together(trainer_features_run):
    out, result = trainer_features_run
    assert "Effective batch: 1 images x 1 processes x 2 accumulation steps = 2 per optimizer step" in result.stdout
    assert re.search(r"Stopping early: the mask AP has not improved on \d\.\d{4} for 2 evaluations",
                     result.stdout)
    records = read_metrics(out)
    assert [r["epoch"] for r in records if r["type"] == "eval"] == [0, 1, 2], "stopped at the third evaluation"
    assert [r["step"] for r in records if r["type"] == "train" and r["epoch"] == 0] == [1, 2, 3, 4], (
        "8 images, batches of 1, 2 a step: 4 optimizer steps an epoch")
    (validation,) = [r for r in records if r["type"] == "val" and r["epoch"] == 0]
    assert {"loss", "loss_mask", "loss_classifier"} <= set(validation) and validation["global_step"] == 4
    evaluation = [r for r in records if r["type"] == "eval"][0]
    assert set(evaluation["raw"]) == {"bbox", "segm"}, "the raw weights' AP beside the average's"
    assert "Validation after epoch 0: loss: " in result.stdout
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert checkpoint["model_ema"]["updates"] == 12 and checkpoint["stopped_early"]
    with Image.open(out / "curves.png") as img:
        assert img.size == (1200, 320)


def test_resume_auto_after_an_early_stop_says_so(trainer_features_run, tiny_dataset):
    out, _ = trainer_features_run
    result = run_cli("train.py", "--data-path", str(tiny_dataset), "--output-dir", str(out), *TINY, "--epochs", "5",
                     "--resume", "auto")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "this run stopped early at epoch 2 (--patience), so there is nothing to continue" in result.stdout
    assert "Epoch: [" not in result.stdout


def test_epoch_files_share_the_checkpoints_bytes_and_model_best_is_lean(trainer_features_run, tiny_dataset,
                                                                         tmp_path):
    out, _ = trainer_features_run
    assert (out / "model_1.pth").stat().st_ino != (out / "model_2.pth").stat().st_ino
    best = torch.load(out / "model_best.pth", weights_only=True)
    assert "optimizer" not in best and "model_ema" in best and best["categories"]
    assert (out / "model_best.pth").stat().st_size < 0.75 * (out / "model_0.pth").stat().st_size
    common = ["--data-path", str(tiny_dataset), *TINY, "--no-tensorboard", "--vis-images", "0"]
    result = run_cli("train.py", *common, "--output-dir", str(tmp_path / "eval"), "--test-only", "--resume",
                     str(out / "model_best.pth"))
    assert result.returncode == 0 and "Evaluating the weights' moving average" in result.stdout, result.stderr
    # Its epoch is 0: at --epochs 1 nothing is left to train, which is not said, as more epochs could not go on.
    result = run_cli("train.py", *common, "--output-dir", str(tmp_path / "again"), "--resume",
                     str(out / "model_best.pth"), "--epochs", "1")
    assert result.returncode == 2 and "holds weights only, no optimizer state" in result.stderr
    assert "pass it to --weights instead" in result.stderr
    result = run_cli("tools/predict.py", "--checkpoint", str(out / "model_best.pth"), str(tiny_dataset / "val2017"),
                     "--output-dir", str(tmp_path / "pictures"), "--device", "cpu", "--score-thresh", "0.0")
    assert result.returncode == 0 and "moving average" in result.stdout, result.stderr
    assert isinstance(json.loads((tmp_path / "pictures" / "predictions.json").read_text()), list)
    images = json.loads((tmp_path / "pictures" / "images.json").read_text())
    assert sorted(Path(image["file_name"]).name for image in images) == sorted(
        p.name for p in (tiny_dataset / "val2017").iterdir())


def test_one_runs_epoch_files_evaluations_and_resumes(tiny_dataset, tmp_path):
    """One short run and what later runs do with it, in order (each step needs the one before): --keep-last and
    --eval-interval; a resume at twice the batch; a resume with nothing left to train; a resume into another
    run's folder; fine-tuning from its from-scratch weights and resuming that."""
    result = run_cli("train.py", "--data-path", str(tiny_dataset), "--output-dir", str(tmp_path), *TINY,
                     "--epochs", "3", "--keep-last", "1", "--no-tensorboard", "--vis-images", "0",
                     "--eval-interval", "2")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.glob("model_*.pth")) == ["model_2.pth", "model_best.pth"]
    assert [r["epoch"] for r in read_metrics(tmp_path) if r["type"] == "eval"] == [1, 2], "the 2nd and the last"
    assert not list(tmp_path.glob("events.out.tfevents.*")) and not (tmp_path / "predictions").exists()
    # Resumed at twice the batch: half the steps per epoch, and the x axis goes on from the saved run's step.
    result = run_cli("train.py", "--data-path", str(tiny_dataset), "--output-dir", str(tmp_path), *TINY,
                     "--epochs", "4", "--keep-last", "1", "--no-tensorboard", "--vis-images", "0", "-b", "4",
                     "--resume", "auto")
    assert result.returncode == 0, result.stderr
    steps = [(r["epoch"], r["global_step"]) for r in read_metrics(tmp_path) if r["type"] == "train"]
    assert [g for e, g in steps if e == 2][-1] == 12 and [g for e, g in steps if e == 3] == [13, 14]
    assert [r["epoch"] for r in read_metrics(tmp_path) if r["type"] == "eval"] == [1, 2, 3], "without --eval-interval"
    records = read_metrics(tmp_path)
    result = run_cli("train.py", "--data-path", str(tiny_dataset), "--output-dir", str(tmp_path), *TINY,
                     "--epochs", "2", "--no-tensorboard", "--resume", str(tmp_path / "model_3.pth"))
    assert result.returncode == 0, result.stderr
    assert "its run has trained 4 epochs, and --epochs is 2: nothing is left to train" in result.stdout
    assert read_metrics(tmp_path) == records, "nothing of the run cut back"
    other = tmp_path / "other"  # a folder of another run, which a checkpoint from here continues in
    other.mkdir()
    (other / "metrics.jsonl").write_text(json.dumps({"type": "eval", "epoch": 7}) + "\n")
    (other / "model_best.pth").write_bytes(b"another run's")
    result = run_cli("train.py", "--data-path", str(tiny_dataset), "--output-dir", str(other), *TINY,
                     "--epochs", "5", "--no-tensorboard", "--vis-images", "0",
                     "--resume", str(tmp_path / "model_3.pth"))
    assert result.returncode == 0, result.stderr
    assert "held another run's outputs" in result.stdout
    assert re.search(r"previous_runs holds 1 run set aside \(0\.0 GB\): delete those you no longer need",
                     result.stdout)
    assert {(r["type"], r["epoch"]) for r in read_metrics(other)} == {("train", 4), ("epoch", 4), ("eval", 4)}
    kept, = (other / "previous_runs").iterdir()
    assert (kept / "model_best.pth").read_bytes() == b"another run's"
    shutil.rmtree(other)  # checkpoints are hundreds of MB: this test keeps a few at a time
    # Fine-tuned from this from-scratch run's weights: its layout (batch norm that trains), kept on resume.
    tuned = tmp_path / "tuned"
    common = ["--data-path", str(tiny_dataset), "--output-dir", str(tuned), *TINY, "--no-tensorboard", "--vis-images",
              "0", "--keep-last", "1", "--weights", str(tmp_path / "model_3.pth")]
    assert run_cli("train.py", *common, "--epochs", "1").returncode == 0
    result = run_cli("train.py", *common, "--epochs", "2", "--resume", "auto")
    assert result.returncode == 0 and "Epoch: [1]" in result.stdout, result.stderr[-2000:]
    assert torch.load(tuned / "checkpoint.pth", weights_only=True)["args"]["pretrained_layout"] is False


def test_model_ema_eval_average_scores_the_average_alone(tiny_dataset, tmp_path):
    result = run_cli("train.py", "--data-path", str(tiny_dataset), "--output-dir", str(tmp_path), *TINY,
                     "--epochs", "1", "--model-ema", "--model-ema-eval", "average")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Evaluating the weights' moving average (model_ema)" in result.stdout
    assert "Evaluating the raw weights" not in result.stdout
    (evaluation,) = [r for r in read_metrics(tmp_path) if r["type"] == "eval"]
    assert "raw" not in evaluation and {"bbox", "segm"} <= set(evaluation)

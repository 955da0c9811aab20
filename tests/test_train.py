"""The real CLI in a subprocess, on a generated dataset: train, checkpoint, resume, evaluate, fail clearly."""

import json
import re

import pytest
import torch
import torchvision

from conftest import SMALL, run_cli
from tools.make_coco_dataset import CATEGORIES

TRAIN_FLAGS = ["--epochs", "1", "-b", "4", "--lr", "0.01", *SMALL]


@pytest.fixture(scope="module")
def trained(dataset, torch_home, tmp_path_factory):
    """One epoch from the ImageNet backbone in the hub cache; its output folder."""
    out = tmp_path_factory.mktemp("run")
    result = run_cli("train.py", "--data-path", str(dataset), "--output-dir", str(out), *TRAIN_FLAGS,
                     torch_home=torch_home)
    assert result.returncode == 0, result.stderr
    return out, result


def test_training_writes_loadable_checkpoints(trained, torch_home, monkeypatch):
    out, result = trained
    assert "CUDA is not available" in result.stdout or "cpu" in result.stdout
    assert re.search(r"Epoch: \[0\] \[\s*\d+/\d+\]  eta: .* loss: .* img/s: ", result.stdout)
    assert (out / "model_0.pth").is_file()
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 0
    assert {"model", "optimizer", "lr_scheduler", "args", "categories"} <= set(checkpoint)
    assert checkpoint["categories"] == [{"id": c["id"], "name": c["name"]} for c in CATEGORIES]
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(num_classes=len(CATEGORIES) + 1)
    model.load_state_dict(checkpoint["model"])  # torchvision's own builder takes it unchanged


def test_epoch_end_evaluation_prints_both_tables(trained):
    _, result = trained
    assert "IoU metric: bbox" in result.stdout and "IoU metric: segm" in result.stdout


def test_test_only_resume_prints_tables_and_writes_predictions(trained, dataset, torch_home, tmp_path):
    out, _ = trained
    result = run_cli("train.py", "--data-path", str(dataset), "--output-dir", str(tmp_path), "--test-only",
                     "--resume", str(out / "checkpoint.pth"), *SMALL, torch_home=torch_home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all") == 2
    file_ids = {c["id"] for c in CATEGORIES}
    for iou_type in ("bbox", "segm"):
        records = json.loads((tmp_path / f"predictions_{iou_type}.json").read_text())
        assert isinstance(records, list)
        assert {r["category_id"] for r in records} <= file_ids, "the file's ids, not the model's labels"


def test_resume_continues_at_next_epoch(trained, dataset, torch_home, tmp_path):
    out, _ = trained
    result = run_cli("train.py", "--data-path", str(dataset), "--output-dir", str(tmp_path), "--resume",
                     str(out / "checkpoint.pth"), *TRAIN_FLAGS[2:], "--epochs", "2", torch_home=torch_home)
    assert result.returncode == 0, result.stderr
    assert "Epoch: [1]" in result.stdout and "Epoch: [0]" not in result.stdout
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 1


def test_from_scratch_custom_ids_predictions_carry_file_ids(dataset, tmp_path):
    result = run_cli("train.py", "--data-path", str(dataset), "--output-dir", str(tmp_path),
                     "--weights-backbone", "none", *TRAIN_FLAGS, "--rpn-score-thresh", "0.0")
    assert result.returncode == 0, result.stderr
    records = json.loads((tmp_path / "predictions_segm.json").read_text())
    assert records, "an untrained model still proposes something"
    assert {r["category_id"] for r in records} <= {c["id"] for c in CATEGORIES}
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(num_classes=len(CATEGORIES) + 1,
                                                               weights_backbone=None)
    model.load_state_dict(checkpoint["model"])


def test_help_lists_every_flag():
    result = run_cli("train.py", "--help")
    flags = ("--data-path --dataset --model --device -b --batch-size --epochs -j --workers --opt --lr "
             "--momentum --wd --weight-decay --norm-weight-decay --lr-scheduler --lr-step-size --lr-steps "
             "--lr-gamma --print-freq --output-dir --resume --start-epoch --start_epoch "
             "--aspect-ratio-group-factor --rpn-score-thresh --trainable-backbone-layers --data-augmentation "
             "--sync-bn --test-only --use-deterministic-algorithms --world-size --dist-url --weights "
             "--weights-backbone --amp --local-rank --local_rank --seed --min-size --max-size --num-classes")
    for flag in flags.split():
        assert re.search(rf"(^|[\s,]){re.escape(flag)}[\s,]", result.stdout), flag
    for later in ("coco_kp", "lsj", "copypaste", "fasterrcnn"):
        assert later not in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--weights-backbone", "ResNet50_Weights.IMAGENET1K_V1"], "resnet50-0676ba61.pth is missing"),
    (["--batch-size", "0"], "--batch-size 0 must be at least 1"),
    (["--lr-steps", "8", "4"], "must be increasing"),
    (["--num-classes", "3", "--weights-backbone", "none"], "--num-classes 3 is too small"),
    (["--resume", "/nowhere/checkpoint.pth"], "no such file"),
])
def test_bad_input_is_one_line_without_traceback(dataset, tmp_path, args, message):
    result = run_cli("train.py", "--data-path", str(dataset), "--output-dir", str(tmp_path), *SMALL, *args,
                     env={"TORCH_HOME": str(tmp_path / "empty_home")})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr


def test_missing_data_path_is_clear(tmp_path):
    result = run_cli("train.py", "--data-path", str(tmp_path / "nope"), *SMALL)
    assert result.returncode == 2 and "is not a folder" in result.stderr and "Traceback" not in result.stderr

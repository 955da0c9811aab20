"""Model variants through the real CLI: keypoints, boxes only, a backbone trained from scratch."""

import json

import torch
import torchvision
from pycocotools.coco import COCO

from conftest import TINY, TRAIN_FLAGS, read_metrics, run_cli
from tools.make_coco_dataset import CATEGORIES


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


def test_keypoint_rcnn_trains_and_prints_the_keypoint_table(keypoint_dataset, tmp_path):
    # With --shape-buckets (a GPU default), which pads the keypoint head's regions too; 20 detections an image,
    # as many as COCO's keypoint scoring counts (the head's cost grows with them).
    result = run_cli("train.py", "--data-path", str(keypoint_dataset), "--dataset", "coco_kp", "--model",
                     "keypointrcnn_resnet50_fpn", "--output-dir", str(tmp_path), *TRAIN_FLAGS,
                     "--weights-backbone", "none", "-b", "2", "--vis-images", "1", "--shape-buckets",
                     "--detections-per-image", "20")
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout.split("IoU metric: keypoints")[1].splitlines()[1:11]
    assert [line.split("@[")[0].split()[0] for line in table] == ["Average"] * 10
    assert all("maxDets= 20" in line for line in table)
    records = read_metrics(tmp_path)
    assert set(records[-1]) >= {"bbox", "keypoints"} and "loss_keypoint" in records[0]
    coco = COCO(str(keypoint_dataset / "annotations" / "person_keypoints_val2017.json"))
    predictions = json.loads((tmp_path / "predictions_keypoints.json").read_text())
    assert predictions and len(predictions[0]["keypoints"]) == 17 * 3
    coco.loadRes(predictions)


def test_box_only_model_trains_without_masks(tiny_dataset, tmp_path):
    result = run_cli("train.py", "--data-path", str(tiny_dataset), "--output-dir", str(tmp_path), *TINY,
                     "--epochs", "1", "--model", "fasterrcnn_mobilenet_v3_large_320_fpn", "--data-augmentation",
                     "ssdlite", "--vis-images", "1", "--no-tensorboard")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "IoU metric: bbox" in result.stdout and "IoU metric: segm" not in result.stdout
    assert (tmp_path / "predictions_bbox.json").is_file() and not (tmp_path / "predictions_segm.json").exists()
    assert (tmp_path / "model_best.pth").is_file()
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=checkpoint["num_classes"])
    model.load_state_dict(checkpoint["model"])

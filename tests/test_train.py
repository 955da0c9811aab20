"""The real CLI in a subprocess, on a generated dataset: train, checkpoint, resume, evaluate, fail clearly."""

import gc
import json
import pickle
import re
import shutil

import pytest
import torch
import torchvision
from PIL import Image
from pycocotools.coco import COCO

import train
from conftest import SMALL, TINY, read_metrics, run_cli
from models import MODELS
from presets import IMAGE_BACKENDS, TRAIN_AUGMENTATIONS
from tools.make_coco_dataset import CATEGORIES

TRAIN_FLAGS = ["--epochs", "1", "-b", "4", "--lr", "0.01", "--clip-grad-norm", "10", *SMALL]


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
    conv = checkpoint["model"]["backbone.body.layer2.0.conv2.weight"]
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous(), "the CPU default"


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
             "--weights-backbone --amp --local-rank --local_rank --seed --min-size --max-size --num-classes "
             "--use-copypaste --use-v2 --backend")
    for flag in flags.split():
        assert re.search(rf"(^|[\s,]){re.escape(flag)}[\s,]", result.stdout), flag
    text = " ".join(result.stdout.split())
    for choice in (*MODELS, "coco_kp", *TRAIN_AUGMENTATIONS, *IMAGE_BACKENDS):
        assert choice in text, choice


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, trained):
    """Files that --resume and --weights must refuse, by name."""
    folder = tmp_path_factory.mktemp("bad_files")
    good = (trained[0] / "checkpoint.pth").read_bytes()
    (folder / "truncated.pth").write_bytes(good[: len(good) // 3])
    (folder / "text.pth").write_text("not a checkpoint")
    torch.save({"weights": torch.zeros(3)}, folder / "foreign.pth")
    return folder


BAD_INPUTS = [
    (["--weights-backbone", "ResNet50_Weights.IMAGENET1K_V1"], "resnet50-0676ba61.pth is missing"),
    (["--model", "no_such_model"], "invalid choice: 'no_such_model'"),
    (["--batch-size", "0"], "--batch-size 0 must be at least 1"),
    (["--workers", "-1"], "--workers -1 must be 0 or more"),
    (["--lr-steps", "8", "4"], "must be increasing"),
    (["--num-classes", "3"], "--num-classes 3 is too small"),
    (["--resume", "/nowhere/checkpoint.pth"], "no such file"),
    (["--resume", "{bad}/truncated.pth"], "not a readable checkpoint"),
    (["--resume", "{bad}/text.pth"], "not a readable checkpoint"),
    (["--resume", "{bad}/foreign.pth"], "is not a checkpoint of this script (no 'model')"),
    (["--resume", "{run}/checkpoint.pth", "--num-classes", "9"], "differs from the 5 classes"),
    (["--weights", "{bad}/foreign.pth"], "does not fit this model: it has no tensor backbone.body.conv1.weight"),
    (["--weights", "{bad}/text.pth"], "not a readable checkpoint (not a file written by torch.save)"),
    (["--weights", "MaskRCNN_ResNet50_FPN_Weights.COCO_V1"], "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth is missing"),
    (["--output-dir", "/proc/no_writing_here"], "is not writable"),
    (["--max-bad-samples", "2"], "must be a share between 0 and 1"),
    (["--backend", "tv_tensor"], "works with torchvision.transforms.v2 only; add --use-v2"),
    (["--use-copypaste"], "use it with --data-augmentation lsj and a maskrcnn model"),
    (["--model", "keypointrcnn_resnet50_fpn"], "use --dataset coco_kp"),
    (["--dataset", "coco_kp"], "person_keypoints_train2017.json is missing"),
    (["--model", "ssd300_vgg16"], "--min-size does not apply to --model ssd300_vgg16; leave it out"),
    (["--weights-backbone", "VGG16_Weights.IMAGENET1K_FEATURES"], "does not fit the model, which takes "
                                                                  "ResNet50_Weights"),
    (["--trainable-backbone-layers", "2"], "--trainable-backbone-layers applies to pretrained weights"),
    (["--cudnn-benchmark", "--use-deterministic-algorithms"], "give one of the two"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_without_traceback(dataset, trained, bad_files, tmp_path, args, message, capsys,
                                                 monkeypatch):
    """train.run in this process (a subprocess each would add seconds of imports to every case): a traceback
    would escape it; test_debug_shows_the_traceback runs the command line itself."""
    args = [a.format(bad=bad_files, run=trained[0]) for a in args]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    try:
        status = train.run(["--data-path", str(dataset), "--output-dir", str(tmp_path), *SMALL,
                            "--weights-backbone", "none", *args])
    except SystemExit as e:  # the parser's own errors
        status = e.code
    finally:
        gc.unfreeze()  # load_data freezes what it made, for loader workers that this process does not fork
    stderr = capsys.readouterr().err
    assert status == 2, stderr[-2000:]
    error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], stderr
    assert stderr.strip().splitlines()[-1] == error_lines[0]


def test_debug_shows_the_traceback(dataset, tmp_path):
    result = run_cli("train.py", "--data-path", str(tmp_path / "nope"), *SMALL, "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_lr_steps_past_the_last_epoch_warn(dataset, tmp_path):
    result = run_cli("train.py", "--data-path", str(tmp_path / "nope"), *SMALL, "--lr-steps", "30", "--epochs", "2")
    assert "warning: --lr-steps 30 is not before --epochs 2" in result.stderr
    assert "is not a folder" in result.stderr, "a warning, then the run goes on (to the next problem)"


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("flag", ["--resume", "--weights"])
def test_malicious_pickle_is_refused_and_runs_nothing(dataset, tmp_path, flag):
    marker = tmp_path / "created_by_pickle"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": _Payload(str(marker))}, f)
    result = run_cli("train.py", "--data-path", str(dataset), "--output-dir", str(tmp_path), *SMALL,
                     "--weights-backbone", "none", flag, str(tmp_path / "evil.pth"))
    assert result.returncode == 2 and "was refused" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


def test_empty_training_set_is_clear(dataset, tmp_path):
    root = tmp_path / "empty"
    shutil.copytree(dataset, root)
    ann_file = root / "annotations" / "instances_train2017.json"
    data = json.loads(ann_file.read_text())
    # Boxes without extent alone: nothing the recipe trains on (crowd regions alone would train as background).
    data["annotations"] = [{**a, "bbox": [*a["bbox"][:2], 0.5, 0.5]} for a in data["annotations"]]
    ann_file.write_text(json.dumps(data))
    result = run_cli("train.py", "--data-path", str(root), *SMALL, "--weights-backbone", "none",
                     "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2 and "has no usable annotated image" in result.stderr


def test_unreadable_images_are_counted_and_limited(tiny_dataset, tmp_path):
    root = tmp_path / "faulty"
    shutil.copytree(tiny_dataset, root)
    images = sorted((root / "train2017").glob("*.jpg"))
    images[0].write_bytes(images[0].read_bytes()[:300])
    images[1].unlink()
    args = ["--data-path", str(root), "--output-dir", str(tmp_path / "out"), *TINY, "--epochs", "1",
            "--vis-images", "0", "--no-tensorboard"]
    result = run_cli("train.py", *args, "--max-bad-samples", "0.3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(f"data: {images[0]}: image unreadable") == 1
    assert result.stdout.count(f"data: {images[1]}: image missing") == 1
    assert "data faults: 2 samples skipped" in result.stdout

    result = run_cli("train.py", *args)
    assert result.returncode == 2 and "train data: 1 of 8 images cannot be used" in result.stderr, "start check"
    result = run_cli("train.py", *args, "--skip-data-check")
    assert result.returncode == 2
    assert "could not be read this epoch, more than --max-bad-samples 0.01" in result.stderr


def test_cpu_amp_runs_bfloat16_in_the_layout_asked_for(micro_dataset, tmp_path):
    # One step at 32 px: on CPUs without AVX-512's bfloat16 instructions, bfloat16 kernels are slow.
    result = run_cli("train.py", "--data-path", str(micro_dataset), "--output-dir", str(tmp_path), *TINY,
                     "--min-size", "32", "--max-size", "32", "--vis-images", "0", "--no-tensorboard",
                     "--epochs", "1", "--amp", "--no-channels-last")
    assert result.returncode == 0, result.stderr
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert checkpoint["scaler"] is None, "bfloat16 needs no gradient scaler"
    assert checkpoint["model"]["backbone.body.layer2.0.conv2.weight"].is_contiguous()


def test_float16_scaler_state_survives_resume(micro_dataset, tmp_path):
    args = ["--data-path", str(micro_dataset), "--output-dir", str(tmp_path), *TINY, "--min-size", "32",
            "--max-size", "32", "--amp", "--amp-dtype", "float16", "--vis-images", "0", "--no-tensorboard"]
    result = run_cli("train.py", *args, "--epochs", "1")
    assert result.returncode == 0, result.stderr
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert checkpoint["scaler"]["scale"] > 0, "float16 trains with a gradient scaler, on the CPU too"
    checkpoint["scaler"]["scale"] = 1234.0
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    result = run_cli("train.py", *args, "--epochs", "2", "--resume", "auto")
    assert result.returncode == 0, result.stderr
    scale = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["scaler"]["scale"]
    assert scale in [1234.0 / 2**k for k in range(5)], "the resumed scaler went on from the saved scale"


def test_missing_data_path_is_clear(tmp_path):
    result = run_cli("train.py", "--data-path", str(tmp_path / "nope"), *SMALL)
    assert result.returncode == 2 and "is not a folder" in result.stderr and "Traceback" not in result.stderr


def test_metrics_file_holds_step_and_evaluation_records(trained):
    out, _ = trained
    records = read_metrics(out)
    steps = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    assert {"loss", "loss_mask", "lr", "images_per_s", "time", "global_step"} <= set(steps[0])
    (evaluation,) = [r for r in records if r["type"] == "eval"]
    for iou_type in ("bbox", "segm"):
        assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"} <= set(
            evaluation[iou_type])
        assert set(evaluation[iou_type]["per_category"]) <= {c["name"] for c in CATEGORIES}


def test_tensorboard_events_hold_the_loss_scalars(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = trained
    events = EventAccumulator(str(out), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/loss_mask", "train/lr", "eval/segm/AP"} <= set(tags["scalars"])
    assert len(events.Scalars("train/loss")) == len([r for r in read_metrics(out) if r["type"] == "train"])
    assert any(tag.startswith("predictions/") for tag in tags["images"])


def test_curves_prediction_pictures_and_best_model(trained, dataset):
    out, result = trained
    with Image.open(out / "curves.png") as img:
        assert img.format == "PNG" and img.size == (1200, 320)
    pictures = sorted((out / "predictions" / "epoch_0").glob("*.jpg"))
    assert len(pictures) == 4
    val = json.loads((dataset / "annotations" / "instances_val2017.json").read_text())
    scales = {str(img["id"]): -(-320 // min(img["width"], img["height"])) for img in val["images"]}
    sizes = {i: (2 * img["width"] * scales[i] + 8, img["height"] * scales[i])
             for i, img in ((str(img["id"]), img) for img in val["images"])}
    for picture in pictures:
        with Image.open(picture) as img:
            assert img.format == "JPEG" and img.size == sizes[picture.stem]
    assert (out / "model_best.pth").is_file() and "New best AP" in result.stdout
    assert "AP per category" in result.stdout


def test_keep_last_prunes_old_epoch_files(tiny_dataset, tmp_path):
    result = run_cli("train.py", "--data-path", str(tiny_dataset), "--output-dir", str(tmp_path), *TINY,
                     "--epochs", "3", "--keep-last", "1", "--no-tensorboard", "--vis-images", "0")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.glob("model_*.pth")) == ["model_2.pth", "model_best.pth"]
    assert not list(tmp_path.glob("events.out.tfevents.*")) and not (tmp_path / "predictions").exists()


def test_predict_on_a_folder(trained, dataset, tmp_path):
    out, _ = trained
    result = run_cli("tools/predict.py", "--checkpoint", str(out / "checkpoint.pth"), str(dataset / "val2017"),
                     "--output-dir", str(tmp_path), "--device", "cpu", "--score-thresh", "0.0", "--batch-size", "3")
    assert result.returncode == 0, result.stderr
    images = sorted((dataset / "val2017").glob("*.jpg"))
    assert sorted(p.name for p in tmp_path.glob("*.jpg")) == [p.name for p in images]
    gt = COCO(str(dataset / "annotations" / "instances_val2017.json"))
    detections = gt.loadRes(str(tmp_path / "predictions.json"))
    assert len(detections.anns) > 0
    assert {a["category_id"] for a in detections.anns.values()} <= {c["id"] for c in CATEGORIES}


def test_keypoint_rcnn_trains_and_prints_the_keypoint_table(keypoint_dataset, tmp_path):
    # With --shape-buckets (a GPU default), which pads the keypoint head's regions too.
    result = run_cli("train.py", "--data-path", str(keypoint_dataset), "--dataset", "coco_kp", "--model",
                     "keypointrcnn_resnet50_fpn", "--output-dir", str(tmp_path), *TRAIN_FLAGS,
                     "--weights-backbone", "none", "-b", "2", "--vis-images", "1", "--shape-buckets")
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


def test_lsj_with_copy_paste_trains(micro_dataset, tmp_path):
    result = run_cli("train.py", "--data-path", str(micro_dataset), "--output-dir", str(tmp_path), *SMALL,
                     "--min-size", "32", "--max-size", "32", "--weights-backbone", "none", "--epochs", "1",
                     "-b", "2", "--lr", "0.01", "--clip-grad-norm", "10", "--data-augmentation", "lsj",
                     "--use-copypaste", "--vis-images", "0", "--no-tensorboard")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "IoU metric: segm" in result.stdout


def test_transforms_v2_on_tv_tensors_trains(tiny_dataset, tmp_path):
    result = run_cli("train.py", "--data-path", str(tiny_dataset), "--output-dir", str(tmp_path), *TINY,
                     "--epochs", "1", "--use-v2", "--backend", "tv_tensor", "--data-augmentation", "ssd",
                     "--vis-images", "0", "--no-tensorboard")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "IoU metric: segm" in result.stdout


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
    assert re.search(r"Stopping early: the primary AP has not improved on \d\.\d{4} for 2 evaluations",
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
    result = run_cli("train.py", *common, "--output-dir", str(tmp_path / "again"), "--resume",
                     str(out / "model_best.pth"), "--epochs", "4")
    assert result.returncode == 2 and "holds weights only, no optimizer state" in result.stderr
    assert "pass it to --weights instead" in result.stderr
    result = run_cli("tools/predict.py", "--checkpoint", str(out / "model_best.pth"), str(tiny_dataset / "val2017"),
                     "--output-dir", str(tmp_path / "pictures"), "--device", "cpu", "--score-thresh", "0.0")
    assert result.returncode == 0 and "moving average" in result.stdout, result.stderr
    assert json.loads((tmp_path / "pictures" / "predictions.json").read_text()) is not None


def test_the_epoch_file_is_the_checkpoints_bytes(trained):
    out, _ = trained
    assert (out / "model_0.pth").stat().st_ino == (out / "checkpoint.pth").stat().st_ino, "a hard link"

"""The real CLI in a subprocess, on a generated dataset: train, checkpoint, resume, evaluate, fail clearly."""

import argparse
import gc
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from pycocotools.coco import COCO

import errors
import flags
import resume
import train
from coco_utils import CategoryMap, build_dataset, coco_category_names
from conftest import SMALL, TRAIN_FLAGS, read_metrics, run_cli
from errors import UserError
from models import MODELS, build_model, detections_per_image, score_threshold
from preemption import StopRequest
from presets import IMAGE_BACKENDS, TRAIN_AUGMENTATIONS
from tools.make_coco_dataset import CATEGORIES


@pytest.fixture(scope="module")
def trained(dataset, torch_home, tmp_path_factory):
    """One epoch from the ImageNet backbone in the hub cache; its output folder."""
    out = tmp_path_factory.mktemp("run")
    result = run_cli("train.py", "--data-path", str(dataset), "--output-dir", str(out), *TRAIN_FLAGS,
                     torch_home=torch_home)
    assert result.returncode == 0, result.stderr
    return out, result


def test_training_writes_loadable_checkpoints(trained, dataset, torch_home, monkeypatch):
    out, result = trained
    assert re.search(r"Epoch: \[0\]  \[\s*\d+/\d+\]  eta: .* loss: .* img/s: ", result.stdout)
    assert (out / "model_0.pth").is_file()
    written = json.loads((out / "args.json").read_text())
    assert written["command"].endswith(" ".join(["train.py", "--data-path", str(dataset), "--output-dir",
                                                 str(out), *TRAIN_FLAGS]))
    assert written["args"]["epochs"] == 1 and written["args"]["device"] == "cpu" and written["args"]["lr"] == 0.01
    assert written["outcome"] == "finished" and written["ended"] >= written["started"]
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
        assert records and {r["category_id"] for r in records} <= file_ids, "the file's ids, not the model's labels"
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    assert evaluation["evaluated"] == str((out / "checkpoint.pth").resolve()) and evaluation["weights"] == "model"
    val_file = dataset / "annotations" / "instances_val2017.json"
    assert evaluation["val_annotations"] == str(val_file.resolve())
    assert evaluation["val_images"] == len(json.loads(val_file.read_text())["images"])
    trained_eval = [r for r in read_metrics(out) if r["type"] == "eval"][-1]
    assert re.fullmatch("[0-9a-f]{16}", trained_eval["validation"]), "the validation data's digest, for BestModel"
    assert (evaluation["epoch"], evaluation["step"]) == (trained_eval["epoch"], None)
    for iou_type in ("bbox", "segm"):  # the epoch's evaluation during training, to the last digit
        assert evaluation[iou_type] == trained_eval[iou_type], iou_type
    # Without sizes and --eval-max-dets, the checkpoint's run's: the same predictions. Scoring up to 150
    # detections an image (as a run trained with --eval-max-dets 150 would have) changes nothing where the model
    # keeps 100, but the name of the recall at the most.
    unsized = [flag for i, flag in enumerate(SMALL) if flag not in ("--min-size", "--max-size")
               and SMALL[i - 1] not in ("--min-size", "--max-size")]
    saved = torch.load(out / "checkpoint.pth", weights_only=False)
    saved["args"]["eval_max_dets"] = 150
    torch.save(saved, tmp_path / "scored_to_150.pth")
    del saved
    again = run_cli("train.py", "--data-path", str(dataset), "--output-dir", str(tmp_path / "again"), "--test-only",
                    "--resume", str(tmp_path / "scored_to_150.pth"), *unsized, torch_home=torch_home)
    (tmp_path / "scored_to_150.pth").unlink()
    assert again.returncode == 0, again.stderr
    # one line, --rois-per-image 64 of TRAIN_FLAGS too
    assert ("As the checkpoint's run: --min-size 96 --max-size 96 --rois-per-image 64 --eval-max-dets 150\n"
            in again.stdout)
    assert again.stdout.count("Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=150 ]") == 2
    for iou_type in ("bbox", "segm"):
        name = f"predictions_{iou_type}.json"
        assert (tmp_path / "again" / name).read_text() == (tmp_path / name).read_text()
    scored_to_150 = json.loads((tmp_path / "again" / "evaluation.json").read_text())
    for iou_type in ("bbox", "segm"):
        renamed = {"AR100" if name == "AR150" else name: value for name, value in scored_to_150[iou_type].items()}
        assert "AR150" in scored_to_150[iou_type] and renamed == evaluation[iou_type]
    assert scored_to_150["settings"] == {"min_size": 96, "max_size": 96, "eval_max_dets": 150,
                                         "detections_per_image": 100, "rpn_score_thresh": 0.0,
                                         "box_score_thresh": 0.05}, \
        "the sizes taken from the checkpoint's run, the others the builder's defaults"


def test_data_that_fails_in_a_loader_worker_is_one_line_and_the_run_ends(trained, dataset, torch_home, tmp_path):
    """Every validation image cut short (the start check only looks files up): the error comes from a worker,
    which ignores SIGTERM, so the run must end its workers itself (it waited on them for ever)."""
    root = tmp_path / "cut"
    shutil.copytree(dataset, root)
    for image in (root / "val2017").iterdir():
        image.write_bytes(image.read_bytes()[:100])
    result = run_cli("train.py", "--data-path", str(root), "--output-dir", str(tmp_path / "out"), "--test-only",
                     "--resume", str(trained[0] / "checkpoint.pth"), *SMALL, "--workers", "2",
                     torch_home=torch_home, timeout=240)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: no image of {root / 'val2017'} can be used (the first: "), line


def test_resume_continues_at_next_epoch(trained, dataset, torch_home, tmp_path):
    out, _ = trained
    result = run_cli("train.py", "--data-path", str(dataset), "--output-dir", str(tmp_path), "--resume",
                     str(out / "checkpoint.pth"), *TRAIN_FLAGS[2:], "--epochs", "2", "--lr", "0.02",
                     torch_home=torch_home)
    assert result.returncode == 0, result.stderr
    assert "Epoch: [1]" in result.stdout and "Epoch: [0]" not in result.stdout
    assert "--lr given otherwise than in its run: it applies from the saved epoch" in result.stdout
    assert re.search(r"Epoch: \[1\]  \[\s*1/\d+\]  eta: \S+  lr: 0.020000", result.stdout), "--lr 0.02, not 0.01"
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 1


def test_continuing_a_folder_with_another_scoring_is_refused_and_leaves_it(trained, dataset, torch_home):
    """check_same_scoring's wiring: a run continued in its own folder with another --eval-max-dets than its run's
    stops before it trains or writes, and the folder stays as it was."""
    out, _ = trained
    before = {path: path.stat().st_mtime_ns for path in out.rglob("*")}
    result = run_cli("train.py", "--data-path", str(dataset), "--output-dir", str(out), "--resume", "auto",
                     *TRAIN_FLAGS[2:], "--epochs", "2", "--eval-max-dets", "300", torch_home=torch_home)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1].endswith(
        "its run scored up to 100 detections an image and category (--eval-max-dets), and model_best.pth and "
        "--patience compare with its evaluations; give --eval-max-dets 100, or score the checkpoint otherwise "
        "with --test-only"), result.stderr[-3000:]
    assert "Epoch: [1]" not in result.stdout
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*")} == before


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


@pytest.mark.parametrize("enabled, said", [(True, "Speed-ups: anchors kept per shape; "),
                                            (False, "Speed-ups: none (torchvision's plain model)")])
def test_the_run_says_which_speedups_changed_its_model(enabled, said, capsys):
    run = train.Run(argparse.Namespace(distributed=False, sync_bn=False), torch.device("cpu"), None, None, True,
                    None, train.speedups.SpeedupConfig(enabled=enabled))
    train.wrap_for_devices(run, train.build_model("fasterrcnn_mobilenet_v3_large_fpn", 3, None, None, None))
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Speed-ups: ")]
    assert len(printed) == 1 and printed[0].startswith(said)
    assert ("sparse RoIAlign on the CPU" in printed[0]) == enabled


class Logged:
    """A run's writers as far as their records go: the epochs of its train and eval records."""

    def __init__(self, train: list[int], evaluated: list[int]) -> None:
        self.epochs = {"train": train, "eval": evaluated}

    def records(self, kind: str) -> list[dict]:
        return [{"epoch": epoch} for epoch in self.epochs[kind]]


@pytest.mark.parametrize("train_epochs, eval_epochs, step, interval, expected", [
    ([0, 1, 2], [0, 1], None, 1, True),  # stopped between epoch 2's checkpoint and its evaluation
    ([0, 1, 2], [0, 1, 2], None, 1, False),
    ([], [], None, 1, False),  # a checkpoint brought from another folder, or torchvision's reference
    ([0, 1, 2], [0, 1], 5, 1, False),  # stopped mid-epoch: its evaluation comes when the epoch ends
    ([0, 1, 2], [1], None, 2, False),  # --eval-interval 2: epoch 2 is not evaluated
    ([0, 1, 2], [], None, 3, True),
])
def test_only_an_epoch_trained_here_and_left_unevaluated_is_evaluated_first(train_epochs, eval_epochs, step,
                                                                             interval, expected):
    args = argparse.Namespace(eval_interval=interval, epochs=10)
    run = argparse.Namespace(is_main=True, writers=Logged(train_epochs, eval_epochs), args=args)
    assert train.saved_but_not_evaluated(run, 2, step) is expected


@pytest.mark.parametrize("epoch, step, evaluated, epochs, expected", [
    (2, None, [0, 1, 2], 3, True),
    (2, None, [0, 1], 3, False),  # epoch 2 is evaluated first
    (2, None, [0, 1, 2], 4, False),
    (2, 5, [0, 1], 3, False),  # part of epoch 2 is left
    (2, 5, [0, 1], 2, True),  # --epochs lowered below the stop
])
def test_a_run_resumed_at_its_end_has_nothing_left_to_train(epoch, step, evaluated, epochs, expected):
    args = argparse.Namespace(eval_interval=1, epochs=epochs)
    run = argparse.Namespace(is_main=True, writers=Logged([0, 1, 2], evaluated), args=args)
    assert train.nothing_left_to_train(run, {"epoch": epoch, "step": step}, of_another_folder=False) is expected
    assert train.nothing_left_to_train(run, {"epoch": epoch, "step": step}, of_another_folder=True) is (
        epoch + (step is None) >= epochs), "another folder's metrics say nothing of a checkpoint of another folder"


def test_scoring_more_detections_than_the_model_keeps_is_noted(capsys):
    train.note_scored_beyond_kept(kept=300, scored=300)
    assert capsys.readouterr().out == ""
    train.note_scored_beyond_kept(kept=100, scored=300)
    assert capsys.readouterr().out == (
        "note: --eval-max-dets 300 scores up to 300 detections an image, and the model keeps 100 "
        "(--detections-per-image), so AR300 counts 100 at most; give --detections-per-image 300 too\n")


def _val_files() -> tuple[argparse.Namespace, argparse.Namespace]:
    """Stand-ins of a validation set annotated as LVIS's and of a plain one (their index alone)."""
    from pycocotools.coco import COCO

    federated, plain = COCO(), COCO()
    federated.dataset = {"images": [{"id": 1, "neg_category_ids": [], "not_exhaustive_category_ids": []}],
                         "categories": [{"id": 1, "name": "a", "frequency": "r"}, {"id": 2, "name": "b",
                                                                                  "frequency": "f"}],
                         "annotations": [{"id": 1, "image_id": 1, "category_id": 1}]}
    plain.dataset = {"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}]}
    return argparse.Namespace(coco=federated), argparse.Namespace(coco=plain)


def _parsed(argv: list[str]) -> argparse.Namespace:
    """train.py's arguments as main has them before it reads the data (no checkpoint)."""
    args = train.get_args_parser().parse_args(argv)
    resume.take_saved_settings(args, None)
    return args


def test_an_lvis_file_scored_at_fewer_detections_than_lvis_counts_is_noted(capsys):
    federated, plain = _val_files()
    parse = _parsed
    train.note_lvis_limits(parse(["--eval-max-dets", "300"]), federated, kept=300)
    train.note_lvis_limits(parse([]), plain, kept=100)
    train.note_lvis_limits(parse(["--model", "keypointrcnn_resnet50_fpn"]), federated, kept=100)
    assert capsys.readouterr().out == "", "a keypoint model's boxes are scored as COCO's"
    train.note_lvis_limits(parse([]), federated, kept=300)
    assert capsys.readouterr().out == (
        "note: the validation file is annotated as LVIS's, and is scored as LVIS's evaluation scores it, which "
        "counts 300 detections an image; this run keeps 300 (--detections-per-image) and counts 100 "
        "(--eval-max-dets): give both 300 for AP comparable with LVIS's\n")


def test_the_scoring_of_the_validation_file_is_checked_before_training(capsys, tmp_path):
    import coco_utils

    federated, plain = _val_files()
    parse = _parsed
    train.check_scoring(parse(["--best-metric", "segm/APr"]), federated)
    with pytest.raises(UserError, match=r"^--best-metric segm/APr is no metric of this validation file's scoring "
                                        r"\(COCO's\); choose one of segm/AP, segm/AP50"):
        train.check_scoring(parse(["--best-metric", "segm/APr"]), plain)
    train.check_scoring(parse(["--best-metric", "bbox/AR10"]), plain)
    with pytest.raises(UserError, match=r"\(LVIS's, as the file is annotated as LVIS's\); choose one of bbox/AP, "):
        train.check_scoring(parse(["--best-metric", "bbox/AR10"]), federated)
    train.check_scoring(parse(["--model", "keypointrcnn_resnet50_fpn", "--best-metric", "bbox/AR10"]), federated)
    with pytest.raises(UserError, match="annotated as LVIS's .*, which faster-coco-eval scores: leave --coco-backend "
                                        "at auto, or give faster"):
        train.check_scoring(parse(["--coco-backend", "pycocotools"]), federated)
    with pytest.raises(UserError, match="^--best-metric segm/APf: no instance of the validation file is of a "
                                        "category of frequency 'f', so APf is always -1 and never improves"):
        train.check_scoring(parse(["--best-metric", "segm/APf"]), federated)
    federated.coco.dataset["images"][0]["not_exhaustive_category_ids"] = "1"
    with pytest.raises(UserError, match=r"and image 1 has not_exhaustive_category_ids '1': give a list of category "
                                        r"ids \(empty where none\)$"):
        train.check_scoring(parse([]), federated)
    federated.coco.dataset["images"][0]["not_exhaustive_category_ids"] = []
    federated.coco.dataset["categories"][0].pop("frequency")
    with pytest.raises(UserError, match="groups the categories by 'frequency' .* category 1 \\(a\\) has no "
                                        "'frequency': give each category one"):
        train.check_scoring(parse([]), federated)
    partly = {"images": [{"id": 1, "file_name": "a.jpg", "height": 10, "width": 10},
                         {"id": 2, "file_name": "b.jpg", "height": 10, "width": 10, "neg_category_ids": [],
                          "not_exhaustive_category_ids": []}],
              "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25,
                               "iscrowd": 0, "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]}],
              "categories": [{"id": 1, "name": "a"}]}
    (tmp_path / "partly.json").write_text(json.dumps(partly))
    train.check_scoring(parse([]), argparse.Namespace(coco=coco_utils.load_coco(tmp_path / "partly.json")))
    assert capsys.readouterr().out.startswith("note: the validation file: 1 of the 2 images carry LVIS's "
                                              "neg_category_ids and not_exhaustive_category_ids, the others not: "
                                              "scored as COCO's")


def test_patience_running_out_at_the_last_epoch_is_no_early_stop(monkeypatch):
    """The run ends there anyway; marked as stopped early, more --epochs could not continue it."""
    import contextlib

    stopped = []
    monkeypatch.setattr(train, "evaluate_or_stop", lambda *given: {"segm": {"AP": 0.1}})
    monkeypatch.setattr(train, "stop_early", lambda run, state, best: stopped.append(True))
    run = argparse.Namespace(args=argparse.Namespace(epochs=3, patience=1))
    best = argparse.Namespace(out_of_patience=lambda patience: True)
    evaluations = argparse.Namespace(timed=contextlib.nullcontext)
    assert train.evaluate_and_check_patience(run, None, None, 2, best, None, evaluations)[1] is False
    assert not stopped
    assert train.evaluate_and_check_patience(run, None, None, 1, best, None, evaluations)[1] is True
    assert stopped == [True]


def test_validation_images_of_more_instances_than_detections_kept_are_noted(capsys):
    counts = {1: (3, 0), 2: (5, 9), 3: (4, 0)}  # image: instances, crowd regions
    anns = [{"image_id": image, "category_id": 1 + k % 2, "bbox": [0, 0, 5, 5], "iscrowd": crowd}
            for image, (plain, crowds) in counts.items() for k, crowd in enumerate([0] * plain + [1] * crowds)]
    anns.append({"image_id": 3, "bbox": None, "iscrowd": 0})  # nothing to match a detection against
    val_set = argparse.Namespace(coco=argparse.Namespace(dataset={"annotations": anns}))
    train.note_crowded_images(val_set, 5)
    assert capsys.readouterr().out == ""  # crowd regions are not matched by detections
    train.note_crowded_images(val_set, 3)
    assert capsys.readouterr().out == (
        "note: 2 validation images hold more instances than the 3 detections the model keeps per image "
        "(--detections-per-image; the most: 5, image 2), so AP and AR stay below 1 on such images however good the "
        "model\n")
    # COCO's scoring counts per category: image 2's 5 instances are 3 of one category and 2 of the other.
    train.note_crowded_images(val_set, 100, scored=3)
    assert capsys.readouterr().out == ""
    train.note_crowded_images(val_set, 4, scored=2)
    assert capsys.readouterr().out == (
        "note: 1 validation image holds more instances than the 4 detections the model keeps per image "
        "(--detections-per-image; the most: 5, image 2) or more of one category than the 2 per image and category "
        "COCO's scoring counts (--eval-max-dets; the most: 3, image 2), so AP and AR stay below 1 on such images "
        "however good the model\n")
    crowded = argparse.Namespace(coco=argparse.Namespace(dataset={"annotations": [
        {"image_id": 4, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 0}] * 101}))
    train.note_crowded_images(crowded, 1000)
    assert capsys.readouterr().out.startswith("note: 1 validation image holds more of one category than the 100 per "
                                              "image and category COCO's scoring counts (--eval-max-dets; the most: "
                                              "101, image 4)")
    train.note_crowded_images(crowded, 1000, scored=300)
    assert capsys.readouterr().out == ""
    # LVIS's scoring counts an image's detections over all categories: image 2's 5 instances, not 3 of one
    train.note_crowded_images(val_set, 100, scored=4, federated=True)
    assert "more instances than the 4 detections an image LVIS's scoring counts (--eval-max-dets; the most: 5, " \
           "image 2)" in capsys.readouterr().out


def test_predict_and_export_keep_the_checkpoints_detections_per_image_unless_given(tmp_path):
    from tools import predict
    model = build_model("fasterrcnn_resnet50_fpn", 3, None, None, None)
    torch.save({"model": model.state_dict(), "num_classes": 3, "categories": [{"id": 1, "name": "a"},
                {"id": 2, "name": "b"}], "args": {"model": "fasterrcnn_resnet50_fpn", "detections_per_image": 7,
                                                  "box_score_thresh": 0.001}},
               tmp_path / "checkpoint.pth")
    args = argparse.Namespace(checkpoint=str(tmp_path / "checkpoint.pth"), model=None, weights=None, min_size=None,
                              max_size=None, detections_per_image=None)
    loaded = predict.load_model(args)[0]
    assert detections_per_image(loaded) == 7
    assert score_threshold(loaded) == 0.001, "as its run evaluated it: what an export keeps"
    args.detections_per_image = 9
    assert detections_per_image(predict.load_model(args)[0]) == 9


def _renamed(categories: list[dict]) -> list[dict]:
    """The same ids with their names moved one on: a file exported again in another order."""
    names = [c["name"] for c in categories]
    return [{"id": c["id"], "name": name} for c, name in zip(categories, names[1:] + names[:1])]


def test_weights_of_a_run_on_other_categories_fine_tune_fresh_heads_and_do_not_evaluate(trained, dataset):
    """create_model gives build_model this run's categories (what it does with them: tests/test_models.py)."""
    path = trained[0] / "checkpoint.pth"
    saved = torch.load(path, weights_only=True)
    head = saved["model"]["roi_heads.box_predictor.cls_score.weight"]
    same = CategoryMap.from_categories(saved["categories"], "coco", saved["labels_are_category_ids"])
    renamed = CategoryMap.from_categories(_renamed(saved["categories"]), "coco", saved["labels_are_category_ids"])
    args = train.get_args_parser().parse_args(["--data-path", str(dataset), "--weights", str(path), *SMALL])
    assert torch.equal(train.create_model(args, saved["num_classes"], None, same).roi_heads.box_predictor
                       .cls_score.weight, head)
    tuned = train.create_model(args, saved["num_classes"], None, renamed)
    assert not torch.equal(tuned.roi_heads.box_predictor.cls_score.weight, head)
    args.test_only = True
    with pytest.raises(UserError, match="was trained on other categories than this run's"):
        train.create_model(args, saved["num_classes"], None, renamed)


def test_predict_refuses_weights_of_a_run_that_named_cocos_labels_otherwise(tmp_path):
    from tools import predict
    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    categories = [{"id": i, "name": n} for i, n in coco_category_names().items()]
    torch.save({"model": build_model(name, 91, None, None, None).state_dict(), "num_classes": 91,
                "categories": _renamed(categories), "labels_are_category_ids": True, "args": {"model": name}},
               tmp_path / "checkpoint.pth")
    args = argparse.Namespace(checkpoint=None, model=name, weights=str(tmp_path / "checkpoint.pth"), min_size=None,
                              max_size=None, detections_per_image=None)
    with pytest.raises(UserError, match=r"trained on other categories than this run's \(its label 1 is 'bicycle', "
                                        r"here 'person' \(id 1\)\)"):
        predict.load_model(args)


def test_prediction_pictures_of_string_image_ids_stay_in_their_folder_each_its_own(tmp_path):
    ids = ("12", "a_b", "a/b", "..", "../../x", "c\\d", "é" * 100, "é" * 101, "x" * 240)
    names = [train.file_name_of(i) for i in ids]
    assert names[:2] == ["12", "a_b"] and names[6] == "é" * 100, "ids that can name a file do so"
    assert [n[:-9] for n in names[2:6]] == ["a_b", "_..", ".._.._x", "c_d"], "a digest of the id follows"
    assert len(set(names)) == len(ids) and max(len(n.encode()) for n in names) == train.MAX_PICTURE_NAME
    for name in names:  # each a file of its folder, with room for write_atomic's temporary
        (tmp_path / f".{name}.jpg.abcdefgh.tmp").write_bytes(b"")
    assert len(list(tmp_path.iterdir())) == len(ids)


def test_the_runs_eta_counts_the_evaluations_still_due_at_the_last_ones_time(monkeypatch):
    times = train.EvaluationTimes(argparse.Namespace(eval_interval=2, epochs=6))  # evaluates after 1, 3 and 5
    assert times.expected_after(0) == 0.0, "none timed yet"
    clock = iter([100.0, 130.0])
    monkeypatch.setattr(train.time, "time", lambda: next(clock))
    with times.timed():
        pass
    assert [times.expected_after(e) for e in range(6)] == [90.0, 90.0, 60.0, 60.0, 30.0, 30.0]


def test_each_evaluation_says_whether_it_is_the_best_and_how_long_since_one_was(tmp_path, capsys):
    evals = [{"epoch": e, "bbox": {"AP": 0.5}, "segm": {"AP": ap}} for e, ap in enumerate((0.1, 0.3, 0.2))]
    writers = argparse.Namespace(records=lambda kind: evals if kind == "eval" else [])
    args = argparse.Namespace(patience=3, model="maskrcnn_resnet50_fpn", best_metric=None, eval_max_dets=100)
    run = argparse.Namespace(writers=writers, output_dir=tmp_path, args=args)
    state = argparse.Namespace(weights_dict=lambda: {"model": {}})
    best = train.BestModel(run, "v1")  # a resumed run's: best at epoch 1, one evaluation since
    assert (best.best, best.best_epoch, best.since_best) == (0.3, 1, 1)
    assert best.update({"bbox": {"AP": 0.9}, "segm": {"AP": 0.25}}, state, 3) is False
    assert capsys.readouterr().out == ("mask AP 0.2500, not above the best, 0.3000 at epoch 1: 2 evaluations without "
                                       "improvement (--patience 3)\n")
    assert not (tmp_path / "model_best.pth").exists() and best.out_of_patience(3) is False
    assert best.update({"bbox": {"AP": 0.1}, "segm": {"AP": 0.4}}, state, 4) is True
    assert capsys.readouterr().out.startswith("New best mask AP 0.4000 at epoch 4: saved ")
    assert (tmp_path / "model_best.pth").is_file() and best.since_best == 0


def test_model_best_and_patience_compare_only_evaluations_of_the_same_validation_data(tmp_path, capsys):
    evals = [{"epoch": 0, "segm": {"AP": 0.6}, "validation": "small"}, {"epoch": 1, "segm": {"AP": 0.2}},
             {"epoch": 2, "segm": {"AP": 0.3}, "validation": "full"}, {"epoch": 3, "segm": {"AP": 0.1},
                                                                      "validation": "full"}]
    args = argparse.Namespace(patience=3, model="maskrcnn_resnet50_fpn", best_metric=None, eval_max_dets=100)
    run = argparse.Namespace(writers=argparse.Namespace(records=lambda kind: evals), output_dir=tmp_path, args=args)
    best = train.BestModel(run, "full")  # the first evaluation, on a subset, scored higher than any can on all
    assert (best.best, best.best_epoch, best.since_best) == (0.3, 2, 1), "one without a digest counts as this one's"
    assert capsys.readouterr().out == ("note: 1 earlier evaluation of this run scored other validation data (images, "
                                       "instances or categories) than this run reads: model_best.pth and --patience "
                                       "leave them out\n")
    best = train.BestModel(run, "another")
    assert (best.best, best.best_epoch, best.since_best) == (0.2, 1, 0)
    evals.pop(1)
    best = train.BestModel(run, "another")
    assert (best.best, best.since_best) == (None, 0)
    assert capsys.readouterr().out.endswith("leave them out, and the next evaluation's weights replace "
                                            "model_best.pth\n")


def test_best_metric_chooses_what_model_best_and_patience_go_by(tmp_path, capsys):
    evals = [{"epoch": e, "bbox": {"AP": 0.5, "AP50": ap50}, "segm": {"AP": ap}}
             for e, (ap, ap50) in enumerate(((0.1, 0.7), (0.3, 0.6)))]
    args = argparse.Namespace(patience=None, model="maskrcnn_resnet50_fpn", best_metric="bbox/AP50", eval_max_dets=100)
    run = argparse.Namespace(writers=argparse.Namespace(records=lambda kind: evals), output_dir=tmp_path, args=args)
    best = train.BestModel(run, "v1")
    assert (best.best, best.best_epoch, best.since_best) == (0.7, 0, 1), "the mask AP would say epoch 1"
    assert best.update({"bbox": {"AP": 0.1, "AP50": 0.8}, "segm": {"AP": 0.0}}, argparse.Namespace(
        weights_dict=lambda: {"model": {}}), 2) is True
    assert capsys.readouterr().out.startswith("New best box AP50 0.8000 at epoch 2: saved ")
    for model, given, primary, most in [("keypointrcnn_resnet50_fpn", None, ("keypoints", "AP"), 100),
                                        ("retinanet_resnet50_fpn", None, ("bbox", "AP"), 100),
                                        ("maskrcnn_resnet50_fpn", "segm/ARs", ("segm", "ARs"), 100),
                                        ("maskrcnn_resnet50_fpn", "segm/AR300", ("segm", "AR300"), 300)]:
        assert flags.best_metric(argparse.Namespace(model=model, best_metric=given, eval_max_dets=most)) == primary
    for model, given in [("maskrcnn_resnet50_fpn", "segm/AP55"), ("fasterrcnn_resnet50_fpn", "segm/AP"),
                         ("maskrcnn_resnet50_fpn", "AP"), ("maskrcnn_resnet50_fpn", "segm/AR5"),
                         ("keypointrcnn_resnet50_fpn", "keypoints/AR300")]:
        with pytest.raises(UserError, match=f"--best-metric {given} is no metric of {model}'s evaluation; choose "
                                            f"one of bbox/AP, bbox/AP50, "):
            flags.best_metric(argparse.Namespace(model=model, best_metric=given, eval_max_dets=100))
    # The recall of another scoring limit: the limit is what to change (a resumed run's scoring is checked later).
    with pytest.raises(UserError, match=r"--best-metric segm/AR300 is the recall of a run scored with --eval-max-dets "
                                        r"300, and this one scores up to 100 \(AR100\); give --eval-max-dets 300 too, "
                                        r"or --best-metric segm/AR100"):
        flags.best_metric(argparse.Namespace(model="maskrcnn_resnet50_fpn", best_metric="segm/AR300",
                                             eval_max_dets=100))
    # Left to --resume's checkpoint, whose run may have scored 300: asked again once it is read.
    left_to_checkpoint = argparse.Namespace(model="maskrcnn_resnet50_fpn", best_metric="segm/AR300",
                                            eval_max_dets=None, resume="c.pth")
    assert flags.best_metric(left_to_checkpoint) == ("segm", "AR300")
    for no_checkpoint in (None, "auto"):  # auto in a folder without one: a new run, which scores 100
        with pytest.raises(UserError, match=r"scores up to 100 \(AR100\); give --eval-max-dets 300 too"):
            flags.best_metric(argparse.Namespace(**{**vars(left_to_checkpoint), "resume": no_checkpoint,
                                                    "output_dir": str(tmp_path)}))


@pytest.mark.parametrize("interval, epochs, evaluated", [(1, 4, [0, 1, 2, 3]), (2, 5, [1, 3, 4]), (3, 6, [2, 5]),
                                                         (10, 3, [2])])
def test_every_interval_th_epoch_and_the_last_are_evaluated(interval, epochs, evaluated):
    args = argparse.Namespace(eval_interval=interval, epochs=epochs)
    assert [e for e in range(epochs) if train.evaluation_due(args, e)] == evaluated


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
    (["--keep-last", "0"], "--keep-last 0 must be at least 1"),
    (["--eval-max-dets", "10"], "--eval-max-dets 10 must be more than 10 (the scores count 1 and 10 detections for "
                                "AR1 and AR10)"),
    (["--workers", "-1"], "--workers -1 must be 0 or more"),
    (["--seed", "-1"], "--seed -1 must be from 0 to 2**63 - 1"),
    (["--lr", "-0.01"], "--lr -0.01 must be finite, 0 or more"),
    (["--lr", "inf"], "--lr inf must be finite, 0 or more"),
    (["--wd", "-1"], "--wd -1.0 must be finite, 0 or more"),
    (["--momentum", "nan"], "--momentum nan must be finite, 0 or more"),
    (["--vis-images", "-1"], "--vis-images -1 must be 0 or more"),
    (["--clip-grad-norm", "0"], "--clip-grad-norm 0.0 must be above 0"),
    (["--weights", ""], "--weights is empty"),
    (["--lr-steps", "8", "4"], "must be increasing"),
    (["--num-classes", "3"], "--num-classes 3 is too small: the categories need 5 (the largest label + 1, "
                             "background included; labels 1..K)"),
    (["--num-classes", "0"], "--num-classes 0 must be at least 2: background and one category"),
    (["--min-size", "0"], "--min-size 0 must be at least 1"),
    (["--min-size", "96", "--max-size", "80"], "--max-size 80 is below --min-size 96"),
    (["--rpn-score-thresh", "2"], "--rpn-score-thresh 2.0 must be a share between 0 and 1"),
    (["--box-score-thresh", "-0.1"], "--box-score-thresh -0.1 must be a share between 0 and 1"),
    (["--start-epoch", "99"], "--start-epoch 99 must be 0 or more and before --epochs"),
    (["--resume", "/nowhere/checkpoint.pth"], "no such file"),
    (["--resume", "{bad}"], "is a folder; give a file in it, such as"),
    (["--resume", "{bad}/truncated.pth"], "not a readable checkpoint"),
    (["--resume", "{bad}/text.pth"], "not a readable checkpoint"),
    (["--resume", "{bad}/foreign.pth"], "is not a checkpoint of this script (no 'model')"),
    (["--resume", "{run}/checkpoint.pth", "--num-classes", "9"], "differs from the 5 classes"),
    # Its one epoch trained: nothing is left to train with --epochs 1, but the model asked for is named first.
    (["--resume", "{run}/checkpoint.pth", "--epochs", "1", "--model", "fasterrcnn_resnet50_fpn"],
     "holds a maskrcnn_resnet50_fpn model, and this run asks for --model fasterrcnn_resnet50_fpn: give --model "
     "maskrcnn_resnet50_fpn to resume it"),
    (["--resume", "{run}/checkpoint.pth", "--epochs", "1", "--num-classes", "9"], "differs from the 5 classes"),
    (["--test-only", "--resume", "{run}/checkpoint.pth", "--model", "retinanet_resnet50_fpn"],
     "holds a maskrcnn_resnet50_fpn model"),
    (["--test-only", "--weights", "KeypointRCNN_ResNet50_FPN_Weights.COCO_V1"],
     "are weights of keypointrcnn_resnet50_fpn, not of --model maskrcnn_resnet50_fpn: give --model "
     "keypointrcnn_resnet50_fpn"),
    (["--resume", "{run}/checkpoint.pth", "--epochs", "2"], "its run built the model from pretrained weights, and "
                                                            "a resumed run keeps that layout"),
    (["--resume", "{run}/checkpoint.pth", "--epochs", "2", "--weights-backbone", "ResNet50_Weights.IMAGENET1K_V1",
      "--trainable-backbone-layers", "5"], "its run trained the default backbone stages"),
    (["--weights", "{bad}/foreign.pth"], "does not fit this model: it has no tensor backbone.body.conv1.weight"),
    (["--weights", "{bad}/text.pth"], "not a readable checkpoint (not a file written by torch.save)"),
    (["--test-only", "--weights", "{run}/checkpoint.pth", "--num-classes", "9"],
     "--test-only --weights takes weights trained for this dataset's categories (9 classes with background)"),
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
    (["--opt", "SGD_Nesterov", "--momentum", "0"], "--opt sgd_nesterov needs momentum, and --momentum is 0"),
    (["--test-only"], "--test-only evaluates trained weights, and there are none: give --resume CHECKPOINT or "
                      "--weights FILE"),
    (["--test-only", "--resume", "auto"], "(no checkpoint.pth in --output-dir for auto)"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_without_traceback(dataset, trained, bad_files, tmp_path, args, message, capsys,
                                                 monkeypatch):
    """train.run in this process (a subprocess each would add seconds of imports to every case): a traceback
    would escape it; test_debug_shows_the_traceback runs the command line itself."""
    args = [a.format(bad=bad_files, run=trained[0]) for a in args]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    monkeypatch.setattr(train, "start_reusing_freed_memory", lambda args: None)  # malloc settings are pytest's too
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


@pytest.mark.parametrize("asked, kept", [(True, True), (True, False), (False, True)])
def test_freed_memory_kept_for_reuse_as_asked_with_a_warning_where_not(monkeypatch, capsys, asked, kept):
    calls = []
    monkeypatch.setattr(train, "reuse_freed_memory_checked", lambda: calls.append("reuse") or kept)
    train.start_reusing_freed_memory(argparse.Namespace(reuse_freed_memory=asked))
    assert calls == (["reuse"] if asked else [])
    warned = "warning: malloc did not keep freed memory for reuse" in capsys.readouterr().err
    assert warned is (asked and not kept)


def test_debug_shows_the_traceback(dataset, tmp_path):
    result = run_cli("train.py", "--data-path", str(tmp_path / "nope"), *SMALL, "--debug",
                     "--output-dir", str(tmp_path))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_lr_steps_past_the_last_epoch_warn(torch_home, tmp_path):
    result = run_cli("train.py", "--data-path", str(tmp_path / "nope"), *SMALL, "--lr-steps", "30", "--epochs", "2",
                     "--output-dir", str(tmp_path), torch_home=torch_home)
    assert "warning: --lr-steps 30 not before --epochs 2: that step never happens" in result.stderr
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


def test_missing_data_path_is_clear(torch_home, tmp_path):
    result = run_cli("train.py", "--data-path", str(tmp_path / "nope"), *SMALL, "--output-dir", str(tmp_path),
                     torch_home=torch_home)
    assert result.returncode == 2 and "is not a folder" in result.stderr and "Traceback" not in result.stderr


def test_metrics_file_holds_step_and_evaluation_records(trained):
    out, _ = trained
    records = read_metrics(out)
    steps = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    assert {"loss", "loss_mask", "lr", "images_per_s", "time", "global_step"} <= set(steps[0])
    (evaluation,) = [r for r in records if r["type"] == "eval"]
    assert evaluation["new_best"] is True and evaluation["seconds"] > 0
    (epoch,) = [r for r in records if r["type"] == "epoch"]
    assert (epoch["epoch"], epoch["steps"], epoch["global_step"]) == (0, len(steps), steps[-1]["global_step"])
    assert epoch["loss"] == pytest.approx(sum(r["loss"] for r in steps) / len(steps)), "--print-freq 1: every step"
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
    assert (out / "model_best.pth").is_file() and "New best mask AP" in result.stdout
    assert "AP per category" in result.stdout


@pytest.mark.parametrize("with_masks", [False, True])
def test_prediction_pictures_show_the_instances_training_reads(dataset, tmp_path, monkeypatch, with_masks):
    """A box model's pictures of a file without outlines show its boxes (not instances dropped for want of a
    mask); a mask model's show the masks."""
    root = tmp_path / "data"
    shutil.copytree(dataset / "annotations", root / "annotations")
    (root / "val2017").symlink_to(dataset / "val2017")
    val_file = root / "annotations" / "instances_val2017.json"
    data = json.loads(val_file.read_text())
    for ann in data["annotations"]:
        ann["segmentation"] = ann["segmentation"] if with_masks or ann["iscrowd"] else []
    val_file.write_text(json.dumps(data))
    val_set = build_dataset(root, "coco", "val", None)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=val_set.category_map.num_classes)
    targets = []
    monkeypatch.setattr(train, "side_by_side", lambda image, target, output, names: targets.append(target))
    indices = list(range(len(val_set)))
    train.prediction_pictures(model, val_set, indices, torch.device("cpu"), None, with_masks)
    assert len(targets) == len(indices) and sum(len(t["boxes"]) for t in targets) > 0
    assert all(len(t["masks"]) == len(t["boxes"]) if with_masks else "masks" not in t for t in targets)


def test_predict_on_a_folder(trained, dataset, tmp_path):
    """Batches of 3 of images of mixed sizes, and a file cut short, which is named and left out."""
    out, _ = trained
    images = sorted((dataset / "val2017").glob("*.jpg"))
    (tmp_path / "in").mkdir()
    for image in images:
        (tmp_path / "in" / image.name).symlink_to(image)
    (tmp_path / "in" / "000009999999.jpg").write_bytes(images[0].read_bytes()[:300])
    result = run_cli("tools/predict.py", "--checkpoint", str(out / "checkpoint.pth"), str(tmp_path / "in"),
                     "--output-dir", str(tmp_path / "out"), "--device", "cpu", "--score-thresh", "0.0",
                     "--batch-size", "3")
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(f"warning: {tmp_path / 'in' / '000009999999.jpg'}: image unreadable"), result.stderr
    assert f"[{len(images) + 1}/{len(images) + 1}]" in result.stdout
    assert sorted(p.name for p in (tmp_path / "out").glob("*.jpg")) == [p.name for p in images]
    listed = json.loads((tmp_path / "out" / "images.json").read_text())
    assert [(i["id"], Path(i["file_name"]).name) for i in listed] == [(int(p.stem), p.name) for p in images]
    gt = COCO(str(dataset / "annotations" / "instances_val2017.json"))
    written = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert written and all("segmentation" in d and len(d["bbox"]) == 4 for d in written), "masks with their box"
    detections = gt.loadRes(str(tmp_path / "out" / "predictions.json"))
    assert [a["bbox"] for a in detections.anns.values()] == [d["bbox"] for d in written], "the model's boxes"
    assert {a["category_id"] for a in detections.anns.values()} <= {c["id"] for c in CATEGORIES}


def test_predict_has_the_model_drop_what_it_would_not_keep(trained, dataset, tmp_path, monkeypatch):
    from tools import predict

    floors, drop = [], predict.drop_detections_below

    def recorded(model, score):
        drop(model, score)
        floors.append(model.roi_heads.score_thresh)

    monkeypatch.setattr(predict, "drop_detections_below", recorded)
    image = sorted((dataset / "val2017").glob("*.jpg"))[0]
    assert predict.main(["--checkpoint", str(trained[0] / "checkpoint.pth"), str(image), "--device", "cpu",
                         "--output-dir", str(tmp_path), "--score-thresh", "0.3", "--no-pictures"]) == 0
    assert floors and 0.2999 < floors[0] < 0.3


@pytest.mark.parametrize("flags, reused", [([], True), (["--no-reuse-freed-memory"], False)])
def test_predict_on_the_cpu_reuses_freed_memory_unless_told(trained, dataset, tmp_path, monkeypatch, flags, reused):
    from tools import predict

    calls = []
    monkeypatch.setattr(predict, "reuse_freed_memory_checked", lambda: calls.append("reuse") or True)
    image = sorted((dataset / "val2017").glob("*.jpg"))[0]
    status = predict.main(["--checkpoint", str(trained[0] / "checkpoint.pth"), str(image), "--output-dir",
                           str(tmp_path), "--device", "cpu", *flags])
    assert status == 0 and (tmp_path / image.name).is_file()
    assert calls == (["reuse"] if reused else [])


def test_predict_says_which_photos_it_turned_upright_for_want_of_a_json_size(trained, tmp_path, capsys):
    from tools import predict

    exif = Image.Exif()
    exif[0x0112] = 6  # a quarter turn: stored 96 x 72, shown 72 x 96
    (tmp_path / "in").mkdir()
    Image.new("RGB", (96, 72)).save(tmp_path / "in" / "7.jpg", exif=exif)
    Image.new("RGB", (96, 72)).save(tmp_path / "in" / "8.jpg")
    args = ["--checkpoint", str(trained[0] / "checkpoint.pth"), str(tmp_path / "in"), "--device", "cpu"]
    assert predict.main([*args, "--output-dir", str(tmp_path / "a")]) == 0
    assert (f"note: 1 image was turned upright as EXIF asks (first: {tmp_path / 'in' / '7.jpg'}); the predictions are "
            f"of the turned pictures") in capsys.readouterr().out
    (tmp_path / "unsized.json").write_text(json.dumps({"images": [{"id": i, "file_name": f"{i}.jpg"} for i in (7, 8)],
                                                       "annotations": [], "categories": []}))
    assert predict.main([*args, "--output-dir", str(tmp_path / "u"), "--annotations", str(tmp_path / "unsized.json")]
                        ) == 0
    assert f"(as training does), give their width and height in {tmp_path / 'unsized.json'}\n" in \
        capsys.readouterr().out
    assert [(i["width"], i["height"]) for i in json.loads((tmp_path / "a" / "images.json").read_text())] == [
        (72, 96), (96, 72)]
    listing = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 96, "height": 72} for i in (7, 8)],
               "annotations": [], "categories": [{"id": 1, "name": "a"}]}
    (tmp_path / "listing.json").write_text(json.dumps(listing))
    assert predict.main([*args, "--output-dir", str(tmp_path / "b"), "--annotations",
                         str(tmp_path / "listing.json")]) == 0
    assert "turned upright" not in capsys.readouterr().out, "read as the file's sizes say"
    listing["images"][1].update(width=72, height=96)
    (tmp_path / "listing.json").write_text(json.dumps(listing))
    assert predict.main([*args, "--output-dir", str(tmp_path / "c"), "--annotations",
                         str(tmp_path / "listing.json")]) == 0
    assert (f"warning: 1 image of another size than --annotations says (first: {tmp_path / 'in' / '8.jpg'} is "
            f"96x72 (width x height), the JSON says 72x96): the detections are in the image files' "
            f"pixels") in capsys.readouterr().err


def test_predict_counts_only_detections_it_would_have_written_as_left_out_for_their_label():
    from tools import predict
    categories = CategoryMap.from_categories([{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], "shapes")
    output = {"scores": torch.tensor([0.9, 0.8, 0.3, 0.2]), "labels": torch.tensor([1, 7, 2, 9])}
    kept, unknown = predict.kept_detections(output, categories, score_thresh=0.5)
    assert kept["labels"].tolist() == [1] and kept["scores"].tolist() == pytest.approx([0.9])
    assert unknown == 1, "label 9 scored under the threshold, and would not have been written anyway"


def test_predict_warns_of_an_earlier_calls_pictures_it_leaves_beside_its_own(tmp_path, capsys):
    from tools import predict
    predict.warn_of_earlier_pictures(tmp_path, ["a.jpg"])  # a new folder
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.jpg").write_bytes(b"")
    predict.warn_of_earlier_pictures(tmp_path, ["a.jpg"])  # pictures, but no earlier call's images.json
    assert capsys.readouterr().err == ""
    (tmp_path / "images.json").write_text("[]")
    predict.warn_of_earlier_pictures(tmp_path, ["a.jpg", "b.jpg"])  # this call replaces them all
    assert capsys.readouterr().err == ""
    predict.warn_of_earlier_pictures(tmp_path, ["a.jpg"])
    assert "holds 1 picture of an earlier call that this one does not replace (first: b.jpg)" in \
        capsys.readouterr().err


@pytest.mark.parametrize("on_terminal", [True, False])
def test_predicts_progress_rewrites_one_line_on_a_terminal_and_prints_tenths_in_a_log(capsys, on_terminal):
    from tools import predict
    progress = predict.ProgressLine(25, on_terminal=on_terminal)
    for done in range(1, 26):
        progress.show(done)
    progress.show(25, last=True)
    progress.end()
    out = capsys.readouterr().out
    counts = [int(n) for n in re.findall(r"\[(\d+)/25\]", out)]
    if on_terminal:
        assert out.endswith("\n") and out.count("\n") == 1 and out.count("\r") == 26
    else:
        assert counts == list(range(3, 25, 3)) + [25] and out.count("\n") == len(counts) and "\r" not in out


def test_predicts_progress_in_a_log_is_printed_at_least_every_log_seconds(capsys, monkeypatch):
    from tools import predict
    monkeypatch.setattr(predict.ProgressLine, "LOG_SECONDS", 0.0)
    progress = predict.ProgressLine(1000, on_terminal=False, already=400)
    for done in (401, 402, 403):
        progress.show(done)
    assert re.findall(r"\[(\d+)/1000\]", capsys.readouterr().out) == ["401", "402", "403"], "not only tenths"


def stop_at_the_image(predict, monkeypatch, stop: type[BaseException], number: int = 4):
    """predict raises stop when it comes to keep the detections of the image of this number (from 1); returns the
    function to restore."""
    kept, calls = predict.kept_detections, []

    def stopped(*given):
        calls.append(1)
        if len(calls) == number:
            raise stop
        return kept(*given)

    monkeypatch.setattr(predict, "kept_detections", stopped)
    return kept


def test_an_interrupted_prediction_keeps_what_it_did_and_resume_does_the_rest(trained, dataset, tmp_path, capsys,
                                                                             monkeypatch):
    from tools import predict
    args = ["--checkpoint", str(trained[0] / "checkpoint.pth"), str(dataset / "val2017"), "--device", "cpu",
            "--score-thresh", "0.0", "--batch-size", "1"]
    assert predict.main([*args, "--output-dir", str(tmp_path / "straight"), "--no-pictures"]) == 0
    assert not list((tmp_path / "straight").glob("*.jpg")), "--no-pictures"
    straight = json.loads((tmp_path / "straight" / "predictions.json").read_text())
    listed = json.loads((tmp_path / "straight" / "images.json").read_text())
    kept = stop_at_the_image(predict, monkeypatch, errors.Terminated, number=1)
    capsys.readouterr()
    straight_again = [*args, "--output-dir", str(tmp_path / "straight"), "--no-pictures"]
    assert predict.main(straight_again) == errors.TERMINATED_STATUS
    assert "Stopped before the first image was done: nothing was written" in capsys.readouterr().err
    assert json.loads((tmp_path / "straight" / "images.json").read_text()) == listed, "the earlier call's files stay"
    monkeypatch.setattr(predict, "kept_detections", kept)
    stop_at_the_image(predict, monkeypatch, errors.Terminated)
    assert predict.main([*args, "--output-dir", str(tmp_path / "cut")]) == errors.TERMINATED_STATUS
    assert (f"Wrote the detections of the images done, 3 of {len(listed)}, to {tmp_path / 'cut'}; the same command "
            f"with --resume predicts the others") in capsys.readouterr().err
    assert json.loads((tmp_path / "cut" / "images.json").read_text()) == listed[:3]
    monkeypatch.setattr(predict, "kept_detections", kept)
    assert predict.main([*args, "--output-dir", str(tmp_path / "cut"), "--resume"]) == 0
    assert f"Resuming: 3 of {len(listed)} images were predicted in" in capsys.readouterr().out
    assert json.loads((tmp_path / "cut" / "images.json").read_text()) == listed
    assert json.loads((tmp_path / "cut" / "predictions.json").read_text()) == straight
    assert len(list((tmp_path / "cut").glob("*.jpg"))) == len(listed), "the pictures of both calls"
    assert predict.main([*args[:2], str(dataset / "train2017"), *args[3:], "--output-dir", str(tmp_path / "cut"),
                         "--resume"]) == 2
    assert "which this call's inputs do not give it; give the interrupted call's inputs" in capsys.readouterr().err
    fewer = [str(dataset / "val2017" / Path(image["file_name"]).name) for image in listed[:-1]]
    assert predict.main([*args[:2], *fewer, *args[3:], "--output-dir", str(tmp_path / "cut"), "--resume"]) == 2
    assert not (tmp_path / "cut" / predict.JOURNAL).exists(), "a resume refused at its last image begins no journal"
    capsys.readouterr()
    assert predict.main([*args[:5], "--score-thresh", "0.5", *args[7:], "--output-dir", str(tmp_path / "cut"),
                         "--resume"]) == 2
    assert "made its detections otherwise (score-thresh 0.0 there, 0.5 here)" in capsys.readouterr().err
    monkeypatch.chdir(dataset)  # the same images named from another folder
    assert predict.main([*args[:2], "val2017", *args[3:], "--output-dir", str(tmp_path / "cut"), "--resume"]) == 0
    assert f"Resuming: {len(listed)} of {len(listed)} images were predicted in" in capsys.readouterr().out
    assert predict.main([*args[:2], "val2017", "val2O17/*.jpg", *args[3:], "--output-dir", str(tmp_path / "typo")]) == 2
    assert "val2O17/*.jpg: no such file or folder, and no file matches it as a pattern" in capsys.readouterr().err


class Killed(BaseException):
    """A kill the process cannot catch (SIGKILL, the out-of-memory killer): nothing of predict's runs after it."""


def test_a_killed_prediction_leaves_its_journal_and_resume_continues_it(trained, dataset, tmp_path, capsys,
                                                                        monkeypatch):
    from tools import predict
    args = ["--checkpoint", str(trained[0] / "checkpoint.pth"), str(dataset / "val2017"), "--device", "cpu",
            "--score-thresh", "0.0", "--batch-size", "1", "--no-pictures"]
    assert predict.main([*args, "--output-dir", str(tmp_path / "straight")]) == 0
    assert not (tmp_path / "straight" / predict.JOURNAL).exists(), "a finished call leaves no journal"
    straight = json.loads((tmp_path / "straight" / "predictions.json").read_text())
    listed = json.loads((tmp_path / "straight" / "images.json").read_text())
    kept = stop_at_the_image(predict, monkeypatch, Killed)
    with pytest.raises(Killed):
        predict.main([*args, "--output-dir", str(tmp_path / "cut")])
    journal = tmp_path / "cut" / predict.JOURNAL
    assert not (tmp_path / "cut" / "predictions.json").exists() and len(journal.read_bytes().splitlines()) == 4
    assert journal.read_bytes().startswith(predict.SETTINGS_MARK), "the settings, then a line per image"
    with open(journal, "ab") as f:
        f.write(b'{"id": 9, "file_name": "x"}\t2\t[{"image_id": 9')  # cut short by the kill: predicted again
    monkeypatch.setattr(predict, "kept_detections", kept)
    capsys.readouterr()
    assert predict.main([*args, "--output-dir", str(tmp_path / "cut"), "--resume"]) == 0
    assert f"Resuming: 3 of {len(listed)} images were predicted in" in capsys.readouterr().out
    assert json.loads((tmp_path / "cut" / "images.json").read_text()) == listed
    assert json.loads((tmp_path / "cut" / "predictions.json").read_text()) == straight
    assert not journal.exists()
    (tmp_path / "cut" / predict.CALL_RECORD).unlink()  # as an earlier version of predict.py left the folder
    assert predict.main([*args, "--output-dir", str(tmp_path / "cut"), "--resume"]) == 0
    assert "recorded no settings (an earlier version of predict.py): they are not compared" in capsys.readouterr().out
    journal.write_bytes(predict.SETTINGS_MARK + b'{"model": ')  # killed within its first line: nothing to go on
    assert predict.main([*args, "--output-dir", str(tmp_path / "cut"), "--resume"]) == 0
    said = capsys.readouterr().out
    assert f"Resuming: 0 of {len(listed)} images were predicted in" in said and "recorded no settings" not in said
    assert json.loads((tmp_path / "cut" / "predictions.json").read_text()) == straight
    journal.write_bytes(b"not json\n{}\t0\t[]\n")
    assert predict.main([*args, "--output-dir", str(tmp_path / "cut"), "--resume"]) == 2
    assert f"line 1 of {journal} is not an image's detections" in capsys.readouterr().err
    assert predict.main([*args, "--output-dir", str(tmp_path / "cut")]) == 2, "nothing of a killed call is replaced"
    assert f"holds {predict.JOURNAL}, the work of a call that was killed: give --resume" in capsys.readouterr().err
    assert journal.read_bytes() == b"not json\n{}\t0\t[]\n"
    (tmp_path / "unreadable").mkdir()
    (tmp_path / "unreadable" / "a.jpg").write_bytes(b"not a jpeg")
    assert predict.main([*args[:2], str(tmp_path / "unreadable"), *args[3:], "--output-dir", str(tmp_path / "bad")]
                        ) == 2
    assert not (tmp_path / "bad" / predict.JOURNAL).exists(), "a call that predicted nothing leaves no journal"
    other = [*args[:5], "--score-thresh", "0.5", *args[7:], "--output-dir", str(tmp_path / "straight")]
    assert predict.main([*other[:2], str(tmp_path / "unreadable"), *other[3:]]) == 2
    capsys.readouterr()
    assert predict.main([*args, "--output-dir", str(tmp_path / "straight"), "--resume"]) == 0, \
        "a call that replaced nothing leaves the earlier call's record"
    assert f"Resuming: {len(listed)} of {len(listed)} images were predicted in" in capsys.readouterr().out
    stop_at_the_image(predict, monkeypatch, Killed, number=2)
    with pytest.raises(Killed):
        predict.main(other)
    monkeypatch.setattr(predict, "kept_detections", kept)
    assert predict.main([*args, "--output-dir", str(tmp_path / "straight"), "--resume"]) == 2
    assert "made its detections otherwise (score-thresh 0.5 there, 0.0 here)" in capsys.readouterr().err, "journal"
    (tmp_path / "straight" / predict.JOURNAL).unlink()
    assert predict.main([*other, "--resume"]) == 2, "the files left are the earlier call's, made at 0.0"
    assert "made its detections otherwise (score-thresh 0.0 there, 0.5 here)" in capsys.readouterr().err


def test_predict_finds_images_in_subfolders_and_their_ids_by_the_path_the_json_gives(tmp_path):
    from tools import predict
    for name in ("val2017/imgs/a.jpg", "val2017/b.jpg", "val2017/imgs/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    paths = predict.find_images([str(tmp_path / "val2017")])
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["val2017/b.jpg", "val2017/imgs/a.jpg"]
    annotations = tmp_path / "val.json"
    images = [{"id": 7, "file_name": "imgs/a.jpg", "width": 64, "height": 48},
              {"id": 9, "file_name": "./b.jpg", "width": 32, "height": 32}]  # as some exporters write it
    annotations.write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    assert predict.image_records(paths, str(annotations)) == [(9, (32, 32)), (7, (64, 48))]
    assert predict.find_images([str(tmp_path / "val2017")], skip=tmp_path / "val2017" / "imgs") == paths[:1]
    (tmp_path / "val2017" / "album.jpg").mkdir()  # a folder named like an image, which a pattern matches
    assert predict.find_images([str(tmp_path / "val2017" / "*.jpg")]) == paths[:1]
    (tmp_path / "val2017" / "cell.TIF").write_bytes(b"")
    assert predict.find_images([str(tmp_path / "val2017")])[:2] == [paths[0], tmp_path / "val2017" / "cell.TIF"]
    with pytest.raises(UserError, match="every image found lies in --output-dir .*imgs, where the pictures go"):
        predict.find_images([str(tmp_path / "val2017" / "imgs")], skip=tmp_path / "val2017" / "imgs")


def test_predict_finds_images_in_linked_folders_each_once(tmp_path):
    from tools import predict
    for name in ("elsewhere/c.jpg", "in/a.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "in" / "linked").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "in" / "loop").symlink_to(tmp_path / "in")  # a link to a folder above: walked once
    paths = predict.find_images([str(tmp_path / "in")])
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["in/a.jpg", "in/linked/c.jpg"]


def test_export_takes_the_first_images_of_a_folder_and_lists_no_more_of_the_tree(tmp_path, monkeypatch):
    from tools import predict
    for name in ("top.jpg", "notes.txt", "a/2.png", "a/1.jpg", "b/3.jpg", "c/4.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "a" / "0.jpg").symlink_to(tmp_path / "gone.jpg")  # a broken link is no image
    listed, walk = [], predict.os.walk

    def listing(folder):
        for parent, subfolders, files in walk(folder):
            listed.append(Path(parent).name)
            yield parent, subfolders, files

    monkeypatch.setattr(predict.os, "walk", listing)
    first = predict.first_images(tmp_path, 3)
    assert [p.relative_to(tmp_path).as_posix() for p in first] == ["top.jpg", "a/1.jpg", "a/2.png"]
    assert listed == [tmp_path.name, "a"], "b/ and c/ are not listed"
    assert len(predict.first_images(tmp_path, 9)) == 5
    with pytest.raises(UserError, match="no images found in"):
        predict.first_images(tmp_path / "a" / "missing", 3)


def test_predict_names_pictures_of_one_stem_apart():
    from tools import predict

    paths = [Path("a.jpg"), Path("a.png"), Path("a_2.jpg"), Path("b.jpg"), Path("other/A.jpg")]
    assert predict.picture_names(paths) == ["a.jpg", "a_2.jpg", "a_2_2.jpg", "b.jpg", "A_3.jpg"]


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size 0 must be at least 1"),
    (["--min-size", "0"], "--min-size 0 must be at least 1"),
    (["--min-size", "96", "--max-size", "64"], "--max-size 64 is below --min-size 96"),
    (["--score-thresh", "1.5"], "--score-thresh 1.5 must be a score between 0 and 1"),
    (["--device", "mps"], "--device mps: give cuda, cuda:N or cpu"),
    (["--onnx", "m.onnx", "--min-size", "320"], "fixed when the ONNX model was exported"),
    (["--detections-per-image", "0"], "--detections-per-image 0 must be at least 1"),
    (["--model", "fasterrcnn_resnet50_fpn"], "holds a maskrcnn_resnet50_fpn; leave --model out"),
    (["--annotations", "/nowhere/instances.json"], "annotation file /nowhere/instances.json: no such file; check"),
    (["--onnx", "m.onnx", "--batch-size", "8"], "--no-speedups and --batch-size apply to a PyTorch model"),
    (["--onnx", "m.onnx", "--no-speedups"], "onnxruntime runs the --onnx file one image at a time; leave them"),
    (["--resume"], "holds no earlier call to continue (no journal, images.json or predictions.json); check"),
    (["--output-dir", "FILE"], "is a file, not a folder; give a folder (it is made if missing)"),
    (["--no-labels", "--no-pictures"], "--no-labels changes the pictures, which --no-pictures leaves out"),
])
def test_predict_refuses_what_it_would_ignore_or_fail_on_late_in_one_line(trained, dataset, tmp_path, capsys,
                                                                           flags, message):
    from tools import predict

    (tmp_path / "FILE").write_text("")
    flags = [str(tmp_path / "FILE") if flag == "FILE" else flag for flag in flags]
    source = [] if "--onnx" in flags else ["--checkpoint", str(trained[0] / "checkpoint.pth")]
    image = sorted((dataset / "val2017").glob("*.jpg"))[0]
    status = predict.main([*source, str(image), "--output-dir", str(tmp_path / "out"), "--device", "cpu", *flags])
    said = capsys.readouterr()
    assert status == 2 and message in said.err and "Traceback" not in said.err, said.err
    assert "note:" not in said.out + said.err, "only the error is said"


def test_predict_refuses_weights_whose_class_heads_do_not_fit(trained, dataset, tmp_path, capsys):
    """A train.py checkpoint of its own categories given to --weights: its heads do not fit COCO's 91 classes,
    which fresh heads would fill with random predictions."""
    from tools import predict

    image = sorted((dataset / "val2017").glob("*.jpg"))[0]
    status = predict.main(["--weights", str(trained[0] / "model_best.pth"), str(image), "--output-dir",
                           str(tmp_path), "--device", "cpu"])
    error = capsys.readouterr().err
    assert status == 2 and "does not fit this model" in error and "goes to --checkpoint" in error, error
    assert "a head sized for another number of classes or keypoints" in error and "--num-classes" not in error
    assert not (tmp_path / "predictions.json").exists()


def test_the_epoch_file_is_the_checkpoints_bytes(trained):
    out, _ = trained
    assert (out / "model_0.pth").stat().st_ino == (out / "checkpoint.pth").stat().st_ino, "a hard link"


def test_weights_of_another_model_to_evaluate_are_named_without_class_head_advice():
    args = train.get_args_parser().parse_args(["--test-only", "--weights", "KeypointRCNN_ResNet50_FPN_Weights.COCO_V1"])
    with pytest.raises(UserError) as error:
        train.create_model(args, 5, None, CategoryMap.from_categories([{"id": 1, "name": "a"}], "coco"))
    assert str(error.value).endswith("not of --model maskrcnn_resnet50_fpn: give --model keypointrcnn_resnet50_fpn")


def test_predict_takes_torchvisions_keypoint_weights_of_persons_alone(tmp_path, monkeypatch):
    """torchvision's COCO keypoint weights have two classes (background and person), not COCO's 91."""
    from models import hub_cache_path
    from tools import predict

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    name = "KeypointRCNN_ResNet50_FPN_Weights.COCO_V1"
    source = torchvision.models.detection.keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    path = hub_cache_path(torchvision.models.get_weight(name).url)
    path.parent.mkdir(parents=True)
    torch.save(source.state_dict(), path)
    args = argparse.Namespace(checkpoint=None, weights=name, model="keypointrcnn_resnet50_fpn", min_size=None,
                              max_size=None, detections_per_image=None)
    model, categories, built = predict.load_model(args)
    assert built == "keypointrcnn_resnet50_fpn" and categories.num_classes == 2
    assert categories.category_id(1) == 1 and categories.name(1) == "person"
    assert torch.equal(model.roi_heads.box_predictor.cls_score.weight, source.roi_heads.box_predictor.cls_score.weight)


@pytest.mark.parametrize("saved_here", [True, False])
def test_a_stop_before_an_epochs_first_step_writes_no_second_checkpoint(tmp_path, capsys, saved_here):
    """Right after an epoch's checkpoint and evaluation, checkpoint.pth resumes where the stop is: a save there
    would spend the grace period on a copy of it."""
    saves = []
    run = argparse.Namespace(save=lambda state: saves.append(state) or tmp_path / "checkpoint.pth", is_main=True,
                             output_dir=tmp_path)
    stop = StopRequest()
    stop.signal_name = "SIGTERM"
    state = argparse.Namespace(epoch=1, step=0)
    with pytest.raises(SystemExit) as exited:
        train.stop_mid_epoch(run, state, stop, saved_here=saved_here)
    assert exited.value.code == 143 and len(saves) == (0 if saved_here else 1)
    expected = (f"before epoch 1's first step, where {tmp_path / 'checkpoint.pth'} resumes already" if saved_here
                else f"at epoch 1 step 0; saved {tmp_path / 'checkpoint.pth'}")
    assert expected in capsys.readouterr().out


def test_predict_pictures_without_labels_draw_masks_and_boxes_only(trained, dataset, tmp_path, monkeypatch):
    """--no-labels, for images of many small detections, whose labels would cover them."""
    from tools import predict
    image = torch.full((3, 120, 160), 128, dtype=torch.uint8)
    output = {"boxes": torch.tensor([[20.0, 30.0, 140.0, 100.0]]), "labels": torch.tensor([1]),
              "scores": torch.tensor([0.9])}
    cmap = CategoryMap.from_categories([{"id": 3, "name": "square"}], "other")
    bare, labelled = (predict.picture_of(image, output, cmap, with_labels) for with_labels in (False, True))
    inside = (slice(None), slice(33, 97), slice(23, 137))
    assert torch.equal(bare[inside], image[inside]) and not torch.equal(labelled[inside], image[inside])
    assert torch.equal(bare[:, 30], labelled[:, 30]), "the same box"
    asked = []
    monkeypatch.setattr(predict, "picture_of", lambda *given: asked.append(given[3]) or given[0])
    assert predict.main(["--checkpoint", str(trained[0] / "checkpoint.pth"), str(dataset / "val2017"), "--device",
                         "cpu", "--output-dir", str(tmp_path), "--no-labels", "--score-thresh", "0.0"]) == 0
    assert asked and not any(asked)

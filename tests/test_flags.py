"""flags.py: the command line's checks of counts, rates, schedules and flag combinations."""

import argparse

import pytest

import flags
import train
from errors import UserError

OUT_OF_RANGE = [
    *[([flag, "0"], f"{flag} 0 must be at least 1") for flag in (
        "--max-size", "--rois-per-image", "--eval-batch-size", "--print-freq", "--lr-step-size", "--grad-accum-steps",
        "--model-ema-steps", "--eval-interval", "--patience", "--auto-scale-lr")],
    (["--epochs", "0"], "--epochs 0 must be at least 1"),
    (["--detections-per-image", "0"], "--detections-per-image 0 must be at least 1"),
    (["--lr-gamma", "-0.1"], "--lr-gamma -0.1 must be finite, 0 or more"),
    (["--norm-weight-decay", "-1"], "--norm-weight-decay -1.0 must be finite, 0 or more"),
    (["--dist-timeout", "0"], "--dist-timeout 0 must be above 0"),
    (["--model-ema-decay", "1.5"], "--model-ema-decay 1.5 must be a share between 0 and 1"),
    (["--repeat-factor-threshold", "2"], "--repeat-factor-threshold 2.0 must be a share between 0 and 1"),
    (["--max-bad-samples", "-0.1"], "--max-bad-samples -0.1 must be a share between 0 and 1"),
    (["--momentum", "1"], "--momentum 1.0 must be below 1"),
    (["--repeat-factor-threshold", "0"], "--repeat-factor-threshold 0.0 must be above 0"),
    (["--aspect-ratio-group-factor", "-5"], "--aspect-ratio-group-factor -5 must be -1 (no grouping) or 0 or more"),
]


@pytest.mark.parametrize("args, message", OUT_OF_RANGE, ids=[" ".join(a) for a, _ in OUT_OF_RANGE])
def test_every_count_share_and_rate_out_of_range_is_refused(args, message):
    parser = train.get_args_parser()
    flags.check_numbers(parser.parse_args([]))  # the defaults pass
    with pytest.raises(UserError) as refused:
        flags.check_numbers(parser.parse_args(args))
    assert str(refused.value).startswith(message), refused.value


def test_every_lr_step_past_the_last_epoch_is_named(capsys):
    def schedule(**flags):
        return argparse.Namespace(**{"lr_steps": None, "lr_step_size": None, "epochs": 5,
                                     "lr_scheduler": "multisteplr", "test_only": False, **flags})

    flags.check_schedule(schedule(lr_steps=[16, 22], epochs=1))
    assert "--lr-steps 16 22 not before --epochs 1: those steps never happen" in capsys.readouterr().err
    flags.check_schedule(schedule(lr_step_size=5))
    assert "--lr-step-size 5 not below --epochs 5: the learning rate never steps" in capsys.readouterr().err
    flags.check_schedule(schedule(lr_step_size=4))
    flags.check_schedule(schedule(lr_step_size=5, lr_scheduler="cosineannealinglr"))  # refused, not warned of
    assert capsys.readouterr().err == ""


def test_a_model_without_keypoints_on_keypoint_data_is_told_what_it_learns(capsys):
    args = train.get_args_parser().parse_args(["--dataset", "coco_kp", "--model", "maskrcnn_resnet50_fpn"])
    flags.check_combinations(args)
    said = capsys.readouterr().out
    assert "persons are learned without their keypoints, from the images with 10 or more labelled" in said
    flags.check_combinations(train.get_args_parser().parse_args(["--dataset", "coco_kp", "--model",
                                                                 "keypointrcnn_resnet50_fpn"]))
    assert capsys.readouterr().out == ""


def test_sizes_given_with_an_augmentation_that_sizes_training_images_are_said_to_apply_to_evaluation(capsys):
    flags.check_combinations(train.get_args_parser().parse_args(["--data-augmentation", "lsj", "--min-size", "64"]))
    assert "--data-augmentation lsj sizes the training images itself; --min-size and --max-size size the " \
           "evaluation's" in capsys.readouterr().out
    flags.check_combinations(train.get_args_parser().parse_args(["--data-augmentation", "hflip", "--min-size", "64"]))
    assert capsys.readouterr().out == ""



def test_model_ema_eval_without_model_ema_is_refused():
    args = train.get_args_parser().parse_args(["--model-ema-eval", "average"])
    with pytest.raises(UserError, match="--model-ema-eval average chooses among the weights --model-ema keeps; add "
                                        "--model-ema, or leave --model-ema-eval out"):
        flags.check_combinations(args)
    flags.check_combinations(train.get_args_parser().parse_args(["--model-ema", "--model-ema-eval", "average"]))


IGNORED_COMBINATIONS = [
    (["--amp-dtype", "bfloat16"], "--amp-dtype bfloat16 picks --amp's precision; add --amp, or leave"),
    (["--lr-scheduler", "cosineannealinglr", "--lr-steps", "8"], "--lr-steps sets multisteplr's steps"),
    (["--lr-scheduler", "cosineannealinglr", "--lr-step-size", "4"], "leave --lr-step-size out, or use"),
    (["--model-ema-decay", "0.99"], "--model-ema-decay tunes the average that --model-ema keeps; add --model-ema"),
    (["--model-ema-steps", "4"], "or leave --model-ema-steps out"),
    (["--opt", "adamw", "--momentum", "0.5"], "--momentum 0.5 is SGD's, and --opt adamw takes none"),
]


@pytest.mark.parametrize("args, message", IGNORED_COMBINATIONS, ids=[" ".join(a) for a, _ in IGNORED_COMBINATIONS])
def test_flags_that_another_flag_would_ignore_are_refused(args, message):
    parser = train.get_args_parser()
    with pytest.raises(UserError, match=message):
        flags.check_training_combinations(parser.parse_args(args))
    flags.check_training_combinations(parser.parse_args(["--amp", "--amp-dtype", "bfloat16"]))
    plain, averaged = parser.parse_args([]), parser.parse_args(["--model-ema", "--model-ema-steps", "4"])
    for args in (plain, averaged):
        flags.check_training_combinations(args)
    assert (plain.model_ema_decay, plain.model_ema_steps) == (0.9998, 1), "the defaults, as recorded before"
    assert (averaged.model_ema_decay, averaged.model_ema_steps) == (0.9998, 4)
    momenta = [parser.parse_args(given) for given in ([], ["--momentum", "0.8"], ["--opt", "AdamW"])]
    for args in momenta:
        flags.check_training_combinations(args)
    assert [args.momentum for args in momenta] == [0.9, 0.8, 0.9], "as recorded before, with AdamW too"


MODEL_FLAG_MISTAKES = [
    (["--model", "ssd300_vgg16", "--min-size", "64"], "--min-size does not apply to --model ssd300_vgg16"),
    (["--model", "retinanet_resnet50_fpn", "--rois-per-image", "32"], "--rois-per-image does not apply"),
    (["--weights", "Foo.BAR"], "--weights Foo.BAR: neither a file nor a torchvision weights name"),
    (["--weights", "missing.pth"], "--weights missing.pth: no such file"),
    (["--weights", "RetinaNet_ResNet50_FPN_Weights.COCO_V1"], "are weights of retinanet_resnet50_fpn, not of"),
    (["--weights-backbone", "Foo.BAR"], "--weights-backbone Foo.BAR: neither a file nor a torchvision weights"),
    (["--trainable-backbone-layers", "6"],
     "--trainable-backbone-layers 6 must be from 0 to 5, the backbone stages of --model maskrcnn_resnet50_fpn"),
    (["--trainable-backbone-layers", "7", "--model", "fasterrcnn_mobilenet_v3_large_fpn"],
     "--trainable-backbone-layers 7 must be from 0 to 6"),
    (["--trainable-backbone-layers", "-1", "--model", "ssd300_vgg16"], "-1 must be from 0 to 5"),
]


def test_every_backbone_stage_may_train():
    parser = train.get_args_parser()
    for model, stages in (("maskrcnn_resnet50_fpn", 5), ("fasterrcnn_mobilenet_v3_large_fpn", 6),
                          ("ssdlite320_mobilenet_v3_large", 6), ("ssd300_vgg16", 5)):
        flags.check_trainable_stages(parser.parse_args(["--model", model, "--trainable-backbone-layers", str(stages)]))


@pytest.mark.parametrize("args, message", MODEL_FLAG_MISTAKES, ids=[" ".join(a) for a, _ in MODEL_FLAG_MISTAKES])
def test_model_flags_that_cannot_work_are_refused_before_the_data_is_read(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=message):
        flags.check_args(train.get_args_parser().parse_args(["--data-path", "no-such-folder", *args]))


def test_a_resumed_run_does_not_need_the_backbone_file_and_a_first_auto_launch_does(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    parser = train.get_args_parser()
    with pytest.raises(UserError, match="--weights-backbone ResNet50_Weights.IMAGENET1K_V1: .* is missing"):
        flags.check_args(parser.parse_args([]))
    run = ["--resume", "auto", "--output-dir", str(tmp_path / "run")]
    with pytest.raises(UserError, match="--weights-backbone ResNet50_Weights.IMAGENET1K_V1: .* is missing"):
        flags.check_args(parser.parse_args(run))  # a first launch, with no checkpoint yet: it reads the file
    with pytest.raises(UserError, match="--weights gone.pth"):
        flags.check_args(parser.parse_args([*run, "--weights", "gone.pth"]))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pth").touch()
    flags.check_args(parser.parse_args(run))  # read from the checkpoint
    flags.check_args(parser.parse_args([*run, "--weights", "gone.pth"]))  # so is a fine-tuning run's
    flags.check_args(parser.parse_args(["--resume", str(tmp_path / "other.pth")]))  # said when it is read

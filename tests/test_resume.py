"""resume.py: the checkpoint a run resumes, checked to fit it, and what carries over from its run."""

import argparse
from pathlib import Path

import pytest

import resume
import train
from errors import UserError


def test_a_checkpoint_from_outside_the_folder_is_another_runs_unless_written_for_it(tmp_path):
    out = tmp_path / "out"
    assert not resume.from_another_run(str(out / "model_1.pth"), {"args": {"output_dir": "elsewhere"}}, out)
    assert not resume.from_another_run(str(tmp_path / "backup.pth"), {"args": {"output_dir": str(out)}}, out)
    assert resume.from_another_run(str(tmp_path / "s" / "model_0.pth"), {"args": {"output_dir": "s"}}, out)
    assert resume.from_another_run(str(tmp_path / "reference.pth"), {"args": {}}, out)


def test_eval_max_dets_left_out_is_the_checkpoints_runs_else_cocos(capsys):
    for given, saved, taken in [(None, {"eval_max_dets": 300}, 300), (None, {}, 100), (None, None, 100),
                                (None, {"eval_max_dets": None}, 100), (150, {"eval_max_dets": 300}, 150)]:
        args = argparse.Namespace(eval_max_dets=given, **{name: None for name in resume.SAVED_MODEL_SETTINGS})
        resume.take_saved_settings(args, saved)
        assert args.eval_max_dets == taken, (given, saved)
    assert capsys.readouterr().out == "As the checkpoint's run: --eval-max-dets 300\n", "said where it was taken"


def test_a_run_continued_in_its_folder_scores_as_its_evaluations_did(capsys):
    resume.check_same_scoring(argparse.Namespace(eval_max_dets=100), {}, "c.pth")  # a run before the flag: 100
    resume.check_same_scoring(argparse.Namespace(eval_max_dets=300), {"eval_max_dets": 300}, "c.pth")
    with pytest.raises(UserError, match=r"^--resume out/checkpoint.pth: its run scored up to 100 detections an image "
                                        r"and category \(--eval-max-dets\), and model_best.pth and --patience compare "
                                        r"with its evaluations; give --eval-max-dets 100, or score the checkpoint "
                                        r"otherwise with --test-only$"):
        resume.check_same_scoring(argparse.Namespace(eval_max_dets=300, test_only=False), {"eval_max_dets": 100},
                                 "out/checkpoint.pth")
    assert capsys.readouterr().out == ""
    resume.check_same_scoring(argparse.Namespace(eval_max_dets=100, test_only=True), {"eval_max_dets": 300}, "c.pth")
    assert capsys.readouterr().out == ("note: --resume c.pth: its run scored up to 300 detections an image and "
                                       "category (--eval-max-dets), and this evaluation up to 100: give "
                                       "--eval-max-dets 300 for that run's numbers\n")


def test_a_checkpoints_evaluation_settings_are_taken_where_this_run_leaves_them_to_the_defaults(capsys):
    args = argparse.Namespace(eval_max_dets=None, **{name: None for name in resume.SAVED_MODEL_SETTINGS})
    args.min_size = 80
    resume.take_saved_settings(args, {"min_size": 64, "box_score_thresh": 0.0001, "detections_per_image": 300,
                                      "rpn_score_thresh": None, "eval_max_dets": 300})
    assert (args.min_size, args.box_score_thresh, args.detections_per_image) == (80, 0.0001, 300)
    assert capsys.readouterr().out == ("As the checkpoint's run: --detections-per-image 300 --box-score-thresh 0.0001 "
                                       "--eval-max-dets 300\n")


def test_a_resumed_run_says_which_training_settings_it_gives_otherwise(capsys):
    saved = {"seed": 1, "data_augmentation": "hflip", "data_path": "/data", "lr": 0.02, "min_size": 64, "max_size": 96}
    args = argparse.Namespace(**{name: None for name in resume.NOTED_ON_RESUME})
    args.__dict__.update(seed=5, data_augmentation="ssd", data_path=Path("/data"), lr=0.01, min_size=80, max_size=96)
    resume.note_changed_settings(args, saved, "out/checkpoint.pth")
    assert capsys.readouterr().out == ("--resume out/checkpoint.pth: given otherwise than in its run: --seed 5 (its "
                                       "run: 1), --data-augmentation ssd (its run: hflip), --min-size 80 (its run: "
                                       "64); they apply from here on\n")
    resume.note_changed_settings(argparse.Namespace(**{**vars(args), "seed": 1, "data_augmentation": "hflip"}),
                                saved, "c.pth")
    assert capsys.readouterr().out.endswith(": --min-size 80 (its run: 64); it applies from here on\n")
    args.min_size = 64
    resume.note_changed_settings(argparse.Namespace(**{**vars(args), "seed": 1, "data_augmentation": "hflip"}),
                                saved, "c.pth")
    assert capsys.readouterr().out == "", "the same settings (a path as the text it was saved as): nothing to say"
    same_folder = {**vars(args), "seed": 1, "data_augmentation": "hflip", "data_path": "./data", "amp": False,
                   "amp_dtype": "float16", "model_ema": False, "model_ema_decay": 0.5}
    resume.note_changed_settings(argparse.Namespace(**same_folder),
                                {**saved, "data_path": str(Path("data").resolve()), "amp_dtype": "bfloat16",
                                 "model_ema_decay": 0.9}, "c.pth")
    assert capsys.readouterr().out == "", "one folder written two ways; settings of what this run leaves off"


def test_resume_auto_without_a_checkpoint_names_the_newest_epochs_file(tmp_path, capsys):
    args = argparse.Namespace(resume="auto", output_dir=str(tmp_path), test_only=False)
    (tmp_path / "previous_runs" / "20261205-101010").mkdir(parents=True)
    (tmp_path / "previous_runs" / "20261205-101010" / "checkpoint.pth").write_bytes(b"")
    for name in ("model_3.pth", "model_10.pth", "model_best.pth"):
        (tmp_path / name).write_bytes(b"")
    assert resume.resolve_resume(args) == ""
    assert (f"so this is a new run; {tmp_path / 'model_10.pth'} is an epoch's checkpoint: to continue from it, give "
            f"--resume {tmp_path / 'model_10.pth'}\n") in capsys.readouterr().out


def test_resume_auto_without_a_checkpoint_names_the_last_run_moved_aside(tmp_path, capsys):
    args = argparse.Namespace(resume="auto", output_dir=str(tmp_path), test_only=False)
    assert resume.resolve_resume(args) == "" and "so this is a new run\n" in capsys.readouterr().out
    for name in ("20261205-101010", "20261206-090909", "20261206-101010"):  # the last one never saved a checkpoint
        (tmp_path / "previous_runs" / name).mkdir(parents=True)
    for name in ("20261205-101010", "20261206-090909"):
        (tmp_path / "previous_runs" / name / "checkpoint.pth").write_bytes(b"")
    assert resume.resolve_resume(args) == ""
    last = tmp_path / "previous_runs" / "20261206-090909" / "checkpoint.pth"
    assert f"the last run moved aside from this folder is in {last.parent}: to continue it, move its files back " \
           f"into {tmp_path} and run again" in capsys.readouterr().out
    for number in range(2, 11):  # ten runs set aside in one second: the tenth is the last
        (tmp_path / "previous_runs" / f"20261206-090909-{number}").mkdir()
        (tmp_path / "previous_runs" / f"20261206-090909-{number}" / "checkpoint.pth").write_bytes(b"")
    assert resume.resolve_resume(args) == ""
    assert "moved aside from this folder is in " + str(tmp_path / "previous_runs" / "20261206-090909-10") + ":" in \
        capsys.readouterr().out
    (tmp_path / "checkpoint.pth").write_bytes(b"")
    assert resume.resolve_resume(args) == str(tmp_path / "checkpoint.pth")


def test_the_model_of_a_checkpoint_is_checked_where_its_run_recorded_one():
    args = argparse.Namespace(model="maskrcnn_resnet50_fpn", num_classes=None)
    resume.check_same_model(args, {"num_classes": 5}, "plain.pth")  # no run's arguments: nothing to compare
    resume.check_same_model(args, {"args": {"model": "maskrcnn_resnet50_fpn"}, "num_classes": 5}, "ours.pth")
    with pytest.raises(UserError, match="ours.pth holds a fasterrcnn_resnet50_fpn model"):
        resume.check_same_model(args, {"args": {"model": "fasterrcnn_resnet50_fpn"}, "num_classes": 5}, "ours.pth")


def test_a_part_way_checkpoint_resumes_only_with_the_same_batches():
    args = train.get_args_parser().parse_args(["--batch-size", "4", "--seed", "3"])
    saved = {**vars(args), "batch_size": 2}
    with pytest.raises(UserError, match=r"saved at step 5 of epoch 1 with --batch-size 2, where this run has "
                                        r"--batch-size 4; .* or resume from model_0.pth"):
        resume.check_same_batches(args, saved, "checkpoint.pth", 1, 5)
    resume.check_same_batches(args, vars(args), "checkpoint.pth", 1, 5)
    resume.check_same_batches(args, {"batch_size": 4}, "checkpoint.pth", 0, 5)  # what a checkpoint lacks is not asked
    with pytest.raises(UserError, match="processes 2, where this run has processes 1; .* or start afresh"):
        resume.check_same_batches(args, {**vars(args), "world_size": 2}, "checkpoint.pth", 0, 5)


@pytest.mark.parametrize("saved, trained", [({"epoch": 0, "step": None}, "1 epoch,"),
                                            ({"epoch": 2, "step": 5}, "2 epochs,"),
                                            ({"epoch": 1, "step": None}, "2 epochs,")])
def test_a_finished_run_says_the_epochs_it_trained(capsys, saved, trained):
    assert resume.already_finished("c.pth", saved, 1) == {}
    assert f"--resume c.pth: its run has trained {trained} and --epochs is 1" in capsys.readouterr().out


def test_a_checkpoint_of_a_run_over_other_training_images_is_said_to_be(capsys):
    checkpoint = {"epoch": 2, "step": 5, "training_images": [8, "ab"]}
    resume.note_other_training_images(checkpoint, (8, "ab"), "c.pth")
    resume.note_other_training_images({"epoch": 2, "step": 5}, (8, "ab"), "c.pth")  # saved before they were kept
    assert capsys.readouterr().out == ""
    resume.note_other_training_images(checkpoint, (8, "cd"), "c.pth")
    assert capsys.readouterr().out == ("note: --resume c.pth was saved at step 5 of epoch 2 of a run over other "
                                       "training images (as many, 8, with other ids): the rest of that epoch is drawn "
                                       "from the images read now, so some train twice in it or not at all\n")

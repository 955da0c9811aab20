"""Checkpoints are written whole or not at all, and read without running code."""

import argparse
import errno
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision

from checkpoint import (
    TrainingState,
    load_file,
    prune_epoch_files,
    save_atomic,
    save_checkpoint,
    set_aside_previous_run,
    writing,
)
from coco_utils import CategoryMap
from conftest import ROOT, TINY, run_cli, start_cli
from errors import UserError


def test_round_trip_leaves_no_temporary_files(tmp_path):
    save_atomic({"a": torch.arange(3), "epoch": 2, "args": {"lr": 0.1}}, tmp_path / "c.pth")
    assert load_file(tmp_path / "c.pth", "--resume")["epoch"] == 2
    assert os.listdir(tmp_path) == ["c.pth"]


def test_failed_save_keeps_previous_file(tmp_path):
    save_atomic({"epoch": 1}, tmp_path / "c.pth")

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        save_atomic({"epoch": 2, "bad": Unsaveable()}, tmp_path / "c.pth")
    assert load_file(tmp_path / "c.pth", "--resume")["epoch"] == 1
    assert os.listdir(tmp_path) == ["c.pth"]


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": _Payload(str(marker))}, f)
    with pytest.raises(UserError, match="refused"):
        load_file(tmp_path / "evil.pth", "--resume")
    assert not marker.exists()


def test_truncated_and_missing_files(tmp_path):
    save_atomic({"w": torch.zeros(1000)}, tmp_path / "c.pth")
    data = (tmp_path / "c.pth").read_bytes()
    (tmp_path / "t.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"not a readable checkpoint .*; give another file \(for a run's damaged "
                                        r"checkpoint\.pth: an earlier epoch's model_E\.pth beside it\)") as raised:
        load_file(tmp_path / "t.pth", "--resume")
    assert "If you are seeing this" not in str(raised.value), "torch's advice to its own developers is left out"
    with pytest.raises(UserError, match="no such file"):
        load_file(tmp_path / "none.pth", "--resume")


def test_a_damaged_copy_is_refused_not_loaded_as_other_weights(tmp_path):
    """torch.load does not read the zip's checksums: a flipped byte in a tensor would load silently."""
    save_atomic({"w": torch.zeros(100_000)}, tmp_path / "c.pth")
    data = bytearray((tmp_path / "c.pth").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "c.pth").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"--resume .*c\.pth is damaged: its record .*data/0 fails its checksum; "
                                        r"give another file"):
        load_file(tmp_path / "c.pth", "--resume")


def _kill_when(process, output_dir, moment):
    """SIGKILL the run at a moment: a number of seconds after start, or 'save' (while a checkpoint is being
    written). Returns once the process is gone."""
    deadline = time.time() + 240
    started = time.time()
    while process.poll() is None and time.time() < deadline:
        if moment == "save":
            if any(output_dir.glob(".*.pth.*.tmp")):
                break
            time.sleep(0.005)
        elif time.time() - started >= moment:
            break
        else:
            time.sleep(0.02)
    process.kill()
    process.communicate()


def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    args = ["--data-path", str(tiny_dataset), "--output-dir", str(out), *TINY, "--epochs", "3",
            "--resume", "auto"]
    moments = ["save", 7, "save", 11, "save"]
    interrupted_saves = 0
    for moment in moments:
        process = start_cli("train.py", *args)
        _kill_when(process, out, moment)
        interrupted_saves += any(out.glob(".*.pth.*.tmp"))
        if (out / "checkpoint.pth").exists():
            checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
            assert {"model", "optimizer", "epoch"} <= set(checkpoint)
    assert interrupted_saves >= 2, "some kills must land during a save"
    result = run_cli("train.py", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 2
    assert not list(out.glob(".*.pth.*.tmp")), "temporaries of killed saves are cleaned up"


def _tiny_state(seed: int, fused: bool = False) -> TrainingState:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, **({"fused": True} if fused else {}))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [2])
    args = argparse.Namespace(model="tiny", lr=0.1, device=torch.device("cpu"))
    categories = CategoryMap.from_categories([{"id": 7, "name": "cat"}], "coco")
    return TrainingState(model, optimizer, scheduler, None, args, categories, 2)


@pytest.mark.parametrize("fused", [False, True])
def test_training_state_round_trip_restores_everything_a_run_continues_with(tmp_path, fused):
    """A GPU run's checkpoint (fused optimizer kernel) continuing on the CPU (torch's default), and back."""
    state = _tiny_state(0, fused)
    state.model(torch.rand(1, 3, 8, 8)).sum().backward()
    state.optimizer.step()
    state.lr_scheduler.step()
    state.epoch, state.step = 3, 5
    save_atomic(state.state_dict(), tmp_path / "c.pth")
    expected_draw = torch.rand(3)

    restored = _tiny_state(1, not fused)
    restored.load_state_dict(load_file(tmp_path / "c.pth", "--resume"), "--resume c.pth")
    assert restored.optimizer.param_groups[0]["fused"] == (None if fused else True), "this run's kernel"
    assert all(torch.equal(a, b) for a, b in zip(state.model.state_dict().values(),
                                                 restored.model.state_dict().values()))
    momentum = [state.optimizer.state[p]["momentum_buffer"] for p in state.model.parameters()]
    assert all(torch.equal(restored.optimizer.state[p]["momentum_buffer"], m)
               for p, m in zip(restored.model.parameters(), momentum))
    assert restored.lr_scheduler.state_dict() == state.lr_scheduler.state_dict()
    assert (restored.epoch, restored.step, restored.resume_at) == (3, 5, (3, 5))
    assert torch.equal(torch.rand(3), expected_draw), "the generators continue where the saved run was"
    saved = torch.load(tmp_path / "c.pth", weights_only=True)
    assert saved["args"]["device"] == "cpu" and saved["categories"] == [{"id": 7, "name": "cat"}]


def test_an_epoch_checkpoint_resumes_at_the_next_epoch_and_weights_only_leaves_the_rest():
    state = _tiny_state(0)
    state.epoch = 4
    checkpoint = state.state_dict()
    fresh = _tiny_state(1)
    fresh.load_state_dict(checkpoint, "--resume x", weights_only=True)
    assert fresh.epoch == -1 and fresh.optimizer.state_dict()["state"] == {}
    fresh.load_state_dict(checkpoint, "--resume x")
    assert fresh.resume_at == (5, 0)


def _checkpoint_of_the_previous_release(tmp_path, tiny_dataset):
    """A checkpoint as train.py wrote them before TrainingState (stop 14's code): the same keys, written here
    by hand from torchvision's own builder, after one optimizer step so that SGD has momentum buffers."""
    categories = [{"id": c["id"], "name": c["name"]} for c in
                  json.loads((tiny_dataset / "annotations" / "instances_train2017.json").read_text())["categories"]]
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                               num_classes=len(categories) + 1)
    # That release's one parameter group: every trainable parameter, those of batch norms last.
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    norm_params = [p for m in norms for p in m.parameters(recurse=False)]
    params = [p for p in model.parameters() if all(p is not q for q in norm_params)] + norm_params
    optimizer = torch.optim.SGD([{"params": params, "weight_decay": 1e-4}], lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [16, 22], 0.1)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    scheduler.step()
    args = {"data_path": str(tiny_dataset), "dataset": "coco", "model": "maskrcnn_resnet50_fpn", "device": "cpu",
            "batch_size": 2, "epochs": 1, "lr": 0.01, "weights": None, "weights_backbone": None,
            "trainable_backbone_layers": None, "amp": False, "channels_last": None, "shape_buckets": None}
    path = tmp_path / "old.pth"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(), "scaler": None, "epoch": 0, "step": None,
                "rng": {"torch": torch.get_rng_state()}, "args": args, "categories": categories,
                "num_classes": len(categories) + 1}, path)
    return path


def test_a_checkpoint_of_the_previous_release_resumes_and_evaluates(tiny_dataset, tmp_path):
    old = _checkpoint_of_the_previous_release(tmp_path, tiny_dataset)
    common = ["--data-path", str(tiny_dataset), *TINY, "--vis-images", "0", "--no-tensorboard"]
    result = run_cli("train.py", *common, "--output-dir", str(tmp_path / "resumed"), "--resume", str(old),
                     "--epochs", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Resumed from {old} (epoch 0)" in result.stdout and "Epoch: [1]" in result.stdout
    assert "Epoch: [0]" not in result.stdout
    assert torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)["epoch"] == 1
    result = run_cli("train.py", *common, "--output-dir", str(tmp_path / "evaluated"), "--test-only",
                     "--resume", str(old))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all") == 2


def test_a_full_disk_is_one_clear_error_and_the_previous_checkpoint_stays(tmp_path, full_disk):
    save_checkpoint({"epoch": 1, "w": torch.zeros(10)}, tmp_path)
    full_disk(4096)
    with pytest.raises(UserError) as error:
        save_checkpoint({"epoch": 2, "w": torch.zeros(100_000)}, tmp_path, also_as="model_2.pth")
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "model_2.pth") in message
    assert "no space left on the device" in message and "no checkpoint written before was touched" in message
    assert load_file(tmp_path / "checkpoint.pth", "--resume")["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth"], "no temporary file, no half-written file"


def test_a_file_over_the_size_limit_names_the_limit(tmp_path):
    expected = (r"could not write .*a.pth: file larger than the file-size limit \(ulimit -f; raise it\) or the "
                r"filesystem allows; no checkpoint written before")
    with pytest.raises(UserError, match=expected), writing(tmp_path / "a.pth"):
        raise OSError(errno.EFBIG, "File too large")


def test_a_ctrl_c_during_a_save_stays_a_ctrl_c_and_the_previous_checkpoint_stays(tmp_path, full_disk):
    """A second Ctrl-C lands inside torch.save, whose zip writer turns it into a RuntimeError."""
    save_checkpoint({"epoch": 1, "w": torch.zeros(10)}, tmp_path)
    full_disk(4096, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 2, "w": torch.zeros(100_000)}, tmp_path)
    assert load_file(tmp_path / "checkpoint.pth", "--resume")["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth"]


def test_a_write_without_permission_names_the_cause(tmp_path, monkeypatch):
    import checkpoint

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", refuse)
    with pytest.raises(UserError, match=r"could not write .*checkpoint\.pth: permission denied"):
        save_checkpoint({"epoch": 2}, tmp_path)


def _checkpoint_of_torchvisions_reference(tmp_path, data_path):
    """A checkpoint as torchvision's references/detection/train.py writes one: its arguments as an
    argparse.Namespace, no categories (its labels are the files' category ids, 91 classes for --dataset coco),
    the optimizer's one group in the model's parameter order, after one step so that SGD has momentum."""
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [16, 22], 0.1)
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    scheduler.step()
    args = argparse.Namespace(data_path=str(data_path), dataset="coco", model="maskrcnn_resnet50_fpn", device="cpu",
                              batch_size=2, epochs=26, workers=0, opt="sgd", lr=0.01, momentum=0.9,
                              weight_decay=1e-4, norm_weight_decay=None, lr_scheduler="multisteplr",
                              lr_step_size=8, lr_steps=[16, 22], lr_gamma=0.1, print_freq=20, output_dir=".",
                              resume="", start_epoch=0, aspect_ratio_group_factor=3, rpn_score_thresh=None,
                              trainable_backbone_layers=None, data_augmentation="hflip", sync_bn=False,
                              test_only=False, use_deterministic_algorithms=False, world_size=1,
                              dist_url="env://", weights=None, weights_backbone=None, amp=False,
                              use_copypaste=False, backend="PIL", use_v2=False, distributed=False)
    path = tmp_path / "reference.pth"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(), "args": args, "epoch": 0}, path)
    return path


@pytest.fixture(scope="module")
def reference_checkpoint(tmp_path_factory, tiny_dataset):
    return _checkpoint_of_torchvisions_reference(tmp_path_factory.mktemp("reference"), tiny_dataset)


def test_a_reference_checkpoint_evaluates_with_the_datasets_categories(reference_checkpoint, tiny_dataset, tmp_path):
    result = run_cli("train.py", "--data-path", str(tiny_dataset), *TINY, "--output-dir", str(tmp_path),
                     "--test-only", "--resume", str(reference_checkpoint))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "checkpoint of torchvision's references/detection" in result.stdout and "(91 classes)" in result.stdout
    assert result.stdout.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all") == 2
    file_ids = {c["id"] for c in json.loads((tiny_dataset / "annotations" / "instances_val2017.json").read_text())[
        "categories"]}
    records = json.loads((tmp_path / "predictions_bbox.json").read_text())
    assert {r["category_id"] for r in records} <= file_ids


def test_a_reference_checkpoint_continues_training_and_fine_tunes(reference_checkpoint, tiny_dataset, tmp_path):
    common = ["--data-path", str(tiny_dataset), *TINY, "--vis-images", "0", "--no-tensorboard"]
    result = run_cli("train.py", *common, "--output-dir", str(tmp_path / "resumed"), "--resume",
                     str(reference_checkpoint), "--epochs", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Epoch: [1]" in result.stdout and "Epoch: [0]" not in result.stdout
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)
    assert resumed["epoch"] == 1 and resumed["num_classes"] == 91 and resumed["labels_are_category_ids"]
    assert resumed["lr_scheduler"]["last_epoch"] == 2, "the reference's schedule went on"
    result = run_cli("train.py", *common, "--output-dir", str(tmp_path / "tuned"), "--weights",
                     str(reference_checkpoint), "--epochs", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "class heads start fresh" in result.stdout


def test_only_the_namespace_is_let_through(tmp_path):
    torch.save({"model": {}, "args": argparse.Namespace(lr=0.1)}, tmp_path / "namespace.pth")
    assert load_file(tmp_path / "namespace.pth", "--resume")["args"].lr == 0.1
    torch.save({"model": {}, "args": argparse.FileType("r")}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="was refused: .*argparse.FileType"):
        load_file(tmp_path / "other.pth", "--resume")


def test_a_fresh_run_moves_another_runs_outputs_aside_whole(tmp_path):
    outputs = ["args.json", "checkpoint.pth", "curves.png", "events.out.tfevents.1.host.2.0", "metrics.jsonl",
               "model_3.pth", "model_best.pth", "predictions_bbox.json", "evaluation.json"]
    for name in outputs + ["notes.txt", "model_final.pth"]:
        (tmp_path / name).write_text(name)
    (tmp_path / "predictions" / "epoch_3").mkdir(parents=True)
    (tmp_path / "predictions" / "photo.jpg").write_text("tools/predict.py's, whose default folder this is")
    for seconds, name in enumerate(outputs):  # the folder is named by the time of the newest output
        os.utime(tmp_path / name, (1.7e9 + 3600 * seconds, 1.7e9 + 3600 * seconds))
    os.utime(tmp_path / "predictions" / "epoch_3", (1.6e9, 1.6e9))
    os.utime(tmp_path / "notes.txt", (1.8e9, 1.8e9))  # the user's own file is no output
    moved_to = set_aside_previous_run(tmp_path)
    newest = 1.7e9 + 3600 * (len(outputs) - 1)
    assert moved_to == tmp_path / "previous_runs" / time.strftime("%Y%m%d-%H%M%S", time.localtime(newest))
    assert sorted(p.name for p in moved_to.iterdir()) == sorted(outputs + ["predictions"])
    assert (moved_to / "metrics.jsonl").read_text() == "metrics.jsonl" and (moved_to / "predictions/epoch_3").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_final.pth", "notes.txt", "predictions",
                                                          "previous_runs"], "the user's own files stay"
    assert [p.name for p in (tmp_path / "predictions").iterdir()] == ["photo.jpg"]
    assert set_aside_previous_run(tmp_path) is None, "nothing left to move"


def test_a_start_that_trained_nothing_is_not_set_aside_and_runs_of_one_second_keep_their_folders(tmp_path):
    (tmp_path / "args.json").write_text("{}")
    assert set_aside_previous_run(tmp_path) is None and (tmp_path / "args.json").is_file()
    folders = []
    for run in ("a", "b"):
        for name in ("metrics.jsonl", "args.json"):
            (tmp_path / name).write_text(run)
            os.utime(tmp_path / name, (1.7e9, 1.7e9))
        folders.append(set_aside_previous_run(tmp_path))
    assert folders[1] == folders[0].with_name(folders[0].name + "-2")
    assert [(f / "metrics.jsonl").read_text() for f in folders] == ["a", "b"]


def test_outputs_that_cannot_be_moved_aside_are_one_clear_error(tmp_path, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text("{}")
    monkeypatch.setattr(Path, "replace", lambda self, target: (_ for _ in ()).throw(PermissionError(
        13, "Permission denied")))
    with pytest.raises(UserError, match=r"could not move the previous run's outputs .* \(Permission denied\); "
                                        r"move or delete them, or give another --output-dir"):
        set_aside_previous_run(tmp_path)
    assert (tmp_path / "metrics.jsonl").is_file()


def test_pruning_keeps_this_runs_newest_epochs_not_later_ones_of_an_earlier_run(tmp_path):
    """A run resumed from epoch 3 in a folder that holds epochs up to 9: after its epoch 4, --keep-last 2 keeps 3
    and 4; 5 to 9 stay until it writes those epochs again."""
    for epoch in range(10):
        (tmp_path / f"model_{epoch}.pth").write_bytes(b"")
    (tmp_path / "model_best.pth").write_bytes(b"")
    doomed = prune_epoch_files(tmp_path, 2, epoch=4)
    assert sorted(p.name for p in doomed) == ["model_0.pth", "model_1.pth", "model_2.pth"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model_best.pth"] + [f"model_{e}.pth" for e in range(3, 10)])


def test_a_copy_where_hard_links_fail_is_synced_before_it_takes_the_name(tmp_path, monkeypatch):
    import checkpoint

    def no_links(*args):
        raise OSError(errno.EPERM, "Operation not permitted")

    synced, replaced = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(checkpoint.os, "link", no_links)
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    monkeypatch.setattr(checkpoint.os, "replace", lambda a, b: replaced.append((len(synced), b)) or real_replace(a, b))
    save_checkpoint({"epoch": 3, "w": torch.arange(5)}, tmp_path, also_as="model_3.pth")
    assert [(n, Path(b).name) for n, b in replaced] == [(1, "model_3.pth"), (2, "checkpoint.pth")]
    assert load_file(tmp_path / "checkpoint.pth", "--resume")["epoch"] == 3
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "model_3.pth"]


def test_a_second_process_cannot_take_a_folder_a_run_holds(tmp_path):
    import checkpoint

    checkpoint.prepare_output_dir(tmp_path)
    checkpoint.prepare_output_dir(tmp_path)  # the same process again: its own folder
    other = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; import checkpoint; "
                            "checkpoint.prepare_output_dir(Path(sys.argv[1]))", str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True)
    assert other.returncode != 0
    assert f"--output-dir {tmp_path} is in use by another run (a train.py or tools/predict.py process" in other.stderr
    assert os.listdir(tmp_path) == [], "no lock file left in the folder"


def test_temporaries_of_interrupted_writes_are_cleared_and_nothing_else(tmp_path):
    from checkpoint import remove_stale_temporaries

    names = [".checkpoint.pth.123.tmp", ".predictions_bbox.json.x1y2.tmp", "predictions/epoch_3/.a.jpg.z9.tmp",
             ".metrics.jsonl.abc.tmp", ".curves.png.q.tmp", ".predictions.json.r.tmp", ".images.json.k3.tmp",
             ".b.jpg.s.tmp", ".args.json.m4.tmp", ".evaluation.json.e5.tmp", ".predict_args.json.p6.tmp",
             ".notes", "notes.tmp", ".editor.tmp", "predictions/epoch_3/a.jpg", "model_1.pth"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    remove_stale_temporaries(tmp_path)
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert left == [".editor.tmp", ".notes", "model_1.pth", "notes.tmp", "predictions/epoch_3/a.jpg"], (
        "a folder of the user's own keeps their files")


def test_a_file_pruning_cannot_delete_is_a_warning_and_the_rest_go(tmp_path, monkeypatch, capsys):
    for epoch in range(4):
        (tmp_path / f"model_{epoch}.pth").write_bytes(b"")
    real_unlink = Path.unlink

    def unlink(path, missing_ok=False):
        if path.name == "model_0.pth":
            raise PermissionError(errno.EACCES, "Permission denied")
        real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    removed = prune_epoch_files(tmp_path, keep_last=1, epoch=3)
    assert [p.name for p in removed] == ["model_1.pth", "model_2.pth"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_0.pth", "model_3.pth"]
    assert f"warning: --keep-last could not delete {tmp_path / 'model_0.pth'} (permission denied)" in (
        capsys.readouterr().err)


def test_a_folder_gone_read_only_while_sharing_a_file_is_still_one_clear_error(tmp_path, monkeypatch):
    import checkpoint

    (tmp_path / "model_1.pth").write_bytes(b"x")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(checkpoint.os, "replace", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(UserError, match=r"could not write .*checkpoint\.pth: read-only filesystem"):
        checkpoint.share_file(tmp_path / "model_1.pth", tmp_path / "checkpoint.pth")


def test_files_saved_without_checksums_load_and_a_damaged_compressed_one_is_refused(tmp_path):
    import zipfile

    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"w": torch.arange(10.0)}, tmp_path / "no_sums.pth")
    finally:
        torch.serialization.set_crc32_options(True)
    assert load_file(tmp_path / "no_sums.pth", "--weights")["w"].equal(torch.arange(10.0))
    save_atomic({"w": torch.zeros(100_000)}, tmp_path / "c.pth")
    with zipfile.ZipFile(tmp_path / "c.pth") as stored, zipfile.ZipFile(tmp_path / "z.pth", "w",
                                                                          zipfile.ZIP_DEFLATED) as compressed:
        for record in stored.infolist():
            compressed.writestr(record.filename, stored.read(record))
    assert load_file(tmp_path / "z.pth", "--weights")["w"].equal(torch.zeros(100_000)), "torch reads it"
    with zipfile.ZipFile(tmp_path / "z.pth") as compressed:
        largest = max(compressed.infolist(), key=lambda r: r.compress_size)
    data = bytearray((tmp_path / "z.pth").read_bytes())
    middle = largest.header_offset + 30 + len(largest.filename) + largest.compress_size // 2
    data[middle:middle + 4] = bytes(255 - b for b in data[middle:middle + 4])
    (tmp_path / "z.pth").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"z\.pth is damaged: its record .* fails its checksum"):
        load_file(tmp_path / "z.pth", "--weights")


def test_a_folder_that_can_be_written_but_not_read_is_let_through(tmp_path, monkeypatch):
    import checkpoint

    real_open = os.open

    def no_reading(path, flags, *args):
        if Path(path) == tmp_path.resolve() and flags == os.O_RDONLY:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(checkpoint.os, "open", no_reading)
    checkpoint.prepare_output_dir(tmp_path)


def test_a_forked_worker_does_not_keep_the_folder_from_the_runs_restart(tmp_path):
    """A data loader's worker outliving its killed run holds no copy of the lock."""
    forking = """
import os, sys, time
from pathlib import Path
import checkpoint
checkpoint.prepare_output_dir(Path(sys.argv[1]))
child = os.fork()
if child == 0:  # lingers without the parent's output pipes, which the test waits on
    os.close(1), os.close(2)
    time.sleep(30)
else:
    print(child)
"""
    child = int(subprocess.run([sys.executable, "-c", forking, str(tmp_path)], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout)
    try:
        restart = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; import checkpoint; "
                                  "checkpoint.prepare_output_dir(Path(sys.argv[1]))", str(tmp_path)],
                                 cwd=ROOT, capture_output=True, text=True)
        assert restart.returncode == 0, restart.stderr
    finally:
        os.kill(child, 9)


def test_a_folder_made_for_a_start_that_wrote_nothing_is_removed_at_exit(tmp_path):
    (tmp_path / "there").mkdir()
    script = ("import sys; from pathlib import Path; import checkpoint; "
              "[checkpoint.prepare_output_dir(Path(p)) for p in sys.argv[1:]]; "
              "(Path(sys.argv[2]) / 'metrics.jsonl').write_text('{}')")
    done = subprocess.run([sys.executable, "-c", script, *(str(tmp_path / name) for name in ("new", "written",
                                                                                           "there"))],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["there", "written"], "an empty folder of its own goes"

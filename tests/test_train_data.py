"""Data through the real CLI: faulty images, LSJ with copy-paste, transforms v2 on tv_tensors."""

import json
import shutil

import torch

from conftest import SMALL, TINY, read_metrics, run_cli


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
    epoch = next(r for r in read_metrics(tmp_path / "out") if r["type"] == "epoch")
    assert (epoch["samples_skipped"], epoch["annotations_repaired"]) == (2, 0)

    result = run_cli("train.py", *args)
    assert result.returncode == 2 and "train data: 1 of 8 images cannot be used" in result.stderr, "start check"
    result = run_cli("train.py", *args, "--skip-data-check")
    assert result.returncode == 2
    assert "could not be read this epoch, more than --max-bad-samples 0.01" in result.stderr


def test_a_run_stopped_by_its_data_mid_epoch_saves_the_steps_done_and_resumes(tiny_dataset, tmp_path):
    """Past --max-bad-samples at the epoch's last batch: the three steps before it are saved and resumed."""
    root = tmp_path / "faulty"
    shutil.copytree(tiny_dataset, root)
    images = json.loads((root / "annotations" / "instances_train2017.json").read_text())["images"]
    by_index = [image["file_name"] for image in sorted(images, key=lambda image: image["id"])]
    order = list(torch.utils.data.DistributedSampler(by_index, num_replicas=1, rank=0, seed=0))  # as epoch 0's
    image = root / "train2017" / by_index[order[-1]]
    image.write_bytes(image.read_bytes()[:300])
    args = ["--data-path", str(root), "--output-dir", str(tmp_path / "out"), *TINY, "--epochs", "1",
            "--aspect-ratio-group-factor", "-1", "--vis-images", "0", "--no-tensorboard"]
    result = run_cli("train.py", *args, "--max-bad-samples", "0")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith("error: 1 of 8 samples could not be read this epoch"), result.stderr
    assert (f"; the steps done are saved (epoch 0 step 3, {tmp_path / 'out' / 'checkpoint.pth'}): once the data is "
            f"fixed, the same command with --resume auto continues from there") in result.stderr
    saved = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (0, 3)
    saved_at_step_3 = (tmp_path / "out" / "checkpoint.pth").read_bytes()
    result = run_cli("train.py", *args, "--max-bad-samples", "0.5", "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(epoch 0 step 3)" in result.stdout and "Epoch: [0]  [4/4]" in result.stdout
    assert "other training images" not in result.stdout
    # Fixed instead by leaving the image out of the file: the rest of the epoch is drawn from the 7 images left.
    data = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    broken = next(entry["id"] for entry in data["images"] if entry["file_name"] == by_index[order[-1]])
    data["images"] = [entry for entry in data["images"] if entry["id"] != broken]
    data["annotations"] = [ann for ann in data["annotations"] if ann["image_id"] != broken]
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(data))
    (tmp_path / "out" / "checkpoint.pth").write_bytes(saved_at_step_3)
    result = run_cli("train.py", *args, "--max-bad-samples", "0", "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"note: --resume {tmp_path / 'out' / 'checkpoint.pth'} was saved at step 3 of epoch 0 of a run over other "
            f"training images (7 against 8): the rest of that epoch is drawn from the images read now") in result.stdout


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


def test_a_layout_of_ones_own_trains_with_its_paths_given(tiny_dataset, tmp_path):
    """Annotation files and image folders named as the user has them, and file_names with a subfolder."""
    mine = tmp_path / "mine"
    for split in ("train", "val"):
        data = json.loads((tiny_dataset / "annotations" / f"instances_{split}2017.json").read_text())
        (mine / f"{split}_pictures" / "imgs").mkdir(parents=True)
        for image in data["images"]:
            shutil.copy(tiny_dataset / f"{split}2017" / image["file_name"], mine / f"{split}_pictures" / "imgs")
            image["file_name"] = f"imgs/{image['file_name']}"
        (mine / f"{split}.json").write_text(json.dumps(data))
    paths = [f"--{split}-{part}" if i == 0 else str(mine / name)
             for split in ("train", "val") for part, name in (("images", f"{split}_pictures"),
                                                              ("annotations", f"{split}.json"))
             for i in (0, 1)]
    result = run_cli("train.py", "--data-path", str(tmp_path / "nowhere"), *paths, "--output-dir",
                     str(tmp_path / "out"), *TINY, "--epochs", "1", "--vis-images", "0", "--no-tensorboard")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "IoU metric: segm" in result.stdout

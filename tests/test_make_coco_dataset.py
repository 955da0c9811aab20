"""The generator writes what real COCO has, in a form pycocotools reads."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from conftest import ROOT, cli_env
from tools.make_coco_dataset import CATEGORIES, DatasetSpec, generate_dataset, main


def test_layout_and_oddities(dataset):
    for split in ("train", "val"):
        assert (dataset / f"{split}2017").is_dir()
        coco = COCO(str(dataset / "annotations" / f"instances_{split}2017.json"))
        for info in coco.imgs.values():
            with Image.open(dataset / f"{split}2017" / info["file_name"]) as im:
                assert im.size == (info["width"], info["height"])
    data = json.loads((dataset / "annotations" / "instances_train2017.json").read_text())
    ids = [c["id"] for c in data["categories"]]
    assert ids != list(range(1, len(ids) + 1)), "category ids must have gaps like COCO's"
    anns = data["annotations"]
    crowd = [a for a in anns if a["iscrowd"]]
    assert crowd and all(isinstance(a["segmentation"]["counts"], list) for a in crowd), "uncompressed RLE"
    assert any(len(a["segmentation"]) == 2 for a in anns if not a["iscrowd"]), "multi-part polygons"
    assert any(a["bbox"][2] == 0 or a["bbox"][3] == 0 for a in anns), "degenerate boxes"
    annotated = {a["image_id"] for a in anns}
    assert any(img["id"] not in annotated for img in data["images"]), "images without annotations"
    modes = {Image.open(dataset / "train2017" / img["file_name"]).mode for img in data["images"]}
    assert modes == {"RGB", "L"}, "grayscale JPEGs among colour ones"


def test_crowd_rle_matches_its_area(dataset):
    coco = COCO(str(dataset / "annotations" / "instances_train2017.json"))
    for ann in coco.anns.values():
        if ann["iscrowd"]:
            assert coco.annToMask(ann).sum() == ann["area"]


def test_same_seed_same_dataset(tmp_path):
    spec = DatasetSpec(train_images=3, val_images=1, seed=5)
    a = generate_dataset(tmp_path / "a", spec)
    b = generate_dataset(tmp_path / "b", spec)
    for name in ("instances_train2017.json", "instances_val2017.json"):
        assert (a / "annotations" / name).read_text() == (b / "annotations" / name).read_text()


def test_cli_sizes(tmp_path):
    main([str(tmp_path), "--train-images", "2", "--val-images", "1", "--size", "64", "--instances", "2"])
    data = json.loads((tmp_path / "annotations" / "instances_train2017.json").read_text())
    assert len(data["images"]) == 2
    assert all(img["width"] == img["height"] == 64 for img in data["images"])
    assert {c["id"] for c in data["categories"]} == {c["id"] for c in CATEGORIES}
    pixels = np.asarray(Image.open(tmp_path / "train2017" / data["images"][0]["file_name"]))
    assert pixels.std() > 5, "textured background, not a flat colour"


def test_coco_named_categories_read_as_coco(tmp_path):
    from coco_utils import CategoryMap

    root = generate_dataset(tmp_path, DatasetSpec(train_images=2, val_images=1, seed=3, coco_categories=True))
    data = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    cmap = CategoryMap.from_categories(data["categories"], "coco")
    assert cmap.keep_ids and cmap.num_classes == 91
    assert {a["category_id"] for a in data["annotations"]} <= {72, 37, 38, 84}


@pytest.mark.parametrize("keypoints", [False, True])
def test_a_write_cut_short_leaves_no_val_annotations(keypoints, tmp_path):
    """A file-size limit (as a full disk would) stops the generator inside the val annotations, the largest
    file: instances_val2017.json, which tools/demo.py takes as the sign of a finished dataset, must then be
    absent rather than cut short, with no temporary file left and one line saying what to do."""
    resource = pytest.importorskip("resource")
    limit = 8192  # above each 64 px JPEG and the one-image train JSON, below the val JSON of 20 images

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = [str(tmp_path), "--train-images", "1", "--val-images", "20", "--size", "64"]
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "make_coco_dataset.py"), *args,
                             *(["--keypoints"] if keypoints else [])], capture_output=True, text=True, timeout=300,
                            env=cli_env(), cwd=ROOT, preexec_fn=limit_file_size)
    assert result.returncode != 0
    annotations = tmp_path / "annotations"
    assert not (annotations / "instances_val2017.json").exists()
    assert not list(annotations.glob("*val2017.json")), "a val file cut short"
    assert json.loads((annotations / "instances_train2017.json").read_text())["images"]  # complete
    assert sorted(p.name for p in annotations.iterdir() if p.name.startswith(".")) == []
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not write ") and "val2017.json" in lines[0], lines
    assert "file larger than the file-size limit (ulimit -f" in lines[0] and "choose another folder" in lines[0]


def test_a_folder_holding_what_the_generator_did_not_write_is_refused(tmp_path, capsys):
    """A real COCO linked at datasets/coco has the very file names the generator writes."""
    real = tmp_path / "coco"
    (real / "annotations").mkdir(parents=True)
    (real / "annotations" / "instances_train2017.json").write_text('{"info": {"description": "COCO 2017"}}')
    spec = DatasetSpec(train_images=2, val_images=1, min_size=48, max_size=48)
    linked = tmp_path / "datasets" / "coco"
    linked.parent.mkdir()
    linked.symlink_to(real)
    assert main([str(linked), "--train-images", "2", "--val-images", "1", "--size", "48"]) == 2
    assert "holds files this tool did not write (a dataset of yours?)" in capsys.readouterr().err
    assert sorted(p.name for p in real.rglob("*")) == ["annotations", "instances_train2017.json"]
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / ".gitkeep").touch()
    assert generate_dataset(kept, spec) == kept, "hidden files make no dataset"
    ours = generate_dataset(tmp_path / "ours", spec)
    assert generate_dataset(ours, spec) == ours, "its own folder is written again"
    (ours / ".written_by_make_coco_dataset").unlink()  # written before the marker: told by the description
    assert generate_dataset(ours, spec) == ours


@pytest.mark.parametrize("args, message", [
    (["--train-images", "-1"], "--train-images -1 must be at least 1"),
    (["--val-images", "0"], "--val-images 0 must be at least 1"),
    (["--instances", "-1"], "--instances -1 must be at least 1"),
    (["--seed", "-1"], "--seed -1 must be at least 0"),
    (["--size", "0"], "--size 0 must be at least 32"),
    (["--size", "80", "--min-size", "64"], "--size fixes every side; give it, or --min-size and --max-size"),
])
def test_counts_and_sizes_that_make_no_dataset_are_one_line(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        main([str(tmp_path / "d"), *args])
    assert refused.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_a_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main([str(tmp_path / "file" / "d"), "--train-images", "1", "--val-images", "1"]) == 2
    assert "cannot make" in capsys.readouterr().err


def test_a_smaller_dataset_written_again_leaves_no_earlier_images(tmp_path):
    generate_dataset(tmp_path, DatasetSpec(train_images=4, val_images=2, min_size=48, max_size=48))
    generate_dataset(tmp_path, DatasetSpec(train_images=2, val_images=1, min_size=48, max_size=48))
    for split in ("train", "val"):
        listed = json.loads((tmp_path / "annotations" / f"instances_{split}2017.json").read_text())["images"]
        assert sorted(p.name for p in (tmp_path / f"{split}2017").iterdir()) == sorted(i["file_name"] for i in listed)

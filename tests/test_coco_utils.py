"""Loading COCO-format folders: targets, category mapping and clear errors on bad files."""

import json
import shutil

import pytest
import torch

from coco_utils import CategoryMap, build_dataset, coco_category_names, load_coco
from presets import DetectionPresetEval
from utils import UserError


def test_training_masks_equal_ann_to_mask(dataset):
    ds = build_dataset(dataset, "coco", "train", DetectionPresetEval())
    checked = crowd_seen = 0
    for index in range(len(ds)):
        image, target = ds[index]
        image_id = target["image_id"]
        anns = ds.coco.imgToAnns[image_id]
        crowd_seen += sum(a["iscrowd"] for a in anns)
        expected = [a for a in anns if not a["iscrowd"] and a["bbox"][2] > 0 and a["bbox"][3] > 0]
        assert len(target["masks"]) == len(expected)
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        assert image.shape[1:] == target["masks"].shape[1:]
        for mask, label, ann in zip(target["masks"], target["labels"], expected):
            assert torch.equal(mask, torch.from_numpy(ds.coco.annToMask(ann)))
            assert ds.category_map.category_id(int(label)) == ann["category_id"]
            checked += 1
        boxes = target["boxes"]
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert checked > 20 and crowd_seen > 0


def test_train_split_skips_images_without_usable_annotations(dataset):
    ds = build_dataset(dataset, "coco", "train", None)
    assert len(ds) < len(ds.coco.imgs)
    val = build_dataset(dataset, "coco", "val", None)
    assert len(val) == len(val.coco.imgs)


def test_category_map_contiguous_for_other_categories():
    cmap = CategoryMap.from_categories([{"id": 25, "name": "b"}, {"id": 3, "name": "a"}], "coco")
    assert cmap.num_classes == 3
    assert [cmap.label(3), cmap.label(25)] == [1, 2]
    assert [cmap.category_id(1), cmap.category_id(2)] == [3, 25]
    assert cmap.name(2) == "b"


def test_category_map_keeps_coco_ids():
    cats = [{"id": i, "name": n} for i, n in coco_category_names().items()]
    cmap = CategoryMap.from_categories(cats, "coco")
    assert len(cats) == 80 and cmap.num_classes == 91
    assert cmap.label(90) == 90 and cmap.category_id(1) == 1 and cmap.name(1) == "person"


def _broken_copy(dataset, tmp_path, edit):
    root = tmp_path / "broken"
    shutil.copytree(dataset / "annotations", root / "annotations")
    (root / "train2017").symlink_to(dataset / "train2017")
    path = root / "annotations" / "instances_train2017.json"
    edit(path)
    return root


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.write_text("{not json"), "not readable JSON"),
    (lambda p: p.write_text(json.dumps({"images": [], "annotations": []})), "no 'categories' list"),
    (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "annotations": [
        {"id": 1, "image_id": 999999999, "category_id": 3, "bbox": [0, 0, 1, 1], "iscrowd": 0}]})),
     "image id 999999999"),
    (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "annotations": [
        {"id": 1, "image_id": json.loads(p.read_text())["images"][0]["id"], "category_id": 4242,
         "bbox": [0, 0, 1, 1], "iscrowd": 0}]})), "category id 4242"),
    (lambda p: p.unlink(), "annotation file"),
])
def test_bad_annotation_files_give_clear_errors(dataset, tmp_path, edit, message):
    root = _broken_copy(dataset, tmp_path, edit)
    with pytest.raises(UserError, match=message):
        build_dataset(root, "coco", "train", None)


def test_missing_data_path(tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        build_dataset(tmp_path / "nowhere", "coco", "train", None)


def test_load_coco_indexes_quietly(dataset, capsys):
    coco = load_coco(dataset / "annotations" / "instances_val2017.json")
    assert coco.imgs and capsys.readouterr().out == ""

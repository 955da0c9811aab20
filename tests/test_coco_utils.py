"""Loading COCO-format folders: targets, category mapping and clear errors on bad files."""

import json
import shutil

import pytest
import torch

from coco_utils import CategoryMap, FaultLog, build_dataset, coco_category_names, load_coco
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


def test_masks_only_for_models_that_learn_them(dataset):
    with_masks = build_dataset(dataset, "coco", "train", None)
    without = build_dataset(dataset, "coco", "train", None, masks=False)
    assert "masks" in with_masks[0][1] and "masks" not in without[0][1]
    assert torch.equal(with_masks[0][1]["boxes"], without[0][1]["boxes"])


def test_keypoint_targets_follow_their_instances(keypoint_dataset):
    ds = build_dataset(keypoint_dataset, "coco_kp", "train", None)
    assert ds.category_map.num_classes == 2
    for index in range(len(ds)):
        target = ds[index][1]
        anns = [a for a in ds.coco.imgToAnns[target["image_id"]] if not a["iscrowd"]]
        assert target["keypoints"].shape == (len(anns), 17, 3)
        expected = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32).reshape(-1, 17, 3)
        assert torch.equal(target["keypoints"], expected)
        assert (target["keypoints"][..., 2] > 0).sum() >= 10, "the recipe's minimum of labelled keypoints"


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


def _copy_dataset(dataset, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(dataset, root)
    return root


def test_unreadable_images_are_replaced_and_reported(dataset, tmp_path):
    root = _copy_dataset(dataset, tmp_path)
    ds = build_dataset(root, "coco", "train", None)
    first, second = (ds.image_path(ds.ids[i]) for i in (0, 1))
    first.write_bytes(first.read_bytes()[:200])
    second.unlink()
    image, target = ds[0]
    assert target["image_id"] == ds.ids[2], "the next readable sample stands in"
    assert len(target["faults"]) == 2
    assert "truncated" in target["faults"][0].lower() and "missing" in target["faults"][1]
    assert all(f.endswith("sample skipped") for f in target["faults"])


def test_size_differing_from_json_is_skipped(dataset, tmp_path):
    root = _copy_dataset(dataset, tmp_path)
    ds = build_dataset(root, "coco", "val", None)
    ds.coco.imgs[ds.ids[0]]["width"] += 3
    _, target = ds[0]
    assert target["image_id"] == ds.ids[1] and "but the JSON says" in target["faults"][0]


def test_bad_polygons_and_boxes_are_repaired(dataset):
    ds = build_dataset(dataset, "coco", "train", None)
    image_id = ds.ids[0]
    anns = [a for a in ds.coco.imgToAnns[image_id] if not a["iscrowd"] and a["bbox"][3] > 1]
    assert len(anns) >= 2
    anns[0]["segmentation"] = anns[0]["segmentation"] + [[1.0, 1.0, 2.0, 2.0]]
    anns[1]["bbox"] = [float("nan")] * 4
    try:
        _, target = ds[0]
    finally:
        anns[0]["segmentation"].pop()
    faults = target["faults"]
    assert any("fewer than 3 points" in f and str(anns[0]["id"]) in f for f in faults)
    assert any("not finite" in f and str(anns[1]["id"]) in f for f in faults)
    assert not torch.isnan(target["boxes"]).any()
    assert len(target["boxes"]) == len(target["masks"]) == len(target["labels"])


def test_fault_log_prints_once_and_enforces_the_share(capsys):
    log = FaultLog(max_share=0.1)
    log.start_epoch()
    log.add(["a.jpg: image missing; sample skipped"], samples_in_epoch=20)
    log.add(["a.jpg: image missing; sample skipped", "b.jpg annotation 3: polygon ... removed"], 20)
    assert capsys.readouterr().out.count("a.jpg") == 1
    assert (log.skipped, log.repaired) == (1, 1), "a sample met twice in an epoch counts once"
    log.add(["c.jpg: image missing; sample skipped"], 20)
    with pytest.raises(UserError, match="3 of 20 samples could not be read"):
        log.add(["d.jpg: image missing; sample skipped"], 20)
    log.start_epoch()
    assert (log.skipped, log.repaired) == (0, 0)


def test_augmentation_depends_on_seed_epoch_and_index_only(dataset):
    from presets import DetectionPresetTrain

    ds = build_dataset(dataset, "coco", "train", DetectionPresetTrain("hflip"), seed=3)
    flips = [torch.equal(ds[i][0], ds.load_image(ds.ids[i])) for i in range(8)]
    torch.manual_seed(123)  # the global generator does not decide
    assert flips == [torch.equal(ds[i][0], ds.load_image(ds.ids[i])) for i in range(8)]
    assert 0 < sum(flips) < 8
    ds.epoch = 1
    assert flips != [torch.equal(ds[i][0], ds.load_image(ds.ids[i])) for i in range(8)]

"""Loading COCO-format folders: targets, category mapping and clear errors on bad files."""

import json
import re
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

import annotations
from annotations import annotation_findings
from coco_utils import (
    CategoryMap,
    CocoDetection,
    SampleError,
    build_dataset,
    coco_category_names,
    coco_of_samples,
    convert_to_coco_api,
    get_coco,
    get_coco_api_from_dataset,
    instance_masks,
    labels_of,
    lacking_categories,
    load_coco,
    orientation_undecided,
    read_rgb,
    scoring_ground_truth,
    split_paths,
)
from conftest import ROOT, load_file_module, reference_checkout
from errors import UserError
from presets import DetectionPresetEval
from tools.make_coco_dataset import DatasetSpec, generate_dataset


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


def test_keypoint_validation_images_without_persons_are_evaluated(tmp_path):
    """Half of COCO's person_keypoints_val2017.json images hold no person: their targets and scoring must work."""
    from coco_eval import CocoEvaluator
    from engine import evaluate
    from models import build_model, model_options

    spec = DatasetSpec(train_images=2, val_images=4, min_size=64, max_size=64, instances=2, seed=3, empty_share=0.5,
                       degenerate_share=0.0, keypoints=True)
    root = generate_dataset(tmp_path, spec)
    ds = build_dataset(root, "coco_kp", "val", DetectionPresetEval())
    empty = [i for i in range(len(ds)) if not ds.coco.imgToAnns[ds.ids[i]]]
    assert empty and ds[empty[0]][1]["keypoints"].shape == (0, 17, 3)
    torch.manual_seed(0)  # 20 detections an image, as many as keypoint scoring counts: the head's cost grows with them
    model = build_model("keypointrcnn_resnet50_fpn", 2, None, None, None,
                        **model_options("keypointrcnn_resnet50_fpn", min_size=64, max_size=64, detections_per_image=20))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=lambda batch: tuple(zip(*batch)))
    evaluator = CocoEvaluator(ds.coco, ("bbox", "keypoints"), ds.category_map)
    metrics = evaluate(model, loader, torch.device("cpu"), evaluator)
    assert list(metrics) == ["bbox", "keypoints"]


def test_category_map_contiguous_for_other_categories():
    cmap = CategoryMap.from_categories([{"id": 25, "name": "b"}, {"id": 3, "name": "a"}], "coco")
    assert cmap.num_classes == cmap.fewest_classes == 3
    assert [cmap.label(3), cmap.label(25)] == [1, 2]
    assert [cmap.category_id(1), cmap.category_id(2)] == [3, 25]
    assert cmap.name(2) == "b"


def test_category_map_keeps_coco_ids():
    cats = [{"id": i, "name": n} for i, n in coco_category_names().items()]
    cmap = CategoryMap.from_categories(cats, "coco")
    assert len(cats) == 80 and cmap.num_classes == 91
    assert cmap.label(90) == 90 and cmap.category_id(1) == 1 and cmap.name(1) == "person"
    persons = CategoryMap.from_categories([{"id": 1, "name": "person"}], "coco")
    assert (persons.num_classes, persons.fewest_classes) == (91, 2), "--num-classes 2 is enough for label 1"


def test_a_label_naming_another_category_where_a_model_was_trained_is_the_first_said():
    trained = CategoryMap.from_categories([{"id": 0, "name": "cat"}, {"id": 5, "name": "dog"}], "coco")
    assert trained.first_other_label(trained) is None
    swapped = CategoryMap.from_categories([{"id": 0, "name": "dog"}, {"id": 5, "name": "cat"}], "coco")
    assert swapped.first_other_label(trained) == "its label 1 is 'cat', here 'dog' (id 0)"
    assert CategoryMap.from_categories(trained.as_list()[:1], "coco").first_other_label(trained) is None
    more = CategoryMap.from_categories([*trained.as_list(), {"id": 9, "name": "bird"}], "coco")
    assert more.first_other_label(trained) is None, "a label it never predicts (its class count is another's)"
    coco = CategoryMap.from_categories([{"id": i, "name": n} for i, n in coco_category_names().items()], "coco")
    cars = CategoryMap.from_categories([{"id": 3, "name": "car"}], "coco")
    assert cars.first_other_label(coco) is None, "a subset of COCO's categories keeps COCO's labels"
    assert coco.first_other_label(cars) is None, "a model of COCO's cars on all of COCO: its car is COCO's"
    autos = CategoryMap.from_categories([{"id": 3, "name": "automobile"}], "coco", keep_ids=True)
    assert coco.first_other_label(autos) == "its label 3 is 'automobile', here 'car' (id 3)"


def test_categories_a_file_lacks_say_where_the_other_file_writes_the_same_id_as_another_kind():
    data = {"categories": [{"id": 0, "name": "cat"}, {"id": 7, "name": "dog"}],
            "annotations": [{"category_id": 0}, {"category_id": 0}, {"category_id": 7}]}
    assert lacking_categories(data, {"0", "5"}) == ("cat (id 0, 2 instances; there id '0', a string), "
                                                   "dog (id 7, 1 instances)")
    data["categories"] = [{"id": "0", "name": "cat"}]
    assert lacking_categories(data, {0}) is None, "no instance of it"
    data["annotations"] = [{"category_id": "0"}]
    assert lacking_categories(data, {0}) == "cat (id '0', 1 instances; there id 0, a number)"


def _broken_copy(dataset, tmp_path, edit):
    root = tmp_path / "broken"
    shutil.copytree(dataset / "annotations", root / "annotations")
    (root / "train2017").symlink_to(dataset / "train2017")
    path = root / "annotations" / "instances_train2017.json"
    edit(path)
    return root


@pytest.mark.parametrize("outline", [
    lambda ann: [],
    lambda ann: [[x, y] for x, y in zip(ann["bbox"][:1] * 3, ann["bbox"][1:2] * 3)],  # an exporter's [[x, y], ...]
    lambda ann: [[0, 0, 9, 0, 1e9, 9]],  # far outside: pycocotools' drawing would run out of memory
], ids=["none", "point pairs", "far outside"])
def test_a_model_that_learns_masks_refuses_a_training_file_without_outlines(dataset, tmp_path, outline):
    """Every instance would be dropped for want of a mask: the run would learn nothing and report success."""
    def edit(path):
        data = json.loads(path.read_text())
        for ann in data["annotations"]:
            if not ann["iscrowd"]:
                ann["segmentation"] = outline(ann)
        path.write_text(json.dumps(data))

    root = _broken_copy(dataset, tmp_path, edit)
    with pytest.raises(UserError, match="no instance has an outline to learn a mask from .* train a box model"):
        build_dataset(root, "coco", "train", None)
    assert len(build_dataset(root, "coco", "train", None, masks=False)) > 0


def _rewritten(change):
    """An edit of an annotation file by a change to its JSON content."""
    def edit(path):
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    return edit


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
    (_rewritten(lambda d: d["annotations"].append(5)), r"'annotations' entry \d+ is 5, not a JSON object"),
    (_rewritten(lambda d: d["images"][0].pop("id")), "'images' entry 0 has no 'id'"),
    (_rewritten(lambda d: d["annotations"][0].pop("id")), "'annotations' entry 0 has no 'id'"),
    (_rewritten(lambda d: d["categories"][0].pop("id")), "'categories' entry 0 has no 'id'"),
    (_rewritten(lambda d: d["images"][0].pop("width")), r"has width None and height \d+; each image needs"),
    (_rewritten(lambda d: d["categories"][0].pop("name")), "has no 'name'; each category needs one"),
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


def test_a_dataset_of_which_no_image_can_be_used_says_why(dataset, tmp_path):
    """Every JSON size swapped (images resized after export): the first image's own reason, not --data-path."""
    def swapped(data):
        for image in data["images"]:
            image["width"], image["height"] = image["height"], image["width"]

    ds = build_dataset(_edited_copy(dataset, tmp_path, "val", swapped), "coco", "val", None)
    square = sum(info["width"] == info["height"] for info in ds.coco.imgs.values())
    assert square == 0, "the test needs every image to change"
    with pytest.raises(UserError, match=r"no image of .* can be used \(the first: .* but the JSON says"):
        ds[0]


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
    assert any("not 4 finite numbers" in f and str(anns[1]["id"]) in f for f in faults)
    assert not torch.isnan(target["boxes"]).any()
    assert len(target["boxes"]) == len(target["masks"]) == len(target["labels"])


def test_augmentation_depends_on_seed_epoch_and_index_only(dataset):
    from presets import DetectionPresetTrain

    ds = build_dataset(dataset, "coco", "train", DetectionPresetTrain("hflip"), seed=3)
    flips = [torch.equal(ds[i][0], ds.load_image(ds.ids[i])) for i in range(8)]
    torch.manual_seed(123)  # the global generator does not decide
    assert flips == [torch.equal(ds[i][0], ds.load_image(ds.ids[i])) for i in range(8)]
    assert 0 < sum(flips) < 8
    ds.epoch = 1
    assert flips != [torch.equal(ds[i][0], ds.load_image(ds.ids[i])) for i in range(8)]


def _edited_copy(dataset, tmp_path, split, edit):
    """A copy of the dataset's annotation file, edited, beside the original images (linked, as a dataset root
    made with ln -s is)."""
    root = tmp_path / "edited"
    shutil.copytree(dataset / "annotations", root / "annotations")
    for folder in ("train2017", "val2017"):
        (root / folder).symlink_to(dataset / folder)
    path = root / "annotations" / f"instances_{split}2017.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return root


def _recipe_keeps(anns):
    """torchvision's recipe trains on an image when it has annotations (crowd regions count) and not all of
    their boxes are without extent (a side of 1 pixel or less)."""
    return bool(anns) and not all(a["bbox"][2] <= 1 or a["bbox"][3] <= 1 for a in anns)


def _recipe_filter_of_the_reference(coco):
    """The image ids torchvision's reference keeps, by its own code (skipped where its references/detection
    folder is not checked out, as on CI)."""
    import types

    folder = reference_checkout("coco_utils.py")
    if folder is None:
        pytest.skip("torchvision's references/detection is not checked out ($TORCHVISION_REFERENCE)")
    module = load_file_module(folder / "coco_utils.py", "reference_coco_utils")
    fake = types.SimpleNamespace(ids=sorted(coco.imgs), coco=coco)
    return [fake.ids[i] for i in module._coco_remove_images_without_annotations(fake).indices]


def _recipe_cases(dataset, tmp_path):
    """The training split with an image of crowd regions alone, one of degenerate boxes alone, one of both and
    one without annotations; the dataset, and those images' ids."""
    chosen = {}

    def edit(data):
        by_image = {}
        for ann in data["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        crowded = [i for i, anns in by_image.items() if any(a["iscrowd"] for a in anns)]
        plain = [i for i in by_image if i not in crowded]
        chosen.update(crowd_only=crowded[0], degenerate_only=plain[0], degenerate_and_crowd=crowded[1],
                      empty=plain[1])
        for ann in data["annotations"]:
            if ann["image_id"] in (chosen["degenerate_only"], chosen["degenerate_and_crowd"]) and not ann["iscrowd"]:
                ann["bbox"][3] = 0.5
        data["annotations"] = [a for a in data["annotations"] if not (
            (a["image_id"] == chosen["crowd_only"] and not a["iscrowd"]) or a["image_id"] == chosen["empty"])]

    return build_dataset(_edited_copy(dataset, tmp_path, "train", edit), "coco", "train", None), chosen


def test_training_images_are_those_the_recipe_keeps(dataset, tmp_path):
    ds, chosen = _recipe_cases(dataset, tmp_path)
    expected = [i for i in sorted(ds.coco.imgs) if _recipe_keeps(ds.coco.imgToAnns[i])]
    assert ds.ids == expected
    assert chosen["crowd_only"] in ds.ids and chosen["degenerate_and_crowd"] in ds.ids
    assert chosen["empty"] not in ds.ids and chosen["degenerate_only"] not in ds.ids
    _, target = ds[ds.ids.index(chosen["crowd_only"])]
    assert target["image_id"] == chosen["crowd_only"] and len(target["boxes"]) == len(target["masks"]) == 0


def test_training_images_are_those_the_references_own_code_keeps(dataset, tmp_path):
    ds, _ = _recipe_cases(dataset, tmp_path)
    assert ds.ids == _recipe_filter_of_the_reference(ds.coco)


@pytest.mark.parametrize("file_name", ["../../x.jpg", "/etc/hostname", "a/../../x.jpg"])
def test_image_paths_outside_the_image_folder_are_a_dataset_error(dataset, tmp_path, file_name):
    def edit(data):
        data["images"][0]["file_name"] = file_name

    root = _edited_copy(dataset, tmp_path, "train", edit)
    with pytest.raises(UserError, match=f"file_name '{re.escape(file_name)}' leaves the image folder"):
        build_dataset(root, "coco", "train", None)


def test_the_loader_itself_reads_nothing_outside_the_image_folder(dataset):
    ds = build_dataset(dataset, "coco", "val", None)
    ds.coco.imgs[ds.ids[0]] = {**ds.coco.imgs[ds.ids[0]], "file_name": "../train2017/" + "x.jpg"}
    _, target = ds[0]
    assert target["image_id"] == ds.ids[1]
    assert "leaves the image folder (remove an annotation tool's own folders" in target["faults"][0]


def test_instances_without_an_outline_are_dropped_and_odd_polygons_repaired(dataset):
    ds = build_dataset(dataset, "coco", "train", None)
    image_id = ds.ids[0]
    info = ds.coco.imgs[image_id]
    anns = [a for a in ds.coco.imgToAnns[image_id] if not a["iscrowd"] and a["bbox"][3] > 1]
    saved = [a["segmentation"] for a in anns]
    polygon_mask = instance_masks([{**anns[1], "segmentation": saved[1][:1]}], info["height"], info["width"])[0]
    anns[0]["segmentation"] = []
    anns[1]["segmentation"] = [saved[1][0] + [3.0]]  # a stray coordinate
    try:
        _, target = ds[0]
        _, boxes_only = build_dataset(dataset, "coco", "train", None, masks=False)[0]
    finally:
        anns[0]["segmentation"], anns[1]["segmentation"] = saved[0], saved[1]
    faults = target["faults"]
    assert any(f"annotation {anns[0]['id']}: no segmentation" in f and "instance dropped" in f for f in faults)
    assert any(f"annotation {anns[1]['id']}: polygon with an odd number of coordinates" in f for f in faults)
    assert len(target["boxes"]) == len(target["masks"]) == len(boxes_only["boxes"]) - 1, "a box-only model keeps it"
    assert any(torch.equal(mask, polygon_mask) for mask in target["masks"]), "the polygon without its stray value"


def _samples(ds) -> list:
    return [ds[index] for index in range(len(ds))]


@pytest.mark.parametrize("split", ["train", "val"])
def test_compacted_datasets_give_the_same_samples(dataset, split):
    plain = build_dataset(dataset, "coco", split, DetectionPresetEval())
    compacted = build_dataset(dataset, "coco", split, DetectionPresetEval())
    expected_categories = plain.image_categories()
    compacted.compact(release_index=True)
    assert compacted.coco is None, "the index is released for loader workers"
    assert compacted.aspect_ratios() == plain.aspect_ratios()
    assert compacted.image_categories() == expected_categories
    assert [int(i) for i in compacted.ids] == plain.ids
    for (image, target), (image_c, target_c) in zip(_samples(plain), _samples(compacted), strict=True):
        assert torch.equal(image, image_c)
        assert target.keys() == target_c.keys()
        for key, value in target.items():
            assert torch.equal(value, target_c[key]) if isinstance(value, torch.Tensor) else value == target_c[key]
        assert type(target_c["image_id"]) is int


def test_compacted_ids_on_both_sides_of_2_to_the_63_stay_the_files_own(dataset, tmp_path):
    """NumPy makes floats of integers on both sides of 2**63, which merged ids less than 2**11 apart there (a
    sample read another image's record) and gave evaluation float image ids."""
    def renumber(data):
        large = {image["id"]: 2**63 + image["id"] if n % 2 else image["id"] for n, image in enumerate(data["images"])}
        for item, key in [*((image, "id") for image in data["images"]), *((ann, "image_id")
                                                                         for ann in data["annotations"])]:
            item[key] = large[item[key]]
        for item, key in [*((category, "id") for category in data["categories"]),
                          *((ann, "category_id") for ann in data["annotations"])]:
            item[key] += 2**63 if item[key] % 2 else 0  # per-image categories, as repeat-factor sampling reads

    root = _edited_copy(dataset, tmp_path, "val", renumber)
    plain, compacted = (build_dataset(root, "coco", "val", None) for _ in range(2))
    compacted.compact(release_index=True)
    assert compacted.ids.tolist() == plain.ids
    assert compacted.image_categories() == plain.image_categories()
    for (_, target), (_, target_c) in zip(_samples(plain), _samples(compacted), strict=True):
        assert target_c["image_id"] == target["image_id"] and type(target_c["image_id"]) is int
        assert torch.equal(target_c["boxes"], target["boxes"]), "its own record"


def test_compacted_dataset_still_refuses_paths_outside_its_folder(dataset):
    ds = build_dataset(dataset, "coco", "val", None)
    first = ds.ids[0]
    ds.coco.imgs[first]["file_name"] = "../" + ds.coco.imgs[first]["file_name"]  # past the start-of-run check
    ds.compact()
    with pytest.raises(SampleError, match="file_name"):
        ds.image_path(first)


def _instance_beside_others(data: dict) -> dict:
    """A non-crowd annotation with a box of extent in an image that has another such one (so the image still
    trains without it)."""
    usable = [a for a in data["annotations"] if not a["iscrowd"] and a["bbox"][2] > 1 and a["bbox"][3] > 1]
    per_image = Counter(a["image_id"] for a in usable)
    return next(a for a in usable if per_image[a["image_id"]] > 1)


def _edited_instance(dataset, tmp_path, split, change) -> tuple:
    """A copy of the dataset whose instance chosen by _instance_beside_others was changed: (root, its id,
    its image's id)."""
    chosen = {}

    def edit(data):
        ann = _instance_beside_others(data)
        chosen.update(id=ann["id"], image_id=ann["image_id"])
        change(ann)

    root = _edited_copy(dataset, tmp_path, split, edit)
    return root, chosen["id"], chosen["image_id"]


def _sample_of(ds, image_id) -> dict:
    ids = [int(i) for i in ds.ids]
    return ds[ids.index(image_id)][1]


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("bbox", [[1, 2, 3], None, [1, 2, None, 4]])
def test_boxes_that_are_not_four_numbers_are_dropped_as_the_check_warns(dataset, tmp_path, split, bbox):
    def change(ann):
        if bbox is None:
            del ann["bbox"]
        else:
            ann["bbox"] = bbox

    root, ann_id, image_id = _edited_instance(dataset, tmp_path, split, change)
    data = json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())
    assert any(f.kind == "box not finite" and str(ann_id) in f.message for f in annotation_findings(data))
    ds = build_dataset(root, "coco", split, None)
    target = _sample_of(ds, image_id)
    expected = [a for a in ds.coco.imgToAnns[image_id] if not a["iscrowd"] and a["id"] != ann_id]
    assert len(target["boxes"]) == len(expected) >= 1
    assert any(f"annotation {ann_id}: box {bbox} is not 4 finite numbers; instance dropped" in f
               for f in target["faults"])
    _samples(ds)  # every other sample loads too


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("bbox", [[1000.0, 1000.0, 30.0, 30.0], [5.0, 5.0, 0.0, 10.0]])
def test_boxes_without_extent_in_their_image_are_dropped_and_counted_in_training(dataset, tmp_path, bbox, split):
    """A box lying outside its image, or without width, keeps nothing once clipped to the image; scoring keeps
    it (as one no prediction can match), so evaluation's loader says nothing of it."""
    root, ann_id, image_id = _edited_instance(dataset, tmp_path, split, lambda ann: ann.update(bbox=bbox))
    ds = build_dataset(root, "coco", split, None)
    target = _sample_of(ds, image_id)
    expected = [a for a in ds.coco.imgToAnns[image_id] if not a["iscrowd"] and a["id"] != ann_id]
    assert len(target["boxes"]) == len(expected)
    width, height = ds.coco.imgs[image_id]["width"], ds.coco.imgs[image_id]["height"]
    said = [f for f in target["faults"] if f"annotation {ann_id}: box {bbox} has no extent inside the "
            f"{width}x{height} image; instance dropped" in f]
    assert len(said) == (split == "train"), target["faults"]


def test_instance_masks_refuse_rle_of_another_size():
    polygon = {"segmentation": [[5, 5, 20, 5, 20, 20, 5, 20]]}
    small = mask_utils.encode(np.asfortranarray(np.ones((10, 10), np.uint8)))
    for anns in ([polygon, {"segmentation": small}], [{"segmentation": small}, polygon]):
        with pytest.raises(ValueError, match=re.escape("is RLE of size [10, 10], not the image's [40, 50]")):
            instance_masks(anns, 40, 50)
    assert instance_masks([polygon, polygon], 40, 50).flatten(1).sum(1).tolist() == [225, 225]


@pytest.mark.parametrize("segmentation, problem", [
    ({"size": [10, 10], "counts": [0, 100]}, "is RLE of size [10, 10], not the image's"),
    ({"size": [10, 10]}, "is neither polygons nor RLE"),
    ("not an outline", "is neither polygons nor RLE"),
    ([[5, 5, 20, None, 20, 20]], "has a polygon whose coordinates are not all finite numbers"),
    ([[5, 5, 20, 5, 1e12, 20]], "has polygon points far outside the"),  # pycocotools' drawing would crash
])
def test_segmentations_that_cannot_be_drawn_are_dropped_as_the_check_warns(dataset, tmp_path, segmentation,
                                                                            problem):
    root, ann_id, image_id = _edited_instance(dataset, tmp_path, "train",
                                              lambda ann: ann.update(segmentation=segmentation))
    data = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    assert any(f.kind == "segmentation format" and problem in f.message for f in annotation_findings(data))
    ds = build_dataset(root, "coco", "train", None)
    target = _sample_of(ds, image_id)
    assert any(f"annotation {ann_id}: segmentation {problem}" in f and f.endswith("instance dropped")
               for f in target["faults"])
    boxes_only = _sample_of(build_dataset(root, "coco", "train", None, masks=False), image_id)
    assert len(target["boxes"]) == len(target["masks"]) == len(boxes_only["boxes"]) - 1, "a box-only model keeps it"
    _samples(ds)


def test_a_flat_polygon_is_read_as_one_polygon(dataset, tmp_path):
    flat = []
    root, ann_id, image_id = _edited_instance(
        dataset, tmp_path, "train", lambda ann: (flat.extend(ann["segmentation"][0]),
                                                 ann.update(segmentation=ann["segmentation"][0])))
    ds = build_dataset(root, "coco", "train", None)
    ann = ds.coco.anns[ann_id]
    assert ann["segmentation"] == [flat], "COCOeval reads it from the index as a polygon too"
    info = ds.coco.imgs[image_id]
    expected = instance_masks([ann], info["height"], info["width"])[0]
    target = _sample_of(ds, image_id)
    assert any(torch.equal(mask, expected) for mask in target["masks"]) and not target["faults"]


def test_a_missing_area_is_computed_from_the_outline(dataset, tmp_path):
    without_outline = {}

    def edit(data):
        for ann in data["annotations"]:
            del ann["area"]
        ann = next(a for a in data["annotations"] if not a["iscrowd"] and a["bbox"][2] > 1 and a["bbox"][3] > 1)
        ann["segmentation"] = []
        without_outline.update(id=ann["id"], area=ann["bbox"][2] * ann["bbox"][3])

    ds = build_dataset(_edited_copy(dataset, tmp_path, "val", edit), "coco", "val", None)
    anns = [a for a in ds.coco.anns.values() if a["id"] != without_outline["id"]]
    assert any(a["iscrowd"] for a in anns), "crowd regions' RLE too"
    for ann in anns:
        assert ann["area"] == float(mask_utils.area(ds.coco.annToRLE(ann)))
    assert ds.coco.anns[without_outline["id"]]["area"] == without_outline["area"], "its box's area"
    _samples(ds)


def test_sizes_written_as_decimals_are_read_as_whole_pixels(dataset, tmp_path):
    """Some exporters write 640.0: the file trains, and masks and scoring see the whole numbers."""
    def edit(data):
        for image in data["images"]:
            image["width"], image["height"] = float(image["width"]), float(image["height"])

    expected = build_dataset(dataset, "coco", "train", None)
    ds = build_dataset(_edited_copy(dataset, tmp_path, "train", edit), "coco", "train", None)
    assert all(type(info["width"]) is int and type(info["height"]) is int for info in ds.coco.imgs.values())
    assert ds.coco.imgs == expected.coco.imgs
    for (_, got), (_, want) in zip(_samples(ds), _samples(expected)):
        assert torch.equal(got["masks"], want["masks"]) and torch.equal(got["boxes"], want["boxes"])


def test_only_a_file_with_instances_the_loader_changes_gets_other_ground_truth_for_scoring(dataset, tmp_path):
    """A sound file is scored against its own index (no pass over its annotations, the same numbers as ever); one
    where the check found an instance the loader leaves out is scored without it, per IoU type."""
    sound = build_dataset(dataset, "coco", "val", None)
    assert not sound.coco.loader_repairs
    assert all(scoring_ground_truth(sound.coco, t) is sound.coco for t in ("bbox", "segm", "keypoints"))
    edited = {}

    def edit(data):
        ann = next(a for a in data["annotations"] if not a["iscrowd"])
        ann["segmentation"] = {"size": [1, 1]}
        edited["id"] = ann["id"]

    ds = build_dataset(_edited_copy(dataset, tmp_path, "val", edit), "coco", "val", None)
    assert ds.coco.loader_repairs
    boxes, masks = scoring_ground_truth(ds.coco, "bbox"), scoring_ground_truth(ds.coco, "segm")
    assert boxes.anns.keys() == ds.coco.anns.keys() and all(boxes.anns[i] is a for i, a in ds.coco.anns.items())
    assert masks.anns.keys() == ds.coco.anns.keys() - {edited["id"]}
    assert all(masks.anns[i] is ds.coco.anns[i] for i in masks.anns), "sound instances are not copied"
    assert scoring_ground_truth(ds.coco, "segm") is masks, "built once a run, not once an evaluation"
    assert scoring_ground_truth(ds.coco, "keypoints") is boxes


def test_16_bit_grayscale_is_scaled_to_8_bits_not_clipped(tmp_path):
    ramp = np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    pixels = read_rgb(tmp_path / "ramp.png")
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.uint8
    assert torch.equal(pixels[0], pixels[2]) and (pixels[0, 0, 0], pixels[0, -1, -1]) == (0, 255)
    assert abs(pixels.float().mean().item() - 127.5) < 1, "spread over the range, not clipped white"


def test_an_exif_turn_is_applied_where_the_json_has_the_turned_size(tmp_path):
    """A photo stored 96 x 72 with orientation 6 (a quarter turn): upright (72 x 96) where the JSON says so or
    no JSON is asked; as stored where the JSON has the stored size, as torchvision's reference reads it."""
    stored = np.zeros((72, 96, 3), np.uint8)
    stored[:10, :20] = 255  # a mark at the stored top left
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "photo.jpg", exif=exif, quality=100)
    upright, as_stored = read_rgb(tmp_path / "photo.jpg", (72, 96)), read_rgb(tmp_path / "photo.jpg", (96, 72))
    assert upright.shape == (3, 96, 72) and as_stored.shape == (3, 72, 96)
    assert torch.equal(read_rgb(tmp_path / "photo.jpg"), upright)
    assert upright[:, :20, -10:].float().mean() > 200, "turned clockwise: the top left goes to the top right"


@pytest.mark.parametrize("stored, orientation, json_size, undecided", [
    ((64, 64), 6, (64, 64), True),  # a square picture turned a quarter: the same size either way
    ((96, 72), 3, (96, 72), True),  # a half turn keeps the size
    ((96, 72), 2, (96, 72), True),  # a mirror too
    ((96, 72), 6, (96, 72), False),  # the JSON has the stored size, not the turned one: read as stored
    ((96, 72), 6, (72, 96), False),  # the JSON has the turned size: turned
    ((64, 64), 1, (64, 64), False),  # upright already
])
def test_a_turn_is_undecided_where_the_json_size_fits_both_ways(tmp_path, stored, orientation, json_size, undecided):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", stored).save(tmp_path / "photo.jpg", exif=exif)
    with Image.open(tmp_path / "photo.jpg") as img:
        assert orientation_undecided(img, json_size) is undecided


def test_an_empty_file_and_one_over_pils_limit_are_said_so(tmp_path, monkeypatch):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(SampleError, match=r"empty.jpg: image unreadable \(the file is empty, 0 bytes\)$"):
        read_rgb(tmp_path / "empty.jpg")
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4,096 pixels are over twice this
    with pytest.raises(SampleError, match=r"big.png: image too large to decode \(0.0041 megapixels; PIL refuses "
                                          r"more than 0.002, its guard against decompression bombs\); downscale"):
        read_rgb(tmp_path / "big.png")


def test_pils_nameless_warning_of_a_large_image_is_left_to_the_named_notes(tmp_path):
    """In a process of its own: pytest keeps the filters a module sets while it is collected from the tests."""
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    script = ("import sys; from PIL import Image; import coco_utils; Image.MAX_IMAGE_PIXELS = 3000; "
              "print(tuple(coco_utils.read_rgb(sys.argv[1]).shape))")  # PIL warns between 3000 and twice that
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "big.png")], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "(3, 64, 64)", done.stderr
    assert "DecompressionBombWarning" not in done.stderr, done.stderr


def test_a_folder_not_in_coco_layout_names_the_json_files_it_holds(tmp_path):
    """An annotation tool's export (Roboflow's train/_annotations.coco.json, say): the error names its files."""
    for split in ("train", "valid", "test"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "_annotations.coco.json").write_text("{}")
    with pytest.raises(UserError, match=r"is missing; --data-path must hold the COCO layout \(annotations/"
                                        r"instances_train2017.json and train2017/\), or give --train-annotations "
                                        r"\(JSON files there: test/_annotations.coco.json, train/_annotations.coco."
                                        r"json, valid/_annotations.coco.json\)$"):
        split_paths(tmp_path, "coco", "train")
    (tmp_path / "extra.json").write_text("{}")
    with pytest.raises(UserError, match=r"\(JSON files there: extra.json, test/_annotations.coco.json, train/"
                                        r"_annotations.coco.json and 1 more\)$"):
        split_paths(tmp_path, "coco", "train")


@pytest.mark.parametrize("columns", [-1, 1])
def test_compressed_rle_whose_counts_miss_the_images_pixels_is_dropped_as_the_check_warns(dataset, tmp_path, columns):
    """A mask encoded at another size than its 'size' says (edited after a resize): decoded, too few counts
    would leave its last pixels as whatever memory holds, too many fail in a loader worker."""
    chosen = {}

    def edit(data):
        ann = _instance_beside_others(data)
        image = next(i for i in data["images"] if i["id"] == ann["image_id"])
        height, width = image["height"], image["width"]
        counts = mask_utils.encode(np.asfortranarray(np.ones((height, width + columns), np.uint8)))["counts"]
        ann["segmentation"] = {"size": [height, width], "counts": counts.decode()}
        chosen.update(id=ann["id"], image_id=ann["image_id"], pixels=height * width)

    root = _edited_copy(dataset, tmp_path, "train", edit)
    problem = f"is compressed RLE whose counts do not cover the image's {chosen['pixels']} pixels"
    data = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    assert any(f.kind == "segmentation format" and problem in f.message for f in annotation_findings(data))
    target = _sample_of(build_dataset(root, "coco", "train", None), chosen["image_id"])
    assert any(f"annotation {chosen['id']}: segmentation {problem}" in f for f in target["faults"])
    assert target["masks"].max() <= 1 and len(target["masks"]) == len(target["boxes"])


def test_the_instances_samples_read_are_counted_and_checksummed_as_read(dataset, tmp_path):
    """What agreement.check_same_data compares across nodes: the same files give the same figures before and after
    compacting; one label changed in a copy of the file, another checksum of as many instances."""
    first, second = (build_dataset(dataset, "coco", "train", None) for _ in range(2))
    before = first.instances_read()
    second.compact(release_index=True)
    assert second.instances_read() == before and before[0] == sum(
        not a["iscrowd"] for i in first.ids for a in first.coco.imgToAnns[i])
    categories = [c["id"] for c in json.loads((dataset / "annotations" / "instances_train2017.json").read_text())[
        "categories"]]

    def relabel(data):
        ann = _instance_beside_others(data)
        ann["category_id"] = next(c for c in categories if c != ann["category_id"])

    edited = build_dataset(_edited_copy(dataset, tmp_path, "train", relabel), "coco", "train", None)
    assert edited.instances_read()[0] == before[0] and edited.instances_read()[1] != before[1]


def test_rle_counts_that_area_sums_past_32_bits_leave_the_instance_out_of_the_sample(dataset, tmp_path):
    """Counts of H*W + 2**32 pixels (no encoder writes them): pycocotools' area() sums them to H*W, so no check
    sees them, and its decode refuses them; the loader leaves the instance out instead of failing in a worker."""
    chosen = {}

    def edit(data):
        ann = _instance_beside_others(data)
        image = next(i for i in data["images"] if i["id"] == ann["image_id"])
        pixels = image["height"] * image["width"]
        counts = annotations._compressed([pixels, 1, 0, 2**32 - 1]).decode()
        assert annotations.compressed_rle_pixels(counts) == pixels
        ann["segmentation"] = {"size": [image["height"], image["width"]], "counts": counts}
        chosen.update(id=ann["id"], image_id=ann["image_id"], pixels=pixels)

    root = _edited_copy(dataset, tmp_path, "train", edit)
    target = _sample_of(build_dataset(root, "coco", "train", None), chosen["image_id"])
    assert f"annotation {chosen['id']}: segmentation is compressed RLE whose counts go past the image's " \
           f"{chosen['pixels']} pixels; instance dropped" in "\n".join(target["faults"])
    assert len(target["masks"]) == len(target["boxes"]) == len(target["labels"]) >= 1


def samples_of(targets: list[dict], size: tuple[int, int] = (20, 30)) -> list[tuple]:
    """(image, target) pairs as a plain Dataset gives them: float images, the targets as given."""
    return [(torch.zeros(3, *size), target) for target in targets]


def test_samples_become_coco_ground_truth_with_their_labels_as_categories():
    masks = torch.zeros(2, 20, 30, dtype=torch.bool)
    masks[0, 2:6, 3:9], masks[1, 10:20, 0:5] = True, True
    points = torch.zeros(2, 17, 3)
    points[0, :3] = torch.tensor([5.0, 4.0, 2.0])
    targets = [{"boxes": torch.tensor([[3.0, 2.0, 9.0, 6.0], [0.0, 10.0, 5.0, 20.0]]), "labels": torch.tensor([2, 5]),
                "masks": masks, "keypoints": points, "iscrowd": torch.tensor([False, True]),
                "image_id": torch.tensor([7])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": "b"}]
    coco, category_map = coco_of_samples(samples_of(targets))
    assert coco.dataset["images"] == [{"id": 7, "height": 20, "width": 30}, {"id": "b", "height": 20, "width": 30}]
    first, second = coco.dataset["annotations"]
    assert (first["bbox"], first["category_id"], first["area"], first["iscrowd"]) == ([3.0, 2.0, 6.0, 4.0], 2, 24.0, 0)
    assert (second["id"], second["iscrowd"], second["num_keypoints"]) == (2, 1, 0)
    assert first["num_keypoints"] == 3 and first["keypoints"][:3] == [5.0, 4.0, 2.0]
    assert mask_utils.decode(second["segmentation"]).sum() == 50
    assert category_map.ids == (2, 5) and category_map.category_id(5) == 5 and category_map.category_id(3) is None


def test_samples_of_one_image_id_or_other_keypoints_cannot_be_scored():
    target = {"boxes": torch.tensor([[1.0, 1.0, 4.0, 4.0]]), "labels": torch.tensor([1]), "image_id": 3}
    with pytest.raises(UserError, match="^samples 0 and 1 of the dataset have one image_id, 3: scoring tells images "
                                        "apart by it; give each sample its own$"):
        coco_of_samples(samples_of([target, dict(target)]))
    with pytest.raises(UserError, match="image 3 has 4 keypoints an instance; keypoints are scored as COCO's 17"):
        coco_of_samples(samples_of([{**target, "keypoints": torch.ones(1, 4, 3)}]))


def test_the_references_dataset_calls_give_this_projects_datasets_and_their_index(dataset):
    val = get_coco(dataset, "val", None)
    assert isinstance(val, CocoDetection) and not val.train and val.coco.source.name == "instances_val2017.json"
    assert get_coco(dataset, "train", None).train
    with pytest.raises(ValueError, match="mode 'panoptic': give one of instances, person_keypoints"):
        get_coco(dataset, "val", None, mode="panoptic")
    calls = []
    flipped = get_coco(dataset, "val", lambda image, target: calls.append(image.dtype) or (image, target))
    assert flipped[0][1]["image_id"] == flipped.ids[0] and calls == [torch.uint8], "a transform of two arguments"
    subset = torch.utils.data.Subset(val, [0, 2])
    assert get_coco_api_from_dataset(subset) is val.coco, "the file's index, not the samples read again"
    assert labels_of(val.coco) == val.category_map and not val.category_map.keep_ids


def test_torchvisions_coco_dataset_is_scored_from_its_own_index_with_category_ids_as_labels(dataset):
    from torchvision.datasets import CocoDetection as TorchvisionCoco

    theirs = TorchvisionCoco(dataset / "val2017", dataset / "annotations" / "instances_val2017.json")
    coco, category_map = coco_of_samples(theirs)
    assert coco is theirs.coco
    assert category_map.keep_ids and category_map.ids == tuple(sorted(theirs.coco.cats))
    assert category_map.names == tuple(theirs.coco.cats[i]["name"] for i in category_map.ids)

    class Renumbered(TorchvisionCoco):
        """A subclass of one's own (as fine-tuning scripts write them): labels 1..K, so its samples are read."""

        def __getitem__(self, index):
            image, anns = super().__getitem__(index)
            boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]
            labels = torch.tensor([sorted(self.coco.cats).index(a["category_id"]) + 1 for a in anns])
            return image, {"boxes": boxes, "labels": labels, "image_id": self.ids[index]}

    renumbered = Renumbered(dataset / "val2017", dataset / "annotations" / "instances_val2017.json")
    coco, category_map = coco_of_samples(renumbered)
    assert coco is not renumbered.coco and category_map.ids == tuple(range(1, len(theirs.coco.cats) + 1))


def test_other_datasets_are_read_sample_by_sample_by_the_references_name_too():
    target = {"boxes": torch.tensor([[1.0, 1.0, 4.0, 5.0]]), "labels": torch.tensor([3]), "image_id": 9}
    coco = convert_to_coco_api(samples_of([target]))
    assert [(a["image_id"], a["category_id"], a["bbox"]) for a in coco.dataset["annotations"]] == [
        (9, 3, [1.0, 1.0, 3.0, 4.0])]
    assert get_coco_api_from_dataset(samples_of([target])).dataset == coco.dataset

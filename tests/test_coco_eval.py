"""Our scoring equals pycocotools' COCOeval on the same detections, with the file's category ids."""

import contextlib
import copy
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import coco_eval
from coco_eval import (
    METRIC_NAMES,
    CocoEvaluator,
    RunLengths,
    format_per_category,
    metric_names,
    run_lengths,
    score,
    summary_stats,
    to_coco_results,
    windowed_run_lengths,
)
from coco_utils import CategoryMap, build_dataset, get_coco_api_from_dataset
from conftest import in_two_processes
from errors import UserError


def _noisy_outputs(ds, seed=0):
    """Predictions built from ground truth with jitter, dropped instances and wrong labels."""
    rng = np.random.default_rng(seed)
    outputs = {}
    for image_id in ds.ids:
        target = ds.load_target(image_id, [])
        n = len(target["boxes"])
        keep = torch.from_numpy(rng.random(n) < 0.8)
        boxes = target["boxes"][keep] + torch.from_numpy(rng.normal(0, 2, (int(keep.sum()), 4))).float()
        labels = target["labels"][keep].clone()
        flip = torch.from_numpy(rng.random(len(labels)) < 0.2)
        labels[flip] = labels[flip] % (ds.category_map.num_classes - 1) + 1
        masks = target["masks"][keep, None].float() * 0.9
        scores = torch.from_numpy(rng.random(len(labels))).float()
        outputs[target["image_id"]] = {"boxes": boxes, "labels": labels, "scores": scores, "masks": masks}
    return outputs


def test_ap_equals_pycocotools_on_the_written_predictions(dataset, tmp_path, capsys):
    ds = build_dataset(dataset, "coco", "val", None)
    evaluator = CocoEvaluator(ds.coco, category_map=ds.category_map, backend="pycocotools")
    evaluator.update(_noisy_outputs(ds))
    metrics = evaluator.summarize()
    assert "IoU metric: segm" in capsys.readouterr().out
    paths = evaluator.write_results(tmp_path)
    for iou_type, path in zip(("bbox", "segm"), paths):
        records = json.loads(path.read_text())
        assert {r["category_id"] for r in records} <= {c["id"] for c in ds.coco.dataset["categories"]}
        reference = COCOeval(copy.deepcopy(ds.coco), ds.coco.loadRes(str(path)), iou_type)
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
        assert [metrics[iou_type][m] for m in METRIC_NAMES] == pytest.approx(list(reference.stats), abs=1e-12)
        assert 0.2 < metrics[iou_type]["AP"] < 1.0


def test_no_detections_scores_zero_and_says_why(dataset, capsys):
    ds = build_dataset(dataset, "coco", "val", None)
    evaluator = CocoEvaluator(ds.coco, category_map=ds.category_map)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
             "masks": torch.zeros(0, 1, 8, 8)}
    evaluator.update({image_id: empty for image_id in ds.ids})
    metrics = evaluator.summarize()
    assert metrics["bbox"]["AP"] == 0.0 and metrics["segm"]["AP"] == 0.0
    assert f"note: the model made no detection on any of the {len(ds.ids)} images" in capsys.readouterr().out
    some = CocoEvaluator(ds.coco, category_map=ds.category_map)
    some.update(_noisy_outputs(ds, seed=3))
    some.summarize()
    assert "made no detection" not in capsys.readouterr().out


def test_an_image_seen_twice_counts_once(dataset):
    ds = build_dataset(dataset, "coco", "val", None)
    once, twice = (CocoEvaluator(ds.coco, category_map=ds.category_map),
                   CocoEvaluator(ds.coco, category_map=ds.category_map))
    outputs = _noisy_outputs(ds, seed=3)
    once.update(outputs)
    first = next(iter(outputs))
    twice.update(outputs)
    twice.update({first: outputs[first]})
    assert once.results("segm") == twice.results("segm")


def test_faster_backend_gives_the_same_numbers(dataset, capsys):
    pytest.importorskip("faster_coco_eval")
    ds = build_dataset(dataset, "coco", "val", None)
    outputs = _noisy_outputs(ds, seed=5)
    results = {}
    for backend in ("pycocotools", "faster"):
        evaluator = CocoEvaluator(ds.coco, category_map=ds.category_map, backend=backend)
        evaluator.update(outputs)
        results[backend] = evaluator.summarize()
    for iou_type in ("bbox", "segm"):
        ours, theirs = results["faster"][iou_type], results["pycocotools"][iou_type]
        assert [ours[m] for m in METRIC_NAMES] == pytest.approx([theirs[m] for m in METRIC_NAMES], abs=1e-4)
        assert ours["per_category"] == pytest.approx(theirs["per_category"], abs=1e-4)


def test_run_lengths_both_ways_encode_like_probabilities(dataset):
    ds = build_dataset(dataset, "coco", "val", None)
    output = _noisy_outputs(ds)[ds.ids[0]]
    output["masks"] = output["masks"] * torch.rand_like(output["masks"]) * 1.2
    output["masks"][0] = 1.0  # a mask whose first pixel is set: its runs start with an empty one
    as_probabilities = to_coco_results(1, output, ds.category_map, ("segm",))
    as_runs = to_coco_results(1, {**output, "masks": run_lengths(output["masks"])}, ds.category_map, ("segm",))
    as_windows = to_coco_results(1, {**output, "masks": windowed_run_lengths(output["masks"])}, ds.category_map,
                                 ("segm",))
    assert as_probabilities == as_runs == as_windows and as_runs["segm"]
    empty = {k: v[:0] for k, v in output.items()}
    assert to_coco_results(1, {**empty, "masks": run_lengths(empty["masks"])}, ds.category_map, ("segm",)) == {
        "segm": []}


def _pycocotools_counts(probabilities: torch.Tensor) -> list[bytes]:
    """pycocotools' own encoding of every pixel, thresholded at 0.5: what the windows must reproduce."""
    masks = (probabilities[:, 0] > 0.5).numpy().transpose(1, 2, 0)
    return [r["counts"] for r in mask_utils.encode(np.asfortranarray(masks).view(np.uint8))]


def _compressed(runs: RunLengths) -> list[bytes]:
    height, width = runs.size
    return [r["counts"] for r in mask_utils.frPyObjects([{"counts": c, "size": [height, width]}
                                                           for c in runs.counts], height, width)]


def test_windowed_run_lengths_equal_pycocotools_on_edges_empty_masks_and_nan():
    generator = torch.Generator().manual_seed(0)
    for trial in range(300):
        height = int(torch.randint(1, 40, (1,), generator=generator))  # windows start in bands of 16 rows
        width = int(torch.randint(1, 12, (1,), generator=generator))
        masks = torch.rand(5, 1, height, width, generator=generator) ** (0.2 + 5 * trial / 300)
        if trial % 3 == 0:  # empty columns on the left, or an empty mask
            masks[:, :, :, : trial % (width + 1)] = 0
        if trial % 7 == 0:
            masks[1, 0, 0, 0] = float("nan")
            masks[2] = float("nan")
        if trial % 5 == 0:  # windows as tall as the image, with set pixels meeting across columns
            masks[3, 0, :, :] = 0.9
        assert _compressed(windowed_run_lengths(masks)) == _pycocotools_counts(masks), trial
        if trial % 4 == 0:  # CPU autocast's masks: NumPy has no bfloat16
            halved = masks.bfloat16()
            assert _compressed(windowed_run_lengths(halved)) == _pycocotools_counts(halved.float()), trial


def test_labels_without_a_category_are_dropped_and_counted_once(dataset, capsys):
    """A model with more classes than the dataset's categories (--num-classes 91 on a custom set): its extra
    labels become no prediction, the count is said once, and the AP is that of the other detections."""
    ds = build_dataset(dataset, "coco", "val", None)
    outputs = _noisy_outputs(ds, seed=7)
    stray_label = ds.category_map.num_classes + 3
    with_strays = {}
    for image_id, output in outputs.items():
        extra = {"boxes": output["boxes"][:2] + 1, "labels": torch.full((min(2, len(output["labels"])),),
                                                                         stray_label),
                 "scores": torch.full((min(2, len(output["labels"])),), 0.99), "masks": output["masks"][:2]}
        with_strays[image_id] = {k: torch.cat([output[k], extra[k]]) for k in output}
    strays = sum(min(2, len(o["labels"])) for o in outputs.values())
    results = {}
    for name, given in (("clean", outputs), ("strays", with_strays)):
        evaluator = CocoEvaluator(ds.coco, category_map=ds.category_map, backend="pycocotools")
        evaluator.update(given)
        results[name] = evaluator.summarize()
        printed = capsys.readouterr().out
        assert ("left out" in printed) == (name == "strays")
    assert printed.count(f"{strays} detections") == 1 and f"label {stray_label}" in printed
    assert results["strays"]["bbox"]["AP"] == results["clean"]["bbox"]["AP"]
    assert results["strays"]["segm"]["AP"] == results["clean"]["segm"]["AP"]
    records = to_coco_results(1, with_strays[ds.ids[0]], ds.category_map, ("bbox",))["bbox"]
    assert len(records) == len(outputs[ds.ids[0]]["labels"])


BACKENDS = ["pycocotools", pytest.param("faster", marks=pytest.mark.skipif(
    importlib.util.find_spec("faster_coco_eval") is None, reason="faster-coco-eval is not installed"))]


def _edited_val(dataset, root, split_file: str, edit) -> Path:
    """A dataset folder at root whose annotation file split_file is the dataset's, edited, beside its images."""
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").symlink_to(dataset / "val2017")
    data = json.loads((dataset / "annotations" / split_file).read_text())
    edit(data)
    (root / "annotations" / split_file).write_text(json.dumps(data))
    return root


def test_categories_that_share_a_name_keep_their_own_ap(dataset, tmp_path):
    """Keyed by name alone, the last of them took the others' place."""
    def same_name(data):
        data["categories"][1]["name"] = data["categories"][0]["name"]

    root = _edited_val(dataset, tmp_path / "named", "instances_val2017.json", same_name)
    ds = build_dataset(root, "coco", "val", None)
    evaluator = CocoEvaluator(ds.coco, ("bbox",), ds.category_map)
    evaluator.update(_noisy_outputs(ds, seed=2))
    metrics = evaluator.summarize()["bbox"]
    first, second = ds.coco.dataset["categories"][:2]
    assert {f"{first['name']} (id {first['id']})", f"{first['name']} (id {second['id']})"} <= set(
        metrics["per_category"])
    assert np.mean(list(metrics["per_category"].values())) == pytest.approx(metrics["AP"], abs=1e-9)


def _scored(root, dataset_name: str, outputs: dict, iou_types: tuple[str, ...], backend: str) -> dict:
    """What CocoEvaluator gives with the dataset's own COCO index, as train.py scores an epoch."""
    ds = build_dataset(root, dataset_name, "val", None)
    evaluator = CocoEvaluator(ds.coco, iou_types, ds.category_map, backend=backend)
    evaluator.update({image_id: dict(output) for image_id, output in outputs.items()})
    return evaluator.summarize()


def _set(key, value):
    return lambda ann: ann.pop(key) if value is None else ann.update({key: value})


# (instance edited: crowd region or not, the edit, the IoU types whose ground truth leaves it out as the loader does)
WARNED_INSTANCES = {
    "no bbox": (False, _set("bbox", None), ("bbox", "segm")),
    "bbox of 3 numbers": (False, _set("bbox", [1, 2, 3]), ("bbox", "segm")),
    "bbox with a null": (False, _set("bbox", [1, 2, None, 4]), ("bbox", "segm")),
    "empty segmentation": (False, _set("segmentation", []), ("segm",)),
    "RLE of another size": (False, _set("segmentation", {"size": [10, 10], "counts": [0, 100]}), ("segm",)),
    "RLE without counts": (False, _set("segmentation", {"size": [10, 10]}), ("segm",)),
    "neither polygons nor RLE": (False, _set("segmentation", "not an outline"), ("segm",)),
    "polygon under 3 points": (False, _set("segmentation", [[1, 2]]), ("segm",)),
    "short polygon beside a sound one": (False, lambda ann: ann.update(segmentation=[[1, 2]] + ann["segmentation"]),
                                         ()),
    "polygon holding a string": (False, _set("segmentation", [[1, 2, "3", 4, 5, 6]]), ("segm",)),
    "annotation id 0": (False, _set("id", 0), ()),
    "annotation id a string": (False, _set("id", "a7"), ()),
    "no iscrowd": (False, lambda ann: ann.pop("iscrowd"), ()),
    "iscrowd null": (False, _set("iscrowd", None), ()),
    "area a string": (False, _set("area", "12"), ()),
    "crowd RLE without counts": (True, _set("segmentation", {"size": [10, 10]}), ("segm",)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(WARNED_INSTANCES))
def test_instances_the_check_warns_about_are_scored_as_the_loader_reads_them(dataset, tmp_path, case, backend):
    """COCOeval stopped with a traceback on these at the end of an epoch. Now the ground truth leaves out what the
    loader leaves out (and reads short polygons repaired as it does): the scores are those of the file without the
    instance where it is left out, and of the sound file elsewhere."""
    crowd, edit, left_out_of = WARNED_INSTANCES[case]
    chosen = {}

    def pick(data):
        chosen["ann"] = next(a for a in data["annotations"] if bool(a["iscrowd"]) == crowd)
        return chosen["ann"]

    broken = _edited_val(dataset, tmp_path / "broken", "instances_val2017.json", lambda d: edit(pick(d)))
    without = _edited_val(dataset, tmp_path / "without", "instances_val2017.json",
                          lambda d: d["annotations"].remove(pick(d)))
    sound = build_dataset(dataset, "coco", "val", None)
    outputs = _noisy_outputs(sound, seed=11)
    if crowd:  # a detection on the crowd region, which counts against the model only without the region
        ann, output = chosen["ann"], outputs[chosen["ann"]["image_id"]]
        x, y, w, h = ann["bbox"]
        detection = {"boxes": torch.tensor([[x, y, x + w, y + h]]), "scores": torch.tensor([0.95]),
                     "labels": torch.tensor([sound.category_map.label(ann["category_id"])]),
                     "masks": torch.from_numpy(sound.coco.annToMask(ann))[None, None].float()}
        outputs[ann["image_id"]] = {k: torch.cat([output[k], detection[k]]) for k in output}
    scored = _scored(broken, "coco", outputs, ("bbox", "segm"), backend)
    expected = {"left out": _scored(without, "coco", outputs, ("bbox", "segm"), backend),
                "kept": _scored(dataset, "coco", outputs, ("bbox", "segm"), backend)}
    for iou_type in left_out_of:
        assert expected["left out"][iou_type] != expected["kept"][iou_type], "the instance counts in the sound file"
    for iou_type in ("bbox", "segm"):
        assert scored[iou_type] == expected["left out" if iou_type in left_out_of else "kept"][iou_type], iou_type


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bbox", [None, [1, 2, 3]])
def test_a_person_without_a_usable_box_is_left_out_of_keypoint_scoring(keypoint_dataset, tmp_path, bbox, backend):
    """Keypoint scoring reads each person's box (OKS's ignore regions): a missing one stopped it as box scoring."""
    files = "person_keypoints_val2017.json"

    def pick(data):
        return next(a for a in data["annotations"] if not a["iscrowd"])

    broken = _edited_val(keypoint_dataset, tmp_path / "broken", files, lambda d: _set("bbox", bbox)(pick(d)))
    without = _edited_val(keypoint_dataset, tmp_path / "without", files, lambda d: d["annotations"].remove(pick(d)))
    outputs = _keypoint_outputs(keypoint_dataset)
    scored = _scored(broken, "coco_kp", outputs, ("bbox", "keypoints"), backend)
    assert scored == _scored(without, "coco_kp", outputs, ("bbox", "keypoints"), backend)


def _keypoint_outputs(root) -> dict:
    """Each val image's ground truth as predictions, scored from 0.9 down."""
    sound = build_dataset(root, "coco_kp", "val", None)
    outputs = {}
    for image_id in sound.ids:
        target = sound.load_target(image_id, [], with_masks=False)
        outputs[image_id] = {"boxes": target["boxes"], "labels": target["labels"], "keypoints": target["keypoints"],
                             "scores": torch.linspace(0.9, 0.5, len(target["labels"]))}
    return outputs


def _labelled_person(data) -> dict:
    return next(a for a in data["annotations"] if not a["iscrowd"] and a["num_keypoints"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_keypoint_counts_missing_or_wrong_are_recounted_for_scoring(keypoint_dataset, tmp_path, backend):
    """COCOeval ignores persons of num_keypoints 0 (and pycocotools stops on a missing one): every AP was -1."""
    files = "person_keypoints_val2017.json"
    outputs = _keypoint_outputs(keypoint_dataset)
    expected = _scored(keypoint_dataset, "coco_kp", outputs, ("bbox", "keypoints"), backend)
    assert expected["keypoints"]["AP"] > 0.5
    for name, edit in [("missing", lambda ann: ann.pop("num_keypoints")), ("zero", _set("num_keypoints", 0))]:
        edited = _edited_val(keypoint_dataset, tmp_path / name, files,
                             lambda d: [edit(a) for a in d["annotations"]])  # noqa: B023
        assert _scored(edited, "coco_kp", outputs, ("bbox", "keypoints"), backend) == expected, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unlabelled", [None, []])
def test_a_person_without_keypoints_scores_as_one_with_none_labelled(keypoint_dataset, tmp_path, backend,
                                                                     unlabelled):
    """COCOeval reads every person's 'keypoints' (it stopped on a missing one)."""
    files = "person_keypoints_val2017.json"
    outputs = _keypoint_outputs(keypoint_dataset)
    broken = _edited_val(keypoint_dataset, tmp_path / "broken", files,
                         lambda d: _set("keypoints", unlabelled)(_labelled_person(d)))
    zeros = _edited_val(keypoint_dataset, tmp_path / "zeros", files, lambda d: _labelled_person(d).update(
        keypoints=[0] * 51, num_keypoints=0))
    assert (_scored(broken, "coco_kp", outputs, ("bbox", "keypoints"), backend)
            == _scored(zeros, "coco_kp", outputs, ("bbox", "keypoints"), backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_file_pycocotools_reads_scores_as_there_when_short_polygons_are_repaired(dataset, tmp_path, backend):
    """A 2-point polygon after a sound one: the check flags it, so scoring reads the file as the loader repairs
    it; pycocotools draws that polygon as no pixels, so the scores stay those of pycocotools' own index of the
    file, as in torchvision's reference."""
    def edit(data):
        ann = next(a for a in data["annotations"] if not a["iscrowd"] and isinstance(a["segmentation"], list))
        x, y, w, h = ann["bbox"]
        ann["segmentation"] = ann["segmentation"] + [[x, y, x + w, y + h]]

    files = "instances_val2017.json"
    broken = _edited_val(dataset, tmp_path / "broken", files, edit)
    outputs = _noisy_outputs(build_dataset(dataset, "coco", "val", None), seed=11)
    ours = build_dataset(broken, "coco", "val", None)
    assert ours.coco.loader_repairs, "the check found the short polygon"
    with contextlib.redirect_stdout(io.StringIO()):
        plain = COCO(str(broken / "annotations" / files))
    evaluator = CocoEvaluator(plain, ("segm",), ours.category_map, backend=backend)
    evaluator.update({image_id: dict(output) for image_id, output in outputs.items()})
    assert _scored(broken, "coco", outputs, ("segm",), backend)["segm"] == evaluator.summarize()["segm"]


# Image ids faster-coco-eval cannot take: strings, integers that a double (which it reads them as) rounds, and
# negative ones (its mask scoring refuses them).
ID_FORMS = {"strings": lambda i: f"img-{i}", "beyond 2**53": lambda i: 2**60 + i, "negative": lambda i: -i - 1}


def _renumbered(form):
    def edit(data):
        for item, key in [*((image, "id") for image in data["images"]),
                          *((ann, "image_id") for ann in data["annotations"])]:
            item[key] = ID_FORMS[form](item[key])
    return edit


@pytest.mark.parametrize("form", ID_FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_image_ids_faster_coco_eval_cannot_take_score_as_small_integers_do_whatever_the_backend(
        dataset, tmp_path, backend, form, capsys):
    """A file of such ids is scored with pycocotools instead of faster-coco-eval."""
    renumbered = _edited_val(dataset, tmp_path / "renumbered", "instances_val2017.json", _renumbered(form))
    sound = build_dataset(dataset, "coco", "val", None)
    outputs = _noisy_outputs(sound, seed=5)
    expected = _scored(dataset, "coco", outputs, ("bbox", "segm"), "pycocotools")
    outputs = {ID_FORMS[form](i): output for i, output in outputs.items()}
    coco_eval._say_scoring_with_pycocotools.cache_clear()  # said once a process: as if this were its first run
    assert _scored(renumbered, "coco", outputs, ("bbox", "segm"), backend) == expected
    assert ("scoring with pycocotools" in capsys.readouterr().out) == (backend == "faster")


# Category ids the checks take but int64 cannot hold, in the order of the small ones (labels follow that order).
CATEGORY_ID_FORMS = {"strings": lambda i: f"cat-{i:04d}", "past 64 bits": lambda i: 2**64 + i}


@pytest.mark.parametrize("form", CATEGORY_ID_FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_category_ids_int64_cannot_hold_score_as_small_integers_do(dataset, tmp_path, backend, form):
    """Encoding the predictions kept the file's category ids as int64, which failed on these after training."""
    def renumber(data):
        for item, key in [*((category, "id") for category in data["categories"]),
                          *((ann, "category_id") for ann in data["annotations"])]:
            item[key] = CATEGORY_ID_FORMS[form](item[key])

    renumbered = _edited_val(dataset, tmp_path / "renumbered", "instances_val2017.json", renumber)
    outputs = _noisy_outputs(build_dataset(dataset, "coco", "val", None), seed=5)
    expected = _scored(dataset, "coco", outputs, ("bbox", "segm"), "pycocotools")
    assert _scored(renumbered, "coco", outputs, ("bbox", "segm"), backend) == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_annotation_ids_used_twice_score_as_unique_ones_do(dataset, tmp_path, backend):
    """COCOeval looks instances up by id: two of one id would be scored as one of them, twice."""
    def reuse(data):
        for ann in data["annotations"][1::2]:
            ann["id"] = data["annotations"][0]["id"]

    reused = _edited_val(dataset, tmp_path / "reused", "instances_val2017.json", reuse)
    outputs = _noisy_outputs(build_dataset(dataset, "coco", "val", None), seed=3)
    expected = _scored(dataset, "coco", outputs, ("bbox", "segm"), backend)
    assert _scored(reused, "coco", outputs, ("bbox", "segm"), backend) == expected


def test_a_category_listed_without_instances_scores_as_if_absent(dataset, tmp_path):
    """A val file may list a category the training file lacks, if it has no instances of it."""
    extra = _edited_val(dataset, tmp_path / "extra", "instances_val2017.json",
                        lambda d: d["categories"].append({"id": 99, "name": "star"}))
    trained = build_dataset(dataset, "coco", "train", None).category_map
    sound = build_dataset(dataset, "coco", "val", None, trained)
    outputs = _noisy_outputs(sound, seed=2)
    ds = build_dataset(extra, "coco", "val", None, trained)
    evaluator = CocoEvaluator(ds.coco, ("bbox", "segm"), ds.category_map, backend="pycocotools")
    evaluator.update({image_id: dict(output) for image_id, output in outputs.items()})
    assert evaluator.summarize() == _scored(dataset, "coco", outputs, ("bbox", "segm"), "pycocotools")
    with_instance = _edited_val(dataset, tmp_path / "instance", "instances_val2017.json", lambda d: (
        d["categories"].append({"id": 99, "name": "star"}), d["annotations"][0].update(category_id=99)))
    with pytest.raises(UserError, match=r"lack: star \(id 99, 1 instances\)"):
        build_dataset(with_instance, "coco", "val", None, trained)


def test_predictions_files_are_written_whole_or_not_at_all(dataset, tmp_path, full_disk):
    ds = build_dataset(dataset, "coco", "val", None)
    evaluator = CocoEvaluator(ds.coco, category_map=ds.category_map, backend="pycocotools")
    evaluator.update(_noisy_outputs(ds))
    (tmp_path / "predictions_bbox.json").write_text("[]")
    full_disk(10)
    with pytest.raises(UserError, match=r"could not write .*predictions_bbox\.json: no space left on the device; "
                                        r"the checkpoints written so far are intact"):
        evaluator.write_results(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["predictions_bbox.json"]
    assert (tmp_path / "predictions_bbox.json").read_text() == "[]"


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_images_evaluated_are_scored(tiny_dataset, backend):
    """Images left out of an evaluation (unreadable ones) must not count their instances as missed."""
    ds = build_dataset(tiny_dataset, "coco", "val", None)  # no crowd regions, no boxes without extent
    evaluated = [image_id for image_id in ds.ids if ds.coco.getAnnIds(imgIds=[image_id])][:1]
    evaluator = CocoEvaluator(ds.coco, ("bbox",), ds.category_map, backend=backend)
    for image_id in evaluated:  # the ground truth's own boxes (x, y, w, h) as detections
        anns = ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=[image_id]))
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64)
        boxes[:, 2:] += boxes[:, :2]
        labels = torch.tensor([ds.category_map.label(a["category_id"]) for a in anns])
        evaluator.update({image_id: {"boxes": boxes, "labels": labels, "scores": torch.ones(len(anns))}})
    assert len(evaluated) < len(ds.ids) and evaluator.summarize()["bbox"]["AP"] == pytest.approx(1.0)


def test_a_table_of_many_categories_shows_the_highest_and_lowest_ap():
    segm = {f"c{i:03d}": i / 100 for i in range(50)}
    metrics = {"bbox": {"per_category": {**segm, "c_box_only": 1.0}}, "segm": {"per_category": segm}}
    title, _, *rows = format_per_category(metrics).splitlines()
    assert title == ("AP per category: the 20 highest and 20 lowest segm AP of 51 categories (each one's is in "
                     "metrics.jsonl)")
    shown = [row.split()[0] for row in rows]
    lowest = [f"c{i:03d}" for i in range(18, -1, -1)] + ["c_box_only"]  # no mask AP: lowest, shown as n/a
    assert shown == [f"c{i:03d}" for i in range(49, 29, -1)] + ["..."] + lowest
    assert rows[20] == "... 11 more" and rows[-1].split()[-1] == "n/a", "51 = 20 + 11 + 20"
    few = {"bbox": {"per_category": {"b": 0.1, "a": 0.2}}}
    assert [row.split()[0] for row in format_per_category(few).splitlines()[2:]] == ["a", "b"], "by name"


def test_the_per_category_table_lines_up_wide_characters_and_combining_marks():
    wide, accented, thai = "\u4e09\u89d2\u5f62", "cafe\u0301", "\u0e01\u0e31"  # 6 columns; 4; a letter and its mark: 1
    names = {"disc": 0.5, wide: 0.25, "Scheibe \u00f8": 0.125, accented: None, thai: 1.0}
    metrics = {"bbox": {"per_category": {n: v for n, v in names.items() if v is not None}},
               "segm": {"per_category": {n: v or 0.0 for n, v in names.items()}}}
    header, *rows = format_per_category(metrics).splitlines()[1:]
    assert header == "category     bbox    segm"
    assert rows == ["Scheibe \u00f8   0.125   0.125", f"{accented}          n/a   0.000", "disc        0.500   0.500",
                    f"{thai}           1.000   1.000", f"{wide}      0.250   0.250"]


def _crowded_ground_truth(instances: int = 150) -> COCO:
    """Two images of `instances` boxes of one category (and a few of another) in a grid, none overlapping."""
    rng = np.random.default_rng(0)
    images, anns = [], []
    for image_id in (1, 2):
        images.append({"id": image_id, "width": 640, "height": 480, "file_name": f"{image_id}.jpg"})
        for k in range(instances + 6):
            side = rng.uniform(8, 28)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1 if k < instances else 2,
                         "bbox": [(k % 20) * 32.0, (k // 20) * 32.0, side, side], "area": side * side,
                         "iscrowd": 0})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": 1, "name": "item"}, {"id": 2, "name": "tag"}, {"id": 3, "name": "spare"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _ground_truth_as_detections(coco: COCO, noise: float = 0.0) -> list[dict]:
    rng = np.random.default_rng(1)
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "score": float(rng.uniform(0.1, 1)),
             "bbox": [v + float(rng.normal(0, noise)) for v in a["bbox"]]} for a in coco.dataset["annotations"]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_summary_of_other_max_dets_takes_cocoevals_own_at_100(backend):
    coco = _crowded_ground_truth()
    detections = _ground_truth_as_detections(coco, noise=2.0)
    # A category without ground truth, whose precision and recall COCOeval leaves at -1 (not counted).
    detections += [{**d, "category_id": 3, "score": d["score"] / 2} for d in detections[:20]]
    evaluator = score(coco, detections, "bbox", [1, 2], backend)
    assert 0 < evaluator.stats[0] < 1
    assert np.array_equal(summary_stats(evaluator, 100), np.asarray(evaluator.stats))


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_max_dets_score_every_instance_of_a_crowded_image(backend, capsys):
    coco = _crowded_ground_truth()
    detections = _ground_truth_as_detections(coco)
    capped = score(coco, detections, "bbox", [1, 2], backend)
    assert capped.stats[0] < 0.9 and capped.stats[8] == pytest.approx((100 / 150 + 1) / 2)  # item, tag
    everything = score(coco, detections, "bbox", [1, 2], backend, max_dets=300)
    assert everything.stats[0] == pytest.approx(1.0) and everything.stats[8] == pytest.approx(1.0)
    assert everything.stats[6] < everything.stats[7] < 1  # AR1 and AR10 still count 1 and 10
    fewer = score(coco, detections, "bbox", [1, 2], backend, max_dets=50)
    assert fewer.stats[8] == pytest.approx((50 / 150 + 1) / 2) and fewer.stats[0] < capped.stats[0]

    evaluator = CocoEvaluator(coco, ("bbox",), CategoryMap.from_categories(coco.dataset["categories"], "custom"),
                              backend, max_dets=300)
    for image_id in (1, 2):
        anns = coco.imgToAnns[image_id]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64)
        boxes[:, 2:] += boxes[:, :2]
        evaluator.update({image_id: {"boxes": boxes, "scores": torch.linspace(1, 0.5, len(anns)),
                                     "labels": torch.tensor([a["category_id"] for a in anns])}})
    metrics = evaluator.summarize()["bbox"]
    assert tuple(name for name in metrics if name != "per_category") == metric_names("bbox", 300)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AR300"] == pytest.approx(1.0)
    assert metrics["per_category"] == {"item": pytest.approx(1.0), "tag": pytest.approx(1.0)}
    printed = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=300 ] = 1.000" in printed
    assert "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets= 10 ]" in printed


def test_the_recall_at_the_most_detections_is_named_by_their_number():
    assert metric_names("bbox") == METRIC_NAMES and metric_names("segm", 100)[8] == "AR100"
    assert metric_names("segm", 300)[8] == "AR300" and metric_names("keypoints", 300)[5] == "AR"


def test_ids_faster_coco_eval_cannot_read_are_said_once_whatever_the_evaluations(capsys):
    coco = COCO()
    coco.dataset = {"images": [{"id": "a", "width": 4, "height": 4}], "categories": [{"id": 1, "name": "x"}],
                    "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    coco_eval._say_scoring_with_pycocotools.cache_clear()
    assert [coco_eval.backend_for(coco, "faster") for _ in range(3)] == ["pycocotools"] * 3
    assert capsys.readouterr().out.count("scoring with pycocotools") == 1


def test_the_references_calls_score_as_ours_and_keep_each_cocoeval(dataset, capsys):
    """A script written against torchvision's reference: CocoEvaluator(coco, iou_types) on
    get_coco_api_from_dataset's index (labels numbered 1..K here, not category ids), one-element tensor image ids
    as keys, then synchronize, accumulate, summarize and coco_eval[iou_type].stats."""
    ds = build_dataset(dataset, "coco", "val", None)
    assert not ds.category_map.keep_ids
    outputs = _noisy_outputs(ds, seed=4)
    ours = CocoEvaluator(ds.coco, category_map=ds.category_map)
    ours.update(outputs)
    expected = ours.summarize()
    assert not ours.accumulated and ours.coco_eval["segm"].eval == {}, "summarize() alone keeps no scored COCOeval"
    theirs = CocoEvaluator(get_coco_api_from_dataset(ds), ["bbox", "segm"])
    theirs.update({torch.tensor([image_id]): output for image_id, output in outputs.items()})
    theirs.synchronize_between_processes()
    theirs.accumulate()
    assert set(theirs.coco_eval) == {"bbox", "segm"}
    assert theirs.summarize() == expected
    for iou_type in ("bbox", "segm"):
        assert list(theirs.coco_eval[iou_type].stats) == [expected[iou_type][m] for m in METRIC_NAMES]
        assert theirs.coco_eval[iou_type].eval["precision"].shape[2] == len(ds.category_map.ids)
    assert expected["bbox"]["AP"] > 0.2
    assert [r["image_id"] for r in theirs.results("bbox")][:1] == [min(ds.ids)], "ids as plain ints"


def test_a_script_may_choose_the_categories_scored_as_the_references_evaluator_allows(dataset):
    ds = build_dataset(dataset, "coco", "val", None)
    outputs = _noisy_outputs(ds, seed=4)
    evaluator = CocoEvaluator(ds.coco, ["bbox"])
    chosen = sorted(ds.coco.getCatIds())[:2]
    evaluator.coco_eval["bbox"].params.catIds = chosen
    evaluator.update(outputs)
    evaluator.accumulate()
    metrics = evaluator.summarize()["bbox"]
    assert list(evaluator.coco_eval["bbox"].params.catIds) == chosen
    assert set(metrics["per_category"]) == {ds.coco.cats[i]["name"] for i in chosen}
    evaluator.accumulate()  # again (a script may): the same categories, though the scored params differ
    assert evaluator.summarize()["bbox"] == metrics
    changed = CocoEvaluator(ds.coco, ["bbox"])
    changed.coco_eval["bbox"].params.maxDets = [1, 10, 300]
    changed.update(outputs)
    with pytest.raises(ValueError, match=r"coco_eval\['bbox'\].params.maxDets was changed: .* only catIds may be"):
        changed.accumulate()
    more = CocoEvaluator(ds.coco, ["bbox"], max_dets=300)  # its scored COCOeval counts (1, 10, 300)
    more.update(outputs)
    more.accumulate()
    more.accumulate()


def test_the_main_process_alone_may_accumulate_and_summarize(dataset, tmp_path):
    """As scripts that gather predictions to rank 0 do: no collective waits for the other rank."""
    ds = build_dataset(dataset, "coco", "val", None)
    outputs = _noisy_outputs(ds, seed=4)

    def work(rank: int):
        evaluator = CocoEvaluator(ds.coco, ["bbox"])
        if rank == 0:
            evaluator.update(outputs)
            evaluator.accumulate()
            return round(evaluator.summarize()["bbox"]["AP"], 12)
        return None

    alone = CocoEvaluator(ds.coco, ["bbox"])
    alone.update(outputs)
    assert in_two_processes(tmp_path, work) == {0: round(alone.summarize()["bbox"]["AP"], 12), 1: None}


def test_a_plain_cocos_labels_are_its_category_ids(dataset):
    coco = COCO(str(Path(dataset) / "annotations" / "instances_val2017.json"))
    evaluator = CocoEvaluator(coco, ("bbox",))
    ids = sorted(coco.cats)
    assert evaluator.category_map.keep_ids and evaluator.category_map.category_id(ids[-1]) == ids[-1]
    with pytest.raises(ValueError, match="iou_types 'bbox': give a sequence of bbox, segm, keypoints"):
        CocoEvaluator(coco, "bbox")
    with pytest.raises(ValueError, match=r"iou_types \('boxes',\)"):
        CocoEvaluator(coco, ("boxes",))
    unnamed = COCO()
    unnamed.dataset = {**coco.dataset, "categories": [{"id": i} for i in ids]}  # as the reference's own are made
    with contextlib.redirect_stdout(io.StringIO()):
        unnamed.createIndex()
    evaluator = CocoEvaluator(unnamed, ("bbox",))
    assert evaluator.category_map.names == tuple(str(i) for i in ids)


def _federated_ground_truth(lists: bool = True) -> COCO:
    """Two images annotated as LVIS's are: image 1 checked for owls (none there) and with dogs not all annotated;
    yaks checked in image 2 only. Categories of each frequency group."""
    images = [{"id": 1, "height": 100, "width": 100}, {"id": 2, "height": 100, "width": 100}]
    if lists:
        images[0].update(neg_category_ids=[3], not_exhaustive_category_ids=[2])
        images[1].update(neg_category_ids=[], not_exhaustive_category_ids=[])
    boxes = [(1, 1, [10, 10, 20, 20]), (1, 2, [50, 50, 20, 20]), (2, 3, [10, 10, 30, 30]), (2, 4, [60, 60, 20, 20])]
    anns = [{"id": i, "image_id": image, "category_id": category, "bbox": box, "area": box[2] * box[3],
             "iscrowd": 0} for i, (image, category, box) in enumerate(boxes, start=1)]
    categories = [{"id": i, "name": name, "frequency": frequency}
                  for i, name, frequency in ((1, "cat", "f"), (2, "dog", "c"), (3, "owl", "r"), (4, "yak", "r"))]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _federated_detections(owl_score: float = 0.9) -> dict:
    """Image 1: the cat and the dog found, a dog where none is annotated, an owl (checked: absent), a yak (not
    checked there); image 2: the owl and the yak found."""
    def output(detections):
        boxes = torch.tensor([box for _, box, _ in detections], dtype=torch.float32)
        boxes[:, 2:] += boxes[:, :2]
        return {"boxes": boxes, "labels": torch.tensor([label for label, _, _ in detections]),
                "scores": torch.tensor([score for _, _, score in detections])}

    return {1: output([(1, [10, 10, 20, 20], 0.9), (2, [50, 50, 20, 20], 0.8), (2, [0, 80, 15, 15], 0.95),
                       (3, [60, 0, 20, 20], owl_score), (4, [30, 30, 10, 10], 0.99)]),
            2: output([(3, [10, 10, 30, 30], 0.5), (4, [60, 60, 20, 20], 0.5)])}


def _bbox_metrics(coco: COCO, outputs: dict, **options) -> dict:
    evaluator = CocoEvaluator(coco, ("bbox",), **options)
    evaluator.update(outputs)
    return evaluator.summarize()["bbox"]


def test_a_federated_file_is_scored_as_lvis_scores_it(capsys):
    pytest.importorskip("faster_coco_eval")
    coco_eval._say_scored_as_lvis.cache_clear()  # said once a process
    metrics = _bbox_metrics(_federated_ground_truth(), _federated_detections(), max_dets=300)
    # the unannotated dog counts neither way, the yak of image 1 is left out, the owl of image 1 is false
    assert metrics["per_category"] == pytest.approx({"cat": 1.0, "dog": 1.0, "owl": 0.5, "yak": 1.0})
    assert metrics["AP"] == pytest.approx(3.5 / 4) and metrics["AR300"] == 1.0
    assert (metrics["APr"], metrics["APc"], metrics["APf"]) == pytest.approx((0.75, 1.0, 1.0))
    assert tuple(name for name in metrics if name != "per_category") == metric_names("bbox", 300, federated=True)
    printed = capsys.readouterr().out
    assert "Scored as LVIS's federated evaluation" in printed and "at most 300 detections an image" in printed
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=300 catIds=  r ] = 0.750" in printed

    plain = _bbox_metrics(_federated_ground_truth(lists=False), _federated_detections(), max_dets=300)
    assert plain["per_category"] == pytest.approx({"cat": 1.0, "dog": 0.5, "owl": 0.5, "yak": 0.5}), (
        "COCO's scoring counts both as false")
    assert "APr" not in plain


def test_federated_scoring_keeps_each_images_most_detections_over_all_categories():
    pytest.importorskip("faster_coco_eval")
    metrics = _bbox_metrics(_federated_ground_truth(), _federated_detections(owl_score=0.85), max_dets=3)
    # image 1 keeps the yak, the unannotated dog and the cat: its annotated dog and its owl are cut
    assert metrics["per_category"] == pytest.approx({"cat": 1.0, "dog": 0.0, "owl": 1.0, "yak": 1.0})
    assert metrics["AR3"] == pytest.approx(0.75)


def test_a_federated_file_needs_faster_coco_eval(monkeypatch):
    monkeypatch.setattr(coco_eval, "resolve_backend", lambda name: "pycocotools")
    with pytest.raises(UserError, match="annotated as LVIS's .* which faster-coco-eval scores: pip install "
                                        "faster-coco-eval"):
        CocoEvaluator(_federated_ground_truth(), ("bbox",))
    assert CocoEvaluator(_federated_ground_truth(lists=False), ("bbox",)).backend == "pycocotools"


def test_masks_of_an_image_without_instances_or_checked_categories_are_left_out_not_failed(capsys):
    """faster-coco-eval fails on masks of an image whose detections it leaves out all of; LVIS leaves them out."""
    pytest.importorskip("faster_coco_eval")
    coco = COCO()
    square = [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]]
    coco.dataset = {
        "images": [{"id": 1, "height": 40, "width": 40, "neg_category_ids": [], "not_exhaustive_category_ids": []},
                   {"id": 2, "height": 40, "width": 40, "neg_category_ids": [], "not_exhaustive_category_ids": []}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400.0,
                         "iscrowd": 0, "segmentation": square}],
        "categories": [{"id": 1, "name": "a", "frequency": "f"}, {"id": 2, "name": "b", "frequency": "r"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    masks = torch.zeros(1, 1, 40, 40)
    masks[..., 10:30, 10:30] = 1.0
    found = {"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]), "scores": torch.tensor([0.9]), "masks": masks}
    evaluator = CocoEvaluator(coco, ("bbox", "segm"))
    evaluator.update({1: {**found, "labels": torch.tensor([1])}, 2: {**found, "labels": torch.tensor([2])}})
    metrics = evaluator.summarize()
    assert metrics["segm"]["AP"] == pytest.approx(1.0) and metrics["bbox"]["AP"] == pytest.approx(1.0)
    assert [r["image_id"] for r in evaluator.results("segm")] == [1, 2], "written, though not scored"

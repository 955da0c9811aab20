"""tools/score_predictions.py scores a results file as train.py's evaluation scores the same detections."""

import json

import pycocotools.mask as mask_utils
import pytest
from test_coco_eval import _federated_detections, _federated_ground_truth, _keypoint_outputs, _noisy_outputs

from coco_eval import CocoEvaluator
from coco_utils import build_dataset
from conftest import run_cli
from tools import score_predictions

VAL = "annotations/instances_val2017.json"


def _score(capsys, *args: str) -> tuple[int, str, str]:
    status = score_predictions.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _write(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def test_a_runs_own_predictions_score_as_its_evaluation_did(dataset, tmp_path, capsys):
    ds = build_dataset(dataset, "coco", "val", None)  # crowds, empty images, boxes the loader repairs
    evaluator = CocoEvaluator(ds.coco, category_map=ds.category_map, backend="pycocotools")
    evaluator.update(_noisy_outputs(ds))
    evaluated = evaluator.summarize()
    evaluation_tables = capsys.readouterr().out
    bbox, segm = evaluator.write_results(tmp_path)
    done = run_cli("tools/score_predictions.py", str(segm), str(bbox), "--data-path", str(dataset),
                   "--coco-backend", "pycocotools", "--output", str(tmp_path / "scores.json"))
    assert done.returncode == 0, done.stderr
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert {t: scores[t] for t in ("bbox", "segm")} == evaluated, "the same numbers, per category too"
    assert scores["predictions"] == {"bbox": str(bbox), "segm": str(segm)} and scores["val_images"] == len(ds.ids)
    assert evaluation_tables.split("IoU metric: bbox", 1)[1] in done.stdout, "the same tables"


def test_keypoints_score_as_their_evaluation_did(keypoint_dataset, tmp_path, capsys):
    ds = build_dataset(keypoint_dataset, "coco_kp", "val", None)
    evaluator = CocoEvaluator(ds.coco, ("bbox", "keypoints"), ds.category_map, backend="pycocotools")
    evaluator.update(_keypoint_outputs(keypoint_dataset))
    evaluated = evaluator.summarize()
    paths = evaluator.write_results(tmp_path)
    status, out, err = _score(capsys, *paths, "--data-path", keypoint_dataset, "--dataset", "coco_kp",
                              "--coco-backend", "pycocotools", "--output", tmp_path / "scores.json")
    assert status == 0, err
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert {t: scores[t] for t in ("bbox", "keypoints")} == evaluated and evaluated["keypoints"]["AP"] > 0.5


def test_a_file_of_boxes_and_masks_is_scored_as_both(tiny_dataset, tmp_path, capsys):
    data = json.loads((tiny_dataset / VAL).read_text())
    polygons = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9, "bbox": a["bbox"],
                 "segmentation": a["segmentation"]} for a in data["annotations"]]
    sizes = {image["id"]: (image["height"], image["width"]) for image in data["images"]}
    as_rle = [{**record, "segmentation": mask_utils.merge(mask_utils.frPyObjects(record["segmentation"],
                                                                                 *sizes[record["image_id"]]))}
              for record in polygons]
    for record in as_rle:
        record["segmentation"]["counts"] = record["segmentation"]["counts"].decode()
    for records in (polygons, as_rle):  # Detectron2 writes RLE; polygons are taken too
        path = _write(tmp_path / "coco_instances_results.json", records)
        status, out, _ = _score(capsys, path, "--val-annotations", tiny_dataset / VAL, "--output",
                                tmp_path / "scores.json")
        assert status == 0 and "IoU metric: bbox" in out and "IoU metric: segm" in out
        scores = json.loads((tmp_path / "scores.json").read_text())
        assert scores["bbox"]["AP"] == scores["segm"]["AP"] == 1.0, "the ground truth itself"
    status, out, _ = _score(capsys, path, "--val-annotations", tiny_dataset / VAL, "--iou-types", "segm")
    assert status == 0 and "IoU metric: segm" in out and "IoU metric: bbox" not in out


def test_an_lvis_file_is_scored_as_lvis_scores_it(tmp_path, capsys):
    pytest.importorskip("faster_coco_eval")
    ground_truth = _federated_ground_truth().dataset
    for image in ground_truth["images"]:
        image["file_name"] = f"{image['id']}.jpg"
    records = []
    for image_id, output in _federated_detections().items():
        for box, label, score in zip(output["boxes"].tolist(), output["labels"].tolist(), output["scores"].tolist()):
            records.append({"image_id": image_id, "category_id": label, "score": score,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    status, out, err = _score(capsys, _write(tmp_path / "p.json", records), "--val-annotations",
                              _write(tmp_path / "lvis.json", ground_truth), "--eval-max-dets", "300", "--output",
                              tmp_path / "scores.json")
    assert status == 0, err
    metrics = json.loads((tmp_path / "scores.json").read_text())["bbox"]
    assert metrics["per_category"] == pytest.approx({"cat": 1.0, "dog": 1.0, "owl": 0.5, "yak": 1.0})
    assert (metrics["AP"], metrics["APr"]) == pytest.approx((0.875, 0.75)), "as test_coco_eval's hand count"
    assert "catIds=  r" in out and "give --eval-max-dets" not in out
    status, out, _ = _score(capsys, tmp_path / "p.json", "--val-annotations", tmp_path / "lvis.json")
    assert status == 0 and "this scoring counts 100: give --eval-max-dets 300 for AP comparable with LVIS's" in out


def _boxes_of_ground_truth(data: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9, "bbox": a["bbox"]}
            for a in data["annotations"]]


def test_detections_of_unknown_categories_are_left_out_with_a_warning(tiny_dataset, tmp_path, capsys):
    data = json.loads((tiny_dataset / VAL).read_text())
    records = _boxes_of_ground_truth(data)
    stray = {**records[0], "category_id": 999}
    status, out, err = _score(capsys, _write(tmp_path / "p.json", records[:1] + [stray]), "--val-annotations",
                              tiny_dataset / VAL)
    assert status == 0
    assert "1 of 2 detections have category ids that are no category of the annotation file (999: 1) and are " \
           "left out" in err
    assert "1 of the annotation file's 2 images have no detection, so their instances count as missed" in out
    status, _, err = _score(capsys, _write(tmp_path / "p.json", [stray]), "--val-annotations", tiny_dataset / VAL)
    assert status == 2 and "1 of 1 detections have category ids that are no category" in err, "none left: an error"


def test_mmdetections_two_files_give_boxes_from_one_and_masks_from_the_other(tiny_dataset, tmp_path, capsys):
    """MMDetection writes each mask's box into its masks' file as well (Detectron2 writes one file of both)."""
    data = json.loads((tiny_dataset / VAL).read_text())
    boxes = _boxes_of_ground_truth(data)
    masks = [{**box, "bbox": [0, 0, 1, 1], "segmentation": a["segmentation"]}  # boxes that would score 0
             for box, a in zip(boxes, data["annotations"])]
    paths = _write(tmp_path / "r.segm.json", masks), _write(tmp_path / "r.bbox.json", boxes)
    status, out, err = _score(capsys, *paths, "--val-annotations", tiny_dataset / VAL, "--output",
                              tmp_path / "scores.json")
    assert status == 0, err
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["predictions"] == {"bbox": paths[1], "segm": paths[0]}
    assert scores["bbox"]["AP"] == scores["segm"]["AP"] == 1.0
    assert out.count("images have no detection") <= 1, "said once a file"
    copy = _write(tmp_path / "copy.bbox.json", boxes)
    status, _, err = _score(capsys, paths[1], copy, "--val-annotations", tiny_dataset / VAL)
    assert status == 2 and "both hold bbox detections; give one file of each IoU type" in err


def test_a_type_some_detections_lack_is_said_not_scored(tiny_dataset, tmp_path, capsys):
    data = json.loads((tiny_dataset / VAL).read_text())
    records = _boxes_of_ground_truth(data)
    records[0]["segmentation"] = data["annotations"][0]["segmentation"]
    status, out, _ = _score(capsys, _write(tmp_path / "p.json", records), "--val-annotations", tiny_dataset / VAL)
    assert status == 0 and "IoU metric: segm" not in out
    assert f"segm is not scored from this file: {len(records) - 1} of its {len(records)} detections have no " \
           f"segmentation" in out


def test_a_faulty_file_stops_it_in_one_line_before_anything_is_scored(tiny_dataset, tmp_path, capsys):
    data = json.loads((tiny_dataset / VAL).read_text())
    records = [{"image_id": 123456, "category_id": data["categories"][0]["id"], "score": 1, "bbox": [0, 0, 5, 5]}]
    status, out, err = _score(capsys, _write(tmp_path / "p.json", records), "--val-annotations", tiny_dataset / VAL)
    assert status == 2 and err.count("\n") == 1 and "IoU metric" not in out
    assert err.startswith(f"error: {tmp_path / 'p.json'}: 1 of 1 detections have an image_id that is no image of "
                          f"the annotation file")
    both = [{**box, "segmentation": a["segmentation"]} for box, a in zip(_boxes_of_ground_truth(data),
                                                                        data["annotations"])]
    both[-1]["segmentation"] = {"size": [1, 1], "counts": "01"}
    status, out, err = _score(capsys, _write(tmp_path / "p.json", both), "--val-annotations", tiny_dataset / VAL)
    assert status == 2 and "have a segmentation that is RLE of size [1, 1]" in err
    assert out == "", "the boxes are not scored first"


def test_a_keypoints_file_against_an_instances_file_says_what_scoring_needs(tiny_dataset, tmp_path, capsys):
    data = json.loads((tiny_dataset / VAL).read_text())
    records = [{**box, "keypoints": [0] * 51} for box in _boxes_of_ground_truth(data)]
    status, _, err = _score(capsys, _write(tmp_path / "p.json", records), "--val-annotations", tiny_dataset / VAL,
                            "--iou-types", "keypoints")
    assert status == 2 and "keypoint scoring needs one category with COCO's 17 person keypoints" in err


def test_output_is_a_regular_file_and_links_are_written_through(tiny_dataset, tmp_path, capsys):
    data = json.loads((tiny_dataset / VAL).read_text())
    path = _write(tmp_path / "p.json", _boxes_of_ground_truth(data))
    (tmp_path / "link.json").symlink_to(tmp_path / "target.json")
    status, out, err = _score(capsys, path, "--val-annotations", tiny_dataset / VAL, "--output",
                              tmp_path / "link.json")
    assert status == 0, err
    assert (tmp_path / "link.json").is_symlink() and json.loads((tmp_path / "target.json").read_text())["bbox"]
    for given, message in [("/dev/null", "--output /dev/null is no regular file"),
                           ("", "--output '' is no file name"), (str(tmp_path), "is no file name")]:
        status, out, err = _score(capsys, path, "--val-annotations", tiny_dataset / VAL, "--output", given)
        assert status == 2 and message in err and out == "", given


def test_a_type_no_file_has_or_a_missing_file_is_refused(tiny_dataset, tmp_path, capsys):
    data = json.loads((tiny_dataset / VAL).read_text())
    boxes = _write(tmp_path / "boxes.json", _boxes_of_ground_truth(data))
    status, _, err = _score(capsys, boxes, "--val-annotations", tiny_dataset / VAL, "--iou-types", "segm")
    assert status == 2 and "--iou-types segm: no file's detections all carry segmentation" in err
    status, _, err = _score(capsys, tmp_path / "none.json", "--val-annotations", tiny_dataset / VAL)
    assert status == 2 and "none.json: no such file" in err
    status, _, err = _score(capsys, boxes, "--data-path", tmp_path)
    assert status == 2 and "annotations/instances_val2017.json is missing; give --val-annotations FILE" in err


def test_predicts_file_cut_at_its_score_threshold_is_noted(tiny_dataset, tmp_path, capsys):
    data = json.loads((tiny_dataset / VAL).read_text())
    path = _write(tmp_path / "predictions.json", _boxes_of_ground_truth(data))
    for threshold, said in [(0.05, False), (0.5, True)]:
        _write(tmp_path / "predict_args.json", {"model": "maskrcnn_resnet50_fpn", "score_thresh": threshold})
        status, out, _ = _score(capsys, path, "--val-annotations", tiny_dataset / VAL)
        assert status == 0
        assert ("written by tools/predict.py with --score-thresh 0.5, so the detections scoring below it are not "
                "there" in out) is said, threshold


def test_ids_that_look_zero_based_are_said_so(tmp_path, capsys):
    categories = [{"id": i, "name": f"c{i}"} for i in (1, 2, 3)]
    images = [{"id": 1, "height": 50, "width": 50, "file_name": "1.jpg"}]
    anns = [{"id": i, "image_id": 1, "category_id": i, "bbox": [10 * i, 0, 8, 8], "area": 64, "iscrowd": 0}
            for i in (1, 2, 3)]
    ground_truth = _write(tmp_path / "gt.json", {"images": images, "annotations": anns, "categories": categories})
    shifted = [{"image_id": 1, "category_id": a["category_id"] - 1, "score": 0.9, "bbox": a["bbox"]} for a in anns]
    status, _, err = _score(capsys, _write(tmp_path / "p.json", shifted), "--val-annotations", ground_truth)
    assert status == 0 and "the ids look like 0-based class indices" in err and "add 1 to each id" in err
    status, _, err = _score(capsys, _write(tmp_path / "p.json", shifted + [{**shifted[0], "category_id": 7}]),
                            "--val-annotations", ground_truth)
    assert status == 0 and "0-based" not in err, "an id past the last category: not merely shifted"


def test_our_files_are_scored_at_their_runs_eval_max_dets_unless_given(tiny_dataset, tmp_path, capsys):
    data = json.loads((tiny_dataset / VAL).read_text())
    path = _write(tmp_path / "predictions_bbox.json", _boxes_of_ground_truth(data))
    scored = tmp_path / "scores.json"
    _write(tmp_path / "evaluation.json", {"settings": {"eval_max_dets": 300}})
    status, out, _ = _score(capsys, path, "--val-annotations", tiny_dataset / VAL, "--output", scored)
    assert status == 0 and f"As the run that wrote them ({tmp_path / 'evaluation.json'}): --eval-max-dets 300" in out
    assert "AR300" in json.loads(scored.read_text())["bbox"]
    status, out, _ = _score(capsys, path, "--val-annotations", tiny_dataset / VAL, "--eval-max-dets", "100",
                            "--output", scored)
    assert status == 0 and "As the run" not in out and "AR100" in json.loads(scored.read_text())["bbox"]
    _write(tmp_path / "args.json", {"args": {"eval_max_dets": 150}})
    status, _, err = _score(capsys, path, "--val-annotations", tiny_dataset / VAL)
    assert status == 2 and "different numbers of detections (300 in" in err and "give --eval-max-dets" in err

"""A results file is read and checked against its annotation file before it is scored."""

import contextlib
import io
import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from pycocotools.coco import COCO

from errors import UserError
from results_file import checked_records, iou_types_in, read_results


def _ground_truth() -> COCO:
    """Two images of 8 x 10 pixels; a shape category and a person with two keypoints."""
    coco = COCO()
    coco.dataset = {"images": [{"id": 1, "height": 8, "width": 10}, {"id": 2, "height": 8, "width": 10}],
                    "annotations": [],
                    "categories": [{"id": 3, "name": "disc"}, {"id": 7, "name": "person", "keypoints": ["a", "b"]}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _record(**fields) -> dict:
    return {"image_id": 1, "category_id": 3, "score": 0.5, **fields}


@pytest.mark.parametrize("content, message", [
    ({"images": [], "annotations": [], "categories": []}, "is an annotation file, not predictions: give a COCO "
                                                          "results file"),
    ({"detections": []}, "is no COCO results file: it must be a JSON list of detections"),
    ([{"image_id": 1}, 3], "is no COCO results file"),
])
def test_a_file_that_holds_no_list_of_detections_is_refused(tmp_path, content, message):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(content))
    with pytest.raises(UserError, match=message):
        read_results(path)


def test_an_unreadable_file_is_refused_naming_it(tmp_path):
    with pytest.raises(UserError, match="none.json: no such file"):
        read_results(tmp_path / "none.json")
    (tmp_path / "cut.json").write_text('[{"image_id": 1')
    with pytest.raises(UserError, match="cut.json is not readable JSON"):
        read_results(tmp_path / "cut.json")


def test_the_iou_types_are_the_geometries_every_detection_carries():
    rle = {"size": [8, 10], "counts": "P1"}
    assert iou_types_in([_record(bbox=[0, 0, 1, 1], segmentation=rle)] * 2) == ("bbox", "segm")
    assert iou_types_in([_record(bbox=[0, 0, 1, 1], segmentation=rle), _record(bbox=[0, 0, 1, 1])]) == ("bbox",)
    assert iou_types_in([_record(keypoints=[1, 1, 2])]) == ("keypoints",)
    assert iou_types_in([]) == ()


@pytest.mark.parametrize("iou_type, records, message", [
    ("bbox", [_record(bbox=[0, 0, 1, 1]), {"image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1]}],
     "1 of 2 detections lack score (the first: detection 1); each needs image_id, category_id, score"),
    ("bbox", [_record(image_id=9, bbox=[0, 0, 1, 1])] * 2,
     "2 of 2 detections have an image_id that is no image of the annotation file (the first: detection 0)"),
    ("bbox", [_record(image_id=[1], bbox=[0, 0, 1, 1])], "have an image_id that is neither a whole number nor"),
    ("bbox", [_record(image_id=True, bbox=[0, 0, 1, 1])], "have an image_id that is neither a whole number nor"),
    ("bbox", [_record(category_id=[3], bbox=[0, 0, 1, 1])], "have a category_id that is neither a whole number"),
    ("bbox", [_record(image_id="1", bbox=[0, 0, 1, 1])],
     "have an image_id written as a string where the annotation file has a number ('1' for 1) (the first: "
     "detection 0); "
     "write the ids as the annotation file has them"),
    ("bbox", [_record(category_id="3", bbox=[0, 0, 1, 1])], "have a category_id written as a string where"),
    ("bbox", [_record(score="0.5", bbox=[0, 0, 1, 1])], "have a score that is no finite number"),
    ("bbox", [_record(score=True, bbox=[0, 0, 1, 1])], "have a score that is no finite number"),
    ("bbox", [_record(score=float("inf"), bbox=[0, 0, 1, 1])], "have a score that is no finite number"),
    ("bbox", [_record(bbox=[0, 0, 1])], "have a bbox that is not 4 finite numbers"),
    ("bbox", [_record(bbox=[0, 0, 1, -1])],
     "width and height >= 0 (the first: detection 0); write boxes as COCO's [x, y, width, height]"),
    ("segm", [_record(segmentation={"size": [10, 8], "counts": "P1"})],
     "have a segmentation that is RLE of size [10, 8], not the image's [8, 10]"),
    ("segm", [_record(segmentation={"size": [8, 10], "counts": "1"})], "whose counts do not cover the image's 80"),
    ("segm", [_record(segmentation=[[0, 0, 4, 0]])], "is no polygons of 3 points or more"),
    ("segm", [_record(segmentation=[[1, 2, 3, 4, 1e300, 6]])],
     "has polygon points far outside the 10 x 8 image (more than its size beyond it)"),
    ("segm", [_record(segmentation=[[1, 2, 3, 4, 5, -1e8]])], "has polygon points far outside"),
    ("segm", [_record(segmentation=[{"size": [8, 10], "counts": "P1"}])], "is RLE inside a list"),
    ("segm", [_record(segmentation={"size": [8, 10], "counts": [40.0, 40.0]})],
     "is uncompressed RLE whose counts are not all whole numbers of 0 or more"),
    ("keypoints", [_record(category_id=7, keypoints=[1, 1, 2])],
     "have keypoints that are not 6 numbers (x, y, v for each of the category's)"),
])
def test_a_faulty_detection_is_refused_naming_the_first_and_their_count(iou_type, records, message):
    with pytest.raises(UserError) as raised:
        checked_records(records, _ground_truth(), iou_type, "p.json")
    assert str(raised.value).startswith("p.json: ") and message in str(raised.value)


def test_masks_are_scored_as_compressed_rle_whatever_form_they_came_in():
    mask = np.zeros((8, 10), dtype=np.uint8, order="F")
    mask[2:6, 3:9] = 1
    encoded = mask_utils.encode(mask)
    expected = {"size": [8, 10], "counts": encoded["counts"].decode()}
    polygon = [[3, 2, 9, 2, 9, 6, 3, 6]]  # the outline of the same pixels, as COCO draws polygons
    uncompressed = {"size": [8, 10], "counts": [int(n) for n in _run_counts(mask)]}
    records = [_record(segmentation=form, bbox=[0, 0, 1, 1], extra=1)
               for form in (expected, uncompressed, polygon)]
    kept, unknown = checked_records(records, _ground_truth(), "segm", "p.json")
    assert not unknown
    assert [record["segmentation"] for record in kept[:2]] == [expected, expected]
    assert mask_utils.area(kept[2]["segmentation"]) == mask_utils.area(expected) == 24
    assert set(kept[0]) == {"image_id", "category_id", "score", "segmentation"}, "the box is the mask's, not given"
    assert records[1]["segmentation"] is uncompressed, "the file's records are left as they were"


def test_an_empty_polygon_list_is_a_mask_of_no_pixels():
    kept, _ = checked_records([_record(segmentation=[])], _ground_truth(), "segm", "p.json")
    assert mask_utils.area(kept[0]["segmentation"]) == 0 and kept[0]["segmentation"]["size"] == [8, 10]


def _run_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE of a mask: run lengths in column order, starting with a run of zeros."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(edges).tolist()
    return runs if flat[0] == 0 else [0, *runs]


def test_detections_of_categories_the_file_lacks_are_counted_and_left_out():
    records = [_record(bbox=[0, 0, 1, 1]), _record(category_id=1, bbox=[0, 0, 1, 1]),
               _record(category_id=1, bbox="not looked at")]
    kept, unknown = checked_records(records, _ground_truth(), "bbox", "p.json")
    assert kept == [_record(bbox=[0, 0, 1, 1])] and unknown == {1: 2}

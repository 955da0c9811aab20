"""annotations.parse_json: msgspec's values where it reads the text, the standard library's where it does not;
annotation_findings: malformed entries are findings, never a traceback."""

from __future__ import annotations

import json
import math

import numpy as np
import pycocotools.mask as mask_utils
import pytest

import annotations

DOCUMENT = {"images": [{"id": 1, "file_name": "a.jpg", "width": 640, "height": 480}], "categories": [],
            "annotations": [{"id": 7, "bbox": [0.1, 2.5e-7, 1e300, -3], "segmentation": [[1, 2, 3.25]],
                             "name": "caf\u00e9 \U0001f600", "big": 2**80}]}


def test_msgspec_reads_what_the_standard_library_reads():
    if annotations.msgspec is None:
        pytest.skip("msgspec is not installed")
    raw = json.dumps(DOCUMENT).encode()
    assert annotations.msgspec.json.decode(raw) == json.loads(raw)
    assert annotations.parse_json(raw) == DOCUMENT


@pytest.mark.parametrize("raw", [b'{"bbox": [NaN, 1, Infinity, -Infinity]}', b"[1, 1e400]", b"\xef\xbb\xbf[1, 2]"])
def test_what_msgspec_refuses_the_standard_library_reads(raw):
    assert repr(annotations.parse_json(raw)) == repr(json.loads(raw))
    if annotations.msgspec is not None:
        with pytest.raises(annotations.msgspec.DecodeError):
            annotations.msgspec.json.decode(raw)


def test_not_json_is_the_standard_librarys_error(monkeypatch):
    with pytest.raises(json.JSONDecodeError, match="Expecting property name"):
        annotations.parse_json(b"{not json")
    monkeypatch.setattr(annotations, "msgspec", None)
    assert annotations.parse_json(json.dumps(DOCUMENT).encode()) == DOCUMENT
    assert math.isnan(annotations.parse_json(b"[NaN]")[0])


def _coco(**changes) -> dict:
    """A small sound COCO file: one 40x50 image with a polygon instance; changes edit its first entries."""
    data = {"images": [{"id": 1, "file_name": "a.jpg", "width": 50, "height": 40}],
            "categories": [{"id": 3, "name": "thing"}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 3, "bbox": [5, 5, 15, 15], "area": 225.0,
                             "iscrowd": 0, "segmentation": [[5, 5, 20, 5, 20, 20, 5, 20]]}]}
    for key, change in changes.items():
        change(data[key])
    return data


@pytest.mark.parametrize("changes, level, kind, text", [
    ({"annotations": lambda a: a.append("x")}, "error", annotations.STRUCTURE, "entry 1 is 'x', not a JSON object"),
    ({"images": lambda i: i[0].pop("id")}, "error", annotations.STRUCTURE, "'images' entry 0 has no 'id'"),
    ({"categories": lambda c: c[0].pop("id")}, "error", annotations.STRUCTURE, "'categories' entry 0 has no 'id'"),
    ({"images": lambda i: i[0].pop("width")}, "error", annotations.STRUCTURE, "has width None and height 40"),
    ({"images": lambda i: i[0].update(width=50.5)}, "error", annotations.STRUCTURE, "has width 50.5 and height 40"),
    ({"images": lambda i: i[0].update(height=True)}, "error", annotations.STRUCTURE, "has width 50 and height True"),
    ({"images": lambda i: i[0].update(width=50.0)}, "warning", "decimal size",
     "1 images have a width or height written as a decimal (first: a.jpg, 50.0x40); they are read as whole pixels"),
    ({"categories": lambda c: c[0].pop("name")}, "error", annotations.STRUCTURE, "category 3 has no 'name'"),
    ({"categories": lambda c: c.append({"id": 9, "name": "thing"}),
      "annotations": lambda a: a.append({**a[0], "id": 8, "category_id": 9})}, "warning",
     "category name twice", "1 category takes a name another category has (first: 'thing', ids 3 and 9)"),
    ({"annotations": lambda a: a.append({**a[0], "id": 8, "iscrowd": 1,
                                         "segmentation": {"size": [10, 10], "counts": "PP"}})}, "warning",
     "crowd format", "crowd region is RLE of size [10, 10], not the image's [40, 50]; COCO crowd regions are RLE"),
    ({"annotations": lambda a: a.append({**a[0], "id": 8, "iscrowd": 1, "segmentation": [
        {"size": [40, 50], "counts": "P"}]})}, "warning", "crowd format", "crowd region is RLE inside a list; write"),
    ({"annotations": lambda a: a.append({**a[0], "id": 8, "iscrowd": 1, "segmentation": []})}, "warning",
     "crowd format", "a.jpg annotation 8: crowd region is empty; COCO crowd regions are RLE"),
    ({"annotations": lambda a: a.append({**a[0], "id": 8, "iscrowd": 1})}, "warning", "crowd format",
     "a.jpg annotation 8: crowd region is polygons, not RLE; COCO crowd regions are RLE {'counts', 'size': [h, w]}"),
    ({"images": lambda i: i.append({**i[0], "id": 2}),
      "annotations": lambda a: a.append({**a[0], "id": 8, "image_id": 2})}, "warning", "file listed twice",
     "1 image entries name a file another entry names (first: a.jpg, ids 1 and 2)"),
    ({"images": lambda i: i.append({**i[0], "id": "b"})}, "error", annotations.STRUCTURE,
     "'images' ids mix numbers and strings (such as 'b'); give every entry of 'images' an id of one kind"),
    ({"categories": lambda c: c.append({**c[0], "id": "4"})}, "error", annotations.STRUCTURE,
     "'categories' ids mix numbers and strings (such as '4')"),
    ({"annotations": lambda a: a.append({**a[0], "id": 8, "category_id": "3"})}, "error", "unknown category id",
     "annotation 8 has category id '3', which is not in 'categories'"),
    ({"annotations": lambda a: a[0].update(segmentation={"size": [10, 10], "counts": "PP"})}, "warning",
     "segmentation format", "is RLE of size [10, 10], not the image's [40, 50]"),
    ({"annotations": lambda a: a[0].update(segmentation={"size": [40, 50]})}, "warning", "segmentation format",
     "neither polygons nor RLE"),
    ({"annotations": lambda a: a[0].update(segmentation={"size": [40, 50], "counts": [100, 30, 100]})}, "warning",
     "segmentation format", "is uncompressed RLE whose counts do not add up to the image's 2000 pixels"),
    ({"annotations": lambda a: a[0].update(segmentation={"size": [40, 50], "counts": [2100, -100]})}, "warning",
     "segmentation format", "is uncompressed RLE whose counts are not all whole numbers of 0 or more"),
    ({"annotations": lambda a: a[0].update(segmentation={"size": [40, 50], "counts": [1000.0, 1000.0]})},
     "warning", "segmentation format", "is uncompressed RLE whose counts are not all whole numbers of 0 or more"),
    ({"annotations": lambda a: a[0].update(segmentation={"size": [40, 50], "counts": "0"})}, "warning",
     "segmentation format", "is compressed RLE whose counts do not cover the image's 2000 pixels"),
    ({"annotations": lambda a: a[0].update(segmentation={"size": [40, 50], "counts": 2000})}, "warning",
     "segmentation format", "has RLE counts that are neither a list of numbers nor a compressed string"),
    ({"annotations": lambda a: a[0].update(segmentation=[5, 5, 20, 5, 20, 20])}, "warning", "flat polygon",
     "read as one polygon"),
    ({"annotations": lambda a: a[0].update(segmentation=[[5, 5, 20, 5, 20, 20], 3])}, "warning",
     "segmentation format", "neither a list of polygons"),
    ({"annotations": lambda a: a[0].pop("area")}, "warning", "no area", "computed from the outline"),
    ({"annotations": lambda a: a[0].update(bbox=[1, 2, 3])}, "warning", "box not finite", "not 4 finite numbers"),
    ({"images": lambda i: i[0].update(id=[1])}, "error", annotations.STRUCTURE,
     "'images' entry 0 has id [1]; an id is a number or a string"),
    ({"annotations": lambda a: a[0].update(segmentation=[[5, 5, 20, 5, 20, 20], {"size": [40, 50], "counts": "P"}])},
     "warning", "segmentation format", "neither a list of polygons"),
    ({"annotations": lambda a: a[0].update(segmentation=[{"size": [10, 50], "counts": [500]}])}, "warning",
     "segmentation format", "is RLE inside a list; write the {'counts', 'size'} object itself (which then is RLE of "
                            "size [10, 50], not the image's [40, 50])"),
    ({"annotations": lambda a: a[0].update(segmentation=[[5, 5, 20, 5, 20, "20"]])}, "warning",
     "segmentation format", "has a polygon whose coordinates are not all finite numbers"),
    ({"annotations": lambda a: a[0].update(segmentation=[[5, 5, 20, 5, 20, float("nan"), 3]])}, "warning",
     "segmentation format", "has a polygon whose coordinates are not all finite numbers"),
    ({"annotations": lambda a: a[0].update(segmentation=[[5, 5, 20, 5, 20, [20]]])}, "warning",
     "segmentation format", "has a polygon whose coordinates are not all finite numbers"),
    ({"annotations": lambda a: a[0].update(segmentation=[[5, 5, 20, 5, 20, 20], [1, 1, 2, 2, -1e9, 3]])},
     "warning", "segmentation format", "has polygon points far outside the 50 x 40 image (more than its size "
                                       "beyond it); models that learn masks and mask scoring leave it out"),
    ({"annotations": lambda a: a[0].update(id=0)}, "warning", "annotation ids",
     "1 annotation ids are not positive integers (first: 0)"),
    ({"annotations": lambda a: a[0].pop("iscrowd")}, "warning", "no iscrowd", "read as 0, not crowd regions"),
    ({"annotations": lambda a: a[0].update(iscrowd=None)}, "warning", "no iscrowd", "read as 0, not crowd regions"),
    ({"annotations": lambda a: a[0].update(area="225")}, "warning", "no area", "no usable 'area' ('225')"),
    ({"categories": lambda c: c.append({"id": 30, "name": "star"})}, "warning", "category without instances",
     "1 category has no instances (first: 'star', id 30)"),
])
def test_malformed_entries_are_findings(changes, level, kind, text):
    found = annotations.annotation_findings(_coco(**changes))
    assert [(f.level, f.kind) for f in found] == [(level, kind)] and text in found[0].message, found



def test_mask_areas_of_more_rles_than_pycocotools_counts_in_one_call():
    """pycocotools' area() raised OverflowError at 256 RLEs under NumPy 2: evaluation of an image with 256 or
    more mask detections (--detections-per-image raised for crowded scenes) stopped with a traceback."""
    masks = np.zeros((10, 12, 300), dtype=np.uint8, order="F")
    for k in range(300):
        masks[: 1 + k % 10, : 1 + k % 12, k] = 1
    rles = mask_utils.encode(masks)
    areas = annotations.rle_areas(rles)
    assert len(rles) > annotations.AREAS_PER_CALL
    assert areas.tolist() == [(1 + k % 10) * (1 + k % 12) for k in range(300)]
    assert annotations.rle_areas([]).shape == (0,)


def _random_masks(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """Masks of sizes from 1 x 1 to 3000 x 4000: rectangles, scattered pixels, empty and full ones."""
    masks = [np.zeros((1, 1), np.uint8), np.ones((1, 1), np.uint8), np.ones((3000, 4000), np.uint8),
             np.zeros((7, 3), np.uint8)]
    for _ in range(count):
        height, width = rng.integers(1, 700, size=2)
        mask = (rng.random((height, width)) < rng.choice([0.001, 0.3, 0.9])).astype(np.uint8)
        top, left = rng.integers(0, height), rng.integers(0, width)
        mask[top:top + rng.integers(1, height + 1), left:left + rng.integers(1, width + 1)] = rng.integers(0, 2)
        masks.append(mask)
    return masks


def test_compressed_rle_pixels_are_what_pycocotools_encoded():
    for mask in _random_masks(np.random.default_rng(0), 60):
        counts = mask_utils.encode(np.asfortranarray(mask))["counts"]
        assert annotations.compressed_rle_pixels(counts) == mask.size, mask.shape
        assert annotations.compressed_rle_pixels(counts.decode()) == mask.size, "as JSON gives it: text"


@pytest.mark.parametrize("counts, pixels", [("", 0), ("0", 0), ("1", 1), ("P", None), ("0P", None), ("~", None),
                                            ("0 ", None), ("0é", None), ("01112", 7), ("o" * 5 + "0", 2**25 - 1)])
def test_compressed_rle_pixels_of_strings_no_encoder_wrote(counts, pixels):
    """Characters outside pycocotools' alphabet or an unfinished last count: no counts pycocotools can read;
    from the fourth on, a count adds the one two before it ("01112": 0, 1, 1, then 1 + 1 and 1 + 2)."""
    assert annotations.compressed_rle_pixels(counts) == pixels


def _counts_read_one_at_a_time(counts: str) -> list[int] | None:
    """The counts a compressed RLE string holds, read count by count: 5-bit groups, lowest first (0x20: another
    group follows; 0x10 in the last: negative), from the fourth count on added to the count two before. None where
    characters fall outside pycocotools' alphabet or the last count is unfinished."""
    read, value, groups = [], 0, 0
    for code in (ord(c) - 48 for c in counts):
        if not 0 <= code < 64:
            return None
        value |= (code & 0x1F) << (5 * groups)
        groups += 1
        if code & 0x20:
            continue
        value -= (1 << (5 * groups)) if code & 0x10 else 0
        read.append(value + (read[-2] if len(read) > 2 else 0))
        value, groups = 0, 0
    return None if groups else read


def test_compressed_rle_pixels_of_many_strings_at_once_are_each_strings_own():
    """Encoder output, cut or lengthened, strings of random characters and lengths, empty ones, in one call: each
    the sum of its counts, where those are what an encoder can write (0 to 2**31 - 1). Others pycocotools keeps in
    32 bits, which area() sums with wrap-around and decode() does not: the loader's own case (test_coco_utils)."""
    rng = np.random.default_rng(1)
    encoded = [mask_utils.encode(np.asfortranarray(mask))["counts"].decode()
               for mask in _random_masks(rng, 30)]
    alphabet = np.array(list("0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[]^_`abcdefghijklmno \\é~/"))
    strings = [*encoded, *(e[:-1] for e in encoded), *(e + "1" for e in encoded), "", "", *(
        "".join(rng.choice(alphabet[:64 if k % 2 else None], size=rng.integers(0, 40))) for k in range(600))]
    read = [_counts_read_one_at_a_time(counts) for counts in strings]
    strings, read = zip(*[(s, r) for s, r in zip(strings, read) if r is None or all(0 <= c < 2**31 for c in r)])
    order = rng.permutation(len(strings))
    strings, read = [strings[i] for i in order], [read[i] for i in order]
    expected = [None if counts is None else sum(counts) for counts in read]
    assert annotations.compressed_rle_pixels_all(strings) == expected
    assert 100 < sum(e is not None for e in expected) < len(strings) - 100, "both kinds"
    for counts, pixels in zip(strings, expected):  # pycocotools decodes those it reads as so many pixels
        if pixels and pixels < 10**6:
            assert mask_utils.decode({"size": [pixels, 1], "counts": counts.encode()}).size == pixels


def test_compressed_rle_of_another_size_than_its_size_says_is_undrawable():
    """As where a mask's size was edited after a resize: its counts cover the old size's pixels."""
    for shape in ((40, 49), (40, 51), (39, 50), (1, 1)):
        counts = mask_utils.encode(np.asfortranarray(np.ones(shape, np.uint8)))["counts"].decode()
        assert annotations.segmentation_problem({"size": [40, 50], "counts": counts}, 40, 50) == (
            "is compressed RLE whose counts do not cover the image's 2000 pixels (as where its size was changed "
            "without encoding the mask again)")
    sound = mask_utils.encode(np.asfortranarray(np.ones((40, 50), np.uint8)))["counts"]
    assert annotations.segmentation_problem({"size": [40, 50], "counts": sound}, 40, 50) is None

@pytest.mark.parametrize("polygon, problem", [
    ([0, 0, 10, 0, 10, 8, 0, 8], None),
    ([-20, -20, 20, -20, 20, 20, -20, 20] * 50, None),  # every point 2 sides away, the most the bound promises
    ([20, 20, 20, 20, 20, 20], None),  # where hypot and sqrt round apart
    ([20, -20, 20, 20, -20, 20, -20, -20, 20, 20, 20, 20], None),
    ([0, 0, 10, 0, 10, 8, 0, 21], None),  # past 2 sides, within the norm's bound: drawn, at a bounded cost
    ([0, 0, 10, 0, 10, 8, 0, 60], "far outside"),
    ([0, 0, 10, 0, 10, 8, 0, 8] * 500 + [1e8, 0], "far outside"),
    ([0, 0, 10, 0, 10, 8, -1e300, 8], "far outside"),
    ([0, 0, 10, 0, 10, 8, float("inf"), float("nan")], "not all finite numbers"),
    ([0, 0, 10, 0, 10, 8, 0, 10**400], "not all finite numbers"),
    ([0, 0, 10, 0, 10, 8, 0, "8"], "not all finite numbers"),
])
def test_polygons_too_far_outside_the_image_to_draw_are_said_so(polygon, problem):
    said = annotations.polygons_problem([[0, 0, 5, 0, 5, 5], polygon], 8, 10)
    assert said is None if problem is None else problem in said
    if problem == "far outside":
        assert max(abs(v) for v in polygon) > 2 * 10, "said only of a point more than 2 sides away"


@pytest.mark.parametrize("bbox, leaves", [([36, 24, 15, 15], False), ([-1, -1, 15, 15], False),
                                           ([40, 5, 15, 15], True), ([5, 30, 15, 15], True),
                                           ([-3, 5, 15, 15], True), ([5, -3, 15, 15], True)])
def test_a_box_leaving_the_image_on_any_side_by_more_than_a_pixel_is_warned_of(bbox, leaves):
    found = annotations.annotation_findings(_coco(annotations=lambda a: a[0].update(bbox=bbox)))
    assert [f.kind for f in found] == (["box outside image"] if leaves else []), found


NONE_INSIDE = "none of it is inside, so training leaves the instance out"


@pytest.mark.parametrize("bbox, said", [([40, 5, 15, 15], "training clips it to the image"),
                                        ([60, 5, 15, 15], NONE_INSIDE), ([50.2, 5, 0.5, 15], NONE_INSIDE)])
def test_a_box_leaving_the_image_says_what_training_does_with_it(bbox, said):
    (found,) = annotations.annotation_findings(_coco(annotations=lambda a: a[0].update(bbox=bbox)))
    assert found.message.endswith(f"box {bbox} leaves the 50x40 image; {said}" + (
        "" if "clips" in said else ", and box scoring counts it as one no prediction can match")), found


def test_an_image_whose_only_annotation_has_an_unknown_category_is_not_also_said_to_have_none():
    found = annotations.annotation_findings(_coco(annotations=lambda a: a[0].update(category_id=99)))
    kinds = [f.kind for f in found]
    assert "unknown category id" in kinds and "image without annotations" not in kinds, found


def test_ids_given_twice_name_the_entries_that_share_them():
    data = _coco(images=lambda i: i.append({**i[0], "file_name": "b.jpg"}))
    messages = [f.message for f in annotations.annotation_findings(data) if f.level == "error"]
    assert messages == ["1 images reuse an id (first: 1, given to 'a.jpg' and 'b.jpg'); give each its own"]
    data["images"] += [{**data["images"][0], "file_name": f"{n}.jpg"} for n in range(5)]
    messages = [f.message for f in annotations.annotation_findings(data) if f.level == "error"]
    assert messages == ["6 images reuse an id (first: 1, given to 'a.jpg' and 'b.jpg' and 5 more); give each its own"]
    data = _coco(categories=lambda c: c.append({"id": 3, "name": "other"}))
    messages = [f.message for f in annotations.annotation_findings(data) if f.level == "error"]
    assert messages == ["1 categories reuse an id (first: 3, given to 'thing' and 'other'); give each its own"]


def test_an_iscrowd_written_as_a_string_is_an_error():
    """"0" would read as a crowd region: every instance so written would be left out of training."""
    found = annotations.annotation_findings(_coco(annotations=lambda a: a[0].update(iscrowd="0")))
    assert (found[0].level, found[0].kind) == ("error", "iscrowd")
    assert "1 annotations have an 'iscrowd' other than 0 or 1 (first: annotation 7: '0')" in found[0].message


def test_the_scoring_digest_is_the_files_content_as_scored_however_written():
    data = _coco()
    data["images"].append({"id": 2, "file_name": "b.jpg", "width": 30, "height": 30})
    data["categories"].append({"id": 1, "name": "other", "frequency": "f"})
    data["annotations"].append({**data["annotations"][0], "id": 8, "image_id": 2, "category_id": 1})
    data["images"][0].update(neg_category_ids=[3, 1], not_exhaustive_category_ids=[])
    digest = annotations.scoring_digest(data)
    rewritten = json.loads(json.dumps(data, sort_keys=True))
    for part in ("images", "annotations", "categories"):
        rewritten[part].reverse()
    ann = rewritten["annotations"][0]
    ann.update(bbox=[float(v) for v in ann["bbox"]], iscrowd=bool(ann["iscrowd"]), extra="not scored")
    rewritten["images"][-1]["neg_category_ids"] = [1, 3]  # the first image, reversed
    assert annotations.scoring_digest(rewritten) == digest
    for change in (lambda d: d["images"].pop(), lambda d: d["annotations"][0]["bbox"].__setitem__(0, 99),
                   lambda d: d["annotations"][0].update(iscrowd=1), lambda d: d["annotations"][0].update(area=1),
                   lambda d: d["images"][0].update(neg_category_ids=[1]),
                   lambda d: d["categories"][1].update(frequency="r")):
        changed = json.loads(json.dumps(data))
        change(changed)
        assert annotations.scoring_digest(changed) != digest


def test_a_sound_file_has_no_findings():
    assert annotations.annotation_findings(_coco()) == []


def test_a_flat_polygon_is_checked_as_the_polygon_it_is_read_as():
    """Wrapped, a flat list of 4 numbers is a polygon of 2 points, which the loader and scoring leave out."""
    found = annotations.annotation_findings(_coco(annotations=lambda a: a[0].update(segmentation=[5, 5, 20, 20])))
    assert [f.kind for f in found] == ["flat polygon", "polygon under 3 points"]


def _boxed_instances(layout, count: int = 12, corner: float = 10.0) -> list[dict]:
    """Square polygon instances from (corner, corner) down and right, each with its box written in `layout`
    (a key of BOX_LAYOUTS)."""
    anns = []
    for i in range(count):
        x, y, size = corner + 3 * i, corner + 2 * i, 30.0 + i
        polygon = [x, y, x + size, y, x + size, y + size, x, y + size]
        box = annotations.BOX_LAYOUTS[layout](x, y, x + size, y + size)
        anns.append({"id": i + 1, "image_id": 1, "category_id": 3, "bbox": list(box), "area": size * size,
                     "iscrowd": 0, "segmentation": [polygon]})
    return anns


@pytest.mark.parametrize("layout", [name for name in annotations.BOX_LAYOUTS if name != annotations.COCO_LAYOUT])
def test_boxes_in_another_layout_than_cocos_are_an_error(layout):
    data = _coco(images=lambda i: i[0].update(width=200, height=200), annotations=lambda a: a.clear())
    data["annotations"] = _boxed_instances(layout)
    errors = [f for f in annotations.annotation_findings(data) if f.level == "error"]
    assert [f.kind for f in errors] == ["box layout"]
    assert f"the boxes are written as {layout}: 12 of the first 12 instances with polygons" in errors[0].message


@pytest.mark.parametrize("instances", [
    _boxed_instances(annotations.COCO_LAYOUT),
    _boxed_instances("[x1, y1, x2, y2] (corners)", count=9),  # too few to tell
    _boxed_instances("[x1, y1, x2, y2] (corners)", corner=0.0)[:1] * 12,  # at the origin, both layouts fit
    _boxed_instances("[x1, y1, x2, y2] (corners)", count=6) + _boxed_instances(annotations.COCO_LAYOUT, count=6),
])
def test_coco_boxes_and_undecided_files_pass_the_layout_check(instances):
    data = _coco(images=lambda i: i[0].update(width=200, height=200), annotations=lambda a: a.clear())
    data["annotations"] = instances
    assert not [f for f in annotations.annotation_findings(data) if f.kind == "box layout"]


def _person(**fields) -> dict:
    """A person of 3 keypoints, two labelled, edited by fields."""
    return {"id": 5, "keypoints": [1, 2, 2, 3, 4, 1, 0, 0, 0], "num_keypoints": 2, **fields}


@pytest.mark.parametrize("points, problem", [
    ([1, 2, 2, 3, 4, 1], "is 6 numbers"),  # a keypoint short
    ([1, 2, 3, 4, 5, 6], "is 6 numbers"),
    ([1, 2, 2, 3, None, 1, 0, 0, 0], "holds None"),
    ([1, 2, 2, 3, "4", 1, 0, 0, 0], "holds '4'"),
    ([1, 2, 2, 3, float("nan"), 1, 0, 0, 0], "holds nan"),
    ({"x": 1}, "is {'x': 1}"),
])
def test_keypoint_arrays_the_loader_cannot_read_are_an_error(points, problem):
    found = annotations.keypoint_array_findings([_person(), _person(id=6, keypoints=points)], 3)
    assert [(f.level, f.kind) for f in found] == [("error", "keypoints")]
    assert f"annotation 6: 'keypoints' {problem}, where 3 keypoints are 9 finite numbers" in found[0].message


@pytest.mark.parametrize("person, kind, text", [
    (_person(keypoints=None), "no keypoints", "1 instances have no 'keypoints' (first: annotation 5)"),
    (_person(keypoints=[]), "no keypoints", "read as having none labelled"),
    ({"id": 5, "keypoints": [1, 2, 2, 3, 4, 1, 0, 0, 0]}, "num_keypoints", "(first: annotation 5, None); it is set "
                                                                          "to the count of visibility flags above 0"),
    (_person(num_keypoints=0), "num_keypoints", "(first: annotation 5, 0)"),
    (_person(keypoints=[1, 2, 3, 3, 4, 1, 5, 5, -1]), "keypoint visibility", "flag 3); flags above 0 are read as "
                                                                               "labelled, the others as not"),
])
def test_keypoints_read_another_way_are_warnings(person, kind, text):
    found = [f for f in annotations.keypoint_array_findings([_person(id=4), person], 3) if f.kind == kind]
    assert len(found) == 1 and found[0].level == "warning" and text in found[0].message, found


def test_sound_keypoints_have_no_findings():
    assert annotations.keypoint_array_findings([_person(), _person(keypoints=[0] * 9, num_keypoints=0)], 3) == []


@pytest.mark.parametrize("points, labelled", [(None, 0), ([], 0), ([1, 2, 2, 3, 4, 1, 0, 0, 0], 2),
                                              ([1, 2, 3, 3, 4, -1, 5, 5, True], 2)])
def test_labelled_keypoints_are_the_flags_above_zero(points, labelled):
    assert annotations.labelled_keypoints(points) == labelled


def _lvis_like() -> dict:
    """Two images annotated as LVIS's: image 1 has a cat, checked for dogs; image 2 has nothing, checked for cats."""
    return {"images": [{"id": 1, "file_name": "a.jpg", "height": 10, "width": 10, "neg_category_ids": [2],
                        "not_exhaustive_category_ids": [1]},
                       {"id": 2, "file_name": "b.jpg", "height": 10, "width": 10, "neg_category_ids": [1],
                        "not_exhaustive_category_ids": []}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25,
                             "iscrowd": 0, "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]}],
            "categories": [{"id": 1, "name": "cat", "frequency": "f"}, {"id": 2, "name": "dog", "frequency": "r"}]}


def _federated(data: dict) -> list[tuple[str, str]]:
    return [(f.level, f.message) for f in annotations.annotation_findings(data)
            if f.kind in ("federated lists", annotations.PARTLY_FEDERATED)]


def test_a_file_annotated_as_lvis_is_said_to_be_scored_so_and_its_lists_checked():
    data = _lvis_like()
    assert _federated(data) == [("note", "the file is annotated as LVIS's (each image's neg_category_ids and "
                                         "not_exhaustive_category_ids): as a validation file, it is scored as LVIS's "
                                         "evaluation scores it; categories with instances by frequency: rare 0, "
                                         "common 0, frequent 1")]
    empty = next(f.message for f in annotations.annotation_findings(data) if f.kind == "image without annotations")
    assert empty.endswith("(detections there are false positives of the categories each lists as checked "
                          "(neg_category_ids), the others left out)")
    data["images"][0]["neg_category_ids"] = [1, 9]
    data["categories"][1].pop("frequency")
    assert [message for level, message in _federated(data) if level == "warning"] == [
        "image 1 lists category ids [9] that are not in 'categories'",
        "image 1 lists categories [1] as checked and absent (neg_category_ids), and has instances of them",
        "1 categories have no LVIS 'frequency' (r, c or f; first: id 2), which scoring this file as LVIS's needs"]
    data["images"][1]["not_exhaustive_category_ids"] = "1"
    assert _federated(data) == [("error", "image 2: not_exhaustive_category_ids is '1', not a list of category ids; "
                                          "give one (empty where none)")]
    plain = _lvis_like()
    del plain["images"][1]["neg_category_ids"], plain["images"][1]["not_exhaustive_category_ids"]
    assert _federated(plain) == [("warning", "1 of the 2 images carry LVIS's neg_category_ids and "
                                             "not_exhaustive_category_ids, the others not: scored as COCO's; give "
                                             "every image both (empty where nothing was checked) to score it as "
                                             "LVIS's")]
    for image in plain["images"]:
        image.pop("neg_category_ids", None), image.pop("not_exhaustive_category_ids", None)
    assert _federated(plain) == []

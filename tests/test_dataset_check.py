"""check_dataset finds each kind of planted fault, and passes a clean dataset."""

import json
import re
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import coco_utils
from annotations import Finding
from coco_utils import FROM_CHECKPOINT, build_dataset
from conftest import run_cli
from dataset_check import SplitReport, check_before_training, format_report, missing_files, missing_reasons
from errors import UserError
from tools.check_dataset import main as check_main
from tools.make_coco_dataset import DatasetSpec, generate_dataset


def check(capsys, *args):
    """tools/check_dataset.py's main in this process: (exit status, printed report)."""
    status = check_main([str(a) for a in args])
    return status, capsys.readouterr().out


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    spec = DatasetSpec(train_images=10, val_images=4, min_size=64, max_size=64, seed=4, crowd_share=0.3,
                       empty_share=0.0, degenerate_share=0.0)
    return generate_dataset(tmp_path_factory.mktemp("clean"), spec)


def test_clean_dataset_passes_strict(clean):
    result = run_cli("tools/check_dataset.py", str(clean), "--strict")
    assert result.returncode == 0, result.stdout
    assert "OK: 0 errors, 0 warnings" in result.stdout
    assert "instances per category: square" in result.stdout
    assert re.search(r"instances per image: \d+\.\d on average, at most \d+ \(image \d+\)\n", result.stdout)
    assert "crowd regions (iscrowd 1): " in result.stdout, "the fixture has crowd regions: counted apart"


def test_the_root_is_taken_as_train_pys_data_path_too(clean, capsys, tmp_path):
    assert check(capsys, "--data-path", clean, "--splits", "val")[0] == 0
    with pytest.raises(SystemExit):
        check(capsys, tmp_path, "--data-path", clean)
    assert "two dataset roots" in capsys.readouterr().err


def _plant(clean, tmp_path, edit):
    root = tmp_path / "faulty"
    shutil.copytree(clean, root)
    path = root / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    edit(root, data)
    path.write_text(json.dumps(data))
    return root


def _huge_png(path, image):
    """A PNG header of an aerial tile's size (14000 x 13000, over PIL's limit), with the JSON's size to match."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 14000, 13000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    image.update(width=14000, height=13000)


def _rename(root, image, in_json, on_disk):
    """The image's file renamed on disk and in the JSON, to two spellings of one name."""
    (root / "train2017" / image["file_name"]).rename(root / "train2017" / on_disk)
    image["file_name"] = in_json


def _first_polygon_ann(data):
    return next(a for a in data["annotations"] if not a["iscrowd"])


FAULTS = {
    "missing image": (lambda root, d: (root / "train2017" / d["images"][0]["file_name"]).unlink(),
                      "ERROR unusable image", "missing"),
    "unreadable image": (lambda root, d: (root / "train2017" / d["images"][1]["file_name"]).write_bytes(b"x" * 50),
                         "ERROR unusable image", "unreadable"),
    "image over PIL's pixel limit": (lambda root, d: _huge_png(root / "train2017" / d["images"][1]["file_name"],
                                                               d["images"][1]), "ERROR unusable image",
                                     "too large to decode (182 megapixels; PIL refuses more than 179, its guard "
                                     "against decompression bombs); downscale it and its annotations"),
    "empty image file": (lambda root, d: (root / "train2017" / d["images"][1]["file_name"]).write_bytes(b""),
                         "ERROR unusable image", "unreadable (the file is empty, 0 bytes)"),
    "floating-point image": (lambda root, d: Image.fromarray(np.zeros((64, 64), np.float32)).save(
        root / "train2017" / d["images"][1]["file_name"], format="TIFF"), "ERROR unusable image",
        "floating-point numbers (mode F)"),
    "size differs": (lambda root, d: d["images"][2].update(width=65), "ERROR unusable image",
                     "size differs from the JSON"),
    "size differs, said in full": (lambda root, d: d["images"][2].update(width=65), "ERROR unusable image",
                     "but the JSON says 65x64"),
    "short polygon": (lambda root, d: _first_polygon_ann(d)["segmentation"].append([1, 1, 2, 2]),
                      "WARNING polygon under 3 points", "fewer than 3 points"),
    "box outside": (lambda root, d: _first_polygon_ann(d).update(bbox=[50, 50, 40, 40]),
                    "WARNING box outside image", "leaves the 64x64 image"),
    "empty box": (lambda root, d: _first_polygon_ann(d).update(bbox=[5, 5, 0, 3]), "WARNING empty box",
                  "has no extent; training leaves the instance out"),
    "tiny box": (lambda root, d: _first_polygon_ann(d).update(bbox=[5, 5, 0.5, 3]), "WARNING tiny box",
                 "is 1 px or less across; it trains"),
    "corner boxes": (lambda root, d: [a.update(bbox=[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                                     a["bbox"][1] + a["bbox"][3]]) for a in d["annotations"]],
                     "ERROR box layout", "the boxes are written as [x1, y1, x2, y2] (corners)"),
    "unknown image id": (lambda root, d: _first_polygon_ann(d).update(image_id=777), "ERROR unknown image id",
                         "image id 777"),
    "unknown category id": (lambda root, d: _first_polygon_ann(d).update(category_id=99),
                            "ERROR unknown category id", "category id 99"),
    "duplicate ids": (lambda root, d: d["annotations"][1].update(id=d["annotations"][0]["id"]),
                      "WARNING annotation ids", "1 annotations reuse an id (first: "),
    "duplicate image ids": (lambda root, d: d["images"][1].update(id=d["images"][0]["id"]),
                            "ERROR duplicate image id", ".jpg'); give each its own"),
    "crowd format": (lambda root, d: next(a for a in d["annotations"] if a["iscrowd"]).update(
        segmentation=[[1, 1, 5, 1, 5, 5]]), "WARNING crowd format", "not RLE"),
    "image without annotations": (lambda root, d: d.update(annotations=[
        a for a in d["annotations"] if a["image_id"] != d["images"][3]["id"]]),
        "NOTE image without annotations", "1 images have no annotations"),
    "unreadable json": (lambda root, d: d.clear(), "ERROR annotation file", "not a readable COCO"),
    "image path outside the folder": (lambda root, d: d["images"][2].update(file_name="../../etc/x.jpg"),
                                      "ERROR image path", "'../../etc/x.jpg' leaves the image folder"),
    "no segmentation": (lambda root, d: _first_polygon_ann(d).update(segmentation=[]),
                        "WARNING no segmentation", "instance without a segmentation"),
    "odd polygon": (lambda root, d: _first_polygon_ann(d)["segmentation"][0].append(5.0),
                    "WARNING odd polygon", "odd number of coordinates"),
    "rle of another size": (lambda root, d: _first_polygon_ann(d).update(segmentation={"size": [10, 10],
                                                                                        "counts": [0, 100]}),
                            "WARNING segmentation format", "is RLE of size [10, 10], not the image's [64, 64]"),
    "rle without counts": (lambda root, d: _first_polygon_ann(d).update(segmentation={"size": [64, 64]}),
                           "WARNING segmentation format", "is neither polygons nor RLE"),
    "flat polygon": (lambda root, d: _first_polygon_ann(d).update(
        segmentation=_first_polygon_ann(d)["segmentation"][0]), "WARNING flat polygon", "read as one polygon"),
    "no area": (lambda root, d: _first_polygon_ann(d).pop("area"), "WARNING no area", "computed from the outline"),
    "image without a size": (lambda root, d: d["images"][0].pop("height"), "ERROR file structure",
                             "has width 64 and height None"),
    "entry not an object": (lambda root, d: d["annotations"].append([1, 2]), "ERROR file structure",
                            "is [1, 2], not a JSON object"),
    "category without a name": (lambda root, d: d["categories"][0].pop("name"), "ERROR file structure",
                                "has no 'name'"),
    "folders written with backslashes": (lambda root, d: d["images"][0].update(
        file_name="sub\\" + d["images"][0]["file_name"]), "ERROR unusable image",
        "missing (file_name separates folders with '\\'; write '/')"),
    "a Windows path": (lambda root, d: d["images"][0].update(file_name="C:\\data\\a.jpg"), "ERROR image path",
                       "'C:\\\\data\\\\a.jpg' is a Windows path from a drive's root"),
    "name in another letter case": (lambda root, d: d["images"][0].update(
        file_name=d["images"][0]["file_name"].upper()), "ERROR unusable image",
        "a name that differs in letter case; write it as on disk"),
    "name in another Unicode form": (lambda root, d: _rename(root, d["images"][0], "caf\u00e9.png",
                                                             "cafe\u0301.png"),
                                     "ERROR unusable image", "a name that differs in Unicode form (NFC or NFD)"),
    "folder given twice": (lambda root, d: d["images"][0].update(file_name="train2017/" + d["images"][0]["file_name"]),
                           "ERROR unusable image", "missing (there is no folder 'train2017' in "),
    "no box with extent": (lambda root, d: [a.update(bbox=[1, 1, 1, 5]) for a in d["annotations"]],
                           "ERROR nothing to train on", "no annotation has a box with extent"),
    "no outlines": (lambda root, d: [a.update(segmentation=[]) for a in d["annotations"] if not a["iscrowd"]],
                    "WARNING no outlines", "models that learn masks (maskrcnn_*) stop on this file"),
    "no outline that can be drawn": (lambda root, d: [a.update(segmentation=[[0, 0, 9, 0, 1e9, 9]])
                                                      for a in d["annotations"] if not a["iscrowd"]],
                                     "WARNING no outlines", "models that learn masks (maskrcnn_*) stop on this file"),
}


@pytest.mark.parametrize("kind", FAULTS)
def test_each_planted_fault_is_found(clean, tmp_path, capsys, kind):
    edit, heading, detail = FAULTS[kind]
    root = _plant(clean, tmp_path, edit)
    status, report = check(capsys, root, "--splits", "train", "--max-bad-samples", "0.05")
    assert heading in report and detail in report, report
    errors = heading.startswith("ERROR")
    assert status == (1 if errors else 0), report
    if not errors:  # --strict fails on warnings, not on notes
        assert check(capsys, root, "--splits", "train", "--strict")[0] == int(heading.startswith("WARNING"))


def test_val_instances_of_categories_the_training_file_lacks_are_an_error(clean, tmp_path, capsys):
    """As train.py stops on them: here the val file numbers the same names otherwise."""
    root = tmp_path / "renumbered"
    shutil.copytree(clean, root)
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    for item, key in [*((c, "id") for c in data["categories"]), *((a, "category_id") for a in data["annotations"])]:
        item[key] += 100
    path.write_text(json.dumps(data))
    status, report = check(capsys, root, "--splits", "val", "train")
    assert status == 1 and "ERROR categories" in report, report
    assert "instances of categories the training file lacks: square (id 103, " in report
    assert check(capsys, root, "--splits", "val")[0] == 0, "nothing to compare with"


def _edited_keypoints(keypoint_dataset, tmp_path, edit):
    root = tmp_path / "figures"
    shutil.copytree(keypoint_dataset, root)
    path = root / "annotations" / "person_keypoints_train2017.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return root


@pytest.mark.parametrize("edit, message", [
    (lambda data: data["categories"][0].pop("keypoints"), "needs one category with COCO's 17 person keypoints"),
    (lambda data: [ann.update(keypoints=[0] * 51) for ann in data["annotations"]], "no image has 10 or more"),
    (lambda data: data["annotations"][1].update(keypoints=data["annotations"][1]["keypoints"][:48]),
     "'keypoints' is 48 numbers, where 17 keypoints are 51 finite numbers"),
])
def test_keypoint_files_are_checked_for_what_keypoint_training_needs(keypoint_dataset, tmp_path, capsys, edit,
                                                                      message):
    """As train.py --dataset coco_kp stops on them."""
    assert check(capsys, keypoint_dataset, "--dataset", "coco_kp")[0] == 0
    root = _edited_keypoints(keypoint_dataset, tmp_path, edit)
    status, report = check(capsys, root, "--dataset", "coco_kp")
    assert status == 1 and message in report, report
    with pytest.raises(UserError, match=re.escape(message)):
        build_dataset(root, "coco_kp", "train", None)


def test_val_categories_the_training_file_names_otherwise_are_an_error(clean, tmp_path, capsys):
    """Per-task exports may number the same names otherwise: every label would score as another category."""
    root = tmp_path / "swapped"
    shutil.copytree(clean, root)
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    first, second = data["categories"][:2]
    first["name"], second["name"] = second["name"], first["name"]
    path.write_text(json.dumps(data))
    status, report = check(capsys, root, "--splits", "train", "val")
    assert status == 1 and "categories the training file names otherwise: id " in report, report
    train_set = build_dataset(root, "coco", "train", None)
    with pytest.raises(UserError, match="names categories otherwise than the training file's categories: id .*; "
                                        "list the same categories, with the same ids and names, in both files"):
        build_dataset(root, "coco", "val", None, train_set.category_map)
    with pytest.raises(UserError, match="than the checkpoint's categories: id .*; a checkpoint's model knows the "
                                        "categories it was trained on; to train on these, fine-tune it with --weights"):
        build_dataset(root, "coco", "val", None, train_set.category_map, categories_from=FROM_CHECKPOINT)


def test_a_val_file_without_instances_to_score_is_an_error(clean, tmp_path, capsys):
    """Every AP would be -1, and model_best.pth chosen by it: train.py stops as the check does."""
    root = tmp_path / "unlabelled"
    shutil.copytree(clean, root)
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    first, second = data["annotations"][:2]
    data["annotations"] = [{**first, "iscrowd": 1}, {**second, "iscrowd": 0, "bbox": None}]  # a crowd region, a boxless
    path.write_text(json.dumps(data))
    status, report = check(capsys, root, "--splits", "val")
    assert status == 1 and "ERROR nothing to score" in report, report
    with pytest.raises(UserError, match="no instance .crowd regions aside. with a usable box to score predictions"):
        build_dataset(root, "coco", "val", None)


def test_a_few_bad_images_are_a_warning_under_the_limit(clean, tmp_path, capsys):
    root = _plant(clean, tmp_path, FAULTS["missing image"][0])
    status, report = check(capsys, root, "--splits", "train", "--max-bad-samples", "0.2")
    assert status == 0 and "WARNING unusable image" in report


def test_training_stops_early_on_missing_images(clean, tmp_path):
    root = _plant(clean, tmp_path, FAULTS["missing image"][0])
    result = run_cli("train.py", "--data-path", str(root), "--device", "cpu", "--weights-backbone", "none",
                     "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2 and "train data: 1 of 10 images cannot be used" in result.stderr


def test_missing_files_answer_as_is_file_does(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.jpg", "sub/b.jpg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.jpg").mkdir()
    names = {"a.jpg", "sub/b.jpg", "./a.jpg", "sub/./b.jpg", "gone.jpg", "sub/gone.jpg", "none/c.jpg", "folder.jpg"}
    assert missing_files(tmp_path, names) == {n for n in names if not (tmp_path / n).is_file()}
    assert missing_files(tmp_path, names) == {"gone.jpg", "sub/gone.jpg", "none/c.jpg", "folder.jpg"}


def test_images_read_in_the_main_thread_give_the_threads_report(clean, tmp_path, capsys):
    root = _plant(clean, tmp_path, FAULTS["unreadable image"][0])
    threads = check(capsys, root, "--splits", "train", "--workers", "2")
    assert threads[0] == 1 and "unreadable" in threads[1]
    assert check(capsys, root, "--splits", "train", "--workers", "0") == threads


@pytest.mark.parametrize("flags, message", [(["--workers", "-1"], "--workers -1 must be 0 or more"),
                                            (["--max-bad-samples", "5"], "must be a share between 0 and 1")])
def test_out_of_range_flags_are_one_line(clean, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        check_main([str(clean), *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_photo_whose_json_has_its_exif_turned_size_is_usable(clean, tmp_path, capsys):
    def turn(root, data):
        image = data["images"][0]
        path = root / "train2017" / image["file_name"]
        with Image.open(path) as img:
            pixels = np.array(img.convert("RGB"))[:48]  # stored 64 wide, 48 high, as the camera did
        exif = Image.Exif()
        exif[0x0112] = 6  # ... and a quarter turn clockwise to show it: 48 wide, 64 high, as the JSON says
        Image.fromarray(pixels).save(path, exif=exif, format="JPEG")
        image.update(width=48, height=64)

    status, report = check(capsys, _plant(clean, tmp_path, turn), "--splits", "train")
    assert status == 0 and "unusable image" not in report, report


def _exif_square(root, data):
    """The first image stored as a square with a quarter turn in its EXIF: the JSON's size fits either way."""
    image = data["images"][0]
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (64, 64)).save(root / "train2017" / image["file_name"], exif=exif, format="JPEG")
    image.update(width=64, height=64)


def test_an_exif_turn_the_json_size_cannot_decide_is_a_warning(clean, tmp_path, capsys):
    status, report = check(capsys, _plant(clean, tmp_path, _exif_square), "--splits", "train")
    assert status == 0 and "WARNING EXIF orientation:" in report, report
    assert "the JSON's 64x64 fits either way; read as stored, as torchvision reads it" in report


@pytest.mark.parametrize("brightest, warned", [(4000, True), (60000, False)])
def test_a_16_bit_image_of_12_bit_values_is_a_warning(clean, tmp_path, capsys, brightest, warned):
    def sixteen_bits(root, data):
        image = data["images"][0]
        pixels = np.linspace(0, brightest, 64 * 64).astype(np.uint16).reshape(64, 64)
        Image.fromarray(pixels).save(root / "train2017" / image["file_name"], format="PNG")
        image.update(width=64, height=64)

    status, report = check(capsys, _plant(clean, tmp_path, sixteen_bits), "--splits", "train")
    assert status == 0 and ("WARNING dim 16-bit image:" in report) == warned, report
    if warned:
        assert "its 16-bit pixels reach only 4000 of 65535 (10- or 12-bit data?)" in report
        assert "(brightest 16 of 255)" in report


def test_an_image_of_many_megapixels_is_a_warning_naming_it(clean, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(coco_utils, "LARGE_IMAGE_PIXELS", 64 * 64 - 1)  # every image of the dataset is 64 x 64
    status, report = check(capsys, clean, "--splits", "val")
    assert status == 0 and "WARNING large image (4):" in report, report
    assert "64x64 (0.0041 megapixels) is decoded, with its masks, at full size before the model shrinks it" in report


def test_a_missing_annotation_file_is_said_to_be_missing(clean, tmp_path, capsys):
    root = tmp_path / "no_val"
    shutil.copytree(clean, root)
    (root / "annotations" / "instances_val2017.json").unlink()
    status, report = check(capsys, root, "--splits", "val")
    assert status == 1 and "instances_val2017.json is missing; --data-path must hold the COCO layout" in report


def test_splits_given_apart_from_the_layout_are_checked(clean, tmp_path, capsys):
    """A layout of the user's own: train.json beside a folder of images, no --data-path."""
    (tmp_path / "pictures").symlink_to(clean / "train2017")
    shutil.copy(clean / "annotations" / "instances_train2017.json", tmp_path / "train.json")
    status, report = check(capsys, "--splits", "train", "--train-images", str(tmp_path / "pictures"),
                           "--train-annotations", str(tmp_path / "train.json"))
    assert status == 0 and "OK: 0 errors, 0 warnings" in report, report
    status, report = check(capsys, "--splits", "train", "--train-images", str(tmp_path / "nowhere"),
                           "--train-annotations", str(tmp_path / "train.json"))
    assert status == 1 and "--train-images" in report and "is no folder" in report


def test_the_start_check_names_the_share_to_go_on_without_them_only_where_some_images_are_found(clean):
    images = json.loads((clean / "annotations" / "instances_train2017.json").read_text())["images"]
    gone = [*images, {**images[0], "file_name": "gone.png"}, {**images[1], "file_name": "lost.png"}]
    with pytest.raises(UserError, match=rf"^train data: 2 of {len(gone)} images cannot be used \(missing: 2\); first: "
                                        r".*gone\.png missing; fix them \(python3 tools/check_dataset.py lists "
                                        r"each\), or raise --max-bad-samples \(0\.1\) above their share \(2 of "
                                        rf"{len(gone)} here; each process counts its own\) to go on without them$"):
        check_before_training(clean / "train2017", gone, "train", 0.1)
    check_before_training(clean / "train2017", gone, "train", 2 / len(gone))  # their share is enough
    with pytest.raises(UserError, match=r"no image of the JSON is found, so check that its file_names are written "
                                        r"relative to .*val2017$"):
        check_before_training(clean / "val2017", images, "train", 0.0)


def test_a_person_without_keypoints_is_a_warning_in_the_training_file(keypoint_dataset, tmp_path, capsys):
    """trains_keypoints read the missing array as a list (a TypeError in the check)."""
    root = _edited_keypoints(keypoint_dataset, tmp_path, lambda data: data["annotations"][0].update(keypoints=None))
    status, report = check(capsys, root, "--dataset", "coco_kp", "--splits", "train")
    assert status == 0 and "WARNING no keypoints" in report, report
    assert len(build_dataset(root, "coco_kp", "train", None)) > 0


def test_a_missing_file_is_named_with_what_the_disk_suggests(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "Photo.JPG").touch()
    (tmp_path / "dir.jpg").mkdir()
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "nowhere.jpg")
    names = ["photo.jpg", "dir.jpg", "broken.jpg", "sub/gone.jpg", "train2017/a.jpg", "imgs\\a.jpg",
             "..\\..\\media\\upload\\a.jpg"]
    reasons = missing_reasons(tmp_path, names)
    assert reasons["photo.jpg"] == ("missing (the folder has 'Photo.JPG', a name that differs in letter case; "
                                    "write it as on disk)")
    assert reasons["dir.jpg"] == reasons["broken.jpg"] == "missing (a link to nothing, or a folder, has its name)"
    assert reasons["sub/gone.jpg"] == "missing"
    assert reasons["train2017/a.jpg"].startswith("missing (there is no folder 'train2017' in ")
    assert reasons["imgs\\a.jpg"] == "missing (file_name separates folders with '\\'; write '/')"
    assert reasons["..\\..\\media\\upload\\a.jpg"] == (
        "missing (file_name separates folders with '\\', and read with '/' it leaves the image folder: write it "
        "from the image folder, with '/')"), "as Label Studio writes them"


def test_the_report_counts_a_kind_only_when_it_has_several_findings():
    report = SplitReport("train", images=3, annotations=4)
    report.findings = [Finding("note", "image without annotations", "2 images have no annotations"),
                       Finding("warning", "box outside image", "a"), Finding("warning", "box outside image", "b")]
    text = format_report([report])
    assert "  NOTE image without annotations:\n    2 images have no annotations" in text
    assert "  WARNING box outside image (2):\n    a\n    b" in text


def test_many_categories_are_summed_up_and_a_crowded_image_is_named():
    counts = {f"c{i}": count for i, count in enumerate([500, 40, 3, 1, 1, 0] + [7] * 20)}
    report = SplitReport("val", images=10, annotations=661, class_counts=counts, scored_instances=661,
                         most_instances=(150, 42), most_of_one_category=(120, 43))
    text = format_report([report])
    assert ("  instances per category: c0 500 (73%), c1 40 (6%), c6 7 (1%), c7 7 (1%), c8 7 (1%), c9 7 (1%), c10 7 "
            "(1%), c11 7 (1%), c12 7 (1%), c13 7 (1%); 16 more categories: 1 with none, 2 with 1, 13 with 2-10\n"
            in text), text
    assert ("  instances per image: 66.1 on average, at most 150 (image 42), 120 of one category (image 43); the "
            "R-CNNs keep 100 detections an image unless --detections-per-image raises it; COCO's scoring counts at "
            "most 100 per image and category unless --eval-max-dets raises it") in text
    report.most_of_one_category = (90, 42)
    assert ("at most 150 (image 42), 90 of one category (image 42); the R-CNNs keep 100 detections an image unless "
            "--detections-per-image raises it") in format_report([report])
    few = format_report([SplitReport("val", images=2, annotations=3, class_counts={"b": 2, "a": 1},
                                     scored_instances=3, most_instances=(2, 7), most_of_one_category=(2, 7))])
    assert "instances per category: b 2 (67%), a 1 (33%)\n  instances per image: 1.5 on average, at most 2 (image 7)" \
        in few


def test_categories_with_validation_instances_and_none_in_training_are_noted(clean, tmp_path, capsys):
    val = json.loads((clean / "annotations" / "instances_val2017.json").read_text())
    untrained = min(a["category_id"] for a in val["annotations"] if not a["iscrowd"])
    name = next(c["name"] for c in val["categories"] if c["id"] == untrained)

    def drop(root, data):
        data["annotations"] = [a for a in data["annotations"] if a["category_id"] != untrained]

    root = _plant(clean, tmp_path, drop)
    status, report = check(capsys, root, "--no-decode")  # the training file's own warning: no instances of it
    assert status == 0, report
    assert f"NOTE categories never trained:\n    1 category has val instances and none in training (first: " \
           f"{name!r}, id {untrained})" in report
    assert "never trained" not in check(capsys, clean, "--no-decode")[1]
    assert "never trained" not in check(capsys, root, "--splits", "val", "--no-decode")[1], "no training file read"

"""tools/export.py and deploy.py: ONNX export of checkpoints and weights, its check against PyTorch with
onnxruntime, predict.py --onnx, and the comparison's own logic. Models are random, at 64 px."""

from __future__ import annotations

import argparse
import ast
import errno
import io
import json
from collections import Counter
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
import torchvision
from pycocotools.coco import COCO
from torchvision.models.detection.transform import GeneralizedRCNNTransform

import deploy
from coco_utils import CategoryMap
from conftest import ROOT, run_cli
from errors import UserError
from models import build_model
from tools import export
from tools.make_coco_dataset import CATEGORIES

# requirements-export.txt, which tools/setup.sh installs; an install without it runs the rest of the suite.
onnx = pytest.importorskip("onnx", reason="onnx is not installed (requirements-export.txt)")

SIZES = {"min_size": 64, "max_size": 96}
FEW = 3  # detections per image of the Mask and Keypoint R-CNN models


def largest_feature(model: torch.nn.Module, image: torch.Tensor) -> float:
    """The largest sum of box-head features over the model's regions of one image."""
    sums = []
    hook = model.roi_heads.box_head.register_forward_hook(lambda module, args, out: sums.append(out.sum(1)))
    with torch.inference_mode():
        model([image.float() / 255])
    hook.remove()
    return sums[0].max().item()


def detecting_shapes(model: torch.nn.Module, name: str) -> None:
    """Random weights detect everything, blank images included. Here class 1 scores a region by its box-head
    features, which are small on a blank image: so the generated shapes have detections and the blank image
    none at all, the case ONNX graphs have failed on (pytorch/vision#2251)."""
    model.roi_heads.detections_per_img = FEW
    images = dict(export.check_images(argparse.Namespace(data_path=None), name, *export.trained_size(model)))
    shapes = largest_feature(model, images["generated (export sample)"])
    blank = largest_feature(model, images["blank gray"])
    assert shapes > 1.5 * blank, "the blank image no longer differs from the shapes for the random model"
    slope = 8 / (shapes - blank)
    with torch.no_grad():
        classifier = model.roi_heads.box_predictor.cls_score
        classifier.weight.zero_()
        classifier.bias.fill_(-20.0)  # the other classes never
        classifier.bias[0] = 0.0  # background
        classifier.weight[1] = slope
        classifier.bias[1] = -slope * (shapes + blank) / 2  # logit +4 on the shapes, -4 on the blank image


def write_checkpoint(path, name: str, categories: list[dict]) -> None:
    """A checkpoint as train.py writes it (what export and predict read) of a random model that detects shapes."""
    torch.manual_seed(0)
    model = build_model(name, len(categories) + 1, None, None, None, **SIZES).eval()
    detecting_shapes(model, name)
    torch.save({"model": model.state_dict(), "args": {"model": name, "dataset": "coco", **SIZES},
                "categories": categories, "num_classes": len(categories) + 1, "labels_are_category_ids": False},
               path)


def export_few(*argv: str) -> tuple[int, str]:
    """export.main in this process, with at most FEW detections per image: the mask and keypoint heads cost about
    1 and 4 GFLOP per detection, so torchvision's 100 take minutes on a CPU, and the graph is the same. Its exit
    status and what it printed."""
    real_load = export.load_model

    def load_few(args):
        model, category_map, name = real_load(args)
        model.roi_heads.detections_per_img = FEW
        return model, category_map, name

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(printed), redirect_stderr(printed):
        patch.setattr(export, "load_model", load_few)
        status = export.main(list(argv))
    return status, printed.getvalue()


@pytest.fixture(scope="module")
def mask_export(tmp_path_factory):
    """A Mask R-CNN checkpoint exported by tools/export.py: (the ONNX file, exit status, what it printed)."""
    folder = tmp_path_factory.mktemp("export")
    categories = [{"id": c["id"], "name": c["name"]} for c in CATEGORIES]
    write_checkpoint(folder / "model_best.pth", "maskrcnn_resnet50_fpn", categories)
    status, printed = export_few("--checkpoint", str(folder / "model_best.pth"), "--output",
                                 str(folder / "new" / "model.onnx"))  # a folder made as train.py makes its own
    (folder / "model_best.pth").unlink()
    yield folder / "new" / "model.onnx", status, printed
    (folder / "new" / "model.onnx").unlink(missing_ok=True)


def table_row(stdout: str, image: str) -> list[str]:
    return next(line for line in stdout.splitlines() if line.startswith(image)).split()


def test_mask_rcnn_export_verifies(mask_export):
    path, status, printed = mask_export
    assert status == 0, printed
    assert "verification passed" in printed
    assert "checked an image of another size than the export's sample: generated, portrait" in printed
    assert "checked an image without detections above the threshold: blank gray" in printed
    for image in ("generated (export sample)", "generated, portrait"):
        counts, mask_iou = table_row(printed, image)[-6], table_row(printed, image)[-2]
        assert int(counts.split("/")[0]) > 0 and float(mask_iou) >= deploy.TOLERANCES["mask_iou"], printed
    assert table_row(printed, "blank gray")[3:5] == ["0/0", "0"]  # nothing detected at all
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert json.loads(meta["categories"]) == [{"id": c["id"], "name": c["name"]} for c in CATEGORIES]
    assert json.loads(meta["outputs"]) == ["boxes", "labels", "scores", "masks"]
    assert meta["input_dtype"] == "uint8"
    assert json.loads(meta["detections_per_image"]) == FEW  # the cap the exported graph keeps
    assert json.loads(meta["score_thresh"]) == 0.05  # torchvision's box threshold, which the graph keeps


def test_onnx_model_outputs(mask_export):
    """Dynamic height and width, masks pasted at image size, and an empty output where nothing is detected."""
    model = deploy.OnnxModel(mask_export[0])
    assert model.name == "maskrcnn_resnet50_fpn" and model.category_map.category_id(1) == CATEGORIES[0]["id"]
    shapes = model.run_one(export.shapes_image(72, 100, 3, False))
    assert shapes["masks"].shape[1:] == (1, 72, 100) and len(shapes["boxes"]) > 0
    blank = model([torch.full((3, 40, 56), 0.5)])[0]  # floats in 0-1 are taken too
    assert blank["boxes"].shape == (0, 4) and blank["masks"].shape == (0, 1, 40, 56)


def test_onnx_model_keeps_fewer_detections_than_its_file_where_asked(mask_export):
    image = export.shapes_image(72, 100, 3, False)
    every = deploy.OnnxModel(mask_export[0]).run_one(image)
    assert len(every["scores"]) == FEW, "the file's own cap"
    best = deploy.OnnxModel(mask_export[0], detections_per_image=FEW - 1).run_one(image)
    assert {k: v.shape[0] for k, v in best.items()} == {k: FEW - 1 for k in every}
    assert torch.equal(every["scores"], every["scores"].sort(descending=True).values), "the cut keeps the best"
    for key in every:
        assert torch.equal(best[key], every[key][:FEW - 1])


def test_onnx_model_refuses_more_detections_than_its_file_keeps(mask_export):
    with pytest.raises(UserError, match=f"--detections-per-image {FEW + 1}: --onnx .* keeps at most {FEW} per image; "
                                        f"ask for {FEW} or fewer, or export again"):
        deploy.OnnxModel(mask_export[0], detections_per_image=FEW + 1)
    with pytest.raises(UserError, match="does not record how many detections it keeps"):
        deploy.OnnxModel._checked_keep("old.onnx", 5, None)
    assert deploy.OnnxModel._checked_keep("old.onnx", None, None) is None


def test_predict_with_onnx(mask_export, tiny_dataset, tmp_path):
    out = tmp_path / "predictions"
    result = run_cli("tools/predict.py", "--onnx", str(mask_export[0]), str(tiny_dataset / "val2017"),
                     "--output-dir", str(out), "--score-thresh", "0.05", "--detections-per-image", str(FEW - 1))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "note:" not in result.stdout, "0.05 is what the file keeps"
    assert len(list(out.glob("*.jpg"))) == len(list((tiny_dataset / "val2017").glob("*.jpg")))
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions and {p["category_id"] for p in predictions} <= {c["id"] for c in CATEGORIES}
    per_image = Counter(p["image_id"] for p in predictions)
    assert max(per_image.values()) == FEW - 1, per_image
    gt = COCO(str(tiny_dataset / "annotations" / "instances_val2017.json"))
    assert len(gt.loadRes(predictions).getAnnIds()) == len(predictions)


def test_predict_with_onnx_says_that_the_file_keeps_no_lower_scores(mask_export, tiny_dataset, tmp_path, capsys):
    from tools import predict

    image = sorted((tiny_dataset / "val2017").glob("*.jpg"))[0]
    assert predict.main(["--onnx", str(mask_export[0]), str(image), "--output-dir", str(tmp_path),
                         "--score-thresh", "0.01", "--no-pictures"]) == 0
    assert (f"note: {mask_export[0]} keeps detections scoring above 0.05, its model's threshold when exported, so "
            f"none under that is written for --score-thresh 0.01") in capsys.readouterr().out


def test_faster_rcnn_weights_export(tmp_path):
    name, weights = "fasterrcnn_resnet50_fpn", tmp_path / "faster.pth"
    torch.manual_seed(0)
    model = build_model(name, 91, None, None, None, **SIZES).eval()
    detecting_shapes(model, name)
    torch.save(model.state_dict(), weights)
    result = run_cli("tools/export.py", "--weights", str(weights), "--model", name, "--min-size", "64", "--max-size",
                     "96", "--output", str(tmp_path / "faster.onnx"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verification passed" in result.stdout
    assert int(table_row(result.stdout, "generated (export sample)")[-6].split("/")[0]) > 0, result.stdout
    model = deploy.OnnxModel(tmp_path / "faster.onnx")
    assert [o.name for o in model.session.get_outputs()] == ["boxes", "labels", "scores"]
    assert model.category_map.keep_ids and model.category_map.name(1) == "person"  # COCO's own
    (tmp_path / "faster.onnx").unlink()  # pytest keeps its last runs' folders; this file is 167 MB


def test_keypoint_rcnn_export(tmp_path):
    write_checkpoint(tmp_path / "kp.pth", "keypointrcnn_resnet50_fpn", [{"id": 1, "name": "person"}])
    status, printed = export_few("--checkpoint", str(tmp_path / "kp.pth"), "--output", str(tmp_path / "kp.onnx"),
                                 "--input-dtype", "float32")
    assert status == 0, printed
    row = table_row(printed, "generated (export sample)")
    assert row[-1] != "-" and float(row[-1]) <= deploy.TOLERANCES["keypoint"], printed  # keypoints compared
    model = deploy.OnnxModel(tmp_path / "kp.onnx")
    assert model.names == ["boxes", "labels", "scores", "keypoints", "keypoints_scores"]
    assert model.session.get_inputs()[0].type == "tensor(float)"
    (tmp_path / "kp.onnx").unlink()


def test_bad_input_is_one_line(tmp_path, capsys):
    assert export.main(["--checkpoint", str(tmp_path / "missing.pth")]) == 2
    assert export.main(["--weights", "x.pth", "--output", str(tmp_path / "new" / "m.onnx")]) == 2
    assert export.main(["--weights", "x.pth", "--opset", "11"]) == 2
    assert export.main(["--weights", "x.pth", "--output", str(tmp_path / "m.onnx"), "--min-size", "0"]) == 2
    assert export.main(["--weights", "x.pth", "--output", str(tmp_path / "m.onnx"), "--score-thresh", "5"]) == 2
    assert export.main(["--weights", "x.pth", "--output", str(tmp_path / "m.onnx"), "--benchmark", "-1"]) == 2
    (tmp_path / "afile").write_text("")
    assert export.main(["--weights", "x.pth", "--output", str(tmp_path / "afile" / "m.onnx")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 7 and all(line.startswith("error: ") for line in lines)
    assert f"{tmp_path / 'afile'} is a file, not a folder" in lines[6]
    assert "no such file" in lines[0] and "x.pth" in lines[1] and "16 or more" in lines[2]
    assert not (tmp_path / "new").exists(), "--output's folder is made only once the model is exported"
    assert "--min-size 0 must be at least 1" in lines[3]
    assert "--score-thresh 5.0 must be a score between 0 and 1" in lines[4]
    assert "--benchmark -1 must be 0 (no timing) or more rounds" in lines[5]


def test_failed_export_is_one_line(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("Failed to export the model\n\n## Exception summary\n\n<class 'torch.fx.Guard'>: no guard"
                           "\nCaused by: (boxes.py:86 in batched_nms)\nmore")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    model = build_model("fasterrcnn_mobilenet_v3_large_320_fpn", 2, None, None, None, **SIZES)
    with pytest.raises(UserError) as error:
        deploy.export(model, "fasterrcnn_mobilenet_v3_large_320_fpn", torch.zeros(3, 64, 64, dtype=torch.uint8),
                      tmp_path / "m.onnx", {})
    message = str(error.value)
    assert "\n" not in message and "Guard: no guard Caused by: (boxes.py:86 in batched_nms)" in message
    assert "Mask R-CNN" in message and not list(tmp_path.iterdir())


@pytest.mark.parametrize("outcome", ["passes", "fails", "crashes"])
def test_only_a_checked_export_replaces_the_output(outcome, tmp_path, monkeypatch, capsys):
    """The export is checked in a file beside --output: a failed or interrupted check leaves the earlier file as
    it was and no temporary file. The exporter and onnxruntime are stubbed: this is about the files."""
    name, output = "fasterrcnn_mobilenet_v3_large_320_fpn", tmp_path / "model.onnx"
    output.write_bytes(b"earlier good export")
    model = build_model(name, 2, None, None, None, **SIZES)
    category_map = CategoryMap.from_categories([{"id": 1, "name": "shape"}], "coco")
    checked = []

    def write(model, name, sample, path, *rest) -> float:
        path.write_bytes(b"new export")
        return 0.0

    def load(path):
        checked.append((path, path.read_bytes()))
        if outcome == "crashes":
            raise UserError("onnxruntime could not load it")
        return None

    monkeypatch.setattr(export, "load_model", lambda args: (model, category_map, name))
    monkeypatch.setattr(deploy, "export", write)
    monkeypatch.setattr(deploy, "OnnxModel", load)
    monkeypatch.setattr(deploy, "verify", lambda *args: [deploy.Comparison(
        "generated (export sample)", 1, 1, unmatched=int(outcome == "fails"), size=(64, 85))])
    status = export.main(["--weights", "x.pth", "--output", str(output)])
    err = capsys.readouterr().err.splitlines()
    assert list(tmp_path.iterdir()) == [output]
    if outcome == "passes":
        assert status == 0 and output.read_bytes() == b"new export" and err == []
    else:
        assert status == (1 if outcome == "fails" else 2) and output.read_bytes() == b"earlier good export"
        assert len(err) == 1 and err[0].startswith("error: ")
    if outcome == "fails":
        assert "verification FAILED" in err[0] and "unchanged" in err[0] and "without a counterpart" in err[0]
    assert checked[0][0] != output and checked[0][1] == b"new export"  # the new file was the one checked


def test_foreign_onnx_file_is_refused(tmp_path):
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["image"], ["boxes"])], "plain",
                                   [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.UINT8, [3, 4, 4])],
                                   [onnx.helper.make_tensor_value_info("boxes", onnx.TensorProto.UINT8, [3, 4, 4])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), tmp_path / "p.onnx")
    with pytest.raises(UserError, match="no model and category metadata"):
        deploy.OnnxModel(tmp_path / "p.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(UserError, match="could not be loaded"):
        deploy.OnnxModel(tmp_path / "junk.onnx")


def test_a_graph_that_fails_on_an_image_is_one_line(tmp_path, capfd):
    shape = onnx.helper.make_tensor("shape", onnx.TensorProto.INT64, [2], [-1, 7])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Reshape", ["image", "shape"], ["boxes"])], "failing",
                                   [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.UINT8,
                                                                       [3, "h", "w"])],
                                   [onnx.helper.make_tensor_value_info("boxes", onnx.TensorProto.UINT8, None)],
                                   initializer=[shape])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    meta = {"model": "fasterrcnn_resnet50_fpn", "input_dtype": "uint8",
            "categories": json.dumps([{"id": 1, "name": "thing"}])}
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, tmp_path / "failing.onnx")
    onnx_model = deploy.OnnxModel(tmp_path / "failing.onnx")
    assert onnx_model.run_one(torch.zeros(3, 7, 5, dtype=torch.uint8))["boxes"].shape == (15, 7)
    with pytest.raises(UserError) as error:
        onnx_model.run_one(torch.zeros(3, 4, 5, dtype=torch.uint8))
    assert str(error.value).startswith(f"onnxruntime could not run {tmp_path / 'failing.onnx'} on a 5x4 image (")
    assert "\n" not in str(error.value) and "export the model again" in str(error.value)
    assert capfd.readouterr().err == "", "onnxruntime's own log says nothing"

    class Nothing(torch.nn.Module):
        def forward(self, images):
            return [{} for _ in images]

    with pytest.raises(UserError) as error:  # export's check, where the file is the one just made
        deploy.verify(Nothing(), onnx_model, [("blank gray", torch.zeros(3, 4, 5, dtype=torch.uint8))], 0.5)
    assert str(error.value).startswith("verification FAILED: onnxruntime could not run the exported graph on blank "
                                       "gray (5x4: ")
    assert "export the model again" not in str(error.value)


def detections(boxes, scores, labels) -> dict:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels)}


def test_compare_matches_across_the_threshold_and_flags_differences():
    expected = detections([[0, 0, 10, 10], [20, 20, 40, 40]], [0.9, 0.501], [1, 2])
    close = detections([[20, 20, 40.01, 40], [0, 0, 10, 10]], [0.499, 0.9], [2, 1])  # order and threshold differ
    assert deploy.compare("a", expected, close, 0.5).problems() == []
    shifted = detections([[0, 0, 12, 10], [20, 20, 40, 40]], [0.9, 0.501], [1, 2])
    assert "box coordinates differ by 2 px" in deploy.compare("a", expected, shifted, 0.5).problems()[0]
    relabelled = detections([[0, 0, 10, 10], [20, 20, 40, 40]], [0.9, 0.501], [1, 3])
    assert deploy.compare("a", expected, relabelled, 0.5).problems() == ["a: 2 detections without a counterpart"]
    low = deploy.compare("a", detections([[0, 0, 10, 10]], [0.1], [1]), detections([[0, 0, 10, 19]], [0.1], [1]), 0.5)
    assert low.matched == 0 and low.problems() == [], "under the threshold on both sides nothing is compared"


def test_equal_scores_at_the_most_detections_per_image_may_keep_other_detections():
    # Two runtimes full at a cap of 2, each keeping another of two detections tied at 0.3: not a difference.
    expected = detections([[0, 0, 10, 10], [20, 20, 40, 40]], [0.9, 0.3], [1, 1])
    actual = detections([[0, 0, 10, 10], [50, 50, 70, 70]], [0.9, 0.3], [1, 1])
    tied = deploy.compare("a", expected, actual, 0.1, cap=2)
    assert (tied.unmatched, tied.at_cut, tied.problems()) == (0, 2, [])
    assert "not compared: 2 detections" in deploy.report([tied], 0.1)[-1]
    assert deploy.compare("a", expected, actual, 0.1, cap=3).unmatched == 2, "a side short of its cap cut nothing"
    higher = detections([[0, 0, 10, 10], [50, 50, 70, 70]], [0.9, 0.35], [1, 1])
    assert deploy.compare("a", expected, higher, 0.1, cap=2).unmatched == 1, "above the other's cut it is missing"
    rounded = detections([[0, 0, 10, 10], [50, 50, 70, 70]], [0.9, 0.305], [1, 1])  # within the score tolerance
    assert deploy.compare("a", expected, rounded, 0.1, cap=2).unmatched == 0

    class Full(torch.nn.Module):  # a model that keeps 2 detections an image, and the other runtime's pick
        roi_heads = type("Heads", (), {"detections_per_img": 2})()

        def forward(self, images):
            return [expected]

        def run_one(self, image):
            return actual

    verified = deploy.verify(Full(), Full(), [("a", torch.zeros(3, 4, 4, dtype=torch.uint8))], 0.1)
    assert verified[0].at_cut == 2, "the check takes the model's most detections per image"


def test_a_check_that_compared_no_detection_says_so_and_sizes_read_width_by_height(tmp_path):
    none = deploy.Comparison("a.jpg", 0, 0, size=(48, 64))
    some = deploy.Comparison("b.jpg", 2, 2, matched=2, size=(48, 64))
    assert "passed on counts only" in export.passed([none], 0.5, tmp_path / "m.onnx")
    assert export.passed([none, some], 0.5, tmp_path / "m.onnx").startswith("verification passed: onnxruntime")
    assert "  64x48" in deploy.report([some], 0.5)[1]


def test_mask_iou_leaves_out_pixels_at_the_cut():
    expected = torch.tensor([[[0.9, 0.9, 0.5001, 0.1]]])
    assert deploy.mask_iou(expected, torch.tensor([[[0.9, 0.9, 0.4999, 0.1]]])).item() == 1.0
    assert deploy.mask_iou(expected, torch.tensor([[[0.9, 0.1, 0.5, 0.1]]])).item() == 0.5


def test_a_failed_write_of_the_onnx_file_is_one_line(tmp_path):
    """deploy writes through checkpoint.write_atomic (tests/test_checkpoint.py covers its causes); its remedy is
    export's own flag."""
    with pytest.raises(UserError, match=r"could not write .*m\.onnx: .*; choose another --output"):
        deploy.write_atomic(tmp_path / "missing" / "m.onnx", lambda f: f.write(b"x"), remedy="choose another --output")
    assert list(tmp_path.iterdir()) == []


def test_training_does_not_import_the_export_set():
    """Only deploy.py imports onnx and onnxruntime, and only inside the functions that use them."""
    optional = {"onnx", "onnxruntime", "onnxscript"}
    for path in ROOT.glob("**/*.py"):
        parts = path.relative_to(ROOT).parts
        if parts[0] in ("tests", "datasets", "output") or parts[0].startswith("."):
            continue
        tree = ast.parse(path.read_text())
        nodes = tree.body if path.name == "deploy.py" else list(ast.walk(tree))
        imported = {alias.name.split(".")[0] for node in nodes if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module.split(".")[0] for node in nodes if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & optional, f"{path} imports {imported & optional}"


def test_data_path_images_come_from_val2017_where_there_is_one(tmp_path):
    from PIL import Image
    for name in ("val2017/x/b.png", "val2017/a.png", "train2017/c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 8), (9, 9, 9)).save(tmp_path / name)
    images = export.data_images(str(tmp_path))
    assert [name for name, _ in images] == ["a.png", "b.png"]
    assert all(image.shape == (3, 8, 12) for _, image in images)
    assert [name for name, _ in export.data_images(str(tmp_path / "train2017"))] == ["c.png"]


def test_data_path_images_that_cannot_be_read_are_left_out_with_a_warning(tmp_path, capsys):
    from PIL import Image
    (tmp_path / "a.jpg").write_bytes(b"not an image")
    for name in ("b.png", "c.png", "d.png", "e.png"):
        Image.new("RGB", (12, 8), (9, 9, 9)).save(tmp_path / name)
    assert [name for name, _ in export.data_images(str(tmp_path))] == ["b.png", "c.png", "d.png"]
    warning = capsys.readouterr().err
    assert warning.startswith("warning: --data-path: ") and "a.jpg" in warning and "the check leaves it out" in warning
    for name in ("b.png", "c.png", "d.png", "e.png"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(UserError, match=r"--data-path: none of the first 5 images in .* could be read \(the first: "
                                        r".*a\.jpg.*\); give a folder of readable images"):
        export.data_images(str(tmp_path))


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(export.tempfile, "TemporaryFile", read_only)
    with pytest.raises(UserError, match=rf"--output {tmp_path}/m\.onnx: cannot write in {tmp_path} \(read-only file "
                                        r"system\); choose another --output"):
        export.check_output(tmp_path / "m.onnx")
    monkeypatch.undo()
    export.check_output(tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_images_of_the_samples_size_from_data_path_leave_the_generated_portrait_in(tmp_path):
    from PIL import Image
    (tmp_path / "val2017").mkdir()
    Image.new("RGB", (64, 48), (9, 9, 9)).save(tmp_path / "val2017" / "a.png")
    labels = [label for label, _ in export.check_images(argparse.Namespace(data_path=str(tmp_path)), "x", 48, 64)]
    assert labels == ["generated (export sample)", "a.png", "generated, portrait", "blank gray"]


def test_coverage_counts_another_size_only_where_it_had_detections():
    same, blank = deploy.Comparison("a.png", 3, 3, size=(48, 64)), deploy.Comparison("blank gray", 0, 0, size=(38, 48))
    lines = export.coverage([deploy.Comparison("sample", 2, 2, size=(48, 64)), same, blank])
    assert lines == ["note: no image of another size than the sample's had detections to compare",
                     "checked an image without detections above the threshold: blank gray"]


class Resize(torch.nn.Module):
    """torchvision's resize alone, as the detection models run it at 800-1333."""

    def __init__(self):
        super().__init__()
        self.transform = GeneralizedRCNNTransform(800, 1333, [0.0] * 3, [1.0] * 3)

    def forward(self, image):
        return self.transform.resize(image.float(), None)[0]


def test_the_graph_resizes_images_to_pytorchs_size():
    """The exporter computes torchvision's scale in float32, and onnxruntime then made 375x500 799x1066 (PyTorch:
    800x1066), and 1 pixel less on about 15% of sizes."""
    ort = pytest.importorskip("onnxruntime")
    buffer = io.BytesIO()
    with deploy.exact_resize_while_tracing():
        torch.onnx.export(Resize().eval(), (torch.zeros(3, 300, 400, dtype=torch.uint8),), buffer, dynamo=False,
                          opset_version=deploy.OPSET, input_names=["image"], output_names=["out"],
                          dynamic_axes={"image": {1: "h", 2: "w"}, "out": {1: "H", 2: "W"}})
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    sizes = [(375, 500), (500, 375), (3000, 70), (100, 130), (165, 159)]
    drawn = torch.randint(40, 2000, (40, 2), generator=torch.Generator().manual_seed(0))
    sizes += [tuple(pair) for pair in drawn.tolist()]
    for height, width in sizes:
        image = torch.zeros(3, height, width, dtype=torch.uint8)
        with torch.inference_mode():
            expected = tuple(Resize()(image).shape[-2:])
        assert session.run(None, {"image": image.numpy()})[0].shape[-2:] == expected, (height, width)
    restored = torchvision.models.detection.transform._resize_image_and_masks
    assert restored.__module__ == "torchvision.models.detection.transform"


class Decode(torch.nn.Module):
    """Box-head regressions of 3 classes decoded against the rows of `boxes` (any count, none included), as the
    box head decodes its regions."""

    def forward(self, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return torchvision.models.detection._utils.BoxCoder((10.0, 10.0, 5.0, 5.0)).decode(rel_codes, [boxes])


@pytest.mark.parametrize("traced_count", [0, 4])
def test_the_graph_decodes_any_number_of_regions_whichever_the_sample_had(traced_count):
    """torchvision's decode branches on whether there are regions; traced, a graph of a sample with regions failed
    on an image with none (and the other way round), as a barely trained model's proposals give."""
    ort = pytest.importorskip("onnxruntime")
    generator = torch.Generator().manual_seed(0)

    def inputs(count):
        corners = torch.rand(count, 2, generator=generator) * 50
        return torch.randn(count, 12, generator=generator), torch.cat([corners, corners + 10], dim=1)

    buffer = io.BytesIO()
    with deploy.traceable_box_decoding():
        torch.onnx.export(Decode().eval(), inputs(traced_count), buffer, dynamo=False, opset_version=deploy.OPSET,
                          input_names=["codes", "boxes"], output_names=["out"],
                          dynamic_axes={"codes": {0: "n"}, "boxes": {0: "n"}, "out": {0: "n"}})
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for count in (0, 1, 5):
        codes, boxes = inputs(count)
        expected = Decode()(codes, boxes).reshape(count, 3, 4)  # eager keeps (0, 12) for none
        out = session.run(None, {"codes": codes.numpy(), "boxes": boxes.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-5, atol=1e-4)
    assert torchvision.models.detection._utils.BoxCoder.decode.__module__ == "torchvision.models.detection._utils"

"""bench/eval_parity.py: each side runs in a fresh process from the repository's root, so the paths it is
given are made absolute first (the evaluations themselves need torchvision's reference, which CI lacks)."""

from __future__ import annotations

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import eval_parity  # noqa: E402


def test_relative_paths_reach_both_sides_as_absolute_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["eval_parity.py", "--data-path", "data", "--checkpoint", "m/checkpoint.pth",
                                      "--reference", "ref/detection", "--device", "cpu"])
    given = []

    def side(name, args):
        given.append((name, args.data_path, args.checkpoint, args.reference))
        return {"bbox": [0.5] * 12, "segm": [0.25] * 12}

    monkeypatch.setattr(eval_parity, "run_side", side)
    eval_parity.main()
    paths = (str(tmp_path / "data"), str(tmp_path / "m" / "checkpoint.pth"), str(tmp_path / "ref" / "detection"))
    assert given == [("ours", *paths), ("reference", *paths)]
    assert '"largest_difference": {"bbox": 0.0, "segm": 0.0}' in capsys.readouterr().out


def test_both_sides_evaluate_with_the_runs_saved_cap_and_thresholds():
    import torchvision

    options = eval_parity.saved_inference_options({"args": {"detections_per_image": 7, "rpn_score_thresh": 0.2,
                                                             "box_score_thresh": 0.001, "min_size": 64}})
    assert options == {"box_detections_per_img": 7, "rpn_score_thresh": 0.2, "box_score_thresh": 0.001}
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3,
                                                               **options)
    assert model.roi_heads.detections_per_img == 7 and model.rpn.score_thresh == 0.2
    assert model.roi_heads.score_thresh == 0.001
    assert eval_parity.saved_inference_options({"args": {"detections_per_image": None}}) == {}
    assert eval_parity.saved_inference_options({}) == {}

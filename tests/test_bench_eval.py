"""bench/bench_eval.py's side-by-side rounds: the two commands take turns in ABBA order and the ratio is the
median of the rounds' (the commands themselves are train.py runs, which other tests cover)."""

from __future__ import annotations

import subprocess
import sys

import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import bench_eval  # noqa: E402


def fake_runs(walls: dict[str, list[float]], calls: list[str]):
    """Two stand-ins for the commands, each returning its next wall time and noting the order of calls."""
    def runner(name: str):
        def run() -> dict:
            calls.append(name)
            return {"wall_s": walls[name].pop(0), "box_AP": 0.0, "mask_AP": 0.0}
        return run
    return runner("ours"), runner("reference")


def test_rounds_alternate_which_runs_first_and_report_the_median_ratio():
    calls: list[str] = []
    ours, reference = fake_runs({"ours": [10.0, 12.0, 30.0], "reference": [40.0, 30.0, 60.0]}, calls)
    result = bench_eval.side_by_side(ours, reference, rounds=3)
    assert calls == ["ours", "reference", "reference", "ours", "ours", "reference"]
    assert [r["first"] for r in result["rounds"]] == ["ours", "reference", "ours"]
    assert [r["ratio"] for r in result["rounds"]] == [0.25, 0.4, 0.5]
    assert result["wall_ratio"] == 0.4
    assert result["ours"]["wall_s"] == 30.0 and result["reference"]["wall_s"] == 60.0  # the last round's runs


def test_one_round_is_the_plain_ratio():
    calls: list[str] = []
    ours, reference = fake_runs({"ours": [9.0], "reference": [27.0]}, calls)
    result = bench_eval.side_by_side(ours, reference, rounds=1)
    assert calls == ["ours", "reference"] and result["wall_ratio"] == 0.333


def test_rounds_without_the_reference_are_refused():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_eval.py"), "--data-path", "d",
                             "--checkpoint", "c", "--rounds", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--rounds 2" in result.stderr


def test_checkpoints_the_reference_would_evaluate_otherwise_are_named(tmp_path):
    plain = {"model": {}, "args": {"weights_backbone": None, "weights": None}}
    cases = {"plain": plain, "average": {**plain, "model_ema": {"model": {}}},
             "pretrained": {**plain, "args": {"weights_backbone": "ResNet50_Weights.IMAGENET1K_V1"}}}
    found = {}
    for name, checkpoint in cases.items():
        torch.save(checkpoint, tmp_path / f"{name}.pth")
        found[name] = bench_eval.not_comparable(str(tmp_path / f"{name}.pth"))
    assert found["plain"] is None
    assert "moving average" in found["average"] and "pretrained weights" in found["pretrained"]


def test_a_relative_output_folder_is_the_callers_not_the_repositorys(tmp_path, monkeypatch, capsys):
    """Ours runs from the repository's root: a relative --output-dir wrote its predictions into the repository."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["bench_eval.py", "--data-path", "d", "--checkpoint", "c.pth", "--device", "cpu",
                                      "--output-dir", "runs"])
    calls = []
    monkeypatch.setattr(bench_eval, "timed", lambda command, cwd, output_dir: calls.append(output_dir) or
                        {"wall_s": 1.0, "box_AP": 0.0, "mask_AP": 0.0})
    bench_eval.main()
    assert calls == [tmp_path / "runs" / "ours"]
    assert '"benchmark": "eval"' in capsys.readouterr().out

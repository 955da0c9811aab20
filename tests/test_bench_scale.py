"""bench/bench_scale.py runs end to end at a small size, beside torchvision's reference where a checkout of its
references/detection is found ($TORCHVISION_REFERENCE, or /work/ref/references/detection), and prints the
figures it promises; it leaves no dataset behind unless asked to keep it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, load_file_module, reference_checkout


def _check(figures: dict, workers: int, samples: int) -> None:
    assert "error" not in figures, figures.get("error")
    assert figures["start_to_first_batch_s"] >= figures["start_to_loaders_s"] > 0
    memory = figures["memory"]
    assert memory["samples_loaded"] == workers * samples
    assert len(memory["workers"]) == workers
    assert all(w["uss_mb"] > 0 and w["pss_anon_mb"] > 0 for w in memory["workers"])
    assert memory["workers_uss_mb"] == round(sum(w["uss_mb"] for w in memory["workers"]), 1)
    assert memory["workers_uss_peak_mb"] >= memory["workers_uss_mb"]
    assert len(memory["workers_after_first_batches"]) == workers


@pytest.mark.parametrize("beside_the_reference", [False, True], ids=["ours", "beside_the_reference"])
def test_bench_runs_at_a_small_size(tmp_path, beside_the_reference):
    reference = reference_checkout() if beside_the_reference else None
    if beside_the_reference and reference is None:
        pytest.skip("no checkout of torchvision's references/detection")
    root = tmp_path / "scale"
    command = [sys.executable, str(ROOT / "bench" / "bench_scale.py"), "--images", "40", "--workers", "2",
               "--samples-per-worker", "4", "--root", str(root)]
    if reference:
        command += ["--reference", str(reference)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["benchmark"] == "scale" and not root.exists()
    assert printed["dataset"]["train"]["images"] == 40 and printed["dataset"]["train"]["instances"] > 40
    _check(printed["ours"], 2, 4)
    assert 0 < printed["ours"]["training_samples"] <= 40
    if reference:
        _check(printed["reference"], 2, 4)
        assert printed["reference"]["training_samples"] == printed["ours"]["training_samples"]
        assert set(printed["comparison"]) >= {"start_up_ratio", "workers_uss_ratio", "growth_pss_anon_ratio",
                                              "workers_uss_growth_ratio"}
    else:
        assert "reference" not in printed


def _figures(start: float, uss: float, growth: float, loading: float, peak: float | None = None) -> dict:
    return {"start_to_first_batch_s": start, "memory": {"workers_uss_mb": uss, "growth_pss_anon_mb": growth,
                                                        "workers_uss_growth_mb": loading,
                                                        "workers_uss_peak_mb": uss if peak is None else peak}}


def test_compare_gives_ratios_and_none_where_the_reference_measured_nothing():
    bench = load_file_module(ROOT / "bench" / "bench_scale.py", "bench_scale")
    met = bench.compare(_figures(5, 10, 1, 2), _figures(10, 200, 20, 4))
    assert met == {"start_up_ratio": 0.5, "workers_uss_ratio": 0.05, "workers_uss_peak_ratio": 0.05,
                   "growth_pss_anon_ratio": 0.05, "workers_uss_growth_ratio": 0.5, "start_up_target_met": True,
                   "worker_memory_target_met": True}
    high_peak = bench.compare(_figures(5, 10, 1, 2, peak=30), _figures(10, 200, 20, 4))
    assert high_peak["workers_uss_peak_ratio"] == 0.15 and high_peak["worker_memory_target_met"] is False
    tiny = bench.compare(_figures(5, 10, 1, 2), _figures(4, 50, 0, 0))
    assert tiny["workers_uss_growth_ratio"] is None and tiny["growth_pss_anon_ratio"] is None
    assert tiny["worker_memory_target_met"] is None and tiny["start_up_target_met"] is False

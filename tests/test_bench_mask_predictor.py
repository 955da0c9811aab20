"""bench/bench_mask_predictor.py measures torchvision's mask predictor and the matched-class one, each in a process
of its own, and prints both with their ratios."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

SCRIPT = str(ROOT / "bench" / "bench_mask_predictor.py")


def test_both_ways_are_measured_apart_and_compared():
    result = subprocess.run([sys.executable, SCRIPT, "--regions", "4", "--classes", "30", "--steps", "1",
                             "--warmup", "1", "--channels-last"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["benchmark"] == "mask_predictor" and printed["settings"]["classes"] == 30
    for way in ("torchvision", "matched_class"):
        assert printed[way]["ms"] > 0 and printed[way]["peak_rss_mb"] >= printed[way]["peak_growth_mb"]
    assert printed["ms_ratio"] == round(printed["matched_class"]["ms"] / printed["torchvision"]["ms"], 3)


def test_settings_that_measure_nothing_are_refused():
    result = subprocess.run([sys.executable, SCRIPT, "--regions", "0"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "error: give --regions >= 1" in result.stderr

"""bench/bench_mask_targets.py times torchvision's mask targets and the cropped ones on the same inputs and says
which the speed-up chooses."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

SCRIPT = str(ROOT / "bench" / "bench_mask_targets.py")


def run(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True, text=True, timeout=300)


def test_both_ways_are_timed_and_the_choice_follows_the_pixels_per_region():
    few = run("--instances", "1", "--regions", "8", "--height", "96", "--width", "128", "--repeats", "1")
    assert few.returncode == 0, few.stderr[-3000:]
    printed = json.loads(few.stdout.strip().splitlines()[-1])
    assert printed["benchmark"] == "mask_targets" and printed["settings"]["regions"] == 8
    assert printed["ms"]["torchvision"] > 0 and printed["ms"]["cropped"] > 0
    assert printed["ms_ratio"] == round(printed["ms"]["cropped"] / printed["ms"]["torchvision"], 3)
    assert printed["crops_chosen"] is False
    many = json.loads(run("--instances", "40", "--regions", "2", "--height", "96", "--width", "128", "--repeats",
                          "1").stdout.strip().splitlines()[-1])
    assert many["crops_chosen"] is True


def test_settings_that_measure_nothing_are_refused():
    result = run("--regions", "0")
    assert result.returncode == 1 and "error: give --instances, --regions" in result.stderr

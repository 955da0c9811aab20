"""bench/bench_train.py runs our training loop (and torchvision's reference's, where a checkout of its
references/detection is found) for a few steps at a tiny size and prints the figures it promises."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, reference_checkout


@pytest.mark.parametrize("implementation", ["ours", "reference"])
def test_bench_times_a_few_steps(tiny_dataset, implementation):
    command = [sys.executable, str(ROOT / "bench" / "bench_train.py"), "--data-path", str(tiny_dataset),
               "--device", "cpu", "--min-size", "64", "--max-size", "64", "--steps", "2", "--warmup", "1",
               "--workers", "0"]
    if implementation == "reference":
        reference = reference_checkout("engine.py")
        if reference is None:
            pytest.skip("no checkout of torchvision's references/detection")
        command += ["--reference", str(reference)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["benchmark"] == "train" and printed["implementation"] == implementation
    assert printed["steps_timed"] == 2 and printed["step_ms"] > 0 and printed["losses_finite"]

"""bench/bench_train.py runs our training loop (and torchvision's reference's, where a checkout of its
references/detection is found) for a few steps at a tiny size and prints the figures it promises."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
import torch

from conftest import ROOT, reference_checkout

sys.path.insert(0, str(ROOT / "bench"))

import bench_train  # noqa: E402


def test_operator_counter_counts_mask_indexing_as_a_wait():
    values, mask = torch.arange(6.0), torch.tensor([True, False] * 3)
    counter = bench_train.OperatorCounter()
    with counter:
        values[mask]  # not counted: the counter is not active yet
        counter.active = True
        values[mask] = 0.0
        values[torch.tensor([1, 3])]
        values.nonzero()
    assert counter.counts["aten.index_put_.default by a boolean mask"] == 1
    assert counter.counts["aten.index.Tensor"] == 1 and "aten.index.Tensor by a boolean mask" not in counter.counts
    assert counter.host_syncs() == 2


def test_operator_counter_counts_tolist_and_tensors_made_on_a_device_and_puts_them_back():
    values = torch.arange(3)
    originals = torch.Tensor.tolist, torch.tensor, torch.as_tensor
    counter = bench_train.OperatorCounter()
    with counter:
        values.tolist()  # not counted: not active yet
        counter.active = True
        assert values.tolist() == [0, 1, 2]
        thread = threading.Thread(target=values.tolist)  # another thread: not this step's
        thread.start()
        thread.join()
        torch.tensor([1.0], device=values.device)  # counted: a copy to the device on a GPU
        torch.as_tensor([1.0], dtype=torch.float32, device=values.device)
        torch.tensor([1.0]), torch.as_tensor(values, device=values.device)  # on the host; no copy
        torch.tensor([1.0], device="meta")  # no data
    assert counter.counts["Tensor.tolist"] == 1 and counter.counts[bench_train.MADE_ON_DEVICE] == 2
    assert counter.host_syncs() == 3
    assert (torch.Tensor.tolist, torch.tensor, torch.as_tensor) == originals


def bench_command(dataset, *flags: str) -> list[str]:
    """bench_train.py on the CPU at 64 px with the loader in the main process, plus flags."""
    return [sys.executable, str(ROOT / "bench" / "bench_train.py"), "--data-path", str(dataset), "--device", "cpu",
            "--min-size", "64", "--max-size", "64", "--workers", "0", *flags]


@pytest.mark.parametrize("implementation", ["ours", "reference"])
def test_bench_times_a_few_steps(tiny_dataset, implementation):
    command = bench_command(tiny_dataset, "--steps", "2", "--warmup", "1")
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
    if implementation == "ours":
        assert "sparse RoIAlign on the CPU" in printed["settings"]["speedups_applied"]
        assert printed["settings"]["fused_optimizer"] is False


def test_a_gpus_speedups_counted_on_the_cpu(tiny_dataset):
    command = bench_command(tiny_dataset, "--steps", "1", "--warmup", "1", "--count-ops", "--speedups-as", "cuda")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    applied = printed["settings"]["speedups_applied"]
    assert "shape buckets" in applied and "training targets matched for the whole batch" in applied
    cpus_own = {"sparse RoIAlign on the CPU", "channels-last layout", "Winograd 3x3 convolutions on the CPU"}
    assert not cpus_own & set(applied) and printed["settings"]["fused_optimizer"] is True
    assert printed["operators_per_step"] > 0 and printed["host_syncs_per_step"] > 0
    by_kind = printed["host_syncs_per_step_by_kind"]
    assert sum(by_kind.values()) == pytest.approx(printed["host_syncs_per_step"], abs=0.5)
    # Before the backbone, only the transform's draws of a size from a CPU tensor, one an image of the batch of
    # 2: a GPU does not wait there.
    assert printed["host_syncs_before_backbone_per_step"] == {"aten._local_scalar_dense.default": 2.0}


def test_our_speedup_choices_are_refused_with_the_reference(tiny_dataset):
    command = bench_command(tiny_dataset, "--reference", str(ROOT), "--speedups-as", "cuda")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 2 and "the reference has none: leave them out with --reference" in result.stderr


def test_too_few_images_for_the_steps_asked_is_refused(tiny_dataset):
    """8 images at batch 2 make 4 steps: 3 timed after 1 of warm-up need 10 images (one more step ends the clock)."""
    command = bench_command(tiny_dataset, "--steps", "3", "--warmup", "1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 1 and "error: 10 training images needed" in result.stderr, result.stderr[-2000:]


def test_one_speedup_left_out_at_a_given_head_size(tiny_dataset):
    """--leave-out measures the step without one speed-up (by its printed name); a name it lacks is refused."""
    left_out = "mask logits of each region's class only"
    command = bench_command(tiny_dataset, "--steps", "1", "--warmup", "1", "--num-classes", "300")
    results = [subprocess.run(command + flags, capture_output=True, text=True, timeout=300, cwd=ROOT)
               for flags in ([], ["--leave-out", left_out], ["--leave-out", "mask logits"])]
    for result in results[:2]:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    applied = [json.loads(result.stdout.strip().splitlines()[-1])["settings"]["speedups_applied"]
               for result in results[:2]]
    assert left_out in applied[0] and left_out not in applied[1]
    # The cropped mask targets belong to the matched-class branch, so they go with it.
    assert set(applied[0]) - set(applied[1]) == {left_out, "mask targets pooled from crops on the CPU"}
    assert results[2].returncode == 1
    assert "error: --leave-out 'mask logits' is none of the training speed-ups: " in results[2].stderr

"""Mixed precision on the CPU through the real CLI: bfloat16 without a scaler, float16 with one that resumes."""


import torch

from conftest import TINY, run_cli


def test_cpu_amp_runs_bfloat16_in_the_layout_asked_for(micro_dataset, tmp_path):
    # One step at 32 px: on CPUs without AVX-512's bfloat16 instructions, bfloat16 kernels are slow.
    result = run_cli("train.py", "--data-path", str(micro_dataset), "--output-dir", str(tmp_path), *TINY,
                     "--min-size", "32", "--max-size", "32", "--vis-images", "0", "--no-tensorboard",
                     "--epochs", "1", "--amp", "--no-channels-last")
    assert result.returncode == 0, result.stderr
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert checkpoint["scaler"] is None, "bfloat16 needs no gradient scaler"
    assert checkpoint["model"]["backbone.body.layer2.0.conv2.weight"].is_contiguous()


def test_float16_scaler_state_survives_resume(micro_dataset, tmp_path):
    args = ["--data-path", str(micro_dataset), "--output-dir", str(tmp_path), *TINY, "--min-size", "32",
            "--max-size", "32", "--amp", "--amp-dtype", "float16", "--vis-images", "0", "--no-tensorboard"]
    result = run_cli("train.py", *args, "--epochs", "1")
    assert result.returncode == 0, result.stderr
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert checkpoint["scaler"]["scale"] > 0, "float16 trains with a gradient scaler, on the CPU too"
    checkpoint["scaler"]["scale"] = 1234.0
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    result = run_cli("train.py", *args, "--epochs", "2", "--resume", "auto")
    assert result.returncode == 0, result.stderr
    scale = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["scaler"]["scale"]
    assert scale in [1234.0 / 2**k for k in range(5)], "the resumed scaler went on from the saved scale"

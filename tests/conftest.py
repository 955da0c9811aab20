"""Shared fixtures: generated datasets, a torch hub cache with ResNet-50 weights, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.make_coco_dataset import DatasetSpec, generate_dataset  # noqa: E402

# Small enough that a CPU training step takes about a second.
SMALL = ["--min-size", "96", "--max-size", "96", "--device", "cpu", "-j", "0", "--print-freq", "1"]


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """A generated COCO-layout dataset with every oddity the generator makes, at 96 px."""
    spec = DatasetSpec(train_images=24, val_images=6, min_size=80, max_size=112, instances=3, seed=1,
                       crowd_share=0.3, empty_share=0.1, gray_share=0.2, degenerate_share=0.3)
    return generate_dataset(tmp_path_factory.mktemp("shapes"), spec)


@pytest.fixture(scope="session")
def torch_home(tmp_path_factory) -> Path:
    """A TORCH_HOME whose hub cache holds a ResNet-50 weights file under torchvision's file name."""
    home = tmp_path_factory.mktemp("torch_home")
    target = home / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    target.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50().state_dict(), target)
    return home


def run_cli(script: str, *args: str, torch_home: Path | None = None, timeout: int = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a script of the repo in a subprocess, as a user would, and capture what it prints."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    if torch_home is not None:
        full_env["TORCH_HOME"] = str(torch_home)
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=ROOT)

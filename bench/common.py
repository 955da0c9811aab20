"""What every benchmark prints with its figures: the machine, the versions, the settings."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def use_implementation(reference: str | None) -> None:
    """Import path set-up: this repository's modules, or those of torchvision's references/detection at the
    given folder (the benchmarks measure either with the same code, in separate processes)."""
    sys.path.insert(0, str(Path(reference).resolve() if reference else ROOT))


def available_device(name: str) -> torch.device:
    """The device asked for, or the CPU where CUDA was asked for and there is none."""
    # Not devices.pick_device: it imports utils, which under --reference would be the reference's.
    return torch.device(name if name == "cpu" or torch.cuda.is_available() else "cpu")


def environment(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "machine": platform.machine(), "threads": torch.get_num_threads(), "device": str(device)}
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def emit(result: dict) -> None:
    """One JSON object on stdout, as every benchmark ends."""
    print(json.dumps(result, sort_keys=True))

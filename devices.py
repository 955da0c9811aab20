"""Which device a run uses and in what precision: the device fallback, autocast and the gradient scaler."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from errors import UserError
from utils import print_once

AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(name: str) -> torch.device:
    """The device named, or the CPU (said once) when CUDA is asked for and there is none."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cuda", "cpu"):  # the two this project is tested on
        raise UserError(f"--device {name}: give cuda, cuda:N or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        print_once("CUDA is not available: running on the CPU")
        return torch.device("cpu")
    return device


def amp_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The autocast type of --amp: as --amp-dtype names it, else float16 on GPUs (the seed's mixed precision,
    with a gradient scaler) and bfloat16 on the CPU (where float16 convolutions are many times slower)."""
    return AMP_DTYPES[name or ("float16" if device.type == "cuda" else "bfloat16")]


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """Mixed-precision context when dtype is set, else a no-op."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """A gradient scaler for float16 autocast, whose small range would flush gradients to zero; None otherwise."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

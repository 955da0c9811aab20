"""Write checkpoints atomically and read checkpoints and weights files safely (tensors and plain data only)."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch

from utils import UserError


def save_atomic(state: dict, path: str | Path) -> None:
    """Write state to path so that path is always either the old complete file or the new complete one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_file(path: str | Path, flag: str) -> dict:
    """torch.load with weights_only=True: code hidden in a pickle is refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported content"
        raise UserError(f"{flag} {path} was refused: it holds more than tensors and plain data ({first}); "
                        f"only load files you trust, re-saved as plain state dicts") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{flag} {path} is not a readable checkpoint (truncated or not a torch file: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None

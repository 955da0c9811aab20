"""Write checkpoints atomically and read checkpoints and weights files safely (tensors and plain data only)."""

from __future__ import annotations

import os
import pickle
import re
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
    with path.open("rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save's zip, or a raw pickle
        raise UserError(f"{flag} {path} is not a readable checkpoint (not a file written by torch.save)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        raise UserError(f"{flag} {path} was refused: it holds more than tensors and plain data "
                        f"({detail.group(1).strip() if detail else 'unsupported content'}); only load files "
                        f"you trust, re-saved as plain state dicts") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{flag} {path} is not a readable checkpoint (truncated or not a torch file: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None


def rng_state() -> dict:
    """The random generators' state, so that a resumed run draws what the uninterrupted one would have."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict, output_dir: Path, also_as: str | None = None) -> Path:
    """Write state to output_dir/checkpoint.pth (and output_dir/also_as); a failed write is one clear error
    that leaves the previous files as they were."""
    paths = [output_dir / "checkpoint.pth"] + ([output_dir / also_as] if also_as else [])
    for path in reversed(paths):  # checkpoint.pth last: --resume auto sees it only once the rest is written
        try:
            save_atomic(state, path)
        except OSError as e:
            raise UserError(f"could not write {path} ({e.strerror or e}); the previous checkpoint is intact. "
                            f"Free space in --output-dir or choose another") from None
    return paths[0]


def remove_stale_temporaries(output_dir: Path) -> None:
    """Temporary files of saves that a kill interrupted; they are never read."""
    for tmp in output_dir.glob(".*.pth.*.tmp"):
        tmp.unlink(missing_ok=True)


def prune_epoch_files(output_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest keep_last model_{epoch}.pth files (model_best.pth is a file of its own)."""
    files = sorted(output_dir.glob("model_*.pth"), key=lambda p: int(p.stem.split("_")[1])
                   if p.stem.split("_")[1].isdigit() else -1)
    doomed = [p for p in files if p.stem.split("_")[1].isdigit()][:-keep_last] if keep_last > 0 else []
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed

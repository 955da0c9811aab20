"""What a run records in --output-dir: metrics.jsonl (one JSON object per logged training step and per
evaluation) and TensorBoard event files with the same scalars and a few prediction pictures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def _finite(value):
    """JSON has no NaN or infinity; write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a record, nested names joined with '/', for TensorBoard."""
    found = {}
    for key, value in record.items():
        if key in ("type", "epoch", "step", "global_step", "time"):
            continue
        if isinstance(value, dict):
            found.update(_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and value is not None:
            found[f"{prefix}{key}"] = float(value)
    return found


class MetricsWriter:
    """Appends records to metrics.jsonl and TensorBoard. A resumed run first drops what was logged past its
    checkpoint, so that each step and each evaluation is recorded once."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = False) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / "metrics.jsonl"
        self.enabled = enabled
        self.use_tensorboard = tensorboard and enabled
        self._board = None
        self._purge_step: int | None = None

    def truncate_after(self, epoch: int, step: int | None, global_step: int) -> None:
        """Keep what was logged up to the checkpoint at (epoch, step) (step None: the epoch ended), which is
        global_step steps into the run."""
        self._purge_step = global_step + 1
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if record.get("type") == "eval":
                keep = record["epoch"] < epoch or (record["epoch"] == epoch and step is None)
            else:
                keep = record["epoch"] < epoch or (record["epoch"] == epoch and (step is None or
                                                                                 record["step"] <= step))
            if keep:
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def records(self, kind: str) -> list[dict]:
        """The records of one type ("train" or "eval") logged so far."""
        if not self.enabled or not self.path.is_file():
            return []
        records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        return [r for r in records if r.get("type") == kind]

    @property
    def board(self):
        """The TensorBoard writer, opened on first use (a resumed run purges events past its checkpoint)."""
        if self._board is None and self.use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._board = SummaryWriter(str(self.output_dir), purge_step=self._purge_step)
        return self._board

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(_finite(record)) + "\n")
        if self.board is not None:
            group = record["type"]
            for name, value in _scalars(record).items():
                self.board.add_scalar(f"{group}/{name}", value, record["global_step"])

    def add_pictures(self, pictures: dict[str, torch.Tensor], global_step: int) -> None:
        """uint8 CHW pictures, by name."""
        if self.board is not None:
            for name, picture in pictures.items():
                self.board.add_image(f"predictions/{name}", picture, global_step)

    def close(self) -> None:
        if self._board is not None:
            self._board.close()

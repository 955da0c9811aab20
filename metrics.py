"""metrics.jsonl in --output-dir: one JSON object per logged training step and per evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _finite(value):
    """JSON has no NaN or infinity; write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


class MetricsWriter:
    """Appends records to metrics.jsonl; a resumed run first drops records past its checkpoint, so that the
    file holds each step and each evaluation once."""

    def __init__(self, output_dir: str | Path, enabled: bool = True) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled

    def truncate_after(self, epoch: int, step: int | None) -> None:
        """Keep what was logged up to the checkpoint at (epoch, step); step None means the epoch ended."""
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

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(_finite(record)) + "\n")

"""train.py's entry point with a probe for the distributed tests: each rank records the image ids of its
training batches in $PROBE_DIR/rank{R}.jsonl, and rank $PROBE_FAIL_RANK, if set, fails on its second step."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402
import train  # noqa: E402

_to_device = engine.to_device
_steps = 0


def _probed_to_device(images, targets, device):
    global _steps
    if targets:  # training batches; evaluation moves images alone
        _steps += 1
        rank = int(os.environ.get("RANK", "0"))
        with open(Path(os.environ["PROBE_DIR"]) / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps([t["image_id"] for t in targets]) + "\n")
        if os.environ.get("PROBE_FAIL_RANK") == str(rank) and _steps == 2:
            raise RuntimeError(f"probe: rank {rank} fails on purpose")
    return _to_device(images, targets, device)


engine.to_device = _probed_to_device
sys.exit(train.run())

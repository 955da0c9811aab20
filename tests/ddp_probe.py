"""train.py's entry point with a probe for the distributed tests: each rank records the image ids of its
training batches in $PROBE_DIR/rank{R}.jsonl; on its second step, rank $PROBE_FAIL_RANK raises, rank
$PROBE_KILL_RANK is killed (SIGKILL) and rank $PROBE_STOP_RANK stops (SIGSTOP), each after writing the time
and its process id to $PROBE_DIR/rank{R}.gone, and rank $PROBE_SIGNAL_RANK is sent SIGTERM; rank
$PROBE_EVAL_SIGNAL_RANK is sent SIGTERM on its first evaluation batch. Every sample of rank $PROBE_FAULT_RANK
comes with an unreadable-image fault."""

import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402
import train  # noqa: E402

_to_device = engine.to_device
_pop_faults = engine.pop_faults
_steps = 0


def _leave(rank: int, sig: signal.Signals) -> None:
    (Path(os.environ["PROBE_DIR"]) / f"rank{rank}.gone").write_text(f"{time.time()} {os.getpid()}")
    os.kill(os.getpid(), sig)


def _probed_to_device(images, targets, device):
    global _steps
    if targets:  # training batches; evaluation moves images alone
        _steps += 1
        rank = str(int(os.environ.get("RANK", "0")))
        with open(Path(os.environ["PROBE_DIR"]) / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps([t["image_id"] for t in targets]) + "\n")
        if _steps == 2 and os.environ.get("PROBE_FAIL_RANK") == rank:
            raise RuntimeError(f"probe: rank {rank} fails on purpose")
        if _steps == 2 and os.environ.get("PROBE_KILL_RANK") == rank:
            _leave(int(rank), signal.SIGKILL)
        if _steps == 2 and os.environ.get("PROBE_STOP_RANK") == rank:
            _leave(int(rank), signal.SIGSTOP)
        if _steps == 2 and os.environ.get("PROBE_SIGNAL_RANK") == rank:
            os.kill(os.getpid(), signal.SIGTERM)
    elif os.environ.get("PROBE_EVAL_SIGNAL_RANK") == os.environ.get("RANK", "0"):
        os.environ.pop("PROBE_EVAL_SIGNAL_RANK")  # once
        os.kill(os.getpid(), signal.SIGTERM)
    return _to_device(images, targets, device)


def _probed_pop_faults(targets):
    faults = _pop_faults(targets)
    if os.environ.get("PROBE_FAULT_RANK") == str(int(os.environ.get("RANK", "0"))):
        faults += [f"{t['image_id']}.jpg: image missing; sample skipped" for t in targets]
    return faults


engine.to_device = _probed_to_device
engine.pop_faults = _probed_pop_faults
sys.exit(train.run())

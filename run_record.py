"""args.json, the record of a training run in its output folder: the command, arguments and software of each
start, and how the latest ended."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torchvision

import utils
from checkpoint import RUN_OUTPUT_REMEDY, TrainingState, write_json_atomic
from errors import Terminated, UserError, message_of


def plain(value: object) -> object:
    """A value as JSON holds it: as it is, or (a device, a path, an infinite float) as text."""
    if isinstance(value, list):
        return [plain(item) for item in value]
    fits = value is None or isinstance(value, (bool, int, str)) or isinstance(value, float) and math.isfinite(value)
    return value if fits else str(value)


def write_arguments(output_dir: Path, args: argparse.Namespace, resumed_here: bool) -> None:
    """args.json: the command line, arguments and software of the latest start of training in the folder (a
    resumed run's too, with its flags), as a config file to read or run again; for a run resumed from the
    folder's own checkpoint, the starts before it follow under earlier_starts."""
    path = output_dir / "args.json"
    start = {"command": shlex.join(sys.argv), "args": {name: plain(value) for name, value in vars(args).items()},
             "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
             "software": software(), "working_directory": os.getcwd()}
    write_json_atomic(path, {**start, "earlier_starts": earlier_starts(path) if resumed_here else []},
                      RUN_OUTPUT_REMEDY)


@contextmanager
def outcome_recorded(path: Path | None, state: TrainingState) -> Iterator[None]:
    """Training, after which args.json's start (at path; None on other ranks) says when and how it ended: a
    folder tells a finished run from one stopped, failed or still going (no "ended": running, or killed)."""
    try:
        yield
    except BaseException as e:
        if path is not None:
            record_outcome(path, outcome_of(e))
        raise
    if path is not None:
        record_outcome(path, "stopped early (--patience)" if state.stopped_early else "finished")


def outcome_of(error: BaseException) -> str:
    """How an exception ended training, in words."""
    if isinstance(error, SystemExit):  # every rank agreed to stop at a signal, after saving where they stood
        return f"stopped by a signal (exit status {error.code}); --resume auto continues"
    if isinstance(error, KeyboardInterrupt):
        return f"interrupted by {'SIGTERM' if isinstance(error, Terminated) else 'Ctrl-C'}"
    if isinstance(error, UserError):
        return f"error: {message_of(error)}"
    if utils.get_world_size() > 1 and utils.lost_peer(error):  # said at length on the console
        return "error: another process of the job stopped answering or ended; --resume auto continues"
    return f"failed: {type(error).__name__}: {str(error)[:300]}"


def record_outcome(path: Path, outcome: str) -> None:
    """Add the end's time and outcome to args.json; a failed write is said, and changes nothing else."""
    try:
        recorded = json.loads(path.read_text())
        ended = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        write_json_atomic(path, {**recorded, "ended": ended, "outcome": outcome}, RUN_OUTPUT_REMEDY)
    except (OSError, ValueError, UserError) as e:
        print(f"warning: how the run ended was not recorded in {path} ({e})", file=sys.stderr)


def earlier_starts(path: Path) -> list[dict]:
    """The starts an args.json records, its own last (none where it is missing or not one of ours)."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(earlier, dict):
        return []
    before = earlier.pop("earlier_starts", None)
    return (before if isinstance(before, list) else []) + [earlier]


def software() -> dict:
    """The versions that ran: Python, torch, torchvision, and this project's git commit (with whether files it
    tracks were changed) where it is a git checkout."""
    found = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__}
    here = Path(__file__).resolve().parent

    def git(*command: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(here), *command], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit:
        found["git_commit"] = commit
        changes = git("status", "--porcelain", "--untracked-files=no")
        found["git_changed_files"] = None if changes is None else bool(changes)
    return found

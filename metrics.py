"""Metrics of a run: collected once per logged step as one record, and rendered by writers.

The training loop collects (StepMeters, LogSchedule); writers show what it collected: ConsoleWriter (the
progress line), JsonlWriter (metrics.jsonl, one JSON object per logged training step, per evaluation and per
epoch's validation losses) and TensorBoardWriter (the same scalars and a few prediction pictures).
"""

from __future__ import annotations

import datetime
import json
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from checkpoint import RUN_OUTPUT_REMEDY, write_atomic, writing
from errors import UserError
from utils import SmoothedValue, print_once


@dataclass(frozen=True)
class LogSchedule:
    """Which steps are logged: every `every` steps, and the last of the epoch. The one place that decides."""

    every: int
    total: int

    def is_logged(self, step: int) -> bool:
        """Whether the state after `step` steps (counted from 1) is logged."""
        return step % self.every == 0 or step == self.total


@dataclass
class Progress:
    """Where a loop is and how fast it goes: what the console line shows besides the record's values."""

    header: str
    step: int
    total: int
    eta_seconds: float
    run_eta_seconds: float | None
    images_per_s: float
    step_time: float
    data_time: float
    averages: dict[str, tuple[float, float]] = field(default_factory=dict)  # name: (median, mean of the run)


@dataclass
class Record:
    """What one logged step or evaluation produced. `values` are the numbers (metrics.jsonl's and TensorBoard's);
    `progress` is for the console."""

    kind: str  # "train", "epoch" (an epoch's means), "val" (--val-loss), "eval", or "test" (evaluation progress)
    epoch: int
    global_step: int
    values: dict
    step: int | None = None
    progress: Progress | None = None

    def as_json(self) -> dict:
        where = {"type": self.kind, "epoch": self.epoch} | ({"step": self.step} if self.step is not None else {})
        return {**where, "global_step": self.global_step, **self.values}


class StepMeters:
    """Times the steps of a loop and keeps running averages of the values each step gives. carried: the sums of
    the same epoch's earlier steps (so_far, kept by a checkpoint saved part-way), which its record then covers."""

    def __init__(self, header: str, start: int, total: int, images_per_step: int, carried: dict | None = None
                 ) -> None:
        self.header, self.start, self.total = header, start, total
        self.images_per_step = images_per_step
        self.step_time, self.data_time = SmoothedValue(), SmoothedValue()
        self.values: dict[str, SmoothedValue] = {}
        self.carried_seconds, self.carried_steps = 0.0, 0
        if carried:
            self.carried_seconds, self.carried_steps = carried["seconds"], carried["steps"]
            for name, (total_value, count) in carried["values"].items():
                meter = self.values[name] = SmoothedValue()
                meter.total, meter.count = total_value, count
        self.started = self._step_started = time.time()

    def timed(self, iterable: Iterable) -> Iterator:
        """Yield from iterable, timing the wait for each item; the loop calls step_done when the item's work ends."""
        self._step_started = time.time()
        for item in iterable:
            self.data_time.update(time.time() - self._step_started)
            yield item

    def step_done(self) -> None:
        """A step (its wait for data included) has ended: its time counts, and the next one starts."""
        now = time.time()
        self.step_time.update(now - self._step_started)
        self._step_started = now

    def update(self, **values: float) -> None:
        for name, value in values.items():
            self.values.setdefault(name, SmoothedValue()).update(float(value))

    def update_each(self, rows: list[dict[str, float]]) -> None:
        """Each step's values in turn (the losses of the steps since the last logged one)."""
        for row in rows:
            self.update(**row)

    def progress(self, step: int, steps_after: int = 0, seconds_after: float = 0.0) -> Progress:
        """The progress after `step` steps; steps_after (steps of later epochs) and seconds_after (the time
        expected besides training, such as evaluations) add an ETA of the whole run."""
        per_step = self.step_time.global_avg
        return Progress(self.header, step, self.total, per_step * (self.total - step),
                        per_step * (self.total - step + steps_after) + seconds_after
                        if steps_after or seconds_after else None,
                        self.images_per_step / max(self.step_time.avg, 1e-9), self.step_time.avg,
                        self.data_time.avg, {k: (v.median, v.global_avg) for k, v in self.values.items()})

    def record(self, kind: str, epoch: int, step: int, global_step: int, steps_after: int = 0,
               seconds_after: float = 0.0) -> Record:
        """The record of the state after `step` steps: each value's latest, the rate and times of the step (the
        console's progress line shows recent averages)."""
        progress = self.progress(step, steps_after, seconds_after)
        step_rate = self.images_per_step / max(self.step_time.value, 1e-9)
        values = {"time": round(time.time(), 3), "images_per_s": round(step_rate, 3),
                  "step_time": round(self.step_time.value, 4), "data_time": round(self.data_time.value, 4),
                  **{name: meter.value for name, meter in self.values.items()}}
        return Record(kind, epoch, global_step, values, step, progress)

    def so_far(self, steps_done: int) -> dict:
        """The epoch's sums after steps_done of this process's steps: its training seconds and steps, and each
        value's total and count (plain data, for a checkpoint)."""
        return {"seconds": self.carried_seconds + time.time() - self.started, "steps": self.carried_steps + steps_done,
                "values": {name: [meter.total, meter.count] for name, meter in self.values.items() if name != "lr"}}

    def epoch_record(self, epoch: int, global_step: int, steps_done: int, counts: dict[str, int] | None = None
                     ) -> Record:
        """The record of an epoch's end: its training time, steps and mean rate, the counts given (its data
        faults), and each value's mean over its steps from first_step on (all of them, unless resumed from a
        checkpoint that kept no sums)."""
        sums = self.so_far(steps_done)
        values = {"time": round(time.time(), 3), "seconds": round(sums["seconds"], 3), "steps": sums["steps"],
                  "first_step": self.start - self.carried_steps,
                  "images_per_s": round(self.images_per_step * sums["steps"] / sums["seconds"], 3), **(counts or {}),
                  **{name: meter.global_avg for name, meter in self.values.items() if name != "lr"}}
        return Record("epoch", epoch, global_step, values)

    def summary(self, steps_done: int) -> str:
        elapsed = time.time() - self.started
        return (f"{self.header} Total time: {duration(elapsed)} "
                f"({elapsed / max(steps_done, 1):.4f} s / it)")


def duration(seconds: float) -> str:
    """Seconds as the console shows a duration: H:MM:SS."""
    return str(datetime.timedelta(seconds=int(seconds)))


class ConsoleWriter:
    """The progress line of training and evaluation steps, and the validation losses, on rank 0."""

    def write(self, record: Record) -> None:
        if record.kind == "val":
            losses = "  ".join(f"{k}: {v:.4f}" for k, v in record.values.items() if k.startswith("loss"))
            print_once(f"Validation after epoch {record.epoch}: {losses}")
        progress = record.progress
        if progress is None:
            return
        eta = duration(progress.eta_seconds)
        if progress.run_eta_seconds is not None:
            eta += f" (run {duration(progress.run_eta_seconds)})"
        width = len(str(progress.total))
        parts = [progress.header, f"[{progress.step:{width}d}/{progress.total}]", f"eta: {eta}"]
        parts += [f"lr: {record.values['lr']:.6f}"] if "lr" in record.values else []
        parts += [f"{name}: {median:.4f} ({mean:.4f})" for name, (median, mean) in progress.averages.items()
                  if name != "lr"]
        parts += [f"img/s: {progress.images_per_s:.1f}", f"time: {progress.step_time:.3f}",
                  f"data: {progress.data_time:.3f}"]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}")  # MB
        print_once("  ".join(parts))

    def close(self) -> None:
        pass


def _finite(value):
    """JSON has no NaN or infinity; write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


# TensorBoard charts AP per category up to this many categories (COCO's 80); an LVIS-like file's would be
# thousands of charts, and metrics.jsonl holds them all.
MOST_CATEGORY_CHARTS = 100


def _scalars(values: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a record's values, nested names joined with '/', for TensorBoard; a slash in a name (a
    category's, such as LVIS's 'cup/mug') becomes a division slash, which TensorBoard does not read as a level."""
    found = {}
    for key, value in values.items():
        if key == "time" or key == "per_category" and len(value) > MOST_CATEGORY_CHARTS:
            continue
        name = prefix + key.replace("/", "\u2215")
        if isinstance(value, dict):
            found.update(_scalars(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[name] = float(value)
    return found


def _keeps(record: dict, epoch: int, step: int | None) -> bool:
    """Whether a metrics.jsonl record was logged no later than the checkpoint at (epoch, step)."""
    if "step" not in record:  # an epoch's means, evaluation or validation losses, logged after it ended
        return record["epoch"] < epoch or (record["epoch"] == epoch and step is None)
    return record["epoch"] < epoch or (record["epoch"] == epoch and (step is None or record["step"] <= step))


def read_records(path: Path) -> list[tuple[str, dict]]:
    """metrics.jsonl's lines with their records, leaving out a last line cut short by a kill."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append((line, json.loads(line)))
        except json.JSONDecodeError:
            continue
    return records


class JsonlWriter:
    """Appends training and evaluation records to metrics.jsonl. A resumed run first drops what was logged past
    its checkpoint, so that each step and each evaluation is recorded once."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        # The file's records, read at the first call of records() and then kept as written: every evaluation
        # asks for them, and a long run's file holds tens of thousands.
        self._records: list[dict] | None = None

    def truncate_after(self, epoch: int, step: int | None) -> None:
        """Keep what was logged up to the checkpoint at (epoch, step) (step None: the epoch ended, and its
        validation losses stay, which a resumed run that evaluates the epoch does not compute again)."""
        if not self.path.is_file():
            return
        kept = [line for line, r in read_records(self.path) if _keeps(r, epoch, step)]
        text = "".join(line + "\n" for line in kept).encode()
        self._records = None
        write_atomic(self.path, lambda f: f.write(text), remedy=RUN_OUTPUT_REMEDY)

    def records(self, kind: str) -> list[dict]:
        """The records of one type ("train", "epoch", "val" or "eval") logged so far."""
        if self._records is None:
            self._records = [r for _, r in read_records(self.path)]
        return [r for r in self._records if r.get("type") == kind]

    def write(self, record: Record) -> None:
        if record.kind != "test":
            line = json.dumps(_finite(record.as_json()))
            with writing(self.path, RUN_OUTPUT_REMEDY), self.path.open("a") as f:
                f.write(line + "\n")
            if self._records is not None:
                self._records.append(json.loads(line))  # as records() would read it back

    def close(self) -> None:
        pass


class TensorBoardWriter:
    """The records' scalars and prediction pictures as TensorBoard events, opened on first use; a resumed run
    purges the events past its checkpoint's step."""

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)
        self.purge_step: int | None = None
        self._board = None

    @property
    def board(self):
        if self._board is None:
            from torch.utils.tensorboard import SummaryWriter

            self._board = SummaryWriter(str(self.output_dir), purge_step=self.purge_step)
        return self._board

    def _writing(self):
        """A failed write (the event file's thread raises it at a later call) as one clear error."""
        return writing(self.output_dir / "events.out.tfevents.*", f"{RUN_OUTPUT_REMEDY} (or --no-tensorboard)")

    def write(self, record: Record) -> None:
        if record.kind != "test":
            with self._writing():
                for name, value in _scalars(record.values).items():
                    # COCOeval's -1: no instance to score (of that size or frequency group); a point at -1 would
                    # drag the chart down, so the metric has none that evaluation (metrics.jsonl keeps the -1)
                    if not (record.kind == "eval" and value == -1.0):
                        self.board.add_scalar(f"{record.kind}/{name}", value, record.global_step)

    def add_pictures(self, pictures: dict[str, torch.Tensor], global_step: int) -> None:
        """uint8 CHW pictures, by name."""
        with self._writing():
            for name, picture in pictures.items():
                self.board.add_image(f"predictions/{name}", picture, global_step)

    def close(self) -> None:
        if self._board is not None:
            with self._writing():
                self._board.close()


def _is_utf8(name: str) -> bool:
    """Whether a file name decoded from bytes was UTF-8 (Python keeps other bytes as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Writers:
    """Every writer of a run, written to together; on ranks other than 0 there are none."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        if enabled and tensorboard and not _is_utf8(str(output_dir)):
            raise UserError(f"--output-dir {output_dir!r}: its name holds bytes that are not UTF-8, which "
                            f"TensorBoard cannot write under; rename it, or give --no-tensorboard")
        self.jsonl = JsonlWriter(output_dir) if enabled else None
        self.tensorboard = TensorBoardWriter(output_dir) if enabled and tensorboard else None
        self.all = [w for w in (ConsoleWriter() if enabled else None, self.jsonl, self.tensorboard) if w]

    def write(self, record: Record) -> None:
        for writer in self.all:
            writer.write(record)

    def resume_after(self, epoch: int, step: int | None, global_step: int) -> None:
        """Drop what was logged past the checkpoint at (epoch, step), which is global_step steps into the run."""
        if self.jsonl is not None:
            self.jsonl.truncate_after(epoch, step)
        if self.tensorboard is not None:
            self.tensorboard.purge_step = global_step + 1

    def records(self, kind: str) -> list[dict]:
        return self.jsonl.records(kind) if self.jsonl is not None else []

    def add_pictures(self, pictures: dict[str, torch.Tensor], global_step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_pictures(pictures, global_step)

    def close(self) -> None:
        for writer in self.all:
            writer.close()

"""Distributed set-up and the small helpers every module shares."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import numbers
import os
import random
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from errors import UserError

# The oldest torch and torchvision this project has run on (the GPU machine's); speedups/ and models.py rely on
# details of torchvision's detection code that older releases may lack.
MIN_VERSIONS = {"torch": (2, 11), "torchvision": (0, 26)}


def check_versions() -> None:
    """One clear error when the installed torch or torchvision is older than the project has run on."""
    for module in (torch, torchvision):
        found = tuple(int(part) for part in module.__version__.split("+")[0].split(".")[:2])
        needed = MIN_VERSIONS[module.__name__]
        if found < needed:
            raise UserError(f"{module.__name__} {module.__version__} is older than {'.'.join(map(str, needed))}, "
                            f"the oldest this project runs on; install the versions in constraints.txt")


# ---------------------------------------------------------------------------------------------- distributed

def launched_as() -> tuple[int, int] | None:
    """(rank, world size) that a launcher gave this process (torchrun, torch.distributed.launch, Slurm's srun
    with several tasks), read from the environment; None for a process run on its own."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    return None


# Seconds a process waits for the others (--dist-timeout's default).
DIST_TIMEOUT = 300


def init_distributed_mode(args: argparse.Namespace) -> None:
    """Fill args.rank, args.world_size, args.gpu, args.distributed from the launcher's environment (args of a
    script written for torchvision's reference, which lack --local-rank, --dist-backend and --dist-timeout, take
    their defaults)."""
    for name, default in (("local_rank", None), ("dist_backend", None), ("dist_timeout", DIST_TIMEOUT)):
        if not hasattr(args, name):
            setattr(args, name, default)
    launched = launched_as()
    if launched is None:
        args.rank, args.gpu, args.distributed = 0, 0, False
        return
    args.rank, args.world_size = launched
    if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
        args.gpu = int(os.environ.get("SLURM_LOCALID", args.rank % max(1, torch.cuda.device_count())))
    else:  # torch.distributed.launch sets LOCAL_RANK too; without --use_env it also passes --local-rank
        args.gpu = int(os.environ.get("LOCAL_RANK", args.local_rank or 0))
    args.distributed = True
    on_gpus = torch.device(args.device).type == "cuda"  # a torch.device by now, which never equals the string
    if on_gpus:
        torch.cuda.set_device(args.gpu)
    backend = args.dist_backend or ("nccl" if on_gpus else "gloo")
    try:
        dist.init_process_group(backend=backend, init_method=args.dist_url, world_size=args.world_size,
                                rank=args.rank, timeout=datetime.timedelta(seconds=args.dist_timeout))
        dist.barrier()
    except RuntimeError as e:  # torch.distributed.DistError is one
        if not lost_peer(e):
            raise
        first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        others = f"{args.world_size - 1} other process{'es' if args.world_size > 2 else ''}"
        raise UserError(f"rank {args.rank} could not join the {others} of the job within --dist-timeout "
                        f"{args.dist_timeout} s ({first_line}): every node runs the same command, "
                        f"started within that time, and reaches the address the launcher gave "
                        f"({os.environ.get('MASTER_ADDR', args.dist_url)}); then the same command continues "
                        f"(from the last checkpoint with --resume auto)") from None


def leave_process_group() -> None:
    """End a distributed run: the ranks meet once more, then the group's threads stop here, not in the
    interpreter's exit, where a gloo rank was once seen to abort (SIGABRT) after a run that went well."""
    if is_dist_avail_and_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    """Rank 0; before the process group exists, the process a launcher numbered 0 (so that what is said while
    setting up is said once)."""
    launched = launched_as()
    if is_dist_avail_and_initialized() or launched is None:
        return get_rank() == 0
    return launched[0] == 0


def all_gather_object(obj: Any) -> list:
    """Every rank's obj, in rank order (a one-item list when not distributed)."""
    if get_world_size() == 1:
        return [obj]
    gathered: list = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def first_other_rank(obj: Any) -> tuple[int, Any, Any] | None:
    """The first rank whose obj differs from rank 0's, with its obj and rank 0's; None where every rank agrees."""
    everyone = all_gather_object(obj)
    return next(((rank, theirs, everyone[0]) for rank, theirs in enumerate(everyone) if theirs != everyone[0]), None)


def reduce_dict(values: dict[str, torch.Tensor], average: bool = True) -> dict[str, torch.Tensor]:
    """Mean (or with average=False, sum) of each scalar tensor over all ranks."""
    world_size = get_world_size()
    if world_size == 1:
        return values
    with torch.no_grad():
        names = sorted(values)
        stacked = torch.stack([values[k] for k in names])
        dist.all_reduce(stacked)
        if average:
            stacked /= world_size
        return dict(zip(names, stacked))


def max_over_ranks(values: list[int]) -> list[int]:
    """Each value's largest over the ranks, on every rank, in one all-reduce (all ranks must call it)."""
    if get_world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.int64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when flag is true on at least one (all ranks must take the same branch)."""
    return bool(max_over_ranks([int(flag)])[0])


# What the process groups' errors say when a peer is gone or silent (gloo and NCCL wordings).
_LOST_PEER = ("timed out", "timeout", "connection reset", "connection closed", "pair closure", "broken pipe",
              "connection refused", "watchdog")


def silent_ranks(wait: float = 5.0) -> list[int] | None:
    """After a collective failed: the ranks that do not answer a roll call in the job's key-value store within
    `wait` seconds (every rank still running answers when its own collective fails). None when the store cannot
    be reached (it lives in the launcher with torchrun, in rank 0's process with a bare env:// start)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"roll_call/{get_rank()}", "here")
        deadline = time.monotonic() + wait
        while True:
            missing = [r for r in range(get_world_size()) if not store.check([f"roll_call/{r}"])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.2)
    except (RuntimeError, ValueError, AttributeError, dist.DistError):
        return None


def lost_peer(error: BaseException) -> bool:
    """Whether an error of torch.distributed says that another process died, stopped answering or never came."""
    return isinstance(error, RuntimeError) and any(word in str(error).lower() for word in _LOST_PEER)


def explain_lost_peer(error: BaseException, timeout: int) -> str | None:
    """One line for a collective that failed because another process died or stopped answering, naming the
    silent ranks where a roll call finds them; None for any other error."""
    if get_world_size() == 1 or not lost_peer(error):
        return None
    silent = silent_ranks()
    who = (f"rank {', '.join(map(str, silent))} stopped answering" if silent else
           "another process stopped answering or ended")
    return (f"rank {get_rank()}: {who} (no reply within --dist-timeout {timeout} s, or its connection closed); "
            f"the job stops. Once the cause is found, the same command with --resume auto continues")


def over_share(count: int, share: float, total: int) -> bool:
    """Whether count is more than share of total: a share written in decimals allows its count (0.29 of 100 is
    29, where the float product is 28.999999999999996)."""
    return count > round(share * total, 9)


def counted(count: int, thing: str) -> str:
    """A count and its thing, in the plural unless one: "1 epoch", "3 epochs"."""
    return f"{count} {thing}{'' if count == 1 else 's'}"


def print_once(*args, **kwargs) -> None:
    """print on rank 0 only, so that a job of N processes does not say everything N times."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def generator_for(*parts) -> torch.Generator:
    """A generator seeded from parts (numbers and strings, in tuples), the same in every process: Python's
    hash() of a string differs from one process to the next."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") % 2**63)


def random_state_kept(device: torch.device) -> AbstractContextManager[None]:
    """A block whose draws from torch's generators (CPU, and the device's) leave them as they were, so that
    the training's random sequence does not depend on what runs between its steps (evaluation, validation)."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def share_rank0_buffers(*modules: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers of modules whose buffers change in training (batch norm statistics,
    which each rank's last forward updated on its own batch), as rank 0's checkpoint holds them."""
    if get_world_size() == 1:
        return
    for module in modules:
        if buffers_change_in_training(module):
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)


def buffers_change_in_training(model: torch.nn.Module) -> bool:
    """Whether any buffer of model can change as it trains: not when all belong to frozen batch norms (the
    pretrained layout), and then DDP need not broadcast them from rank 0 before every forward."""
    return any(not isinstance(module, FrozenBatchNorm2d) for module in model.modules()
               if next(module.buffers(recurse=False), None) is not None)


def collate_fn(batch: list) -> tuple:
    """Detection batches stay lists: images differ in size and targets in instance count."""
    return tuple(zip(*batch))


# ---------------------------------------------------------------------------------- torchvision-reference names

# Training scripts written against torchvision's references/detection/utils.py import these names from utils
# (SmoothedValue also keeps metrics.StepMeters' series).

class SmoothedValue:
    """A series of numbers: its window (the latest window_size) for median, avg and max, and every value ever
    given, weighted by n, for global_avg. str() formats with fmt, which may name median, avg, global_avg, max and
    value."""

    def __init__(self, window_size: int = 20, fmt: str | None = None) -> None:
        self.window: deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"

    def update(self, value: float, n: int = 1) -> None:
        """Add value, standing for n items (a batch's mean loss over n images) in global_avg."""
        self.window.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        """Sum count and total over the ranks (all must call it, once), so global_avg covers every rank's values;
        the window stays each rank's own."""
        if not is_dist_avail_and_initialized():
            return
        # A CPU tensor for gloo, a GPU one for NCCL (which takes no other)
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        sums = torch.tensor([self.count, self.total], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        count, self.total = sums.tolist()
        self.count = int(count)

    # Each reads 0.0 before the first value, so a meter added but not yet updated still prints.
    @property
    def median(self) -> float:
        return float(np.median(self.window)) if self.window else 0.0

    @property
    def avg(self) -> float:
        return float(np.mean(self.window)) if self.window else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def max(self) -> float:
        return max(self.window, default=0.0)

    @property
    def value(self) -> float:
        """The latest value."""
        return self.window[-1] if self.window else 0.0

    @property
    def deque(self) -> deque:
        """The window, under the reference's name for it (scripts read meter.deque)."""
        return self.window

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max,
                               value=self.value)


class MetricLogger:
    """Named SmoothedValues (meters), shown on one line, and log_every, which prints them as a loop runs."""

    def __init__(self, delimiter: str = "\t") -> None:
        self.meters: defaultdict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **values: float | torch.Tensor) -> None:
        """Add each value (a number, or a one-element tensor) to the meter of its name."""
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            if not isinstance(value, numbers.Real):
                raise TypeError(f"MetricLogger.update: {name} must be a number or a one-element tensor, "
                                f"not {type(value).__name__}")
            self.meters[name].update(value)

    def __getattr__(self, name: str) -> SmoothedValue:
        # Only called for names that are no real attribute; __dict__ is read directly, as copy and pickle call this
        # before __init__ has set meters.
        meters = self.__dict__.get("meters", {})
        if name in meters:
            return meters[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute or meter '{name}'")

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        """A meter of its own window or format (a learning rate shown as its latest value, say)."""
        self.meters[name] = meter

    def synchronize_between_processes(self) -> None:
        """Every meter's SmoothedValue.synchronize_between_processes (all ranks must call it)."""
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def log_every(self, iterable: Iterable, print_freq: int, header: str | None = None) -> Iterator:
        """Yield iterable's items, printing (on rank 0) the progress and the meters after item 0, every print_freq
        items and the last, then the total time. iterable needs a len() for [i/total] and the eta."""
        # Checked here, where the call is, not at the first item, as the generator below would
        try:
            total = len(iterable)
        except TypeError:
            raise TypeError(f"MetricLogger.log_every needs an iterable with a len() (a list, a DataLoader), not a "
                            f"{type(iterable).__name__}; make it a list first") from None
        if print_freq < 1:
            raise ValueError(f"MetricLogger.log_every: print_freq must be 1 or more, not {print_freq}")
        return self._logged(iterable, total, print_freq, header or "")

    def _logged(self, iterable: Iterable, total: int, print_freq: int, header: str) -> Iterator:
        step_time, data_time = SmoothedValue(fmt="{avg:.4f}"), SmoothedValue(fmt="{avg:.4f}")
        started = step_started = time.perf_counter()
        for i, item in enumerate(iterable):
            data_time.update(time.perf_counter() - step_started)
            yield item
            step_time.update(time.perf_counter() - step_started)
            if i % print_freq == 0 or i == total - 1:
                print_once(self._progress_line(header, i, total, step_time, data_time))
            step_started = time.perf_counter()
        elapsed = time.perf_counter() - started
        print_once(f"{header} Total time: {_duration(elapsed)} ({elapsed / max(total, 1):.4f} s / it)".lstrip())

    def _progress_line(self, header: str, i: int, total: int, step_time: SmoothedValue,
                       data_time: SmoothedValue) -> str:
        parts = [header] if header else []
        parts += [f"[{i:{len(str(total))}d}/{total}]", f"eta: {_duration(step_time.global_avg * (total - i - 1))}",
                  str(self), f"time: {step_time}", f"data: {data_time}"]
        if torch.cuda.is_available():
            parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}")
        return self.delimiter.join(parts)


def _duration(seconds: float) -> str:
    """Whole seconds as H:MM:SS."""
    return str(datetime.timedelta(seconds=int(seconds)))


def mkdir(path: str | os.PathLike) -> None:
    """Create the folder and its parents; one that exists already is fine."""
    os.makedirs(path, exist_ok=True)


def save_on_master(obj: Any, path: str | os.PathLike) -> None:
    """torch.save on rank 0 only (the others would write the same file), atomically: a write cut short leaves
    the file as it was."""
    if is_main_process():
        import checkpoint  # here, not at the top: checkpoint imports utils

        checkpoint.save_atomic(obj, path)


# The reference's name for it: one implementation
all_gather = all_gather_object

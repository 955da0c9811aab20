"""Distributed set-up, logging of running averages, and the small helpers every module shares."""

from __future__ import annotations

import datetime
import os
import random
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torchvision.ops.misc import FrozenBatchNorm2d


class UserError(Exception):
    """A problem with the user's input: train.py prints its message as one line and exits non-zero."""


# ---------------------------------------------------------------------------------------------- distributed

def init_distributed_mode(args) -> None:
    """Fill args.rank, args.world_size, args.gpu, args.distributed from the launcher's environment."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        args.rank = int(os.environ["RANK"])
        args.world_size = int(os.environ["WORLD_SIZE"])
        # torch.distributed.launch sets LOCAL_RANK too; without --use_env it also passes --local-rank
        args.gpu = int(os.environ.get("LOCAL_RANK", args.local_rank or 0))
    elif "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        args.rank = int(os.environ["SLURM_PROCID"])
        args.world_size = int(os.environ["SLURM_NTASKS"])
        args.gpu = int(os.environ.get("SLURM_LOCALID", args.rank % max(1, torch.cuda.device_count())))
    else:
        args.rank, args.gpu, args.distributed = 0, 0, False
        return
    args.distributed = True
    if args.device == "cuda":
        torch.cuda.set_device(args.gpu)
    backend = args.dist_backend or ("nccl" if args.device == "cuda" else "gloo")
    dist.init_process_group(backend=backend, init_method=args.dist_url, world_size=args.world_size,
                            rank=args.rank, timeout=datetime.timedelta(seconds=args.dist_timeout))
    dist.barrier()


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def all_gather_object(obj) -> list:
    """Every rank's obj, in rank order (a one-item list when not distributed)."""
    if get_world_size() == 1:
        return [obj]
    gathered: list = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def reduce_dict(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean of each scalar tensor over all ranks."""
    world_size = get_world_size()
    if world_size == 1:
        return values
    with torch.no_grad():
        names = sorted(values)
        stacked = torch.stack([values[k] for k in names])
        dist.all_reduce(stacked)
        stacked /= world_size
        return dict(zip(names, stacked))


def any_rank(flag: bool) -> bool:
    """True on every rank when flag is true on at least one (all ranks must take the same branch)."""
    if get_world_size() == 1:
        return flag
    value = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def print_once(*args, **kwargs) -> None:
    """print on rank 0 only, so that a job of N processes does not say everything N times."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_channels_last(flag: bool | None, device: torch.device) -> bool:
    """The memory format of the convolutions: as --channels-last/--no-channels-last say, else channels-last on a
    CPU (in our runs at 320-1333 px, 7-20% faster training steps and 12-23% faster evaluation; slower only at
    toy sizes like 96 px) and the usual layout on GPUs, where it depends on the precision."""
    return device.type == "cpu" if flag is None else flag


def use_shape_buckets(flag: bool | None, device: torch.device) -> bool:
    """Whether batches are padded to recurring shapes (shape_buckets.py): as --shape-buckets/--no-shape-buckets
    say, else on GPUs, where a new shape costs cuDNN plans, and not on the CPU, where padding costs arithmetic."""
    return device.type == "cuda" if flag is None else flag


AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def amp_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The autocast type of --amp: as --amp-dtype names it, else float16 on GPUs (the seed's mixed precision,
    with a gradient scaler) and bfloat16 on the CPU (where float16 convolutions are many times slower)."""
    return AMP_DTYPES[name or ("float16" if device.type == "cuda" else "bfloat16")]


def buffers_change_in_training(model: torch.nn.Module) -> bool:
    """Whether any buffer of model can change as it trains: not when all belong to frozen batch norms (the
    pretrained layout), and then DDP need not broadcast them from rank 0 before every forward."""
    return any(not isinstance(module, FrozenBatchNorm2d) for module in model.modules()
               if next(module.buffers(recurse=False), None) is not None)


def collate_fn(batch: list) -> tuple:
    """Detection batches stay lists: images differ in size and targets in instance count."""
    return tuple(zip(*batch))


# ---------------------------------------------------------------------------------------------- logging

class SmoothedValue:
    """A series' running average over a window and over the whole run."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})") -> None:
        self.window: deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value: float, n: int = 1) -> None:
        self.window.append(value)
        self.count += n
        self.total += value * n

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
    def value(self) -> float:
        return self.window[-1] if self.window else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    """Running averages of named values, printed every print_freq iterations with ETA and throughput."""

    def __init__(self, delimiter: str = "  ") -> None:
        self.meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **values: float) -> None:
        for name, value in values.items():
            self.meters[name].update(float(value))

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def log_every(self, iterable: Iterable, print_freq: int, header: str = "", images_per_step: int = 1,
                  start: int = 0, total: int | None = None, on_log: Callable[[dict], None] | None = None,
                  steps_after: int = 0) -> Iterator:
        """Yield from iterable; every print_freq steps print progress, ETA, averages and images/s, and hand
        on_log the step's own values (step counts from 1; start is where a resumed epoch picks up).

        steps_after, the steps still to come in later epochs, adds an ETA of the whole run.
        """
        total = start + len(iterable) if total is None else total
        step_time = SmoothedValue(fmt="{avg:.3f}")
        data_time = SmoothedValue(fmt="{avg:.3f}")
        width = len(str(total))
        started = end = time.time()
        i = start
        for obj in iterable:
            data_time.update(time.time() - end)
            yield obj
            step_time.update(time.time() - end)
            i += 1
            if i % print_freq == 0 or i == total:
                eta = datetime.timedelta(seconds=int(step_time.global_avg * (total - i)))
                rate = images_per_step / max(step_time.avg, 1e-9)
                if steps_after:
                    run_eta = datetime.timedelta(seconds=int(step_time.global_avg * (total - i + steps_after)))
                    eta = f"{eta} (run {run_eta})"
                parts = [f"{header} [{i:{width}d}/{total}]", f"eta: {eta}", str(self),
                         f"img/s: {rate:.1f}", f"time: {step_time}", f"data: {data_time}"]
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}MB")
                print_once(self.delimiter.join(parts))
                if on_log is not None:
                    on_log({"step": i, "time": round(time.time(), 3), "images_per_s": round(rate, 3),
                            "step_time": round(step_time.value, 4), "data_time": round(data_time.value, 4),
                            **{name: meter.value for name, meter in self.meters.items()}})
            end = time.time()
        elapsed = datetime.timedelta(seconds=int(time.time() - started))
        print_once(f"{header} total time: {elapsed} ({(time.time() - started) / max(i - start, 1):.3f} s / it)")

"""Training throughput: images/s of the whole training loop (data loader, forward, backward, optimizer step)
at a given image size and batch, past a warm-up, with peak memory (the process's, and the GPU's) and whether
every loss was finite.

    python3 bench/bench_train.py --data-path ./datasets/coco-like --device cuda --batch-size 4 --amp
    python3 bench/bench_train.py --data-path ... --reference /path/to/vision/references/detection

Steps are timed from the first forward call past the warm-up to the last, with a GPU synchronised there only
(waiting at every step would keep the host from queueing a step while the GPU still runs the one before), so
the figure is what a run sees, data waits included; with --reference the same is measured for torchvision's
reference loop, data pipeline and model builder. The time spent waiting for the data loader is reported apart.
--count-ops counts instead the operators a timed step dispatches (forward, backward, optimizer) and those that
wait for the device's results, by kind (Tensor.tolist and tensors made from Python data on a named device
included, which dispatch no operator of their own on the CPU; a host tensor's .to(device) is not seen), and
apart those of the forward before it reaches the backbone, which keep the host from queueing the backbone while
the device still runs the step before. Where a GPU step is bound by the host, these are its cost, and they can
be counted on any device (--speedups-as cuda on a CPU leaves out the CPU's own speed-ups, as a GPU run would;
the CPU's optimizer still loops where a GPU's calls foreach kernels). --profile DIR
records the timed steps with torch's profiler and writes their operator tables and a trace there.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import resource
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from common import available_device, emit, environment, use_implementation  # noqa: E402

# Two waits that dispatch no operator of their own on the CPU, counted where they are called: a copy to the host,
# and Python data made into a tensor on a device given (a blocking copy there, where torchvision passes the
# device of a model's tensor).
TOLIST = "Tensor.tolist"
MADE_ON_DEVICE = "a tensor made from host data on a device"
# Operators whose result size or value the host must read before it can go on: each waits for the device.
HOST_SYNCS = frozenset({"aten.nonzero.default", "aten._local_scalar_dense.default", "aten.masked_select.default",
                        "aten.is_nonzero.default", "aten._unique2.default", "aten.unique_consecutive.default",
                        "aten.unique_dim.default", "aten.repeat_interleave.Tensor", "aten.equal.default",
                        TOLIST, MADE_ON_DEVICE})


# Indexing by a boolean mask: on a GPU it finds the mask's true positions first (a nonzero the host waits for),
# though on the CPU that nonzero is not dispatched on its own.
MASK_INDEXING = frozenset({"aten.index.Tensor", "aten.index_put_.default", "aten.index_put.default"})
BY_MASK = " by a boolean mask"


def _made_on_a_device(data, **kwargs) -> bool:
    """Whether a call of torch.tensor or torch.as_tensor copies Python data to a device it names (the meta
    device holds no data)."""
    device = kwargs.get("device")
    return device is not None and torch.device(device).type != "meta" and not isinstance(data, torch.Tensor)


class OperatorCounter(TorchDispatchMode):
    """Counts the operators dispatched while active (backward's as well: the mode travels with autograd); indexing
    by a boolean mask is counted under its own name, as it waits for the device, and so are calls of
    Tensor.tolist, and of torch.tensor and torch.as_tensor that name a device (in this thread only, as the mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.before_backbone = False  # set from a forward's start until it reaches the backbone
        self.counts: collections.Counter[str] = collections.Counter()
        self.counts_before_backbone: collections.Counter[str] = collections.Counter()
        self.thread = threading.get_ident()

    def __enter__(self):
        self.factories = torch.tensor, torch.as_tensor
        # tolist is inherited from torch's C base class: set on torch.Tensor here, deleted again on leaving.
        torch.Tensor.tolist = self._counted(torch.Tensor.tolist, TOLIST, lambda tensor: True)
        torch.tensor, torch.as_tensor = (self._counted(f, MADE_ON_DEVICE, _made_on_a_device) for f in self.factories)
        return super().__enter__()

    def __exit__(self, *exc):
        del torch.Tensor.tolist
        torch.tensor, torch.as_tensor = self.factories
        return super().__exit__(*exc)

    def _counted(self, function: Callable, name: str, counts: Callable[..., bool]) -> Callable:
        """function, counting under name each call in this thread while active for which counts(...) holds."""
        def counted(*args, **kwargs):
            if self.active and threading.get_ident() == self.thread and counts(*args, **kwargs):
                self._count(name)
            return function(*args, **kwargs)
        return counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active:
            name = str(func)
            if name in MASK_INDEXING and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                             for i in args[1]):
                name += BY_MASK
            self._count(name)
        return func(*args, **(kwargs or {}))

    def _count(self, name: str) -> None:
        self.counts[name] += 1
        if self.before_backbone:
            self.counts_before_backbone[name] += 1

    def host_syncs_by_kind(self, before_backbone: bool = False) -> dict[str, int]:
        """The counted operators that wait for the device's result, by name (those of the forwards before they
        reached the backbone only, if asked)."""
        counts = self.counts_before_backbone if before_backbone else self.counts
        return {op: n for op, n in sorted(counts.items()) if op in HOST_SYNCS or op.endswith(BY_MASK)}

    def host_syncs(self, before_backbone: bool = False) -> int:
        """How many of the counted operators wait for the device's result."""
        return sum(self.host_syncs_by_kind(before_backbone).values())


class TimedLoader:
    """A data loader whose iteration records in .waits the time spent waiting for each batch."""

    def __init__(self, loader: torch.utils.data.DataLoader) -> None:
        self.loader = loader
        self.waits: list[float] = []

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.waits.append(time.perf_counter() - start)
            yield batch


class StepClock:
    """Forward hooks that time the steps between the first forward call past the warm-up and the last one, and
    check each loss dict for finite values; with a counter, they switch it on at the first step past the warm-up
    (and mark where each forward reaches the backbone), as they start a profiler."""

    def __init__(self, model: torch.nn.Module, device: torch.device, warmup: int, calls: int,
                 counter: OperatorCounter | None = None, profiler: torch.profiler.profile | None = None) -> None:
        self.device = device
        self.warmup = warmup
        self.calls = calls
        self.counter = counter
        self.profiler = profiler
        self.times: list[float] = []
        self.flags: list[torch.Tensor] = []
        model.register_forward_pre_hook(self._before)
        model.register_forward_hook(self._after)
        if counter is not None and hasattr(model, "backbone"):
            model.backbone.register_forward_pre_hook(lambda module, inputs: setattr(counter, "before_backbone",
                                                                                    False))

    def _before(self, module, inputs) -> None:
        # Only where the timing starts and ends: a wait at every step would keep the host from queueing a step
        # while the device still runs the one before, as a run does.
        if self.device.type == "cuda" and len(self.times) in (self.warmup, self.calls - 1):
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        if self.counter is not None:
            self.counter.active = len(self.times) > self.warmup
            self.counter.before_backbone = True
        if self.profiler is not None and len(self.times) == self.warmup + 1:
            self.profiler.start()

    def _after(self, module, inputs, output) -> None:
        if isinstance(output, dict):  # kept on the device: checking now would add a sync to every step
            self.flags.append(torch.stack([v.detach().float() for v in output.values()]).isfinite().all())

    @property
    def finite(self) -> bool:
        return bool(torch.stack(self.flags).all()) if self.flags else True


def torchvision_model(args) -> torch.nn.Module:
    """torchvision's own builder, seeded: the starting weights of both implementations' runs."""
    torch.manual_seed(0)
    weights_backbone = None if args.weights_backbone is None else "ResNet50_Weights.IMAGENET1K_V1"
    return torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=weights_backbone, num_classes=args.num_classes, min_size=args.min_size,
        max_size=args.max_size)


def first_samples(dataset, count: int) -> torch.utils.data.Subset:
    """The first count samples; fewer would time fewer steps than the settings say."""
    if len(dataset) < count:
        raise SystemExit(f"error: {count} training images needed (--steps and --warmup at this --batch-size), "
                         f"{len(dataset)} usable; generate more")
    return torch.utils.data.Subset(dataset, list(range(count)))


def run_ours(args, device, steps: int, make_clock: Callable[[torch.nn.Module], StepClock]
             ) -> tuple[StepClock, TimedLoader]:
    import presets
    import speedups
    import utils
    from coco_utils import build_dataset
    from data import start_worker_with_malloc_defaults
    from devices import amp_dtype, grad_scaler
    from engine import TrainOptions, train_one_epoch
    from freed_memory import ReleasingCollate, reuse_freed_memory_checked, reuse_wanted
    from group_by_aspect_ratio import ResumableBatchSampler
    from models import build_model
    from optimization import make_optimizer

    leave_out(speedups, args.leave_out)
    dataset = first_samples(build_dataset(args.data_path, "coco", "train", presets.DetectionPresetTrain("hflip")),
                            steps * args.batch_size)
    # In order, as the reference's run below; the loop reads the run's clock from the batch sampler.
    batches = ResumableBatchSampler(torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(dataset),
                                                                  args.batch_size, drop_last=True))
    # As train.py: the main process keeps its freed memory on the CPU (unless told not to), its workers do not.
    args.reuse_freed_memory = reuse_wanted(args.reuse_freed_memory, device.type) and reuse_freed_memory_checked()
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=args.workers,
                                         collate_fn=ReleasingCollate(utils.collate_fn),
                                         pin_memory=device.type == "cuda",
                                         worker_init_fn=start_worker_with_malloc_defaults if args.reuse_freed_memory
                                         else None)
    loader = TimedLoader(loader)
    model = build_model("maskrcnn_resnet50_fpn", args.num_classes, None, args.weights_backbone, None,
                        min_size=args.min_size, max_size=args.max_size)
    # The same starting weights as the reference's run: how many proposals the heads train on, and so the
    # cost of a step, depends on them.
    model.load_state_dict(torchvision_model(args).state_dict())
    config = speedups.SpeedupConfig(not args.no_speedups, args.channels_last, args.shape_buckets, autocast=args.amp)
    chosen_for = torch.device(args.speedups_as) if args.speedups_as else device
    model = speedups.for_training(model.to(device), chosen_for, config)
    # The settings printed say which were used.
    args.channels_last = config.use_channels_last(chosen_for)
    args.shape_buckets = config.use_shape_buckets(chosen_for)
    args.speedups_applied = speedups.applied(model)
    precision = amp_dtype(args.amp_dtype, device) if args.amp else None
    if precision is not None:
        args.amp_dtype = str(precision).removeprefix("torch.")
    scaler = grad_scaler(device, precision)
    # As train.py makes it, with the reference's settings: the fused kernel where the speed-ups are chosen for a GPU.
    args.fused_optimizer = config.use_fused_optimizer(chosen_for)
    recipe = argparse.Namespace(opt="sgd", lr=args.lr, momentum=0.9, weight_decay=1e-4, norm_weight_decay=None)
    optimizer = make_optimizer(model, recipe, fused=args.fused_optimizer)
    clock = make_clock(model)
    # Epoch 1 of 2, as the reference's loop is called: past the warm-up, and no run ETA below zero.
    options = TrainOptions(print_freq=10**9, epochs=2, scaler=scaler, amp_dtype=precision)
    train_one_epoch(model, optimizer, loader, device, epoch=1, options=options)
    return clock, loader


def leave_out(speedups, names: list[str]) -> None:
    """Take the named training speed-ups out of this process's list, so that the step is measured without them."""
    known = [speedup.name for speedup in speedups.TRAINING]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"error: --leave-out {unknown[0]!r} is none of the training speed-ups: "
                         + "; ".join(known))
    speedups.TRAINING = tuple(speedup for speedup in speedups.TRAINING if speedup.name not in names)


def run_reference(args, device, steps: int, make_clock: Callable[[torch.nn.Module], StepClock]
                  ) -> tuple[StepClock, TimedLoader]:
    import coco_utils
    import presets
    import utils
    from engine import train_one_epoch

    dataset = first_samples(coco_utils.get_coco(args.data_path, "train",
                                                presets.DetectionPresetTrain(data_augmentation="hflip")),
                            steps * args.batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False, drop_last=True,
                                         num_workers=args.workers, collate_fn=utils.collate_fn)
    loader = TimedLoader(loader)
    model = torchvision_model(args).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    scaler = torch.cuda.amp.GradScaler() if args.amp else None
    clock = make_clock(model)
    train_one_epoch(model, optimizer, loader, device, epoch=1, print_freq=10**9, scaler=scaler)
    return clock, loader


def write_profile(profiler: torch.profiler.profile, folder: Path, implementation: str, steps: int) -> dict:
    """Writes the profiled steps' operator tables (by host time, and by device time where there is a device)
    and their trace to folder; returns the per-step totals of both."""
    folder.mkdir(parents=True, exist_ok=True)
    averages = profiler.key_averages()
    sorts = ["self_cpu_time_total"] + (["self_device_time_total"] if profiler.activities != {
        torch.profiler.ProfilerActivity.CPU} else [])
    tables = [f"{steps} steps; sorted by {key}\n{averages.table(sort_by=key, row_limit=60, max_name_column_width=70)}"
              for key in sorts]
    (folder / f"profile_{implementation}.txt").write_text("\n\n".join(tables))
    profiler.export_chrome_trace(str(folder / f"trace_{implementation}.json.gz"))
    return {"host_ms_per_step": round(sum(a.self_cpu_time_total for a in averages) / 1000 / steps, 1),
            "device_ms_per_step": round(sum(a.self_device_time_total for a in averages) / 1000 / steps, 1)}


def get_args_parser() -> argparse.ArgumentParser:
    """The command line: what is measured, on which data, with which of our switches."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", required=True)
    parser.add_argument("--reference", help="folder of torchvision's references/detection to measure instead")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--min-size", type=int, default=800)
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--steps", type=int, default=20, help="steps timed, after the warm-up")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.001, help="the seed's rate; higher can diverge in a few "
                        "steps from random weights, which ends the measurement")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--amp-dtype", choices=("float16", "bfloat16"),
                        help="ours only, default as train.py's: float16 on GPUs, bfloat16 on the CPU; the "
                        "reference's --amp is float16 on GPUs and does nothing on the CPU")
    parser.add_argument("--no-speedups", action="store_true", help="ours only: torchvision's plain model")
    parser.add_argument("--leave-out", action="append", default=[], metavar="SPEEDUP",
                        help="ours only: train without this one of the model's speed-ups (speedups.TRAINING), "
                        "named as speedups_applied names it (may be repeated), to measure what it does (one that "
                        "needs it goes too: the cropped mask targets with the matched-class logits); those chosen "
                        "by device are not among them (the layout, its convolution gradients, Winograd's "
                        "convolutions, the shape buckets: --[no-]channels-last and --[no-]shape-buckets choose two)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="ours only; default as train.py's: on for CPUs")
    parser.add_argument("--reuse-freed-memory", action=argparse.BooleanOptionalAction, default=None,
                        help="ours only; default as train.py's: on for the CPU")
    parser.add_argument("--shape-buckets", action=argparse.BooleanOptionalAction, default=None,
                        help="ours only; default as train.py's: on for GPUs")
    parser.add_argument("--speedups-as", choices=("cpu", "cuda"),
                        help="ours only: the speed-ups chosen for this kind of device, whatever --device (with "
                             "--count-ops, cuda on a CPU counts the operators of the step a GPU runs)")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="cuDNN times its kernels per input shape")
    parser.add_argument("--count-ops", action="store_true",
                        help="count the operators of each step past the warm-up (the timings then include the "
                        "counting, and mean little)")
    parser.add_argument("--profile", metavar="DIR",
                        help="record the timed steps with torch's profiler; write its tables and trace to DIR")
    parser.add_argument("--num-classes", type=int, default=91,
                        help="the model's classes, background included, for both (default 91, as the reference's "
                        "COCO); more than the data's measures a head of that size")
    parser.add_argument("--weights-backbone", default=None,
                        help="ResNet50_Weights.IMAGENET1K_V1 for the pretrained layout (hub cache); default none")
    return parser


def main() -> None:
    parser = get_args_parser()
    args = parser.parse_args()
    if args.reference and (args.speedups_as or args.no_speedups or args.leave_out):
        parser.error("--speedups-as, --no-speedups and --leave-out choose our speed-ups; the reference has none: "
                     "leave them out with --reference")
    use_implementation(args.reference)
    device = available_device(args.device)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    total = args.warmup + args.steps + 1
    counter = OperatorCounter() if args.count_ops else None
    profiler = None
    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profiler = torch.profiler.profile(activities=activities)
    implementation = "reference" if args.reference else "ours"
    with counter or contextlib.nullcontext():
        clock, loader = (run_reference if args.reference else run_ours)(
            args, device, total, lambda model: StepClock(model, device, args.warmup, total, counter, profiler))
    gaps = [b - a for a, b in zip(clock.times, clock.times[1:])][args.warmup:]
    seconds = sum(gaps)
    # The wait for batch i + 1 falls in the gap timed from step i's forward.
    data_wait = sum(loader.waits[args.warmup + 1:args.warmup + 1 + len(gaps)])
    result = {
        "benchmark": "train", "implementation": implementation,
        "environment": environment(device), "settings": vars(args),
        "steps_timed": len(gaps), "seconds": round(seconds, 3),
        "step_ms": round(1000 * seconds / max(len(gaps), 1), 1),
        "data_wait_ms": round(1000 * data_wait / max(len(gaps), 1), 1),
        "images_per_s": round(len(gaps) * args.batch_size / seconds, 2) if seconds else None,
        "losses_finite": clock.finite,
    }
    counted = args.steps + 1  # the steps counted or profiled: each timed one and the last, whose forward ends it
    if profiler is not None:
        profiler.stop()
        result["profile"] = write_profile(profiler, Path(args.profile), implementation, counted)
    if counter is not None:
        result["operators_per_step"] = round(sum(counter.counts.values()) / counted, 1)
        result["host_syncs_per_step"] = round(counter.host_syncs() / counted, 1)
        result["host_syncs_per_step_by_kind"] = {op: round(n / counted, 1)
                                                 for op, n in counter.host_syncs_by_kind().items()}
        # Before the backbone is queued, a wait keeps the host from queueing it while the device still runs the
        # step before.
        result["host_syncs_before_backbone_per_step"] = {op: round(n / counted, 1) for op, n in
                                                         counter.host_syncs_by_kind(before_backbone=True).items()}
    # The whole process's peak (model, optimizer, data with --workers 0): on the CPU, the training's memory.
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    if device.type == "cuda":
        result["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    emit(result)


if __name__ == "__main__":
    main()

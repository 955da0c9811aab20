"""The training and evaluation loops, and the pieces each step is made of."""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

import utils
from coco_eval import CocoEvaluator, RunLengths, run_lengths, windowed_run_lengths
from coco_utils import coco_of_samples, plain_id
from devices import autocast
from errors import UserError
from metrics import ConsoleWriter, LogSchedule, Record, StepMeters
from models import iou_types_of

# With several processes, ranks agree on a stop request about this often (one all-reduce each time), and at
# least every this many steps; a single process checks at every step for free. A stop then lands well within a
# launcher's grace period (torchrun kills its workers 30 s after passing on a signal).
STOP_AGREEMENT_SECONDS = 2.0
STOP_AGREEMENT_MOST_STEPS = 10
WARMUP_STEPS = 1000


def to_device(images: Sequence[torch.Tensor], targets: Sequence[dict], device: torch.device
              ) -> tuple[list[torch.Tensor], list[dict]]:
    """Move a batch to the device; uint8 images become floats in [0, 1] there (float images, which other datasets
    such as torchvision's tutorial's give, are taken as in [0, 1] already), and masks (column-major from the
    loader) become row-major there, where that is cheap, rather than in the loader."""
    images = [img.to(device, non_blocking=True).float().div_(255) if img.dtype == torch.uint8
              else img.to(device, non_blocking=True) for img in images]
    targets = [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
               for t in targets]
    for target in targets:
        if "masks" in target:
            target["masks"] = target["masks"].contiguous()
    return images, targets


def pop_faults(targets: Sequence[dict]) -> list[str]:
    """The per-sample faults the dataset attached to a batch's targets, removed from them."""
    return [f for t in targets for f in t.pop("faults", [])]


def _annotation_of(fault: str) -> str:
    """The annotation a fault is of (its '<file> annotation <id>: ' start), or the fault where it names none."""
    found = re.match(r".*? annotation \S+?: ", fault)
    return found.group(0) if found else fault


def skipped_samples(faults: set[str]) -> int:
    return sum(f.endswith("sample skipped") for f in faults)


def repaired_annotations(faults: set[str]) -> int:
    """Annotations repaired or left out: one may have several faults (a polygon removed, then no outline)."""
    return len({_annotation_of(f) for f in faults if not f.endswith("sample skipped")})


class FaultLog:
    """Prints each per-sample fault once per run, counts the distinct ones of each epoch, and knows when more
    than max_share of the epoch's samples (this rank's share of them) could not be read."""

    def __init__(self, max_share: float, scope: str = "this epoch") -> None:
        self.max_share, self.scope = max_share, scope
        self.seen: set[str] = set()
        self.epoch_faults: set[str] = set()
        self.samples_in_epoch = 0

    def start_epoch(self) -> None:
        self.epoch_faults = set()

    @property
    def skipped(self) -> int:
        return skipped_samples(self.epoch_faults)

    def add(self, faults: list[str], samples_in_epoch: int) -> None:
        self.samples_in_epoch = samples_in_epoch
        for fault in faults:
            self.epoch_faults.add(fault)
            if fault not in self.seen:
                self.seen.add(fault)
                print(f"data: {fault}", flush=True)

    def discard(self, faults: list[str]) -> None:
        """Count these faults no more this epoch (their samples were read, then not trained on)."""
        self.epoch_faults.difference_update(faults)

    @property
    def over_limit(self) -> bool:
        return utils.over_share(self.skipped, self.max_share, self.samples_in_epoch)

    def counted(self) -> str:
        """'k of n' skipped samples, n said as this process's share where there are several."""
        share = "this process's " if utils.get_world_size() > 1 else ""
        return f"{self.skipped} of {share}{self.samples_in_epoch}"

    def limit_error(self) -> UserError:
        """The error that stops the run, worded for this rank: its own count, or another rank's."""
        if not self.over_limit:
            return UserError(f"another process found more unreadable samples {self.scope} than --max-bad-samples "
                             f"{self.max_share:g} allows; fix the files it named or raise --max-bad-samples")
        return UserError(f"{self.counted()} samples could not be read {self.scope}, more than --max-bad-samples "
                         f"{self.max_share:g} allows; fix the files named above or raise --max-bad-samples")


def warmup_factor(iteration: int, warmup_iters: int, start_factor: float = 0.001) -> float:
    """Linear warm-up of the learning rate from start_factor to 1 over the first warmup_iters steps."""
    if iteration >= warmup_iters:
        return 1.0
    return start_factor + (1 - start_factor) * iteration / warmup_iters


class Warmup:
    """The first epoch's learning-rate warm-up over min(1000, steps - 1) steps, counted from the epoch's start,
    so a run resumed mid-epoch gets the rates an uninterrupted one gets. The optimizer keeps its base rates
    outside the epoch (they are what a checkpoint saves)."""

    def __init__(self, optimizer: torch.optim.Optimizer, epoch: int, steps_in_epoch: int) -> None:
        self.optimizer = optimizer
        self.steps = min(WARMUP_STEPS, steps_in_epoch - 1) if epoch == 0 else 0
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]

    def set_lr(self, step: int) -> None:
        factor = warmup_factor(step, self.steps)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * factor

    def restore(self) -> None:
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr


class PendingLosses:
    """Loss values kept on the device until a logged step reads them: reading one is a host sync, and a step
    needs none of its own. A non-finite loss is found then, and named with its own step."""

    def __init__(self, epoch: int, amp_dtype: torch.dtype | None = None) -> None:
        self.epoch, self.amp_dtype = epoch, amp_dtype
        self.pending: list[tuple[int, dict[str, torch.Tensor]]] = []

    def add(self, step: int, loss_dict: dict[str, torch.Tensor]) -> None:
        self.pending.append((step, utils.reduce_dict({k: v.detach().float() for k, v in loss_dict.items()})))

    def read(self) -> list[dict[str, float]]:
        """Each pending step's losses, with their total as "loss", in step order; raises on a non-finite one."""
        if not self.pending:
            return []
        names = list(self.pending[0][1])
        values = torch.stack([torch.stack([d[k] for k in names]) for _, d in self.pending]).cpu().tolist()
        rows = []
        for (step, _), row in zip(self.pending, values):
            total = sum(row)
            if not math.isfinite(total):
                shown = {k: round(v, 4) for k, v in zip(names, row)}
                bfloat16 = "--amp-dtype bfloat16 instead of float16, " if self.amp_dtype == torch.float16 else ""
                raise UserError(
                    f"loss is {total} at epoch {self.epoch} step {step} {shown}; training stopped without a "
                    f"checkpoint of these weights (earlier ones are kept). Likely fixes: a lower --lr, "
                    f"--clip-grad-norm 10, {bfloat16}or a look at the data")
            rows.append({"loss": total, **dict(zip(names, row))})
        self.pending.clear()
        return rows


class StopAgreement:
    """Whether every rank stops before a step of one loop, asked to or (raising, where faults are counted) for
    too many unreadable samples on any rank. One process decides at every step. Several agree, so that all take
    the same branch, at the loop's first two steps and then every STOP_AGREEMENT_SECONDS of the slowest rank's
    steps (every step when steps are slower, at most every STOP_AGREEMENT_MOST_STEPS): each rank sets the next
    agreement from the same all-reduced pace, so all call the all-reduce together."""

    def __init__(self, faults: FaultLog | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.faults, self.clock = faults, clock
        self.next_step: int | None = None
        self.last_step, self.last_time = 0, clock()

    def agreed(self, step: int, requested: bool) -> bool:
        if utils.get_world_size() == 1:
            return stop_agreed_now(requested, self.faults)
        if self.next_step is not None and step < self.next_step:
            return False
        now, first = self.clock(), self.next_step is None
        stop, slowest_ms = _agree(requested, self.faults, 0 if first else int(1000 * (now - self.last_time)))
        self.next_step = step + (1 if first else self.steps_between(slowest_ms / (step - self.last_step)))
        self.last_step, self.last_time = step, now
        return stop

    @staticmethod
    def steps_between(per_step_ms: float) -> int:
        """The steps until the next agreement at the slowest rank's pace."""
        return min(max(int(1000 * STOP_AGREEMENT_SECONDS / max(per_step_ms, 1)), 1), STOP_AGREEMENT_MOST_STEPS)


def stop_agreed_now(requested: bool, faults: FaultLog | None) -> bool:
    """Whether every rank stops, decided now (one all-reduce, which every rank must call)."""
    return _agree(requested, faults, 0)[0]


def _agree(requested: bool, faults: FaultLog | None, elapsed_ms: int) -> tuple[bool, int]:
    """One all-reduce for both reasons to stop and the slowest rank's elapsed_ms: (stop, that time)."""
    stop, over_limit, slowest_ms = utils.max_over_ranks(
        [int(requested), int(faults is not None and faults.over_limit), elapsed_ms])
    if over_limit:
        raise faults.limit_error()
    return bool(stop), slowest_ms


class EvaluationStopped(Exception):
    """Every rank agreed to end an evaluation pass unfinished: a stop signal arrived during it."""


def stop_evaluation_if_agreed(agreement: StopAgreement, step: int, stop_requested: Callable[[], bool] | None
                              ) -> None:
    """Before this step (counted from 0), on the agreement's schedule: raise EvaluationStopped once the ranks agree
    that a stop was asked for (only during training, where stop_requested is given), or the faults' UserError
    once a rank is past --max-bad-samples (--test-only too)."""
    if agreement.agreed(step, stop_requested is not None and stop_requested()):
        raise EvaluationStopped


@dataclass
class TrainOptions:
    """How train_one_epoch steps, besides the model, optimizer and data."""

    print_freq: int = 20
    epochs: int = 1
    scaler: torch.amp.GradScaler | None = None
    amp_dtype: torch.dtype | None = None
    clip_grad_norm: float | None = None
    grad_accum_steps: int = 1
    faults: FaultLog = field(default_factory=lambda: FaultLog(max_share=0.01))
    stop_requested: Callable[[], bool] = lambda: False
    on_record: Callable[[Record], None] = ConsoleWriter().write
    after_step: Callable[[int], None] | None = None  # called with the run's optimizer steps after each one
    # The seconds the run expects to spend after an epoch's training other than in training (its evaluations),
    # for the run's ETA.
    seconds_after: Callable[[int], float] = lambda epoch: 0.0


def accumulated(batches: Iterable, count: int) -> Iterator[list]:
    """Consecutive groups of `count` batches, one group per optimizer step; a last, incomplete group is left
    out, so every step sees as many batches."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == count:
            yield group
            group = []


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    """Gradients of loss added to the parameters', through the gradient scaler when there is one."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def update(model: nn.Module, optimizer: torch.optim.Optimizer, options: TrainOptions) -> None:
    """One optimizer step from the gradients gathered: unscaled and clipped if asked, through the scaler."""
    scaler = options.scaler
    if options.clip_grad_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), options.clip_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list, device: torch.device,
                  options: TrainOptions) -> dict[str, torch.Tensor]:
    """One optimizer step over its batches (gradients accumulated, each batch's loss weighing 1 / batches);
    returns the mean of the batches' losses, on the device."""
    optimizer.zero_grad(set_to_none=True)
    mean: dict[str, torch.Tensor] = {}
    for i, (images, targets) in enumerate(batches):
        images, targets = to_device(images, targets, device)
        # Under DDP, gradients are averaged over the processes with the last batch only (the earlier ones'
        # travel with it); no_sync must hold over the forward as well as the backward.
        skip_sync = i < len(batches) - 1 and isinstance(model, torch.nn.parallel.DistributedDataParallel)
        with model.no_sync() if skip_sync else nullcontext(), deterministic_kernels_missing_said():
            with autocast(device, options.amp_dtype):
                loss_dict = model(images, targets)
            backward(sum(loss_dict.values()) / len(batches), options.scaler)
        for name, value in loss_dict.items():
            mean[name] = mean.get(name, 0) + value.detach().float() / len(batches)
    update(model, optimizer, options)
    return mean


@contextmanager
def deterministic_kernels_missing_said() -> Iterator[None]:
    """torch's error for an operation without a deterministic kernel under --use-deterministic-algorithms
    (torchvision's RoIAlign backward on CUDA has none), as one line."""
    try:
        yield
    except RuntimeError as error:
        text = str(error)
        if "does not have a deterministic implementation" not in text:
            raise
        operation = text.split(" does not have", 1)[0].strip()
        raise UserError(f"--use-deterministic-algorithms: {operation} has no deterministic implementation on this "
                        f"device, so training cannot keep to deterministic kernels here; leave the flag out, or "
                        f"train on the CPU") from None


@dataclass
class DataFailure:
    """The error that ended an epoch's data between two steps (the steps done before it are sound), and whether
    every rank met it at once (the fault limit, raised by their agreement), so that they can wait for a save."""

    error: UserError | None = None
    agreed: bool = False


def epoch_faults_everywhere(faults: FaultLog, failure: DataFailure, carried: dict | None) -> set[str]:
    """The epoch's distinct faults on every rank (what two ranks both met counts once) and, after a resume
    part-way, before it too (carried: the checkpoint's, so that a sample met on both sides counts once)."""
    met = set(faults.epoch_faults)
    if failure.error is None or failure.agreed:  # every rank is here, but not one alone in its failure
        met = set().union(*utils.all_gather_object(met))
    return met | set((carried or {}).get("faults", ()))


def fault_counts(faults: set[str]) -> dict[str, int]:
    return {"samples_skipped": skipped_samples(faults), "annotations_repaired": repaired_annotations(faults)}


def until_data_fails(batches: Iterable, failure: DataFailure) -> Iterator:
    """The batches, ending early where reading one raises a UserError, which failure keeps."""
    try:
        yield from batches
    except UserError as error:
        failure.error = error


@dataclass
class EpochResult:
    steps_done: int
    finished: bool
    failure: DataFailure = field(default_factory=DataFailure)
    so_far: dict | None = None  # an unfinished epoch's sums (StepMeters.so_far), for its checkpoint


@dataclass
class EpochClock:
    """The step clock of a loader whose epochs are all of one length (a plain DataLoader, as torchvision's
    tutorial makes), for train_one_epoch where the batch sampler is not this project's."""

    batch_size: int
    steps_per_epoch: int

    def steps(self, epoch: int) -> int:
        return self.steps_per_epoch

    def global_step(self, epoch: int, step: int) -> int:
        return epoch * self.steps_per_epoch + step


def step_clock(data_loader: DataLoader, accumulation: int) -> Any:
    """The clock of the run's optimizer steps: the loader's batch sampler where it is this project's (its epochs
    may differ in length), else an EpochClock of the loader's length."""
    sampler = data_loader.batch_sampler
    if hasattr(sampler, "global_step"):
        return sampler
    return EpochClock(getattr(sampler, "batch_size", None) or 1, len(data_loader) // accumulation)


def call_options(options: TrainOptions | None, print_freq: int | None, scaler: torch.amp.GradScaler | None
                 ) -> TrainOptions:
    """options as given (train.py's call), or those of a call as torchvision's reference makes it: print_freq, and
    a scaler, which means float16 autocast there."""
    if options is None:
        return TrainOptions(print_freq=print_freq or 20, scaler=scaler,
                            amp_dtype=torch.float16 if scaler is not None else None)
    if print_freq is not None or scaler is not None:
        raise TypeError("train_one_epoch takes print_freq and scaler, or options that hold them, not both")
    return options


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader, device: torch.device,
                    epoch: int, print_freq: int | None = None, scaler: torch.amp.GradScaler | None = None, *,
                    options: TrainOptions | None = None, start_step: int = 0, carried: dict | None = None
                    ) -> EpochResult:
    """Optimizer steps over data_loader (which yields the epoch's batches from start_step's on) until it ends or
    a stop is requested on any rank; the step in progress always completes. Logged steps become records, whose
    global step is the loader's batch sampler's clock; carried: the sums of the epoch's steps before start_step,
    which its record then covers too. Called as torchvision's reference and tutorial call theirs (print_freq,
    and a scaler for float16 autocast), or with options, which hold those two among the rest (train.py)."""
    options = call_options(options, print_freq, scaler)
    model.train()
    accumulation = options.grad_accum_steps
    clock = step_clock(data_loader, accumulation)
    steps_in_epoch = start_step + len(data_loader) // accumulation
    images_per_step = clock.batch_size * accumulation * utils.get_world_size()
    meters = StepMeters(f"Epoch: [{epoch}]", start_step, steps_in_epoch, images_per_step, carried)
    schedule = LogSchedule(options.print_freq, steps_in_epoch)
    losses, warmup = PendingLosses(epoch, options.amp_dtype), Warmup(optimizer, epoch, steps_in_epoch)
    options.faults.start_epoch()
    agreement, failure = StopAgreement(options.faults), DataFailure()
    step = start_step
    for batches in until_data_fails(meters.timed(accumulated(data_loader, accumulation)), failure):
        faults = pop_faults([target for _, targets in batches for target in targets])
        options.faults.add(faults, steps_in_epoch * images_per_step // utils.get_world_size())
        # Checked before the step rather than after it, so that the last step done has been logged.
        if agreed_stop(partial(agreement.agreed, step, options.stop_requested()), failure):
            options.faults.discard(faults)  # a resumed epoch reads these samples again
            break
        warmup.set_lr(step)
        losses.add(step + 1, training_step(model, optimizer, batches, device, options))  # counted as the log does
        meters.update(lr=optimizer.param_groups[0]["lr"])
        meters.step_done()
        step += 1
        if options.after_step is not None:
            options.after_step(clock.global_step(epoch, step))
        if schedule.is_logged(step):
            meters.update_each(losses.read())
            steps_after = sum(clock.steps(e) for e in range(epoch + 1, options.epochs))
            options.on_record(meters.record("train", epoch, step, clock.global_step(epoch, step), steps_after,
                                            options.seconds_after(epoch)))
    meters.update_each(losses.read())  # a stop between logged steps: their losses are still checked
    if failure.error is None:  # the faults of the steps since the ranks last agreed
        agreed_stop(partial(stop_agreed_now, False, options.faults), failure)
    warmup.restore()
    utils.print_once(meters.summary(step - start_step))
    met = epoch_faults_everywhere(options.faults, failure, carried)
    counts = fault_counts(met)
    if met:
        utils.print_once(f"Epoch: [{epoch}] data faults: {counts['samples_skipped']} samples skipped, "
                         f"{counts['annotations_repaired']} annotations repaired or left out")
    finished = step == steps_in_epoch and failure.error is None
    if finished and step > start_step:
        options.on_record(meters.epoch_record(epoch, clock.global_step(epoch, step), step - start_step, counts))
    return EpochResult(steps_done=step, finished=finished, failure=failure,
                       so_far=None if finished else {**meters.so_far(step - start_step), "faults": sorted(met)})


def agreed_stop(decide: Callable[[], bool], failure: DataFailure) -> bool:
    """decide(): whether the ranks stop. The fault limit's error, which every rank raises at one agreement,
    goes into failure and stops them too."""
    try:
        return decide()
    except UserError as error:
        failure.error, failure.agreed = error, True
        return True


@contextmanager
def resized_as_in_evaluation(model: nn.Module) -> Iterator[None]:
    """A block in which a model built to take training images resized by their augmentation (lsj, multiscale:
    torchvision's transform skips its resize in training mode) resizes them itself, as in evaluation."""
    unresized = [m for m in model.modules() if getattr(m, "_skip_resize", False)]
    for transform in unresized:
        transform._skip_resize = False
    try:
        yield
    finally:
        for transform in unresized:
            transform._skip_resize = True


@torch.no_grad()
def validation_losses(model: nn.Module, data_loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None,
                      stop_requested: Callable[[], bool] | None = None) -> dict[str, float]:
    """The model's mean losses over data_loader's batches and every rank's share, changing nothing: no
    gradient, batch norm statistics left as they are (its layers in eval mode), and the random generators
    (which the heads' sampling draws from) restored afterwards. Images are resized as evaluation resizes them,
    also where training's augmentation resizes instead of the model (lsj, multiscale). A stop signal ends it
    unfinished (EvaluationStopped)."""
    model.train()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.eval()
    totals: dict[str, torch.Tensor] = {}
    agreement = StopAgreement()
    with utils.random_state_kept(device), resized_as_in_evaluation(model):
        for step, (images, targets) in enumerate(data_loader):
            stop_evaluation_if_agreed(agreement, step, stop_requested)
            pop_faults(targets)
            images, targets = to_device(images, targets, device)
            with autocast(device, amp_dtype):
                loss_dict = model(images, targets)
            for name, value in {"loss": sum(loss_dict.values()), **loss_dict}.items():
                totals[name] = totals.get(name, 0) + value.float()
    batches = max(len(data_loader), 1)
    return {k: float(v) / batches for k, v in utils.reduce_dict(dict(sorted(totals.items()))).items()}


def compact_masks(probabilities: torch.Tensor) -> RunLengths:
    """What evaluation keeps of the pasted masks: their run lengths, made on the device the masks are on (from
    an accelerator only a few thousand numbers per image come back to the host; on the CPU only the pixels
    inside each mask's window are thresholded)."""
    if probabilities.device.type == "cpu":
        return windowed_run_lengths(probabilities)
    return run_lengths(probabilities)


def predict_batch(model: nn.Module, images: Sequence[torch.Tensor], device: torch.device,
                  amp_dtype: torch.dtype | None) -> list[dict]:
    """The model's outputs for a batch, on the CPU, with masks compacted and floats in float32."""
    images, _ = to_device(images, [], device)
    with autocast(device, amp_dtype):
        outputs = model(images)
    outputs = [{k: compact_masks(v) if k == "masks" else v.float() if v.is_floating_point() else v
                for k, v in out.items()} for out in outputs]
    outputs = [{k: v.to("cpu", non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in out.items()}
               for out in outputs]
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # the non-blocking copies must land first
    return outputs


def padded_size(model: nn.Module, image: torch.Tensor) -> tuple[int, ...]:
    """The size image takes in the batch tensor the model makes of it at evaluation: resized as torchvision's
    transform resizes it, then padded to the transform's multiple. A model without that transform: the image's."""
    transform = getattr(model, "transform", None)
    height, width = image.shape[-2:]
    if transform is None or not hasattr(transform, "size_divisible"):
        return (height, width)
    if transform.fixed_size is not None:
        height, width = transform.fixed_size[1], transform.fixed_size[0]
    else:  # the scale and the truncation torchvision's resize and torch's interpolate apply
        scale = min(transform.min_size[-1] / min(height, width), transform.max_size / max(height, width))
        height, width = int(height * scale), int(width * scale)
    multiple = transform.size_divisible
    return (math.ceil(height / multiple) * multiple, math.ceil(width / multiple) * multiple)


class SameSizeBatches:
    """Gathers images into batches of one padded size, so that each image gets the detections it gets alone: the
    model pads a batch to its largest image, which changes the others' features. Items (size_of gives an item's
    padded size) come in order and leave in batches as soon as their size has batch_size of them; at most 4
    batches' worth wait."""

    def __init__(self, batch_size: int, size_of: Callable[[Any], tuple[int, ...]]) -> None:
        self.batch_size, self.size_of = batch_size, size_of
        self.waiting: dict[tuple[int, ...], list] = {}

    def add(self, items: Iterable) -> list[list]:
        """Take items; the batches they complete."""
        ready = []
        for item in items:
            size = self.size_of(item)
            self.waiting.setdefault(size, []).append(item)
            if len(self.waiting[size]) == self.batch_size:
                ready.append(self.waiting.pop(size))
            elif sum(map(len, self.waiting.values())) > 4 * self.batch_size:
                ready.append(self.waiting.pop(max(self.waiting, key=lambda s: len(self.waiting[s]))))
        return ready

    def rest(self) -> list[list]:
        """The batches still waiting, at the end."""
        rest, self.waiting = list(self.waiting.values()), {}
        return rest


def same_size_batches(items: Iterable, batch_size: int, size_of: Callable[[Any], tuple[int, ...]]
                      ) -> Iterator[list]:
    """SameSizeBatches over items, as a stream of batches."""
    batches = SameSizeBatches(batch_size, size_of)
    for item in items:
        yield from batches.add([item])
    yield from batches.rest()


def predict_into(evaluator: CocoEvaluator, model: nn.Module, batch: list[tuple], device: torch.device,
                 amp_dtype: torch.dtype | None) -> float:
    """Predict a batch of (image, target) pairs into the evaluator; the seconds the model took."""
    started = time.perf_counter()
    outputs = predict_batch(model, [image for image, _ in batch], device, amp_dtype)
    seconds = time.perf_counter() - started
    evaluator.update({plain_id(target["image_id"]): output for (_, target), output in zip(batch, outputs)})
    return seconds


@torch.inference_mode()
def evaluate(model: nn.Module, data_loader: DataLoader, device: torch.device, evaluator: CocoEvaluator | None = None,
             print_freq: int = 20, amp_dtype: torch.dtype | None = None,
             stop_requested: Callable[[], bool] | None = None, max_bad_samples: float = 1.0) -> dict:
    """Predict on every image of data_loader, merge over ranks and score; rank 0 prints the COCO tables and a
    line of where the time went, and gets the metrics; other ranks get an empty dict. A stop signal (where
    stop_requested is given: during training) ends it unfinished by EvaluationStopped. Unreadable images are
    left out of the scores, with a warning, up to max_bad_samples of a rank's share (then a UserError).
    Without an evaluator (torchvision's tutorial calls it so), the loader's dataset gives the ground truth
    (coco_utils.coco_of_samples) and the model's heads what is scored."""
    if evaluator is None:
        coco_gt, category_map = coco_of_samples(data_loader.dataset)
        evaluator = CocoEvaluator(coco_gt, iou_types_of(model), category_map)
        evaluator.ground_truth = "the dataset"
    model.eval()
    faults = FaultLog(max_bad_samples, scope="in this evaluation")
    batch_size = data_loader.batch_sampler.batch_size
    meters = StepMeters("Test:", 0, len(data_loader), batch_size)
    schedule, console = LogSchedule(print_freq, len(data_loader)), ConsoleWriter()
    batches = SameSizeBatches(batch_size, lambda sample: padded_size(model, sample[0]))
    agreement = StopAgreement(faults)
    started = time.perf_counter()
    model_seconds = 0.0
    for step, (images, targets) in enumerate(meters.timed(data_loader), start=1):
        stop_evaluation_if_agreed(agreement, step - 1, stop_requested)
        faults.add(pop_faults(targets), len(data_loader.sampler))
        for batch in batches.add(zip(images, targets)):
            model_seconds += predict_into(evaluator, model, batch, device, amp_dtype)
        meters.step_done()
        if schedule.is_logged(step):
            console.write(meters.record("test", 0, step, step))
    for batch in batches.rest():
        model_seconds += predict_into(evaluator, model, batch, device, amp_dtype)
    stop_agreed_now(False, faults)  # the faults of the batches since the ranks last agreed
    if faults.skipped:
        print(f"warning: {faults.counted()} images could not be read (named above); the scores leave them out",
              file=sys.stderr, flush=True)
    utils.print_once(meters.summary(len(data_loader)))
    loop_seconds = time.perf_counter() - started
    evaluator.synchronize_between_processes()
    metrics = evaluator.summarize()
    if not utils.is_main_process():
        return {}
    times = evaluator.timings
    encoding = f", waiting for mask encoding {times['encode_wait']:.1f} s" if "segm" in evaluator.iou_types else ""
    utils.print_once(f"Evaluation of {len(evaluator.per_image)} images: {time.perf_counter() - started:.1f} s "
                     f"(model {model_seconds:.1f} s, data and the rest of the loop {loop_seconds - model_seconds:.1f}"
                     f" s{encoding}, COCOeval ({evaluator.backend}) {times['score']:.1f} s)")
    return metrics

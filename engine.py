"""The training and evaluation loops."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

import utils
from coco_eval import CocoEvaluator, binarize_masks, run_lengths
from coco_utils import FaultLog


def to_device(images, targets, device: torch.device) -> tuple[list[torch.Tensor], list[dict]]:
    """Move a batch to the device; uint8 images become floats in [0, 1] there, and masks (column-major from
    the loader) become row-major there, where that is cheap, rather than in the loader."""
    images = [img.to(device, non_blocking=True).float().div_(255) for img in images]
    targets = [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
               for t in targets]
    for target in targets:
        if "masks" in target:
            target["masks"] = target["masks"].contiguous()
    return images, targets


def pop_faults(targets) -> list[str]:
    """The per-sample faults the dataset attached to a batch's targets, removed from them."""
    return [f for t in targets for f in t.pop("faults", [])]


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """Mixed-precision context when amp_dtype is set, else a no-op."""
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def warmup_factor(iteration: int, warmup_iters: int, start_factor: float = 0.001) -> float:
    """Linear warm-up of the learning rate from start_factor to 1 over the first warmup_iters steps."""
    if iteration >= warmup_iters:
        return 1.0
    return start_factor + (1 - start_factor) * iteration / warmup_iters


@dataclass
class TrainOptions:
    """How train_one_epoch steps, besides the model, optimizer and data."""

    print_freq: int = 20
    epochs: int = 1
    scaler: torch.amp.GradScaler | None = None
    amp_dtype: torch.dtype | None = None
    clip_grad_norm: float | None = None
    faults: FaultLog = field(default_factory=lambda: FaultLog(max_share=0.01))
    stop_requested: Callable[[], bool] = lambda: False
    on_log: Callable[[dict], None] | None = None


@dataclass
class EpochResult:
    steps_done: int
    finished: bool


def train_one_epoch(model, optimizer, data_loader, device: torch.device, epoch: int, options: TrainOptions,
                    start_step: int = 0) -> EpochResult:
    """Steps over data_loader (which yields the epoch's batches from start_step on) until it ends or a stop
    is requested on any rank; the step in progress always completes.

    The first epoch warms the learning rate up over min(1000, steps - 1) steps, counted from the epoch's
    start, so a run resumed mid-epoch gets the same rates as one that was not interrupted.
    """
    model.train()
    logger = utils.MetricLogger()
    logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    steps_in_epoch = start_step + len(data_loader)
    warmup_iters = min(1000, steps_in_epoch - 1) if epoch == 0 else 0
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    images_per_step = data_loader.batch_sampler.batch_size * utils.get_world_size()
    samples_in_epoch = steps_in_epoch * data_loader.batch_sampler.batch_size
    options.faults.start_epoch()

    def log(record: dict) -> None:
        if options.on_log is not None:
            global_step = epoch * steps_in_epoch + record["step"]
            options.on_log({"type": "train", "epoch": epoch, "global_step": global_step, **record})

    # Losses stay on the device until a progress line needs them: reading one is a host sync, and a step
    # needs none of its own. A non-finite loss is found there too, and named with its own step.
    pending: list[tuple[int, dict[str, torch.Tensor]]] = []

    def flush() -> None:
        if not pending:
            return
        names = list(pending[0][1])
        values = torch.stack([torch.stack([d[k] for k in names]) for _, d in pending]).cpu().tolist()
        for (at, _), row in zip(pending, values):
            total = sum(row)
            if not math.isfinite(total):
                shown = {k: round(v, 4) for k, v in zip(names, row)}
                raise utils.UserError(
                    f"loss is {total} at epoch {epoch} step {at} {shown}; training stopped and the last "
                    f"checkpoint is kept. Likely fixes: a lower --lr, --clip-grad-norm 10, --amp-dtype bfloat16 "
                    f"instead of float16, or a look at the data")
            logger.update(loss=total, **dict(zip(names, row)))
        pending.clear()

    # One process checks for a stop request at every step for free; several agree on it at progress lines.
    check_every = 1 if utils.get_world_size() == 1 else options.print_freq
    step = start_step
    batches = logger.log_every(data_loader, options.print_freq, f"Epoch: [{epoch}]", images_per_step,
                               start=start_step, total=steps_in_epoch, on_log=log,
                               steps_after=(options.epochs - epoch - 1) * steps_in_epoch)
    for images, targets in batches:
        # Checked before the step rather than after it, so that the last step done has been logged.
        if step % check_every == 0 and utils.any_rank(options.stop_requested()):
            break
        options.faults.add(pop_faults(targets), samples_in_epoch)
        factor = warmup_factor(step, warmup_iters)
        for group, base_lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base_lr * factor
        images, targets = to_device(images, targets, device)
        with autocast(device, options.amp_dtype):
            loss_dict = model(images, targets)
            losses = sum(loss_dict.values())
        pending.append((step, utils.reduce_dict({k: v.detach().float() for k, v in loss_dict.items()})))

        optimizer.zero_grad(set_to_none=True)
        scaler = options.scaler
        if scaler is not None:
            scaler.scale(losses).backward()
            if options.clip_grad_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), options.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            losses.backward()
            if options.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), options.clip_grad_norm)
            optimizer.step()
        logger.update(lr=optimizer.param_groups[0]["lr"])
        step += 1
        if step % options.print_freq == 0 or step == steps_in_epoch:
            flush()
    flush()

    # The optimizer's state is saved with base rates, so a resumed run warms up from the same point.
    for group, base_lr in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base_lr
    if options.faults.skipped or options.faults.repaired:
        utils.print_once(f"Epoch: [{epoch}] data faults: {options.faults.summary()}")
    return EpochResult(steps_done=step, finished=step == steps_in_epoch)


def compact_masks(probabilities: torch.Tensor):
    """What evaluation keeps of the pasted masks: on a GPU their run lengths, computed there (a few thousand
    numbers per image to copy back, and no encoding work for the host); on the CPU booleans laid out for
    pycocotools' encoder, which runs on the evaluator's background thread."""
    if probabilities.is_cuda:
        return run_lengths(probabilities)
    return binarize_masks(probabilities)


@torch.inference_mode()
def evaluate(model, data_loader, device: torch.device, evaluator: CocoEvaluator, print_freq: int = 20,
             amp_dtype: torch.dtype | None = None, faults: FaultLog | None = None) -> dict:
    """Predict on every image of data_loader, merge over ranks and score; rank 0 prints the COCO tables and a
    line of where the time went, and gets the metrics; other ranks get an empty dict."""
    model.eval()
    logger = utils.MetricLogger()
    faults = faults or FaultLog(max_share=1.0)
    faults.start_epoch()
    images_per_step = data_loader.batch_sampler.batch_size
    started = time.perf_counter()
    model_seconds = 0.0
    for images, targets in logger.log_every(data_loader, print_freq, "Test:", images_per_step):
        faults.add(pop_faults(targets), len(data_loader.dataset))
        step_started = time.perf_counter()
        images, _ = to_device(images, [], device)
        with autocast(device, amp_dtype):
            outputs = model(images)
        outputs = [{k: compact_masks(v) if k == "masks" else v.float() if v.is_floating_point() else v
                    for k, v in out.items()} for out in outputs]
        outputs = [{k: v.to("cpu", non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in out.items()}
                   for out in outputs]
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # the non-blocking copies must land first
        model_seconds += time.perf_counter() - step_started
        evaluator.update({t["image_id"]: out for t, out in zip(targets, outputs)})
    loop_seconds = time.perf_counter() - started
    evaluator.synchronize_between_processes()
    if not utils.is_main_process():
        return {}
    metrics = evaluator.summarize()
    times = evaluator.timings
    utils.print_once(f"Evaluation of {len(evaluator.per_image)} images: {time.perf_counter() - started:.1f} s "
                     f"(model {model_seconds:.1f} s, data and the rest of the loop {loop_seconds - model_seconds:.1f}"
                     f" s, waiting for mask encoding {times['encode_wait']:.1f} s, COCOeval ({evaluator.backend}) "
                     f"{times['score']:.1f} s)")
    return metrics

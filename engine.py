"""The training and evaluation loops."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

import utils
from coco_eval import CocoEvaluator


def to_device(images, targets, device: torch.device) -> tuple[list[torch.Tensor], list[dict]]:
    """Move a batch to the device; uint8 images become floats in [0, 1] there, not in the loader."""
    images = [img.to(device, non_blocking=True).float().div_(255) for img in images]
    targets = [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
               for t in targets]
    return images, targets


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


def train_one_epoch(model, optimizer, data_loader, device: torch.device, epoch: int, print_freq: int,
                    scaler: torch.amp.GradScaler | None = None, amp_dtype: torch.dtype | None = None
                    ) -> dict[str, float]:
    """One pass over data_loader; the first epoch warms the learning rate up over min(1000, steps - 1) steps.

    Returns the epoch's average of each loss.
    """
    model.train()
    logger = utils.MetricLogger()
    logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    warmup_iters = min(1000, len(data_loader) - 1) if epoch == 0 else 0
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    images_per_step = data_loader.batch_sampler.batch_size * utils.get_world_size()

    for step, (images, targets) in enumerate(logger.log_every(data_loader, print_freq, f"Epoch: [{epoch}]",
                                                              images_per_step)):
        factor = warmup_factor(step, warmup_iters)
        for group, base_lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base_lr * factor
        images, targets = to_device(images, targets, device)
        with autocast(device, amp_dtype):
            loss_dict = model(images, targets)
            losses = sum(loss_dict.values())

        loss_dict_reduced = utils.reduce_dict({k: v.detach().float() for k, v in loss_dict.items()})
        loss_value = sum(loss_dict_reduced.values()).item()
        if not math.isfinite(loss_value):
            shown = {k: round(v.item(), 4) for k, v in loss_dict_reduced.items()}
            raise utils.UserError(f"loss is {loss_value} at epoch {epoch} step {step} {shown}; training stopped "
                                  f"and the last checkpoint is kept: lower --lr, or check the data")

        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(losses).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            losses.backward()
            optimizer.step()
        logger.update(loss=loss_value, **{k: v.item() for k, v in loss_dict_reduced.items()})
        logger.update(lr=optimizer.param_groups[0]["lr"])

    for group, base_lr in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base_lr
    return {name: meter.global_avg for name, meter in logger.meters.items() if name != "lr"}


@torch.inference_mode()
def evaluate(model, data_loader, device: torch.device, evaluator: CocoEvaluator, print_freq: int = 20,
             amp_dtype: torch.dtype | None = None) -> dict[str, dict[str, float]]:
    """Predict on every image of data_loader, merge over ranks and score; rank 0 prints the COCO tables."""
    model.eval()
    logger = utils.MetricLogger()
    images_per_step = data_loader.batch_sampler.batch_size if data_loader.batch_sampler else 1
    for images, targets in logger.log_every(data_loader, print_freq, "Test:", images_per_step):
        images, _ = to_device(images, [], device)
        with autocast(device, amp_dtype):
            outputs = model(images)
        outputs = [{k: v.float().cpu() for k, v in out.items()} for out in outputs]
        evaluator.update({t["image_id"]: out for t, out in zip(targets, outputs)})
    evaluator.synchronize_between_processes()
    if not utils.is_main_process():
        return {}
    return evaluator.summarize()

"""Every change this project makes to how torchvision's detection models run, behind two entry points.

`for_training(model, device, config)` prepares the model that trains (in place); `for_inference(model, device,
config)` gives the model that evaluation, prediction and export run. Each speed-up keeps the numbers of
torchvision's plain model to float rounding (the tests compare both ways), keeps the state-dict keys, and is
applied in the fixed order of TRAINING below. Before one is applied, it runs a small self-check against the
installed torchvision's own code; when torchvision has changed what the speed-up relies on, that speed-up is
left off with one printed line and torchvision's behaviour stays. `--no-speedups` (config.enabled False) gives
torchvision's plain model: none of them, channels-last and shape buckets included. Measured effects are in
docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from errors import UserError
from utils import print_once

from . import (
    anchor_cache,
    batched_proposals,
    batched_sampling,
    batched_targets,
    byte_mask_resize,
    channels_last,
    coder_constants,
    conv_gradients,
    cropped_mask_targets,
    deferred_box_check,
    flat_regions,
    level_pooling,
    mask_paste,
    matched_class_masks,
    norm_folding,
    shape_buckets,
    sparse_roi_align,
    transform_constants,
    winograd_convs,
)


@dataclass(frozen=True)
class SpeedupConfig:
    """What the command line asked for: all speed-ups or none, and the two whose default depends on the device
    (None: by device); with them, the choice of the optimizer's fused kernel."""

    enabled: bool = True
    channels_last: bool | None = None
    shape_buckets: bool | None = None
    autocast: bool = False  # the model runs under autocast (--amp): the float32-only ones would never run

    def __post_init__(self) -> None:
        if not self.enabled and (self.channels_last or self.shape_buckets):
            flag = "--channels-last" if self.channels_last else "--shape-buckets"
            raise UserError(f"--no-speedups runs torchvision's plain model, which {flag} would change; give one "
                            f"of the two")

    def use_channels_last(self, device: torch.device) -> bool:
        """Channels-last convolutions: on CPUs (oneDNN's own layout) unless asked otherwise; off on GPUs, where
        it pays only in some precisions."""
        if not self.enabled:
            return False
        return device.type == "cpu" if self.channels_last is None else self.channels_last

    def use_shape_buckets(self, device: torch.device) -> bool:
        """Batches padded to recurring shapes: on GPUs (cuDNN plans per shape) unless asked otherwise; off on
        CPUs, where the padding is only extra arithmetic."""
        if not self.enabled:
            return False
        return device.type == "cuda" if self.shape_buckets is None else self.shape_buckets

    def use_fused_optimizer(self, device: torch.device) -> bool:
        """The optimizer's fused kernel, on GPUs: one launch a step instead of a few per parameter group, and,
        under a gradient scaler, the check for infinite gradients taken on the device rather than read on the
        host after every backward. CPUs keep torch's default loop."""
        return self.enabled and device.type == "cuda"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SpeedupConfig:
        """The speed-ups train.py's flags ask for (--no-speedups, --channels-last, --shape-buckets, --amp)."""
        return cls(not args.no_speedups, args.channels_last, args.shape_buckets, autocast=args.amp)


PLAIN = SpeedupConfig(enabled=False)


@dataclass(frozen=True)
class Speedup:
    """One change to torchvision's model: `self_check()` says why it cannot run on this torchvision (None when
    it can), `apply(model)` makes the change in place."""

    name: str
    self_check: Callable[[], str | None]
    apply: Callable[[nn.Module], object]
    cpu_only: bool = False  # chosen only for models on the CPU
    float32_only: bool = False  # not chosen for a model that runs under autocast, where it would never run


SPARSE_ROI_ALIGN = Speedup("sparse RoIAlign on the CPU", sparse_roi_align.self_check,
                           sparse_roi_align.use_sparse_roi_align, cpu_only=True)
# The order they are applied in: norms folded before anything copies or wraps the convolutions; module swaps
# before the layout change; hooks last, on the final modules.
TRAINING = (
    Speedup("frozen norms folded into convolutions", norm_folding.self_check, norm_folding.fold_frozen_norms),
    Speedup("anchors kept per shape", anchor_cache.self_check, anchor_cache.cache_anchors),
    Speedup("training targets matched for the whole batch", batched_targets.self_check,
            batched_targets.use_batched_targets),
    Speedup("training samples drawn for the whole batch", batched_sampling.self_check,
            batched_sampling.use_batched_sampling),
    Speedup("proposals filtered for the whole batch", batched_proposals.self_check,
            batched_proposals.use_batched_proposals),
    # After the batched targets, which take only torchvision's own RoIHeads class.
    Speedup("mask logits of each region's class only", matched_class_masks.self_check,
            matched_class_masks.use_matched_class_masks),
    # In the matched-class branch, which it needs.
    Speedup("mask targets pooled from crops on the CPU", cropped_mask_targets.self_check,
            cropped_mask_targets.crop_mask_targets, cpu_only=True),
    SPARSE_ROI_ALIGN,
    # After the sparse pooler, which keeps its own forward where it is chosen.
    Speedup("region pooling levels read once", level_pooling.self_check, level_pooling.read_levels_once),
    Speedup("batched mask paste", mask_paste.self_check, mask_paste.use_device_paste),
    # After the mask paste, which gives the model a new transform.
    Speedup("transform without blocking copies to the device", transform_constants.self_check,
            transform_constants.keep_transform_constants),
    # After the transform's constants, whose resize it calls.
    Speedup("training masks resized as bytes", byte_mask_resize.self_check, byte_mask_resize.resize_masks_as_bytes),
    Speedup("box coder without blocking copies to the device", coder_constants.self_check,
            coder_constants.keep_coder_constants),
    Speedup("target boxes checked without waiting before the backbone", deferred_box_check.self_check,
            deferred_box_check.defer_box_check),
)
CHANNELS_LAST = Speedup("channels-last layout", channels_last.self_check, channels_last.to_channels_last)
# With channels-last on the CPU, where oneDNN's channels-last weight gradients are the slow part.
CPU_CONV_GRADIENTS = Speedup("convolution gradients for channels-last on the CPU", conv_gradients.self_check,
                             conv_gradients.use_fast_cpu_gradients, cpu_only=True, float32_only=True)
# On the CPU, in either layout: the large 3x3 convolutions by Winograd's transforms.
CPU_WINOGRAD = Speedup("Winograd 3x3 convolutions on the CPU", winograd_convs.self_check,
                       winograd_convs.use_winograd_convs, cpu_only=True, float32_only=True)
SHAPE_BUCKETS = Speedup("shape buckets", shape_buckets.self_check, shape_buckets.pad_to_shape_buckets)
INFERENCE_FOLD = Speedup("batch norms folded for inference", norm_folding.self_check, norm_folding.fold_batch_norms)
# Where the sparse RoIAlign pools, whose regions come channels-last.
INFERENCE_FLAT_REGIONS = Speedup("box head reads channels-last regions in place", flat_regions.self_check,
                                 flat_regions.read_regions_in_place)

_APPLIED = "_speedups_applied"  # names of the speed-ups a model carries, set on the model


@cache
def _problem(speedup: Speedup) -> str | None:
    """The self-check's finding, once per process; a speed-up that fails it is announced once."""
    # Whatever the caller's mode; the examples' random draws leave the run's seeded sequence as it was.
    with torch.inference_mode(False), torch.autocast("cpu", enabled=False), torch.random.fork_rng(devices=[]):
        problem = speedup.self_check()
    if problem:
        print_once(f"speed-up off ({speedup.name}): {problem}; torchvision's own code runs instead")
    return problem


def _fingerprint(model: nn.Module) -> list[tuple]:
    """What a speed-up can change, module by module: its class and the classes of the objects it holds, its
    hooks, and where and how its parameters are stored."""
    return [(type(module), [type(value) for value in vars(module).values()], len(module._forward_hooks),
             len(module._forward_pre_hooks),
             [(p.data_ptr(), p.stride()) for p in module.parameters(recurse=False)])
            for module in model.modules()]


def _apply(model: nn.Module, speedups: tuple[Speedup, ...]) -> None:
    """Apply each speed-up not applied yet whose self-check passes; it is listed as applied only when it
    changed the model (the fingerprint tells), so one that finds nothing of its kind is not claimed."""
    applied = model.__dict__.setdefault(_APPLIED, [])
    fingerprint = _fingerprint(model)
    for speedup in speedups:
        if speedup.name not in applied and _problem(speedup) is None:
            speedup.apply(model)
            before, fingerprint = fingerprint, _fingerprint(model)  # the next one's "before"
            if fingerprint != before:
                applied.append(speedup.name)


def for_training(model: nn.Module, device: torch.device, config: SpeedupConfig) -> nn.Module:
    """The model prepared to train on device, in place (its parameters already there): every speed-up the
    config allows, in TRAINING's order, then channels-last (with its convolution gradients), Winograd
    convolutions, and shape buckets where the config says; those marked cpu_only for a model on the CPU only,
    those marked float32_only for a model without autocast only."""
    if not config.enabled:
        return model
    layout = (CHANNELS_LAST, CPU_CONV_GRADIENTS) if config.use_channels_last(device) else ()
    buckets = (SHAPE_BUCKETS,) if config.use_shape_buckets(device) else ()
    chosen = TRAINING + layout + (CPU_WINOGRAD,) + buckets
    _apply(model, tuple(speedup for speedup in chosen if (device.type == "cpu" or not speedup.cpu_only)
                        and not (config.autocast and speedup.float32_only)))
    return model


def for_inference(model: nn.Module, device: torch.device, config: SpeedupConfig) -> nn.Module:
    """The model evaluation and prediction run: a copy in eval mode, without gradients, with the speed-ups the
    config allows (those the model does not carry yet added to the copy), every batch norm folded into the
    convolution before it and, where the sparse RoIAlign pools, the box head reading its regions in place. The
    model given is left as it is. Without speed-ups, the model itself in eval mode."""
    if not config.enabled:
        return model.eval()
    clone = for_training(copy.deepcopy(model), device, config).eval().requires_grad_(False)
    regions = (INFERENCE_FLAT_REGIONS,) if SPARSE_ROI_ALIGN.name in applied(clone) else ()
    _apply(clone, (INFERENCE_FOLD, *regions))
    if config.use_channels_last(device):
        clone.to(memory_format=torch.channels_last)  # the folded weights are new tensors
    return clone


def applied(model: nn.Module) -> list[str]:
    """The names of the speed-ups that changed the model, in the order applied (a copy of it carries the
    same)."""
    return list(model.__dict__.get(_APPLIED, []))

"""The optimizer, its parameter groups, the learning-rate schedule, and the learning rate's scaling to the
effective batch."""

from __future__ import annotations

import argparse
import math
import warnings

import torch
from torch.optim.lr_scheduler import LRScheduler

import utils
from errors import UserError

# torchvision's recipes (references/detection's README, 8 GPUs each; for the v2 R-CNNs the pull requests their
# weights' meta["recipe"] names, 4 nodes of 8): the SGD rate and the effective batch it is given for. RetinaNet v2
# was trained with AdamW, so it gets no advice.
RCNN_RECIPE = (0.02, 16)  # 8 GPUs x the default 2 images
RECIPES = {
    "fasterrcnn_resnet50_fpn_v2": (0.1, 64), "maskrcnn_resnet50_fpn_v2": (0.1, 64),
    "fasterrcnn_resnet50_fpn": RCNN_RECIPE, "fasterrcnn_mobilenet_v3_large_fpn": RCNN_RECIPE,
    "fasterrcnn_mobilenet_v3_large_320_fpn": RCNN_RECIPE, "maskrcnn_resnet50_fpn": RCNN_RECIPE,
    "keypointrcnn_resnet50_fpn": RCNN_RECIPE, "retinanet_resnet50_fpn": (0.01, 16), "fcos_resnet50_fpn": (0.01, 16),
    "ssd300_vgg16": (0.002, 32), "ssdlite320_mobilenet_v3_large": (0.15, 192),
}


def effective_batch(args: argparse.Namespace) -> int:
    """Images per optimizer step over every process."""
    return args.batch_size * utils.get_world_size() * args.grad_accum_steps


def scale_learning_rate(args: argparse.Namespace) -> None:
    """Say what the effective batch is; with --auto-scale-lr B scale --lr by it / B, else point out when it
    differs from the batch of the model's recipe, which torchvision's --lr is given for."""
    total = effective_batch(args)
    utils.print_once(f"Effective batch: {args.batch_size} images x {utils.get_world_size()} processes x "
                     f"{args.grad_accum_steps} accumulation steps = {total} per optimizer step")
    if args.auto_scale_lr:
        scaled = args.lr * total / args.auto_scale_lr
        utils.print_once(f"--auto-scale-lr {args.auto_scale_lr}: --lr {args.lr:g} x {total} / "
                         f"{args.auto_scale_lr} = {scaled:g}")
        args.lr = scaled
    elif args.model in RECIPES and args.opt.startswith("sgd"):  # the recipes' rates are SGD's
        lr, batch = RECIPES[args.model]
        if total != batch and not math.isclose(args.lr, lr * total / batch):
            utils.print_once(f"note: torchvision's recipe for {args.model} has --lr {lr:g} for a batch of {batch}, "
                             f"which for this batch of {total} is --lr {lr * total / batch:g} (--auto-scale-lr "
                             f"{batch} scales whatever --lr is given by the batch / {batch})")


def lr_milestones(args: argparse.Namespace) -> list[int]:
    if args.lr_steps is not None:
        return args.lr_steps
    if args.lr_step_size is not None:
        return list(range(args.lr_step_size, args.epochs, args.lr_step_size))
    return [16, 22]


def parameter_groups(model: torch.nn.Module, args: argparse.Namespace, reference_order: bool = False
                     ) -> list[dict]:
    """The trainable parameters, normalization layers' apart when --norm-weight-decay is set. A checkpoint's
    optimizer state is matched to parameters by position, so the order is that of the checkpoint's writer:
    ours (normalization layers' last), or torchvision's reference (the model's order; norms first when apart)."""
    norm_types = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm)
    norm_params, other_params = [], []
    for module in model.modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        (norm_params if isinstance(module, norm_types) else other_params).extend(params)
    decay, norm_decay = args.weight_decay, args.norm_weight_decay
    if norm_decay is not None:
        groups = [{"params": other_params, "weight_decay": decay}, {"params": norm_params, "weight_decay": norm_decay}]
        # A group without parameters (frozen norms have none) is left out, as the reference leaves it out:
        # checkpoints of either writer then hold the same groups
        return [group for group in (groups[::-1] if reference_order else groups) if group["params"]]
    in_order = [p for p in model.parameters() if p.requires_grad] if reference_order else other_params + norm_params
    return [{"params": in_order, "weight_decay": decay}]


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace, reference_order: bool = False,
                   fused: bool = False) -> torch.optim.Optimizer:
    """SGD or AdamW, with torch's fused kernel if asked (else torch's default); normalization layers get
    --norm-weight-decay when it is set."""
    groups = parameter_groups(model, args, reference_order)
    implementation = {"fused": True} if fused else {}
    if args.opt in ("sgd", "sgd_nesterov"):
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=args.opt == "sgd_nesterov",
                               **implementation)
    return torch.optim.AdamW(groups, lr=args.lr, **implementation)


def keep_implementation(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter group the optimizer's own choice of kernel (fused, foreach or torch's default) again:
    loading a state dict replaces it with that of the run that wrote it."""
    for group in optimizer.param_groups:
        for key in ("fused", "foreach"):
            if key in optimizer.defaults:
                group[key] = optimizer.defaults[key]


def make_lr_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace) -> LRScheduler:
    """The per-epoch schedule --lr-scheduler names: steps at --lr-steps (or every --lr-step-size), or cosine; at
    --start-epoch's place in it, so that its steps fall at the epochs they name (torchvision's reference starts
    the schedule afresh there, moving every step later by that many epochs). A checkpoint's state replaces it."""
    if args.lr_scheduler == "multisteplr":
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, lr_milestones(args), args.lr_gamma)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    with warnings.catch_warnings():  # stepped before any optimizer step, on purpose
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        for _ in range(args.start_epoch):
            scheduler.step()
    return scheduler


# What the flags set in an optimizer's groups and a schedule; the rest of their state is the run's progress.
GROUP_SETTINGS = ("initial_lr", "weight_decay", "momentum", "dampening", "nesterov", "betas", "eps", "amsgrad")
SCHEDULE_SETTINGS = ("milestones", "gamma", "T_max", "eta_min")
# The command-line flags behind those settings (the others keep torch's defaults).
FLAG_OF = {"initial_lr": "--lr", "weight_decay": "--wd or --norm-weight-decay", "momentum": "--momentum",
           "nesterov": "--opt", "milestones": "--lr-steps or --lr-step-size", "gamma": "--lr-gamma",
           "T_max": "--epochs"}


def settings_of(optimizer: torch.optim.Optimizer, scheduler: LRScheduler) -> dict:
    """The optimizer's and the schedule's settings, as this run's flags made them (before a checkpoint loads)."""
    groups = [{k: g[k] for k in GROUP_SETTINGS if k in g} for g in optimizer.param_groups]
    return {"groups": groups, **{k: v for k, v in scheduler.state_dict().items() if k in SCHEDULE_SETTINGS}}


def drop_empty_groups(checkpoint: dict) -> None:
    """Leave out a checkpoint's parameter groups without parameters, and their places in its schedule's lists:
    this project's checkpoints kept an empty --norm-weight-decay group before such groups were left out."""
    groups = checkpoint["optimizer"]["param_groups"]
    empty = [i for i, group in enumerate(groups) if not group["params"]]
    if not empty or len(empty) == len(groups):
        return
    checkpoint["optimizer"]["param_groups"] = [g for i, g in enumerate(groups) if i not in empty]
    schedule = checkpoint.get("lr_scheduler") or {}
    for key in ("base_lrs", "_last_lr"):
        if len(schedule.get(key) or []) == len(groups):
            schedule[key] = [v for i, v in enumerate(schedule[key]) if i not in empty]


def check_state_fits(optimizer: torch.optim.Optimizer, saved: dict, source: str) -> None:
    """One clear error when a checkpoint's optimizer state cannot continue in this run's optimizer: another
    kind (--opt) or another grouping of the parameters (--norm-weight-decay set or not)."""
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise UserError(f"{source} has {len(groups)} parameter groups, this run's optimizer "
                        f"{len(optimizer.param_groups)}: resume with --norm-weight-decay set as its run had it (or "
                        f"not), or start from its weights with --weights")
    kind = {k for k in GROUP_SETTINGS if k in optimizer.param_groups[0]} - {"initial_lr"}
    if kind != {k for k in GROUP_SETTINGS if k in groups[0]} - {"initial_lr"}:
        raise UserError(f"{source} holds another optimizer's state than --opt {type(optimizer).__name__.lower()}'s: "
                        f"resume with the --opt it was trained with, or start from its weights with --weights")


def rate_at(scheduler: LRScheduler, base_lr: float, epoch: int) -> float:
    """The learning rate a MultiStepLR or CosineAnnealingLR gives at epoch, from its settings alone."""
    if isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR):
        passed = sum(n for milestone, n in scheduler.milestones.items() if milestone <= epoch)
        return base_lr * scheduler.gamma ** passed
    eta_min = scheduler.eta_min
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * epoch / scheduler.T_max)) / 2


def keep_this_runs_settings(optimizer: torch.optim.Optimizer, scheduler: LRScheduler, own: dict, saved_schedule: dict
                            ) -> list[str]:
    """After a checkpoint's optimizer loaded: where this run's flags set other settings (settings_of, taken
    before) than the checkpoint's, this run's apply, and the learning rate follows this run's schedule from the
    saved epoch; the checkpoint's schedule is loaded otherwise. Returns the flags (or settings) that changed."""
    changed = sorted({k for group, mine in zip(optimizer.param_groups, own["groups"]) for k, v in mine.items()
                      if group.get(k) != v})
    if ("T_max" in own) != ("T_max" in saved_schedule):
        changed.append("--lr-scheduler")
    else:
        changed += [k for k in SCHEDULE_SETTINGS if k in own and saved_schedule.get(k) != own[k]]
    if not changed:
        scheduler.load_state_dict(saved_schedule)
        return []
    for group, mine in zip(optimizer.param_groups, own["groups"]):
        group.update(mine)
    epoch = saved_schedule["last_epoch"]
    scheduler.last_epoch, scheduler._step_count = epoch, saved_schedule["_step_count"]
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = rate_at(scheduler, group["initial_lr"], epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return [FLAG_OF.get(k, k) for k in changed]

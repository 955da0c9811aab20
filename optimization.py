"""The optimizer, its parameter groups, the learning-rate schedule, and the learning rate's scaling to the
effective batch."""

from __future__ import annotations

import argparse

import torch

import utils

# torchvision's recipe: --lr 0.02 for 8 GPUs x 2 images.
RECIPE_LR, RECIPE_BATCH = 0.02, 16


def effective_batch(args: argparse.Namespace) -> int:
    """Images per optimizer step over every process."""
    return args.batch_size * utils.get_world_size() * args.grad_accum_steps


def scale_learning_rate(args: argparse.Namespace) -> None:
    """Say what the effective batch is; with --auto-scale-lr B scale --lr by it / B, else point out when it
    differs from the recipe's batch, which torchvision's --lr is given for."""
    total = effective_batch(args)
    utils.print_once(f"Effective batch: {args.batch_size} images x {utils.get_world_size()} processes x "
                     f"{args.grad_accum_steps} accumulation steps = {total} per optimizer step")
    if args.auto_scale_lr:
        scaled = args.lr * total / args.auto_scale_lr
        utils.print_once(f"--auto-scale-lr {args.auto_scale_lr}: --lr {args.lr:g} x {total} / "
                         f"{args.auto_scale_lr} = {scaled:g}")
        args.lr = scaled
    elif total != RECIPE_BATCH and not args.test_only:
        utils.print_once(f"note: torchvision's recipe has --lr {RECIPE_LR} for a batch of {RECIPE_BATCH}; for this "
                         f"batch of {total} that is --lr {RECIPE_LR * total / RECIPE_BATCH:g} (--auto-scale-lr "
                         f"{RECIPE_BATCH} scales --lr {args.lr:g} to {args.lr * total / RECIPE_BATCH:g})")


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
        return groups[::-1] if reference_order else groups
    in_order = [p for p in model.parameters() if p.requires_grad] if reference_order else other_params + norm_params
    return [{"params": in_order, "weight_decay": decay}]


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace, reference_order: bool = False,
                   fused: bool = False) -> torch.optim.Optimizer:
    """SGD or AdamW, with torch's fused kernel if asked (else torch's default); normalization layers get
    --norm-weight-decay when it is set."""
    groups = parameter_groups(model, args, reference_order)
    implementation = {"fused": True} if fused else {}
    if args.opt == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, **implementation)
    return torch.optim.AdamW(groups, lr=args.lr, **implementation)


def keep_implementation(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter group the optimizer's own choice of kernel (fused, foreach or torch's default) again:
    loading a state dict replaces it with that of the run that wrote it."""
    for group in optimizer.param_groups:
        for key in ("fused", "foreach"):
            if key in optimizer.defaults:
                group[key] = optimizer.defaults[key]


def make_lr_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace):
    if args.lr_scheduler == "multisteplr":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, lr_milestones(args), args.lr_gamma)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)

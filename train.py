r"""Train and evaluate Mask R-CNN on COCO or any COCO-format dataset, on one device or many.

Single device:
    python3 train.py --data-path ./datasets/coco --dataset coco --model maskrcnn_resnet50_fpn \
        --lr 0.001 --batch-size 4
Mixed precision:
    python3 train.py ... --batch-size 1 --amp
Several processes (one per GPU):
    python3 -m torch.distributed.launch --nproc_per_node=8 --use_env train.py ... --wd 0.000001
Evaluate a checkpoint (COCO box and mask mAP):
    python3 train.py ... --test-only --resume output/checkpoint.pth

The learning rate of torchvision's recipe is 0.02 for 8 GPUs x 2 images; scale it linearly with the total
batch size.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import inspect
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.utils.data
import torchvision

import presets
import speedups
import utils
from checkpoint import (
    RUN_OUTPUT_REMEDY,
    TrainingState,
    from_reference_checkpoint,
    is_reference_checkpoint,
    last_set_aside_checkpoint,
    load_file,
    prepare_output_dir,
    previous_runs_held,
    prune_epoch_files,
    save_atomic,
    save_checkpoint,
    set_aside_previous_run,
    write_json_atomic,
)
from coco_eval import COCO_MAX_DETECTIONS, COCOEVAL_BACKENDS, CocoEvaluator, metric_names
from coco_utils import (
    DATASET_LAYOUTS,
    MIN_KEYPOINTS_PER_IMAGE,
    CocoDetection,
    SampleError,
    add_split_paths,
    id_array,
    scored_instances_per_image,
    split_paths,
)
from data import Data, load_data
from devices import AMP_DTYPES, amp_dtype, autocast, grad_scaler, pick_device
from ema import ModelEma
from engine import (
    EpochResult,
    EvaluationStopped,
    FaultLog,
    TrainOptions,
    evaluate,
    to_device,
    train_one_epoch,
    validation_losses,
)
from errors import Terminated, UserError, exit_status, message_of
from freed_memory import NOT_KEPT_WARNING, reuse_freed_memory_checked, reuse_wanted
from metrics import Record, Writers, duration
from models import (
    MODELS,
    build_model,
    check_size_order,
    check_weights_name_fits,
    default_backbone_weights,
    detections_per_image,
    iou_types,
    layout_of,
    model_options,
    trained_pretrained,
)
from optimization import make_lr_scheduler, make_optimizer, scale_learning_rate
from preemption import StopRequest
from visualize import plot_curves, save_jpeg, side_by_side


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line that points at --help, like every other input error."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The command line: torchvision's reference's flags and ours, in groups as --help shows them."""
    parser = ArgumentParser(description=__doc__, add_help=add_help,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_flags(parser.add_argument_group("data"))
    add_model_flags(parser.add_argument_group("model"))
    add_optimization_flags(parser.add_argument_group("optimization"))
    add_run_flags(parser.add_argument_group("run"))
    add_distributed_flags(parser.add_argument_group("several processes"))
    add_speed_flags(parser.add_argument_group("speed and memory"))
    return parser


def add_data_flags(group: argparse._ArgumentGroup) -> None:
    """The dataset, how samples are read and augmented."""
    add = group.add_argument
    add("--data-path", default="./datasets/coco", help="dataset root with annotations/, train2017/, val2017/")
    add("--dataset", default="coco", choices=sorted(DATASET_LAYOUTS), help="dataset layout")
    add_split_paths(group)
    add("-j", "--workers", default=default_workers(), type=int,
        help="data loading worker processes per device (default 4, or the CPU cores this process may use if fewer)")
    add("--aspect-ratio-group-factor", default=3, type=int,
        help="batch images of similar aspect ratio in 2k+2 groups; -1 turns grouping off")
    add("--data-augmentation", default="hflip", choices=presets.TRAIN_AUGMENTATIONS,
        help="training augmentation policy: hflip, lsj (large-scale jitter to 1024x1024), multiscale (short side "
             "480-800), ssd or ssdlite (photometric distortion, zoom out, IoU crop)")
    add("--use-copypaste", action="store_true",
        help="Simple Copy-Paste between the images of a batch (needs --data-augmentation lsj and masks)")
    add("--use-v2", action="store_true", help="augment with torchvision.transforms.v2 and tv_tensors")
    add("--backend", default="tensor", type=str.lower, choices=presets.IMAGE_BACKENDS,
        help="image type the augmentation works on: tensor (fastest here), pil, or tv_tensor (with --use-v2)")
    add("--repeat-factor-threshold", default=None, type=float, metavar="T",
        help="repeat-factor sampling for long-tailed data (LVIS): an image repeats by the largest max(1, "
             "sqrt(T / f)) of its categories, f the share of training images with the category (try 0.001)")
    add("--max-bad-samples", default=0.01, type=float,
        help="share of an epoch's or an evaluation's images that may be unreadable (skipped) before the run "
             "stops; with several processes, of each one's share of the images")
    add("--skip-data-check", action="store_true", help="start without looking up every image file first")


def add_model_flags(group: argparse._ArgumentGroup) -> None:
    """The model, its weights and its sizes."""
    add = group.add_argument
    add("--model", default="maskrcnn_resnet50_fpn", choices=MODELS, metavar="MODEL",
        help=f"torchvision detection model: {', '.join(MODELS)}")
    add("--weights", default=None,
        help="whole-model weights: a torchvision name (MaskRCNN_ResNet50_FPN_Weights.COCO_V1) or a .pth path")
    add("--weights-backbone", default="default",
        help="backbone weights: a torchvision name read from the torch hub cache, a .pth path, or none; default: "
             "the ImageNet weights torchvision's recipe uses for the model (ResNet50_Weights.IMAGENET1K_V1, "
             "MobileNet_V3_Large_Weights.IMAGENET1K_V1, VGG16_Weights.IMAGENET1K_FEATURES)")
    add("--trainable-backbone-layers", default=None, type=int,
        help="backbone stages to train with pretrained weights (0-5 for ResNet and VGG, 0-6 for MobileNet; "
             "default: the builder's, 3, or 4 for ssd300_vgg16 and 6 for ssdlite320_mobilenet_v3_large)")
    add("--num-classes", default=None, type=int,
        help="classes including background (default: 91 for COCO's own categories, else categories + 1)")
    add("--min-size", default=None, type=int,
        help="the model resizes each image's short side to this (default: the model's, 800 for R-CNNs)")
    add("--max-size", default=None, type=int, help="... keeping its long side at most this (default: 1333)")
    add("--rois-per-image", default=None, type=int,
        help="R-CNNs: region proposals sampled per image to train the box and mask heads (default: 512); "
             "fewer make steps much cheaper when images hold few objects")
    add("--detections-per-image", default=None, type=int,
        help="the most detections the model keeps per image, in evaluation and prediction (default: the model's: "
             "100 for R-CNNs and FCOS, 200 for SSD300, 300 for RetinaNet and SSDlite); raise it for images of "
             "more objects")
    add("--rpn-score-thresh", default=None, type=float,
        help="R-CNNs: proposals under this objectness score are left out, in training and evaluation")
    add("--torchvision-mask-init", action="store_true",
        help="keep torchvision's initialisation of fresh mask logits, whose scale grows as the classes get fewer "
             "(by default they start at the scale torchvision gives COCO's 91 classes)")
    add("--sync-bn", action="store_true", help="synchronise batch norm statistics across processes")


def add_optimization_flags(group: argparse._ArgumentGroup) -> None:
    """Batches, optimizer, schedule, precision and the weights' average."""
    add = group.add_argument
    add("-b", "--batch-size", default=2, type=int, help="images per device; total = batch size x processes")
    add("--epochs", default=26, type=int, help="number of epochs to run")
    add("--start-epoch", "--start_epoch", default=0, type=int, dest="start_epoch", help="first epoch number")
    add("--opt", default="sgd", type=str.lower, choices=("sgd", "sgd_nesterov", "adamw"),
        help="optimizer (any case, as torchvision's reference reads it)")
    add("--lr", default=0.02, type=float,
        help="learning rate: 0.02 suits 8 devices x 2 images; scale linearly with the total batch")
    add("--momentum", default=0.9, type=float, help="SGD momentum")
    add("--wd", "--weight-decay", default=1e-4, type=float, dest="weight_decay", help="weight decay")
    add("--norm-weight-decay", default=None, type=float,
        help="weight decay for normalization layers (default: same as --wd)")
    add("--clip-grad-norm", default=None, type=float,
        help="clip the gradient norm to this (default: no clipping); steadies training from scratch")
    add("--lr-scheduler", default="multisteplr", type=str.lower, choices=("multisteplr", "cosineannealinglr"),
        help="how the learning rate falls over epochs")
    add("--lr-step-size", default=None, type=int,
        help="multisteplr: divide the lr every this many epochs (used when --lr-steps is not given)")
    add("--lr-steps", default=None, nargs="+", type=int,
        help="multisteplr: epochs at which the lr is multiplied by --lr-gamma (default: 16 22)")
    add("--lr-gamma", default=0.1, type=float, help="multisteplr: factor at each step")
    add("--grad-accum-steps", default=1, type=int,
        help="batches whose gradients add up before each optimizer step: the effective batch is --batch-size x "
             "processes x this (warm-up, schedule and --print-freq count optimizer steps)")
    add("--auto-scale-lr", default=None, type=int, metavar="B",
        help="scale --lr by the effective batch / B (B: the batch --lr was given for; torchvision's recipe: 0.02 "
             "for 16)")
    add("--amp", action="store_true", help="mixed precision (autocast; a gradient scaler for float16)")
    add("--amp-dtype", default=None, choices=sorted(AMP_DTYPES),
        help="autocast type with --amp (default: float16 on CUDA, bfloat16 on CPU); bfloat16 needs no "
             "scaler and is the better choice on Ampere and Hopper GPUs")
    add("--model-ema", action="store_true",
        help="keep an exponential moving average of the weights; evaluation and model_best.pth use it (the raw "
             "weights' AP is logged too)")
    add("--model-ema-eval", default="both", choices=("both", "average"),
        help="with --model-ema, what each evaluation during training scores: the average and the raw weights beside "
             "it (both; the raw weights' AP logged under raw), or the average alone, in half the time")
    add("--model-ema-decay", default=0.9998, type=float,
        help="the average's decay per update, ramped up over the first updates")
    add("--model-ema-steps", default=1, type=int, help="optimizer steps between updates of the average")
    add("--seed", default=0, type=int, help="seed for weights, sampling order and augmentation")
    add("--use-deterministic-algorithms", action="store_true", help="only deterministic kernels")


def add_run_flags(group: argparse._ArgumentGroup) -> None:
    """Where the run writes, resuming, evaluation and logging."""
    add = group.add_argument
    add("--device", default="cuda", help="cuda or cpu; without CUDA the run falls back to the CPU")
    add("--output-dir", default="output", help="where checkpoints and predictions go")
    add("--resume", default="", help="checkpoint to resume from, or 'auto' for --output-dir/checkpoint.pth")
    add("--test-only", action="store_true", help="evaluate only (with --resume or --weights)")
    add("--eval-batch-size", default=1, type=int,
        help="images per device at evaluation, batched by padded size so that any batch gives batch 1's numbers "
             "(more is faster on GPUs)")
    add("--coco-backend", default="auto", choices=COCOEVAL_BACKENDS,
        help="COCOeval implementation: faster-coco-eval's C++ one when installed (auto), or pycocotools'")
    add("--eval-max-dets", default=COCO_MAX_DETECTIONS, type=int, metavar="N",
        help=f"the most detections of an image, per category, that the box and mask scores count (COCOeval's "
             f"maxDets, {COCO_MAX_DETECTIONS}; keypoints keep their 20): for images of more instances, with "
             f"--detections-per-image at least N; AP and the last AR, named AR<N>, then count N")
    add("--eval-interval", default=1, type=int, metavar="N",
        help="evaluate (and --val-loss) after every N-th epoch and after the last one, not after each; --patience "
             "counts evaluations")
    add("--val-loss", action="store_true",
        help="the losses on the validation set after each epoch (nothing in the model changes), logged beside the "
             "training losses")
    add("--patience", default=None, type=int, metavar="K",
        help="stop when the best metric (--best-metric) has not improved for K evaluations")
    add("--best-metric", default=None, metavar="TYPE/NAME",
        help="the metric model_best.pth and --patience go by, as metrics.jsonl names it, such as bbox/AP50 or "
             "segm/APs (default: the primary AP: segm/AP for Mask R-CNN, keypoints/AP for Keypoint R-CNN, else "
             "bbox/AP)")
    add("--print-freq", default=20, type=int, help="print a progress line every this many optimizer steps")
    add("--no-tensorboard", action="store_true", help="write no TensorBoard event files")
    add("--vis-images", default=4, type=int,
        help="validation images drawn with their predictions after each evaluation during training (0: none; "
             "--test-only draws none)")
    add("--keep-last", default=None, type=int,
        help="keep only the newest K model_{epoch}.pth files (model_best.pth and checkpoint.pth stay)")
    add("--debug", action="store_true", help="show the traceback of input errors")


def add_distributed_flags(group: argparse._ArgumentGroup) -> None:
    """Several processes: set by the launcher, or its process group's settings."""
    add = group.add_argument
    add("--world-size", default=1, type=int, help="number of processes (set by the launcher)")
    add("--dist-url", default="env://", help="how processes find each other")
    add("--dist-backend", default=None, choices=("nccl", "gloo"), help="default: nccl on CUDA, gloo on CPU")
    add("--dist-timeout", default=300, type=int, help="seconds a process waits for the others before failing")
    add("--local-rank", "--local_rank", default=None, type=int, dest="local_rank",
        help="set by torch.distributed.launch without --use_env")


def add_speed_flags(group: argparse._ArgumentGroup) -> None:
    """Speed-ups and memory settings (docs/ARCHITECTURE.md says what each changes)."""
    add = group.add_argument
    add("--no-speedups", action="store_true",
        help="run torchvision's plain model: none of speedups/'s changes (channels-last and shape buckets "
             "included), and torch's default optimizer kernel on GPUs rather than the fused one; the numbers "
             "agree to float rounding, see docs/ARCHITECTURE.md")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=None,
        help="channels-last memory format for the convolutions (default: on for CPUs, where it is faster; off for "
             "GPUs; see docs/PERFORMANCE.md)")
    add("--shape-buckets", action=argparse.BooleanOptionalAction, default=None,
        help="pad training batches to a few shapes and head regions to multiples of 32, so that cuDNN reuses its "
             "plans (default: on for GPUs; off for CPUs, where it only adds arithmetic; see docs/PERFORMANCE.md)")
    add("--cudnn-benchmark", action="store_true",
        help="let cuDNN time its kernels for each new input shape: for fixed-size inputs (SSD); R-CNN heads "
             "change shape every step, which makes it much slower")
    add("--release-freed-memory", action=argparse.BooleanOptionalAction, default=True,
        help="after building each batch, data loaders hand the memory freed on the way back to the OS, so that a "
             "worker holds about one batch's worth (--no-release-freed-memory: faster loading, more memory per "
             "worker; see docs/PERFORMANCE.md)")
    add("--reuse-freed-memory", action=argparse.BooleanOptionalAction, default=None,
        help="the main process keeps the memory it frees for its next tensors rather than handing large blocks "
             "back to the OS, which would fault them in afresh on every pass (default: on when the model runs on "
             "the CPU; more resident memory; see docs/PERFORMANCE.md)")


def default_workers() -> int:
    """4 loader workers, as torchvision's reference, or the cores this process may use if fewer: more only adds
    processes that wait (and torch warns of them)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, cores)


def check_numbers(args: argparse.Namespace) -> None:
    """Reject counts, shares, rates and seeds out of range."""
    check_counts(args)
    check_rates(args)
    check_schedule(args)
    if not 0 <= args.seed < 2**63:  # NumPy's generators take no negative seed, torch's none past 64 bits
        raise UserError(f"--seed {args.seed} must be from 0 to 2**63 - 1")


def check_counts(args: argparse.Namespace) -> None:
    """Reject counts of workers, epochs, classes, images, pixels and steps out of range."""
    for flag in ("workers", "vis_images"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be 0 or more")
    if args.epochs < 1 and not args.test_only:
        raise UserError(f"--epochs {args.epochs} must be at least 1")
    if not 0 <= args.start_epoch < args.epochs and not args.test_only:
        raise UserError(f"--start-epoch {args.start_epoch} must be 0 or more and before --epochs {args.epochs}")
    if args.num_classes is not None and args.num_classes < 2:
        raise UserError(f"--num-classes {args.num_classes} must be at least 2: background and one category")
    for flag in ("batch_size", "min_size", "max_size", "rois_per_image", "detections_per_image", "eval_batch_size",
                 "print_freq", "lr_step_size", "grad_accum_steps", "model_ema_steps", "eval_interval", "patience",
                 "auto_scale_lr", "keep_last"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} {value} must be at least 1")
    if args.eval_max_dets <= 10:  # COCOeval's other recalls count 1 and 10
        raise UserError(f"--eval-max-dets {args.eval_max_dets} must be more than 10 (the scores count 1 and 10 "
                        f"detections for AR1 and AR10)")
    check_size_order(args.min_size, args.max_size)


def check_rates(args: argparse.Namespace) -> None:
    """Reject negative rates, limits at or below 0 and shares outside 0..1."""
    for flag, value in (("lr", args.lr), ("momentum", args.momentum), ("wd", args.weight_decay),
                        ("norm-weight-decay", args.norm_weight_decay), ("lr-gamma", args.lr_gamma)):
        if value is not None and not 0 <= value < math.inf:  # torch refuses most, after the data has loaded
            raise UserError(f"--{flag} {value} must be finite, 0 or more")
    for flag in ("clip_grad_norm", "dist_timeout"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            raise UserError(f"--{flag.replace('_', '-')} {value} must be above 0")
    for flag, low, high in (("max_bad_samples", 0, 1), ("model_ema_decay", 0, 1), ("repeat_factor_threshold", 0, 1),
                            ("rpn_score_thresh", 0, 1)):
        value = getattr(args, flag)
        if value is not None and not low <= value <= high:
            raise UserError(f"--{flag.replace('_', '-')} {value} must be a share between {low} and {high}")


def check_schedule(args: argparse.Namespace) -> None:
    """Reject learning-rate steps out of order; warn of steps after the last epoch."""
    if args.lr_steps is not None and any(b <= a for a, b in zip(args.lr_steps, args.lr_steps[1:])):
        raise UserError(f"--lr-steps {' '.join(map(str, args.lr_steps))} must be increasing")
    late = [step for step in args.lr_steps or () if step >= args.epochs]
    if late and not args.test_only:
        print(f"warning: --lr-steps {' '.join(map(str, late))} not before --epochs {args.epochs}: "
              f"{'that step never happens' if len(late) == 1 else 'those steps never happen'}", file=sys.stderr)


def check_combinations(args: argparse.Namespace) -> None:
    """Reject data and model flags that do not go together, then training flags (check_training_combinations)."""
    if args.backend == "tv_tensor" and not args.use_v2:
        raise UserError("--backend tv_tensor works with torchvision.transforms.v2 only; add --use-v2")
    if args.use_copypaste and (args.data_augmentation != "lsj" or "segm" not in iou_types(args.model)):
        raise UserError("--use-copypaste pastes instances by their masks onto lsj's fixed-size images; use it "
                        "with --data-augmentation lsj and a maskrcnn model")
    if "keypoints" in iou_types(args.model) and args.dataset != "coco_kp":
        raise UserError(f"--model {args.model} learns keypoints; use --dataset coco_kp")
    if args.data_augmentation in presets.RESIZING_AUGMENTATIONS and (args.min_size or args.max_size):
        utils.print_once(f"--data-augmentation {args.data_augmentation} sizes the training images itself; "
                         f"--min-size and --max-size size the evaluation's")
    if args.dataset == "coco_kp" and "keypoints" not in iou_types(args.model):
        utils.print_once(f"--dataset coco_kp with --model {args.model}: persons are learned without their "
                         f"keypoints, from the images with {MIN_KEYPOINTS_PER_IMAGE} or more labelled keypoints that "
                         f"coco_kp keeps")
    if args.dataset == "coco_kp" and args.use_v2:
        raise UserError("--use-v2 cannot flip keypoints' left and right; leave --use-v2 out for coco_kp")
    check_training_combinations(args)


def check_training_combinations(args: argparse.Namespace) -> None:
    """Reject training flags that do not go together."""
    if args.model_ema_eval != "both" and not args.model_ema:
        raise UserError(f"--model-ema-eval {args.model_ema_eval} chooses among the weights --model-ema keeps; add "
                        f"--model-ema, or leave --model-ema-eval out")
    if args.cudnn_benchmark and args.use_deterministic_algorithms:
        raise UserError("--cudnn-benchmark picks kernels by timing them, which --use-deterministic-algorithms "
                        "rules out; give one of the two")
    if args.opt == "sgd_nesterov" and args.momentum <= 0:
        raise UserError(f"--opt sgd_nesterov needs momentum, and --momentum is {args.momentum:g}; give a positive "
                        f"--momentum or --opt sgd")
    best_metric(args)  # a name the model's evaluation gives


def check_args(args: argparse.Namespace) -> None:
    """Reject values that would fail later, or silently do the wrong thing; resolve the backbone weights."""
    check_numbers(args)
    check_combinations(args)
    speedups.SpeedupConfig.from_args(args)  # --no-speedups with a flag it would override is an error
    if args.weights == "":
        raise UserError("--weights is empty; give a weights name or file, or leave the flag out")
    if args.weights_backbone.lower() == "none":
        args.weights_backbone = None
    elif args.weights_backbone == "default":
        args.weights_backbone = default_backbone_weights(args.model)
    if args.trainable_backbone_layers is not None and args.weights is None and args.weights_backbone is None:
        raise UserError("--trainable-backbone-layers applies to pretrained weights; from scratch every backbone "
                        "stage trains, so leave it out or give --weights-backbone")


IOU_NAMES = {"segm": "mask", "keypoints": "keypoint", "bbox": "box"}  # as the README and the curves say them


def best_metric(args: argparse.Namespace) -> tuple[str, str]:
    """The (IoU type, metric name) model_best.pth and --patience go by: --best-metric's, else the primary AP
    (masks' or keypoints', or boxes' for models that give neither); refused when the model gives no such one."""
    types = iou_types(args.model)
    if args.best_metric is None:
        return next(kind for kind in ("segm", "keypoints", "bbox") if kind in types), "AP"
    kind, _, name = args.best_metric.partition("/")
    if kind not in types or name not in metric_names(kind, args.eval_max_dets):
        if kind in ("bbox", "segm") and re.fullmatch(r"AR[1-9][0-9]*", name) and int(name[2:]) > 10:
            raise UserError(f"--best-metric {args.best_metric} is the recall of a run scored with --eval-max-dets "
                            f"{name[2:]}, and this one scores up to {args.eval_max_dets} (AR{args.eval_max_dets}); "
                            f"give --eval-max-dets {name[2:]} too, or --best-metric {kind}/AR{args.eval_max_dets}")
        choices = ", ".join(f"{t}/{n}" for t in types for n in metric_names(t, args.eval_max_dets))
        raise UserError(f"--best-metric {args.best_metric} is no metric of {args.model}'s evaluation; choose one "
                        f"of {choices}")
    return kind, name


def prediction_pictures(model: torch.nn.Module, dataset: CocoDetection, indices: list[int], device: torch.device,
                        amp_dtype: torch.dtype | None, with_masks: bool) -> dict[str, torch.Tensor]:
    """Ground truth (with the masks that training reads, for a model that learns them) beside prediction for
    the given samples of dataset, by image id."""
    model.eval()
    pictures = {}
    with torch.inference_mode():
        for index in indices:
            image_id = dataset.ids[index]
            try:
                image, target = dataset.load_image(image_id), dataset.load_target(image_id, [], with_masks)
            except SampleError:
                continue  # already reported by the evaluation that just ran
            images, _ = to_device([image], [], device)
            with autocast(device, amp_dtype):
                output = model(images)[0]
            output = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in output.items()}
            pictures[str(image_id)] = side_by_side(image, target, output, dataset.category_map)
    return pictures


def resolve_resume(args: argparse.Namespace) -> str:
    """The checkpoint to resume from: --resume as given, or for 'auto' the run's own if it exists."""
    if args.resume != "auto":
        return args.resume
    path = Path(args.output_dir) / "checkpoint.pth"
    if path.is_file():
        return str(path)
    if not args.test_only:  # a mistyped --output-dir would otherwise start afresh without a word
        set_aside = last_set_aside_checkpoint(Path(args.output_dir))
        where = (f"; the last run moved aside from this folder is in {set_aside.parent}: to continue it, move its "
                 f"files back into {args.output_dir} and run again") if set_aside else ""
        utils.print_once(f"--resume auto: no {path}, so this is a new run{where}")
    return ""


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by this script (or by torchvision's reference), checked to hold what resuming
    reads."""
    checkpoint = load_file(path, "--resume")
    if is_reference_checkpoint(checkpoint):
        checkpoint = from_reference_checkpoint(checkpoint)
    if not isinstance(checkpoint, dict):
        checkpoint = {}
    missing = [k for k in ("model", "epoch", "categories", "num_classes") if k not in checkpoint]
    if missing:
        raise UserError(f"--resume {path} is not a checkpoint of this script (no '{missing[0]}'); for plain "
                        f"model weights use --weights")
    return checkpoint


# ------------------------------------------------------------------------------------------------ the stages

@dataclass
class Run:
    """What every stage of a run shares: its arguments, device, precision, output folder, writers and speed-ups."""

    args: argparse.Namespace
    device: torch.device
    amp_dtype: torch.dtype | None
    output_dir: Path
    is_main: bool
    writers: Writers
    speedup_config: speedups.SpeedupConfig

    def save(self, state: TrainingState, also_as: str | None = None) -> Path | None:
        """checkpoint.pth (and also_as, the same bytes) in the output folder, from rank 0; None elsewhere."""
        return save_checkpoint(state.state_dict(), self.output_dir, also_as) if self.is_main else None


def start_run(args: argparse.Namespace) -> Run:
    """Check the arguments, pick the device, join the other processes (whose flags must match), scale the
    learning rate, prepare the output folder, seed, set the kernels and make the writers."""
    check_args(args)
    args.device = pick_device(args.device)
    args.reuse_freed_memory = reuse_wanted(args.reuse_freed_memory, args.device.type)
    utils.init_distributed_mode(args)
    check_same_flags(args)
    if args.distributed and args.device.type == "cuda":
        args.device = torch.device("cuda", args.gpu)
    utils.print_once(args)
    if not args.test_only:
        scale_learning_rate(args)
    is_main = utils.is_main_process()
    output_dir = Path(args.output_dir)
    if is_main:
        prepare_output_dir(output_dir)
    utils.seed_everything(args.seed)
    if args.use_deterministic_algorithms:
        # cuBLAS is deterministic only with a fixed workspace, which torch otherwise refuses to run without.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    precision = amp_dtype(args.amp_dtype, args.device) if args.amp else None
    writers = Writers(output_dir, enabled=is_main, tensorboard=not args.no_tensorboard)
    return Run(args, args.device, precision, output_dir, is_main, writers, speedups.SpeedupConfig.from_args(args))


def start_reusing_freed_memory(args: argparse.Namespace) -> None:
    """With --reuse-freed-memory, from here on malloc keeps this process's freed memory for the model's next
    tensors (freed_memory.py); after reading the data, whose parsing frees large buffers better handed back."""
    if args.reuse_freed_memory and not reuse_freed_memory_checked():
        utils.print_once(NOT_KEPT_WARNING, file=sys.stderr)


def read_resume_checkpoint(args: argparse.Namespace) -> tuple[dict | None, str]:
    """The checkpoint --resume names (or finds, for 'auto'), and its path; (None, "") for a fresh run."""
    path = resolve_resume(args)
    if args.test_only and not path and not args.weights:  # the model as built: random heads, an AP of 0
        raise UserError(f"--test-only evaluates trained weights, and there are none: give --resume CHECKPOINT or "
                        f"--weights FILE{' (no checkpoint.pth in --output-dir for auto)' if args.resume else ''}")
    checkpoint = load_checkpoint(path) if path else None
    check_same_on_every_rank(checkpoint, args.resume)
    return checkpoint, path


# What each process of a job may give its own way: who it is and its device, its loader workers, and paths (a
# node may mount the same files elsewhere: the data read are compared instead, by check_same_data).
PER_PROCESS_FLAGS = frozenset({
    "rank", "local_rank", "gpu", "world_size", "distributed", "dist_url", "device", "workers", "reuse_freed_memory",
    "data_path", "train_images", "train_annotations", "val_images", "val_annotations", "output_dir", "resume"})


def check_same_flags(args: argparse.Namespace) -> None:
    """Every process of a job was started with the same flags: one node's other --lr or --batch-size would train
    its share otherwise, silently where the steps still line up, or fail a collective an epoch later."""
    other = utils.first_other_rank({name: plain(value) for name, value in vars(args).items()
                                    if name not in PER_PROCESS_FLAGS})
    if other is not None:
        rank, theirs, first = other
        flags = ", ".join(f"--{name.replace('_', '-')} {theirs.get(name)} (rank 0: {first.get(name)})"
                          for name in sorted(first.keys() | theirs.keys()) if first.get(name) != theirs.get(name))
        raise UserError(f"rank {rank} was started with other flags than rank 0: {flags}; every process of a job "
                        f"takes the same ones (between nodes only --data-path, the split paths, --output-dir, "
                        f"--resume, --workers, --device, --dist-url and --[no-]reuse-freed-memory may differ)")


def ids_digest(ids: Sequence) -> str:
    """A digest of every id in order, for a list or the compact NumPy array alike (NumPy's repr of an array of
    over 1,000 elements shows only its ends)."""
    return hashlib.sha256(repr(id_array(ids).tolist()).encode()).hexdigest()


def check_same_data(args: argparse.Namespace, data: Data) -> None:
    """Every process read the same images and categories, whatever its paths: otherwise their samplers would split
    other images into other numbers of steps, and a collective fail an epoch later."""
    def images(dataset: CocoDetection | None) -> tuple[int, str]:
        ids = [] if dataset is None else dataset.ids
        return len(ids), ids_digest(ids)

    read = {"training images": images(data.train_set), "validation images": images(data.val_set),
            "categories": (len(data.category_map.ids), data.category_map)}
    everyone = utils.all_gather_object(args.data_path)
    other = utils.first_other_rank(read)
    if other is not None:
        rank, theirs, first = other
        differing = [part for part in read if theirs[part] != first[part]]
        counts = "; ".join(f"{theirs[part][0]} {part} against {first[part][0]}" for part in differing)
        raise UserError(f"rank {rank} read other {' and '.join(differing)} than rank 0 ({counts}; its --data-path "
                        f"{everyone[rank]}, rank 0's {everyone[0]}): every node must read the same files")


def check_same_on_every_rank(checkpoint: dict | None, resume: str) -> None:
    """Every process resumes the same position: a node that cannot see the output folder's checkpoint (not on a
    shared filesystem) would otherwise start afresh beside ranks that resume, and train apart until a collective
    fails."""
    found = utils.all_gather_object(None if checkpoint is None else (checkpoint.get("epoch"), checkpoint.get("step")))
    if len(set(found)) == 1:
        return
    ranks: dict = {}
    for rank, position in enumerate(found):
        ranks.setdefault(position, []).append(str(rank))
    where = {p: "none" if p is None else f"epoch {p[0]}" + ("" if p[1] is None else f" step {p[1]}") for p in ranks}
    said = "; ".join(f"rank {', '.join(r)}: {where[p]}" for p, r in ranks.items())
    raise UserError(f"--resume {resume}: the processes found different checkpoints ({said}); every node must read "
                    f"the same file: give --output-dir on a filesystem all nodes share, or --resume one file")


def check_same_model(args: argparse.Namespace, checkpoint: dict, resume: str) -> None:
    """One clear error, before the data loads, where --model or --num-classes is not the checkpoint's: its
    weights fit no other model (said even when its run has nothing left to train)."""
    saved = (checkpoint.get("args") or {}).get("model")
    if saved is not None and saved != args.model:
        raise UserError(f"--resume {resume} holds a {saved} model, and this run asks for --model {args.model}: "
                        f"give --model {saved} to resume it, or start a new run in another --output-dir")
    if args.num_classes is not None and args.num_classes != checkpoint["num_classes"]:
        raise UserError(f"--num-classes {args.num_classes} differs from the {checkpoint['num_classes']} classes "
                        f"of --resume {resume}; leave --num-classes out to resume")


def class_count(args: argparse.Namespace, data: Data, checkpoint: dict | None) -> int:
    """--num-classes, else the checkpoint's, else what the categories need; enough for the categories (the
    checkpoint's count is checked by check_same_model)."""
    categories = data.category_map
    num_classes = args.num_classes or (checkpoint["num_classes"] if checkpoint else categories.num_classes)
    if num_classes < categories.fewest_classes:
        numbering = "COCO's own categories keep their COCO ids" if categories.keep_ids else "labels 1..K"
        raise UserError(f"--num-classes {num_classes} is too small: the categories need "
                        f"{categories.fewest_classes} (the largest label + 1, background included; {numbering})")
    return num_classes


# Model settings that a checkpoint's evaluation and continuation keep from its run unless they are given again.
SAVED_MODEL_SETTINGS = ("min_size", "max_size", "rois_per_image", "detections_per_image", "rpn_score_thresh")


def take_saved_settings(args: argparse.Namespace, saved: dict) -> None:
    """The checkpoint's run's model settings, for those this run leaves to their defaults; says which."""
    taken = {name: saved[name] for name in SAVED_MODEL_SETTINGS
             if getattr(args, name) is None and saved.get(name) is not None}
    for name, value in taken.items():
        setattr(args, name, value)
    if taken:
        flags = " ".join(f"--{name.replace('_', '-')} {value}" for name, value in taken.items())
        utils.print_once(f"As the checkpoint's run: {flags}")


def note_crowded_images(val_set: CocoDetection, kept: int, scored: int = COCO_MAX_DETECTIONS) -> None:
    """Say where validation images hold more instances than the model keeps detections, or more of one category
    than the scoring counts: those can only be missed, capping the scores below 1."""
    annotations = val_set.coco.dataset["annotations"]
    per_image = scored_instances_per_image(annotations)
    per_category = scored_instances_per_image(annotations, by_category=True)
    over_kept = {image: count for image, count in per_image.items() if count > kept}
    over_scored = {image: count for (image, _), count in per_category.items() if count > scored}
    if not over_kept and not over_scored:
        return
    crowded = len(over_kept.keys() | over_scored.keys())
    said = []
    if over_kept:
        image, count = max(over_kept.items(), key=lambda item: item[1])
        said.append(f"more instances than the {kept} detections the model keeps per image (--detections-per-image; "
                    f"the most: {count}, image {image})")
    if over_scored:
        image, count = max(over_scored.items(), key=lambda item: item[1])
        said.append(f"more of one category than the {scored} per image and category COCO's scoring counts "
                    f"(--eval-max-dets; the most: {count}, image {image})")
    images = f"{crowded} validation images hold" if crowded > 1 else "1 validation image holds"
    utils.print_once(f"note: {images} {' or '.join(said)}, so AP and AR stay below 1 on such images however good "
                     f"the model")


def create_model(args: argparse.Namespace, num_classes: int, checkpoint: dict | None) -> torch.nn.Module:
    """torchvision's model, with its weights read from local files; for a checkpoint, laid out as its run was
    (with its sizes and settings unless given) and not read from anywhere (the checkpoint has every weight)."""
    utils.print_once(f"Creating model {args.model} with {num_classes} classes")
    if checkpoint is not None:
        take_saved_settings(args, checkpoint["args"])
    options = model_options(args.model, min_size=args.min_size, max_size=args.max_size,
                            box_batch_size_per_image=args.rois_per_image, rpn_score_thresh=args.rpn_score_thresh,
                            detections_per_image=args.detections_per_image)
    if args.data_augmentation in presets.RESIZING_AUGMENTATIONS:
        options["_skip_resize"] = True  # in training only: evaluation images are resized by the model
    if checkpoint is None:
        # Recorded with the run's arguments, so that a resumed run lays the model out as this one does.
        args.pretrained_layout, args.trainable_backbone_layers = layout_of(args.weights, args.weights_backbone,
                                                                           args.trainable_backbone_layers)
        if args.weights:  # said as it is, before the class-head advice below could be added to it
            check_weights_name_fits(args.model, args.weights)
        try:  # to evaluate only, fresh class heads would score at random: the weights' heads must fit
            return build_model(args.model, num_classes, args.weights, args.weights_backbone,
                               args.trainable_backbone_layers, mask_init=not args.torchvision_mask_init,
                               new_class_heads=not args.test_only, **options)
        except UserError as e:
            if not args.test_only:
                raise
            raise UserError(f"{e}. --test-only --weights takes weights whose class heads fit this dataset's "
                            f"{num_classes} classes (with background); a checkpoint of train.py goes to --resume, "
                            f"which brings its own categories") from None
    saved = checkpoint["args"]
    if not args.test_only:
        check_same_layout(args, saved)
    args.pretrained_layout = trained_pretrained(saved)  # the run's layout, recorded again in this run's checkpoints
    args.trainable_backbone_layers = saved.get("trainable_backbone_layers")
    return build_model(args.model, num_classes, None, None, args.trainable_backbone_layers,
                       pretrained_layout=args.pretrained_layout, **options)


def check_same_layout(args: argparse.Namespace, saved: dict) -> None:
    """One clear error where a resumed run's flags would lay the model out otherwise than the checkpoint's run
    did: the optimizer's state holds that layout's trainable parameters, and the next checkpoint would record
    the flags."""
    fresh_start = "or fine-tune from it with --weights in a new --output-dir"
    # --weights is not read on resume (nor compared: its file may hold a checkpoint of either layout)
    if not args.weights and trained_pretrained(saved) != bool(args.weights_backbone):
        was = "from pretrained weights" if trained_pretrained(saved) else "from scratch (--weights-backbone none)"
        raise UserError(f"--resume {args.resume}: its run built the model {was}, and a resumed run keeps that "
                        f"layout; give its --weights or --weights-backbone again, {fresh_start}")
    given = args.trainable_backbone_layers
    if given is not None and given != saved.get("trainable_backbone_layers"):
        was = saved["trainable_backbone_layers"]
        raise UserError(f"--resume {args.resume}: its run trained {'the default' if was is None else was} "
                        f"backbone stages (--trainable-backbone-layers), and a resumed run keeps them; give the "
                        f"flag as it had it, {fresh_start}")


def wrap_for_devices(run: Run, model: torch.nn.Module) -> torch.nn.Module:
    """The model on its device with the speed-ups, synchronised batch norm and DDP where the run asks."""
    args = run.args
    model = speedups.for_training(model.to(run.device), run.device, run.speedup_config)
    utils.print_once("Speed-ups: " + ("; ".join(speedups.applied(model)) or "none (torchvision's plain model)"))
    if args.distributed and args.sync_bn:
        if run.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            utils.print_once("--sync-bn: torch synchronises batch norm on GPUs only; on the CPU each process "
                             "keeps its own statistics")
    if args.distributed:
        ddp = torch.nn.parallel.DistributedDataParallel
        # torch 2.14 renamed the flag (and warns on the old name); older versions know only the old one.
        sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
                else "broadcast_buffers")
        model = ddp(model, device_ids=[args.gpu] if run.device.type == "cuda" else None,
                    **{sync: utils.buffers_change_in_training(model)})
    return model


def create_training_state(run: Run, model: torch.nn.Module, data: Data, num_classes: int,
                          checkpoint: dict | None) -> TrainingState:
    """The optimizer, schedule, scaler and weight average for the model (unwrapped from DDP), with the run's
    description; the optimizer's parameters in the order of the checkpoint's writer."""
    args = run.args
    optimizer = make_optimizer(model, args, reference_order=bool(checkpoint and checkpoint.get("from_reference")),
                               fused=run.speedup_config.use_fused_optimizer(run.device))
    # An average to train, or to evaluate where the checkpoint keeps one (asked for or not).
    kept = bool(checkpoint and "model_ema" in checkpoint)
    average = kept if args.test_only else args.model_ema
    if args.test_only and args.model_ema and checkpoint is not None and not kept:
        utils.print_once("--model-ema: the checkpoint keeps no moving average of the weights; evaluating its weights")
    ema = ModelEma(model, args.model_ema_decay) if average else None
    return TrainingState(model, optimizer, make_lr_scheduler(optimizer, args), grad_scaler(run.device, run.amp_dtype),
                         args, data.category_map, num_classes, ema)


# What decides the batches of an epoch: the rest of an epoch saved part-way can only be replayed with the same.
BATCH_LAYOUT = {"world_size": "processes", "batch_size": "--batch-size", "grad_accum_steps": "--grad-accum-steps",
                "seed": "--seed", "aspect_ratio_group_factor": "--aspect-ratio-group-factor",
                "repeat_factor_threshold": "--repeat-factor-threshold"}


def check_same_batches(args: argparse.Namespace, saved: dict, resume: str, epoch: int, step: int) -> None:
    """One clear error where a checkpoint saved part-way through an epoch is resumed with other batches."""
    ours = {**vars(args), "world_size": utils.get_world_size()}
    saved = {"world_size": 1, **saved}
    differ = [name for name in BATCH_LAYOUT if name in saved and saved[name] != ours[name]]
    if differ:
        earlier = f"resume from model_{epoch - 1}.pth (the end of epoch {epoch - 1})" if epoch else "start afresh"
        was = ", ".join(f"{BATCH_LAYOUT[name]} {saved[name]}" for name in differ)
        now = ", ".join(f"{BATCH_LAYOUT[name]} {ours[name]}" for name in differ)
        raise UserError(f"--resume {resume} was saved at step {step} of epoch {epoch} with {was}, where this run "
                        f"has {now}; the rest of that epoch is replayed only with the same batches: run with "
                        f"the saved values, or {earlier}")


# Training settings a resumed run may give otherwise (at an epoch's end; part-way, BATCH_LAYOUT's are refused):
# said, as they make the run other than one run of one command. The optimizer's are noted on their own
# (optimization.keep_this_runs_settings).
NOTED_ON_RESUME = (*(name for name in BATCH_LAYOUT if name != "world_size"), "data_augmentation", "use_copypaste",
                   "use_v2", "clip_grad_norm", "amp", "amp_dtype", "model_ema", "model_ema_decay", "model_ema_steps",
                   "data_path", "train_images", "train_annotations", "no_speedups")


def note_changed_settings(args: argparse.Namespace, saved: dict, resume: str) -> None:
    """Say which training settings this run gives otherwise than the checkpoint's run had them (those that take
    effect in this run; a path, as the folder it names)."""
    def differs(name: str) -> bool:
        ours, theirs = getattr(args, name), saved[name]
        if name in ("data_path", "train_images", "train_annotations") and ours and theirs:
            return Path(ours).resolve() != Path(theirs).resolve()
        return plain(ours) != plain(theirs)

    in_effect = {"amp_dtype": args.amp, "model_ema_decay": args.model_ema, "model_ema_steps": args.model_ema}
    changed = [name for name in NOTED_ON_RESUME if name in saved and in_effect.get(name, True) and differs(name)]
    if changed:
        flags = ", ".join(f"--{name.replace('_', '-')} {plain(getattr(args, name))} (its run: {plain(saved[name])})"
                          for name in changed)
        utils.print_once(f"--resume {resume}: given otherwise than in its run: {flags}; they apply from here on")


def check_same_scoring(args: argparse.Namespace, saved: dict, resume: str) -> None:
    """Where this run scores otherwise than the checkpoint's run did: for --test-only a note (its numbers are not
    that run's), for a run continued in its folder one clear error (model_best.pth and --patience compare with its
    earlier evaluations)."""
    was = saved.get("eval_max_dets", COCO_MAX_DETECTIONS)
    if args.eval_max_dets == was:
        return
    scored = f"its run scored up to {was} detections an image and category (--eval-max-dets)"
    if args.test_only:
        utils.print_once(f"note: --resume {resume}: {scored}, and this evaluation up to {args.eval_max_dets}: give "
                         f"--eval-max-dets {was} for that run's numbers")
        return
    raise UserError(f"--resume {resume}: {scored}, and model_best.pth and --patience compare with its "
                    f"evaluations; give --eval-max-dets {was}, or score the checkpoint otherwise with --test-only")


def restore(run: Run, state: TrainingState, checkpoint: dict, resume: str, data: Data, continues_folder: bool
            ) -> None:
    """Continue from the checkpoint: weights, and for training the optimizer, schedule, scaler, generators and
    position; what the folder's run logged past it is dropped (continues_folder: the folder's outputs are this
    checkpoint's run's)."""
    state.load_state_dict(checkpoint, f"--resume {resume}", weights_only=run.args.test_only)
    if not run.args.test_only:
        epoch, step = checkpoint["epoch"], checkpoint.get("step")
        if step:  # step 0 (a stop before the epoch's first step) has nothing of the epoch to replay
            check_same_batches(run.args, checkpoint["args"], resume, epoch, step)
        note_changed_settings(run.args, checkpoint["args"], resume)
        if continues_folder:
            check_same_scoring(run.args, checkpoint["args"], resume)
        clock = data.train_loader.batch_sampler
        counted_here = clock.global_step(epoch, clock.steps(epoch) if step is None else step)
        if checkpoint.get("global_step") is not None:  # the x axis goes on from where the saved run had it
            clock.step_offset = checkpoint["global_step"] - counted_here
        if continues_folder:
            run.writers.resume_after(epoch, step, counted_here + clock.step_offset)
    elif checkpoint.get("args"):  # --test-only: a note where its numbers will not be the run's
        check_same_scoring(run.args, checkpoint["args"], resume)
    where = f"epoch {checkpoint['epoch']}" + (f" step {checkpoint['step']}" if checkpoint.get("step") else "")
    averaged = " with the weights' moving average" if state.ema is not None and "model_ema" in checkpoint else ""
    utils.print_once(f"Resumed from {resume} ({where}){averaged}")
    if "model_ema" in checkpoint and state.ema is None and not run.args.test_only:
        utils.print_once(f"--resume {resume} holds a moving average of the weights, which this run without "
                         f"--model-ema leaves behind: it trains and evaluates the raw weights")
    if checkpoint.get("from_reference"):
        utils.print_once(f"{resume} is a checkpoint of torchvision's references/detection: categories from the "
                         f"dataset's files, whose ids are its labels ({state.num_classes} classes)")


def epochs_trained(checkpoint: dict) -> int:
    """The complete epochs a checkpoint's run has trained."""
    return checkpoint["epoch"] + 1 if checkpoint.get("step") is None else checkpoint["epoch"]


def from_another_run(resume: str, checkpoint: dict, output_dir: Path) -> bool:
    """Whether a checkpoint resumed from outside --output-dir was written by a run of another folder, whose
    outputs are then not this folder's (a copy of this folder's checkpoint elsewhere is not)."""
    if Path(resume).resolve().parent == output_dir.resolve():
        return False
    saved = (checkpoint.get("args") or {}).get("output_dir")
    return saved is None or Path(saved).resolve() != output_dir.resolve()


def nothing_left_to_train(run: Run, checkpoint: dict, of_another_folder: bool) -> bool:
    """Whether the checkpoint's run has trained --epochs epochs already, and evaluated the last where it was due
    (as far as this folder's metrics say: for a checkpoint of another folder, nothing)."""
    return (epochs_trained(checkpoint) >= run.args.epochs
            and (of_another_folder or not saved_but_not_evaluated(run, checkpoint["epoch"], checkpoint.get("step"))))


def already_finished(resume: str, checkpoint: dict, epochs: int) -> dict:
    """The run's end when its checkpoint has trained --epochs already: says so and how to go on; no metrics."""
    utils.print_once(f"--resume {resume}: its run has trained {epochs_trained(checkpoint)} epochs, and --epochs is "
                     f"{epochs}: nothing is left to train; raise --epochs to train more, or evaluate it with "
                     f"--test-only")
    return {}


def already_stopped(resume: str, checkpoint: dict) -> dict:
    """The run's end when its checkpoint stopped early (--patience): says so and what to do; no metrics."""
    utils.print_once(f"--resume {resume}: this run stopped early at epoch {checkpoint['epoch']} (--patience), so "
                     f"there is nothing to continue; model_best.pth beside it holds its best weights (to train on "
                     f"regardless, resume from model_{checkpoint['epoch']}.pth, saved before the stop, with a larger "
                     f"--patience)")
    return {}


def run_evaluation(run: Run, data: Data, model: torch.nn.Module, stop_requested: Callable[[], bool] | None = None
                   ) -> tuple[CocoEvaluator, dict, torch.nn.Module]:
    """COCO evaluation of the model's inference copy over every rank's share of the validation set; during
    training (stop_requested given), a stop signal ends it unfinished (EvaluationStopped)."""
    evaluator = CocoEvaluator(data.val_set.coco, data.category_map, iou_types(run.args.model),
                              run.args.coco_backend, run.args.eval_max_dets)
    eval_model = speedups.for_inference(model, run.device, run.speedup_config)
    metrics = evaluate(eval_model, data.val_loader, run.device, evaluator, run.args.print_freq, run.amp_dtype,
                       stop_requested=stop_requested, max_bad_samples=run.args.max_bad_samples)
    return evaluator, metrics, eval_model


def evaluated_weights(state: TrainingState) -> torch.nn.Module:
    """The weights evaluation, model_best.pth's choice and prediction use: the moving average when there is one."""
    return state.ema.module if state.ema is not None else state.model


def evaluate_only(run: Run, data: Data, state: TrainingState, checkpoint: dict | None, resume: str) -> dict:
    """--test-only: evaluate the weights (their average where there is one) and write the predictions files and
    evaluation.json; checkpoint: what --resume (the path resume) read, None for --weights."""
    if state.ema is not None:
        utils.print_once("Evaluating the weights' moving average (model_ema)")
    started = time.perf_counter()
    evaluator, metrics, _ = run_evaluation(run, data, evaluated_weights(state))
    if run.is_main:
        seconds = round(time.perf_counter() - started, 3)
        for path in evaluator.write_results(run.output_dir):
            print(f"Wrote {path}")
        path = run.output_dir / "evaluation.json"
        record = evaluation_record(run.args, data, state, checkpoint, resume) | {"seconds": seconds} | metrics
        write_json_atomic(path, record, remedy=RUN_OUTPUT_REMEDY)
        print(f"Wrote {path}")
    return metrics


def evaluation_record(args: argparse.Namespace, data: Data, state: TrainingState, checkpoint: dict | None,
                      resume: str) -> dict:
    """What --test-only evaluated, for evaluation.json beside its metrics: the weights (and the epoch and step of
    a checkpoint's) and the validation files."""
    ann_file = split_paths(args.data_path, args.dataset, "val", args.val_images, args.val_annotations)[1]
    position = {"epoch": checkpoint.get("epoch"), "step": checkpoint.get("step")} if checkpoint else {}
    return {"time": round(time.time(), 3), "evaluated": str(Path(resume).resolve()) if resume else args.weights,
            "weights": "model_ema" if state.ema is not None else "model", **position,
            "val_annotations": str(ann_file.resolve()), "val_images": len(data.val_set)}


def keep_previous_outputs(output_dir: Path) -> None:
    """A fresh run: what another training run wrote in the folder is moved aside, not continued or overwritten."""
    moved_to = set_aside_previous_run(output_dir)
    if moved_to is not None:
        runs, size = previous_runs_held(output_dir)
        print(f"{output_dir} held another run's outputs (checkpoints, metrics, events, best weights): moved to "
              f"{moved_to}; to continue that run instead, resume from the checkpoint there. {moved_to.parent} "
              f"holds {runs} run{'s' if runs > 1 else ''} set aside ({size / 2**30:.1f} GB): delete those you no "
              f"longer need", flush=True)


def exit_stopped(stop: StopRequest) -> NoReturn:
    """End a run that every rank agreed to stop at this point: they leave the process group together, as a run
    that finishes does, and exit with the signal's status."""
    utils.leave_process_group()
    sys.exit(stop.exit_code)


def stop_mid_epoch(run: Run, state: TrainingState, stop: StopRequest, saved_here: bool) -> NoReturn:
    """A stop signal during an epoch: checkpoint.pth holds the position (epoch and step), then every rank exits.
    saved_here: this run's last checkpoint resumes at that position already (a stop before an epoch's first
    step), so none is written again: a grace period is not spent on it, nor the disk on a second copy."""
    path = None if saved_here else run.save(state)
    # Every rank waits for rank 0's checkpoint here: a launcher ends a job's other processes once one exits.
    stop.agreed()
    if path is not None:
        print(f"Stopped by {stop.signal_name} at epoch {state.epoch} step {state.step}; saved {path}. "
              f"Run the same command with --resume auto to continue.", flush=True)
    elif saved_here and run.is_main:
        print(f"Stopped by {stop.signal_name} before epoch {state.epoch}'s first step, where "
              f"{run.output_dir / 'checkpoint.pth'} resumes already. Run the same command with --resume auto to "
              f"continue.", flush=True)
    exit_stopped(stop)


def stop_on_data_failure(run: Run, state: TrainingState, epoch: int, result: EpochResult, start_step: int
                         ) -> NoReturn:
    """The epoch's data failed between two steps: the steps done since the last checkpoint are saved where every
    rank can wait for the save (one process, or a fault limit they met together), then the error stops the run
    (a process alone in its failure exits, and the launcher ends the others)."""
    failure = result.failure
    saved = None
    if result.steps_done > start_step and (utils.get_world_size() == 1 or failure.agreed):
        state.epoch, state.step = epoch, result.steps_done
        saved = run.save(state)
        utils.max_over_ranks([0])  # the others wait for rank 0's checkpoint: a launcher ends them once one exits
    if saved is None:
        raise failure.error
    raise UserError(f"{message_of(failure.error)}; the steps done are saved (epoch {epoch} step "
                    f"{result.steps_done}, {saved}): once the data is fixed, the same command with --resume auto "
                    f"continues from there")


def save_epoch(run: Run, state: TrainingState, epoch: int) -> None:
    """End of an epoch: the schedule steps, checkpoint.pth and model_{epoch}.pth are written (old ones pruned)."""
    state.lr_scheduler.step()
    state.epoch, state.step = epoch, None
    if run.save(state, also_as=f"model_{epoch}.pth") is not None and run.args.keep_last:
        prune_epoch_files(run.output_dir, run.args.keep_last, epoch)


class BestModel:
    """model_best.pth: the weights of the evaluation with the best metric (best_metric) so far (counting a resumed
    run's), and how many evaluations have passed without a better one."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.kind, self.metric = best_metric(run.args)
        records = run.writers.records("eval")
        history = [r[self.kind][self.metric] for r in records]
        self.best = max(history, default=None)
        self.best_epoch = records[history.index(self.best)]["epoch"] if history else None
        self.since_best = len(history) - 1 - history.index(self.best) if history else 0

    def update(self, metrics: dict, state: TrainingState, epoch: int) -> bool:
        """Count an evaluation; returns whether it is the new best (and model_best.pth its weights)."""
        ap, name = metrics[self.kind][self.metric], f"{IOU_NAMES[self.kind]} {self.metric}"
        if self.best is None or ap > self.best:
            self.best, self.best_epoch, self.since_best = ap, epoch, 0
            save_atomic(state.weights_dict(), self.run.output_dir / "model_best.pth")
            print(f"New best {name} {ap:.4f} at epoch {epoch}: saved {self.run.output_dir / 'model_best.pth'}")
            return True
        self.since_best += 1
        patience = f" (--patience {self.run.args.patience})" if self.run.args.patience else ""
        print(f"{name} {ap:.4f}, not above the best, {self.best:.4f} at epoch {self.best_epoch}: "
              f"{self.since_best} evaluation{'s' if self.since_best > 1 else ''} without improvement{patience}")
        return False

    def out_of_patience(self, patience: int | None) -> bool:
        """Whether --patience evaluations have passed without improvement (decided on rank 0, for every rank)."""
        return patience is not None and utils.any_rank(self.since_best >= patience)


def log_validation_losses(run: Run, data: Data, state: TrainingState, epoch: int, at: int,
                          stop_requested: Callable[[], bool]) -> None:
    """--val-loss: the validation set's losses, as a record of their own, once an epoch: a run stopped during
    the evaluation that follows them keeps them when it resumes (also in TensorBoard, at the same step)."""
    if utils.any_rank(run.is_main and epoch in {r["epoch"] for r in run.writers.records("val")}):
        return
    losses = validation_losses(state.model, data.val_loss_loader, run.device, run.amp_dtype, stop_requested)
    run.writers.write(Record("val", epoch, at, {"time": round(time.time(), 3), **losses}))


def file_name_of(image_id: str) -> str:
    """An image id as a name of a file in its folder: an id that is a string may hold a '/' or be '..'."""
    name = re.sub(r"[/\\\x00]", "_", image_id)
    return name if name.strip(".") else f"_{name}"


def report_evaluation(run: Run, data: Data, eval_model: torch.nn.Module, epoch: int, metrics: dict, at: int,
                      about: dict) -> None:
    """After an evaluation, on rank 0: the record (about: its seconds and whether it is the best, beside the
    metrics), the curves and the evaluated model's prediction pictures."""
    run.writers.write(Record("eval", epoch, at, {"time": round(time.time(), 3), **about, **metrics}))
    plot_curves(run.writers.records("train"), run.writers.records("eval"), run.output_dir / "curves.png",
                run.writers.records("val"))
    vis_indices = list(range(min(run.args.vis_images, len(data.val_set))))
    pictures = prediction_pictures(eval_model, data.val_set, vis_indices, run.device, run.amp_dtype,
                                   with_masks="segm" in iou_types(run.args.model))
    for name, picture in pictures.items():
        save_jpeg(picture, run.output_dir / "predictions" / f"epoch_{epoch}" / f"{file_name_of(name)}.jpg")
    run.writers.add_pictures(pictures, at)


def evaluate_epoch(run: Run, data: Data, state: TrainingState, epoch: int, best: BestModel,
                   stop_requested: Callable[[], bool]) -> dict:
    """After an epoch: the validation losses (--val-loss), then the evaluation of the weights (the moving
    average's, and the raw ones' beside it unless --model-ema-eval average), its predictions JSON,
    model_best.pth, record and pictures. A stop signal ends it unfinished (EvaluationStopped), with no
    evaluation recorded."""
    at = data.train_loader.batch_sampler.global_step(epoch + 1, 0)
    utils.share_rank0_buffers(state.model, *([state.ema.module] if state.ema is not None else []))
    if data.val_loss_loader is not None:
        log_validation_losses(run, data, state, epoch, at, stop_requested)
    raw, started = {}, time.perf_counter()
    if state.ema is not None:
        if run.args.model_ema_eval == "both":
            utils.print_once("Evaluating the raw weights (without the moving average)")
            raw = {"raw": run_evaluation(run, data, state.model, stop_requested)[1]}
        utils.print_once("Evaluating the weights' moving average (model_ema)")
    evaluator, metrics, eval_model = run_evaluation(run, data, evaluated_weights(state), stop_requested)
    if run.is_main:
        about = {"seconds": round(time.perf_counter() - started, 3)}
        evaluator.write_results(run.output_dir)
        about["new_best"] = best.update(metrics, state, epoch)
        report_evaluation(run, data, eval_model, epoch, {**metrics, **raw}, at, about)
    return metrics


def stop_early(run: Run, state: TrainingState, best: BestModel) -> None:
    """--patience ran out: say so, and mark the checkpoint so that --resume auto knows."""
    utils.print_once(f"Stopping early: the {IOU_NAMES[best.kind]} {best.metric} has not improved on "
                     f"{best.best:.4f} for {run.args.patience} evaluations (--patience); model_best.pth holds the "
                     f"best weights")
    state.stopped_early = True
    run.save(state)


def train(run: Run, data: Data, model: torch.nn.Module, state: TrainingState) -> dict:
    """The epochs from where the state stands: train, save, evaluate; a stop signal saves and exits."""
    utils.print_once("Start training")
    started = time.time()
    stop = StopRequest().install()
    args = run.args
    options = TrainOptions(print_freq=args.print_freq, epochs=args.epochs, scaler=state.scaler,
                           amp_dtype=run.amp_dtype, clip_grad_norm=args.clip_grad_norm,
                           grad_accum_steps=args.grad_accum_steps, faults=FaultLog(args.max_bad_samples),
                           stop_requested=stop.requested, on_record=run.writers.write,
                           after_step=moving_average_updates(state, args.model_ema_steps))
    evaluations = EvaluationTimes(args)
    options.seconds_after = evaluations.expected_after
    best, metrics = BestModel(run), {}
    start_epoch, start_step = state.resume_at if state.epoch >= 0 else (args.start_epoch, 0)
    if saved_but_not_evaluated(run, state.epoch, state.step):
        utils.print_once(f"Evaluating epoch {state.epoch} first: the run stopped after saving it, before its "
                         f"evaluation ended")
        metrics, out_of_patience = evaluate_and_check_patience(run, data, state, state.epoch, best, stop,
                                                               evaluations)
        if out_of_patience:
            start_epoch = args.epochs  # as the uninterrupted run would have stopped here
    saved_at = None  # where checkpoint.pth resumes, once this run has written it
    for epoch in range(start_epoch, args.epochs):
        data.train_set.epoch = epoch
        data.train_loader.batch_sampler.set_epoch(epoch, start_step)
        result = train_one_epoch(model, state.optimizer, data.train_loader, run.device, epoch, options, start_step)
        state.global_step = data.train_loader.batch_sampler.global_step(epoch, result.steps_done)
        if result.failure.error is not None:
            stop_on_data_failure(run, state, epoch, result, start_step)
        start_step = 0
        if not result.finished:
            state.epoch, state.step = epoch, result.steps_done
            stop_mid_epoch(run, state, stop, saved_here=(epoch, result.steps_done) == saved_at)
        save_epoch(run, state, epoch)
        saved_at = (epoch + 1, 0)
        # Agreed, as the steps' stops are: rank 0 is still writing the checkpoint when the others get here.
        if stop.agreed():
            utils.print_once(f"Stopped by {stop.signal_name} after epoch {epoch}; --resume auto continues.")
            exit_stopped(stop)
        if not evaluation_due(args, epoch):
            continue
        metrics, out_of_patience = evaluate_and_check_patience(run, data, state, epoch, best, stop, evaluations)
        if out_of_patience:
            break
    run.writers.close()
    utils.print_once(f"Training time {duration(time.time() - started)}")
    return metrics


def evaluate_and_check_patience(run: Run, data: Data, state: TrainingState, epoch: int, best: BestModel,
                                stop: StopRequest, evaluations: EvaluationTimes) -> tuple[dict, bool]:
    """The epoch's evaluation, timed for the run's ETA, and whether --patience has run out (the checkpoint is
    then marked as stopped early)."""
    with evaluations.timed():
        metrics = evaluate_or_stop(run, data, state, epoch, best, stop)
    if best.out_of_patience(run.args.patience):
        stop_early(run, state, best)
        return metrics, True
    return metrics, False


def evaluate_or_stop(run: Run, data: Data, state: TrainingState, epoch: int, best: BestModel,
                     stop: StopRequest) -> dict:
    """evaluate_epoch, with the random state kept (a resumed run's next epoch draws what this one's would); a
    stop signal during it exits at once: the epoch's checkpoint is saved, and --resume auto evaluates it first."""
    try:
        with utils.random_state_kept(run.device):
            return evaluate_epoch(run, data, state, epoch, best, stop.requested)
    except EvaluationStopped:
        stop.agreed()  # every rank takes the signal's name, as after a step
        utils.print_once(f"Stopped by {stop.signal_name} during epoch {epoch}'s evaluation; its checkpoint is "
                         f"saved, and --resume auto evaluates it first.")
        exit_stopped(stop)


def plain(value: object) -> object:
    """A value as JSON holds it: as it is, or (a device, a path, an infinite float) as text."""
    if isinstance(value, list):
        return [plain(item) for item in value]
    fits = value is None or isinstance(value, (bool, int, str)) or isinstance(value, float) and math.isfinite(value)
    return value if fits else str(value)


def write_arguments(output_dir: Path, args: argparse.Namespace, resumed_here: bool) -> None:
    """args.json: the command line, arguments and software of the latest start of training in the folder (a
    resumed run's too, with its flags), as a config file to read or run again; for a run resumed from the
    folder's own checkpoint, the starts before it follow under earlier_starts."""
    path = output_dir / "args.json"
    start = {"command": shlex.join(sys.argv), "args": {name: plain(value) for name, value in vars(args).items()},
             "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
             "software": software(), "working_directory": os.getcwd()}
    write_json_atomic(path, {**start, "earlier_starts": earlier_starts(path) if resumed_here else []},
                      RUN_OUTPUT_REMEDY)


@contextmanager
def outcome_recorded(path: Path | None, state: TrainingState) -> Iterator[None]:
    """Training, after which args.json's start (at path; None on other ranks) says when and how it ended: a
    folder tells a finished run from one stopped, failed or still going (no "ended": running, or killed)."""
    try:
        yield
    except BaseException as e:
        if path is not None:
            record_outcome(path, outcome_of(e))
        raise
    if path is not None:
        record_outcome(path, "stopped early (--patience)" if state.stopped_early else "finished")


def outcome_of(error: BaseException) -> str:
    """How an exception ended training, in words."""
    if isinstance(error, SystemExit):  # every rank agreed to stop at a signal, after saving where they stood
        return f"stopped by a signal (exit status {error.code}); --resume auto continues"
    if isinstance(error, KeyboardInterrupt):
        return f"interrupted by {'SIGTERM' if isinstance(error, Terminated) else 'Ctrl-C'}"
    if isinstance(error, UserError):
        return f"error: {message_of(error)}"
    if utils.get_world_size() > 1 and utils.lost_peer(error):  # said at length on the console
        return "error: another process of the job stopped answering or ended; --resume auto continues"
    return f"failed: {type(error).__name__}: {str(error)[:300]}"


def record_outcome(path: Path, outcome: str) -> None:
    """Add the end's time and outcome to args.json; a failed write is said, and changes nothing else."""
    try:
        recorded = json.loads(path.read_text())
        ended = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        write_json_atomic(path, {**recorded, "ended": ended, "outcome": outcome}, RUN_OUTPUT_REMEDY)
    except (OSError, ValueError, UserError) as e:
        print(f"warning: how the run ended was not recorded in {path} ({e})", file=sys.stderr)


def earlier_starts(path: Path) -> list[dict]:
    """The starts an args.json records, its own last (none where it is missing or not one of ours)."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(earlier, dict):
        return []
    before = earlier.pop("earlier_starts", None)
    return (before if isinstance(before, list) else []) + [earlier]


def software() -> dict:
    """The versions that ran: Python, torch, torchvision, and this project's git commit (with whether files it
    tracks were changed) where it is a git checkout."""
    found = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__}
    here = Path(__file__).resolve().parent

    def git(*command: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(here), *command], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit:
        found["git_commit"] = commit
        changes = git("status", "--porcelain", "--untracked-files=no")
        found["git_changed_files"] = None if changes is None else bool(changes)
    return found


class EvaluationTimes:
    """For the run's ETA: each evaluation still due is expected to take as long as the last one this process
    timed (none before the first: the ETA is then of training alone)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.seconds: float | None = None

    @contextmanager
    def timed(self) -> Iterator[None]:
        started = time.time()
        yield
        self.seconds = time.time() - started

    def expected_after(self, epoch: int) -> float:
        """The seconds of the evaluations due from the end of epoch's training to the run's end."""
        due = sum(evaluation_due(self.args, e) for e in range(epoch, self.args.epochs))
        return (self.seconds or 0.0) * due


def evaluation_due(args: argparse.Namespace, epoch: int) -> bool:
    """Whether the epoch ends with an evaluation: every --eval-interval-th does, and the last."""
    return (epoch + 1) % args.eval_interval == 0 or epoch + 1 >= args.epochs


def saved_but_not_evaluated(run: Run, epoch: int, step: int | None) -> bool:
    """Whether the resumed checkpoint ended an epoch due for evaluation that this folder's metrics show trained
    but not evaluated (a stop between the two; a checkpoint brought from elsewhere has no such record), decided
    on rank 0 for all."""
    if epoch < 0 or step is not None or not evaluation_due(run.args, epoch):
        return False
    epochs = {kind: {r["epoch"] for r in run.writers.records(kind)} for kind in ("train", "eval")}
    return utils.any_rank(run.is_main and epoch in epochs["train"] and epoch not in epochs["eval"])


def moving_average_updates(state: TrainingState, every: int) -> Callable[[int], None] | None:
    """What runs after each optimizer step: the moving average's update every `every` steps of the run, across
    epochs (None without one)."""
    if state.ema is None:
        return None

    def after_step(step: int) -> None:
        if step % every == 0:
            state.ema.update(state.model)

    return after_step


def main(args: argparse.Namespace) -> dict:
    """The recipe: set up, read the checkpoint to resume (a run it finished ends here), read the data, build the
    model and its training state, restore the checkpoint into them, then evaluate only or train."""
    run = start_run(args)
    checkpoint, resume = read_resume_checkpoint(args)
    of_another_folder = (checkpoint is not None and not args.test_only
                         and from_another_run(resume, checkpoint, run.output_dir))
    if checkpoint is not None:
        check_same_model(args, checkpoint, resume)
    if checkpoint is not None and not args.test_only:  # before anything of the folder's run is cut back
        if checkpoint.get("stopped_early"):
            return already_stopped(resume, checkpoint)
        if nothing_left_to_train(run, checkpoint, of_another_folder):
            return already_finished(resume, checkpoint, args.epochs)
    data = load_data(args, checkpoint)
    check_same_data(args, data)
    start_reusing_freed_memory(args)
    num_classes = class_count(args, data, checkpoint)
    model = wrap_for_devices(run, create_model(args, num_classes, checkpoint))
    bare_model = getattr(model, "module", model)  # without DDP's wrapper
    note_crowded_images(data.val_set, detections_per_image(bare_model), args.eval_max_dets)
    state = create_training_state(run, bare_model, data, num_classes, checkpoint)
    if checkpoint is not None:
        restore(run, state, checkpoint, resume, data, continues_folder=not of_another_folder)
    if args.test_only:
        return evaluate_only(run, data, state, checkpoint, resume)
    # Once the run is set up, so that one that fails moves nothing aside.
    if (checkpoint is None or of_another_folder) and run.is_main:
        keep_previous_outputs(run.output_dir)
    if run.is_main:
        write_arguments(run.output_dir, args, resumed_here=checkpoint is not None and not of_another_folder)
    with outcome_recorded(run.output_dir / "args.json" if run.is_main else None, state):
        return train(run, data, model, state)


def run(argv: list[str] | None = None) -> int:
    """Entry point: bad input becomes one line on stderr and exit status 2, not a traceback (--debug shows
    it), and so does a Ctrl-C that stops at once (exit status 130); a process of a distributed job that loses
    its peers says which in one line."""
    args = get_args_parser().parse_args(argv)
    try:
        return exit_status(lambda: run_and_leave(args), interrupted_message(args), args.debug,
                           keep_default_sigterm=utils.launched_as() is not None)
    except RuntimeError as e:  # torch.distributed.DistError is one
        explanation = utils.explain_lost_peer(e, args.dist_timeout)
        if explanation is None or args.debug:
            raise
        print(f"error: {explanation}", file=sys.stderr, flush=True)
        return 1


def run_and_leave(args: argparse.Namespace) -> None:
    """main, after the version check; a run that ends well leaves its process group with the others."""
    utils.check_versions()
    main(args)
    utils.leave_process_group()


def interrupted_message(args: argparse.Namespace) -> str:
    """What a Ctrl-C that stops at once (during set-up, during --test-only, or a second one) leaves behind."""
    if args.test_only:
        return "the evaluation did not end, and no predictions were written"
    return ("stopped at once; every file written before is whole, and --resume auto continues from the last "
            "checkpoint, if one was written")


if __name__ == "__main__":
    sys.exit(run())

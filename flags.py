"""train.py's command line: its flags, in the groups --help shows, and the checks that refuse values which would
fail later or silently do the wrong thing."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

import presets
import speedups
import utils
from coco_eval import COCO_MAX_DETECTIONS, COCOEVAL_BACKENDS, metric_names
from coco_utils import DATASET_LAYOUTS, MIN_KEYPOINTS_PER_IMAGE, add_split_paths
from devices import AMP_DTYPES
from errors import UserError
from models import (
    MODELS,
    backbone_weights_class,
    check_size_order,
    check_weights_name_fits,
    default_backbone_weights,
    iou_types,
    model_options,
    resolve_weights,
)
from resume import continues_a_checkpoint

# The weight average's settings when --model-ema is given without them (torchvision's reference's values).
EMA_DEFAULTS = {"model_ema_decay": 0.9998, "model_ema_steps": 1}
# SGD's momentum when --momentum is not given (the reference's default; recorded so with AdamW too, as there).
SGD_MOMENTUM = 0.9


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line that points at --help, like every other input error."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def make_parser(description: str, add_help: bool = True) -> argparse.ArgumentParser:
    """The command line: torchvision's reference's flags and ours, in groups as --help shows them, under
    description (train.py's usage)."""
    parser = ArgumentParser(description=description, add_help=add_help,
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
    add("--box-score-thresh", default=None, type=float,
        help="detections scoring at or below this are left out in evaluation and in an export of the checkpoint "
             "(default: the model's: 0.05 for "
             "R-CNNs and RetinaNet, 0.2 FCOS, 0.01 SSD300, 0.001 SSDlite); lower it, with --detections-per-image "
             "300, for data of many rare categories, as LVIS's recipes evaluate at 0.0001")
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
    add("--momentum", default=None, type=float, help=f"SGD's momentum (default {SGD_MOMENTUM}); not for AdamW")
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
    add("--model-ema-decay", default=None, type=float,
        help=f"with --model-ema, the average's decay per update, ramped up over the first updates (default "
             f"{EMA_DEFAULTS['model_ema_decay']})")
    add("--model-ema-steps", default=None, type=int,
        help=f"with --model-ema, optimizer steps between updates of the average (default "
             f"{EMA_DEFAULTS['model_ema_steps']})")
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
    add("--eval-max-dets", default=None, type=int, metavar="N",
        help=f"the most detections of an image, per category, that the box and mask scores count (COCOeval's "
             f"maxDets, {COCO_MAX_DETECTIONS}, or with --resume the checkpoint's run's; keypoints keep their 20): "
             f"for images of more instances, with --detections-per-image at least N; AP and the last AR, named "
             f"AR<N>, then count N; for a validation file annotated as LVIS's, the most of an image over all "
             f"categories, as LVIS counts (300)")
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
             "segm/APs, or segm/APr for a validation file annotated as LVIS's (default: the primary AP: segm/AP "
             "for Mask R-CNN, keypoints/AP for Keypoint R-CNN, else bbox/AP)")
    add("--print-freq", default=20, type=int,
        help="print a progress line every this many optimizer steps (and evaluation batches)")
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
    add("--dist-timeout", default=utils.DIST_TIMEOUT, type=int,
        help="seconds a process waits for the others before failing")
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
    if args.eval_max_dets is not None and args.eval_max_dets <= 10:  # COCOeval's other recalls count 1 and 10
        raise UserError(f"--eval-max-dets {args.eval_max_dets} must be more than 10 (the scores count 1 and 10 "
                        f"detections for AR1 and AR10)")
    check_size_order(args.min_size, args.max_size)


def check_rates(args: argparse.Namespace) -> None:
    """Reject negative rates, limits at or below 0 and shares outside 0..1."""
    for flag, value in (("lr", args.lr), ("momentum", args.momentum), ("wd", args.weight_decay),
                        ("norm-weight-decay", args.norm_weight_decay), ("lr-gamma", args.lr_gamma)):
        if value is not None and not 0 <= value < math.inf:  # torch refuses most, after the data has loaded
            raise UserError(f"--{flag} {value} must be finite, 0 or more")
    if args.momentum is not None and not args.momentum < 1:  # an average that never forgets: steps grow unbounded
        raise UserError(f"--momentum {args.momentum} must be below 1 ({SGD_MOMENTUM} is usual)")
    for flag in ("clip_grad_norm", "dist_timeout", "repeat_factor_threshold"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            raise UserError(f"--{flag.replace('_', '-')} {value} must be above 0")
    if args.aspect_ratio_group_factor < -1:
        raise UserError(f"--aspect-ratio-group-factor {args.aspect_ratio_group_factor} must be -1 (no grouping) or "
                        f"0 or more")
    for flag, low, high in (("max_bad_samples", 0, 1), ("model_ema_decay", 0, 1), ("repeat_factor_threshold", 0, 1),
                            ("rpn_score_thresh", 0, 1), ("box_score_thresh", 0, 1)):
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
    if args.lr_step_size is not None and args.lr_steps is None and args.lr_step_size >= args.epochs \
            and args.lr_scheduler == "multisteplr" and not args.test_only:
        print(f"warning: --lr-step-size {args.lr_step_size} not below --epochs {args.epochs}: the learning rate "
              f"never steps", file=sys.stderr)


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


def check_momentum(args: argparse.Namespace) -> None:
    """--momentum is SGD's: refused with AdamW, SGD_MOMENTUM where not given, above 0 for Nesterov's."""
    if args.opt == "adamw" and args.momentum is not None:
        raise UserError(f"--momentum {args.momentum:g} is SGD's, and --opt adamw takes none (its averages are "
                        f"torch's betas); leave --momentum out, or use --opt sgd")
    if args.momentum is None:
        args.momentum = SGD_MOMENTUM
    if args.opt == "sgd_nesterov" and args.momentum <= 0:
        raise UserError(f"--opt sgd_nesterov needs momentum, and --momentum is {args.momentum:g}; give a positive "
                        f"--momentum or --opt sgd")


def check_training_combinations(args: argparse.Namespace) -> None:
    """Reject training flags that do not go together; SGD's momentum and the weight average's settings left out
    take their defaults (SGD_MOMENTUM, EMA_DEFAULTS) once it is known they may be given."""
    if args.amp_dtype is not None and not args.amp:
        raise UserError(f"--amp-dtype {args.amp_dtype} picks --amp's precision; add --amp, or leave --amp-dtype out")
    if args.lr_scheduler == "cosineannealinglr" and (args.lr_steps is not None or args.lr_step_size is not None):
        flag = "--lr-steps" if args.lr_steps is not None else "--lr-step-size"
        raise UserError(f"{flag} sets multisteplr's steps, and --lr-scheduler cosineannealinglr falls smoothly over "
                        f"--epochs; leave {flag} out, or use --lr-scheduler multisteplr")
    check_momentum(args)
    for flag, default in EMA_DEFAULTS.items():
        if getattr(args, flag) is not None and not args.model_ema:
            raise UserError(f"--{flag.replace('_', '-')} tunes the average that --model-ema keeps; add --model-ema, "
                            f"or leave --{flag.replace('_', '-')} out")
        if getattr(args, flag) is None:
            setattr(args, flag, default)
    if args.model_ema_eval != "both" and not args.model_ema:
        raise UserError(f"--model-ema-eval {args.model_ema_eval} chooses among the weights --model-ema keeps; add "
                        f"--model-ema, or leave --model-ema-eval out")
    if args.cudnn_benchmark and args.use_deterministic_algorithms:
        raise UserError("--cudnn-benchmark picks kernels by timing them, which --use-deterministic-algorithms "
                        "rules out; give one of the two")
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
    check_trainable_stages(args)
    builder_options(args)  # the model flags' mistakes that need no data, said before it is read
    if args.weights:
        check_weights_name_fits(args.model, args.weights)
    if continues_a_checkpoint(args):  # then neither file is read: the checkpoint holds every weight
        return
    if args.weights:
        resolve_weights(args.weights, "--weights")
    elif args.weights_backbone:
        resolve_weights(args.weights_backbone, "--weights-backbone", backbone_weights_class(args.model))


def check_trainable_stages(args: argparse.Namespace) -> None:
    """--trainable-backbone-layers within the backbone's stages (torchvision's builders check it only after the
    data has loaded): 6 for MobileNet, 5 for ResNet and VGG."""
    given = args.trainable_backbone_layers
    stages = 6 if backbone_weights_class(args.model).__name__.startswith("MobileNet") else 5
    if given is not None and not 0 <= given <= stages:
        raise UserError(f"--trainable-backbone-layers {given} must be from 0 to {stages}, the backbone stages of "
                        f"--model {args.model}")


def builder_options(args: argparse.Namespace) -> dict:
    """The model flags given, as the builder's keyword arguments; one the model does not take is an error."""
    return model_options(args.model, min_size=args.min_size, max_size=args.max_size,
                         box_batch_size_per_image=args.rois_per_image, rpn_score_thresh=args.rpn_score_thresh,
                         detections_per_image=args.detections_per_image, box_score_thresh=args.box_score_thresh)


def best_metric(args: argparse.Namespace) -> tuple[str, str]:
    """The (IoU type, metric name) model_best.pth and --patience go by: --best-metric's, else the primary AP
    (masks' or keypoints', or boxes' for models that give neither); refused when the model gives no such one."""
    types = iou_types(args.model)
    if args.best_metric is None:
        return next(kind for kind in ("segm", "keypoints", "bbox") if kind in types), "AP"
    kind, _, name = args.best_metric.partition("/")
    # None: --resume's checkpoint decides it, once read (and this is asked again)
    most = COCO_MAX_DETECTIONS if args.eval_max_dets is None else args.eval_max_dets
    # LVIS's names too: whether the validation file is scored as LVIS's is known once it is read
    known = {*metric_names(kind, most), *metric_names(kind, most, federated=True)}
    if kind not in types or name not in known:
        if kind in ("bbox", "segm") and re.fullmatch(r"AR[1-9][0-9]*", name) and int(name[2:]) > 10:
            if args.eval_max_dets is None and continues_a_checkpoint(args):
                return kind, name
            raise UserError(f"--best-metric {args.best_metric} is the recall of a run scored with --eval-max-dets "
                            f"{name[2:]}, and this one scores up to {most} (AR{most}); give --eval-max-dets "
                            f"{name[2:]} too, or --best-metric {kind}/AR{most}")
        choices = ", ".join(f"{t}/{n}" for t in types for n in metric_names(t, most))
        raise UserError(f"--best-metric {args.best_metric} is no metric of {args.model}'s evaluation; choose one "
                        f"of {choices}")
    return kind, name

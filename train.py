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
import sys
import time
from pathlib import Path

import torch
import torch.utils.data

import presets
import utils
from checkpoint import (
    load_file,
    prune_epoch_files,
    remove_stale_temporaries,
    restore_rng,
    rng_state,
    save_atomic,
    save_checkpoint,
)
from coco_eval import BACKENDS, CocoEvaluator
from coco_utils import (
    DATASET_LAYOUTS,
    CategoryMap,
    FaultLog,
    SampleError,
    build_dataset,
    coco_keypoint_names,
    flip_order,
)
from dataset_check import check_before_training
from engine import TrainOptions, autocast, evaluate, to_device, train_one_epoch
from group_by_aspect_ratio import GroupedBatchSampler, ResumableBatchSampler, create_aspect_ratio_groups
from inference import inference_copy
from metrics import MetricsWriter
from models import MODELS, build_from_checkpoint, build_model, default_backbone_weights, iou_types, model_options
from preemption import StopRequest, ignore_stop_signals
from shape_buckets import pad_to_shape_buckets
from utils import UserError
from visualize import plot_curves, save_jpeg, side_by_side


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line that points at --help, like every other input error."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, add_help=add_help,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data-path", default="./datasets/coco", help="dataset root with annotations/, train2017/, val2017/")
    add("--dataset", default="coco", choices=sorted(DATASET_LAYOUTS), help="dataset layout")
    add("--model", default="maskrcnn_resnet50_fpn", choices=MODELS, metavar="MODEL",
        help=f"torchvision detection model: {', '.join(MODELS)}")
    add("--device", default="cuda", help="cuda or cpu; without CUDA the run falls back to the CPU")
    add("-b", "--batch-size", default=2, type=int, help="images per device; total = batch size x processes")
    add("--epochs", default=26, type=int, help="number of epochs to run")
    add("-j", "--workers", default=4, type=int, help="data loading worker processes per device")
    add("--opt", default="sgd", choices=("sgd", "adamw"), help="optimizer")
    add("--lr", default=0.02, type=float,
        help="learning rate: 0.02 suits 8 devices x 2 images; scale linearly with the total batch")
    add("--momentum", default=0.9, type=float, help="SGD momentum")
    add("--wd", "--weight-decay", default=1e-4, type=float, dest="weight_decay", help="weight decay")
    add("--norm-weight-decay", default=None, type=float,
        help="weight decay for normalization layers (default: same as --wd)")
    add("--clip-grad-norm", default=None, type=float,
        help="clip the gradient norm to this (default: no clipping); steadies training from scratch")
    add("--lr-scheduler", default="multisteplr", choices=("multisteplr", "cosineannealinglr"),
        help="how the learning rate falls over epochs")
    add("--lr-step-size", default=None, type=int,
        help="multisteplr: divide the lr every this many epochs (used when --lr-steps is not given)")
    add("--lr-steps", default=None, nargs="+", type=int,
        help="multisteplr: epochs at which the lr is multiplied by --lr-gamma (default: 16 22)")
    add("--lr-gamma", default=0.1, type=float, help="multisteplr: factor at each step")
    add("--print-freq", default=20, type=int, help="print a progress line every this many iterations")
    add("--output-dir", default=".", help="where checkpoints and predictions go")
    add("--resume", default="", help="checkpoint to resume from, or 'auto' for --output-dir/checkpoint.pth")
    add("--start-epoch", "--start_epoch", default=0, type=int, dest="start_epoch", help="first epoch number")
    add("--aspect-ratio-group-factor", default=3, type=int,
        help="batch images of similar aspect ratio in 2k+2 groups; -1 turns grouping off")
    add("--rpn-score-thresh", default=None, type=float, help="RPN score threshold at inference")
    add("--trainable-backbone-layers", default=None, type=int,
        help="backbone stages to train with pretrained weights (0-5 for ResNet and VGG, 0-6 for MobileNet; "
             "default: 3)")
    add("--data-augmentation", default="hflip", choices=presets.TRAIN_AUGMENTATIONS,
        help="training augmentation policy: hflip, lsj (large-scale jitter to 1024x1024), multiscale (short side "
             "480-800), ssd or ssdlite (photometric distortion, zoom out, IoU crop)")
    add("--use-copypaste", action="store_true",
        help="Simple Copy-Paste between the images of a batch (needs --data-augmentation lsj and masks)")
    add("--use-v2", action="store_true", help="augment with torchvision.transforms.v2 and tv_tensors")
    add("--backend", default="tensor", type=str.lower, choices=presets.BACKENDS,
        help="image type the augmentation works on: tensor (fastest here), pil, or tv_tensor (with --use-v2)")
    add("--sync-bn", action="store_true", help="synchronise batch norm statistics across processes")
    add("--test-only", action="store_true", help="evaluate only (with --resume or --weights)")
    add("--use-deterministic-algorithms", action="store_true", help="only deterministic kernels")
    add("--world-size", default=1, type=int, help="number of processes (set by the launcher)")
    add("--dist-url", default="env://", help="how processes find each other")
    add("--dist-backend", default=None, choices=("nccl", "gloo"), help="default: nccl on CUDA, gloo on CPU")
    add("--dist-timeout", default=300, type=int, help="seconds a process waits for the others before failing")
    add("--local-rank", "--local_rank", default=None, type=int, dest="local_rank",
        help="set by torch.distributed.launch without --use_env")
    add("--weights", default=None,
        help="whole-model weights: a torchvision name (MaskRCNN_ResNet50_FPN_Weights.COCO_V1) or a .pth path")
    add("--weights-backbone", default="default",
        help="backbone weights: a torchvision name read from the torch hub cache, a .pth path, or none; default: "
             "the ImageNet weights torchvision's recipe uses for the model (ResNet50_Weights.IMAGENET1K_V1, "
             "MobileNet_V3_Large_Weights.IMAGENET1K_V1, VGG16_Weights.IMAGENET1K_FEATURES)")
    add("--amp", action="store_true", help="mixed precision (autocast; a gradient scaler for float16)")
    add("--amp-dtype", default=None, choices=sorted(utils.AMP_DTYPES),
        help="autocast type with --amp (default: float16 on CUDA, bfloat16 on CPU); bfloat16 needs no "
             "scaler and is the better choice on Ampere and Hopper GPUs")
    add("--seed", default=0, type=int, help="seed for weights, sampling order and augmentation")
    add("--min-size", default=None, type=int,
        help="the model resizes each image's short side to this (default: the model's, 800 for R-CNNs)")
    add("--max-size", default=None, type=int, help="... keeping its long side at most this (default: 1333)")
    add("--rois-per-image", default=None, type=int,
        help="R-CNNs: region proposals sampled per image to train the box and mask heads (default: 512); "
             "fewer make steps much cheaper when images hold few objects")
    add("--num-classes", default=None, type=int,
        help="classes including background (default: 91 for COCO's own categories, else categories + 1)")
    add("--no-tensorboard", action="store_true", help="write no TensorBoard event files")
    add("--vis-images", default=4, type=int,
        help="validation images drawn with their predictions after each evaluation (0: none)")
    add("--keep-last", default=None, type=int,
        help="keep only the newest K model_{epoch}.pth files (model_best.pth and checkpoint.pth stay)")
    add("--eval-batch-size", default=1, type=int,
        help="images per device at evaluation (1 gives torchvision's exact numbers; more is faster on GPUs)")
    add("--coco-backend", default="auto", choices=BACKENDS,
        help="COCOeval implementation: faster-coco-eval's C++ one when installed (auto), or pycocotools'")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=None,
        help="channels-last memory format for the convolutions (default: on for CPUs, where training steps were "
             "7-20%% and evaluation 12-23%% faster with it in our runs at 320-1333 px; off for GPUs)")
    add("--shape-buckets", action=argparse.BooleanOptionalAction, default=None,
        help="pad training batches to a few shapes and head regions to multiples of 32, so that cuDNN reuses its "
             "plans (default: on for GPUs, where a new batch shape cost about 300 ms a training step in our runs; "
             "off for CPUs, where it made steps 3-6%% slower)")
    add("--cudnn-benchmark", action="store_true",
        help="let cuDNN time its kernels for each new input shape: for fixed-size inputs (SSD); R-CNN heads "
             "change shape every step, which makes it much slower")
    add("--max-bad-samples", default=0.01, type=float,
        help="share of an epoch's images that may be unreadable (skipped) before the run stops")
    add("--skip-data-check", action="store_true", help="start without looking up every image file first")
    add("--debug", action="store_true", help="show the traceback of input errors")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Reject values that would fail later, or silently do the wrong thing."""
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} must be at least 1")
    if args.workers < 0:
        raise UserError(f"--workers {args.workers} must be 0 or more")
    if args.epochs < 1 and not args.test_only:
        raise UserError(f"--epochs {args.epochs} must be at least 1")
    if args.lr_steps is not None and any(b <= a for a, b in zip(args.lr_steps, args.lr_steps[1:])):
        raise UserError(f"--lr-steps {' '.join(map(str, args.lr_steps))} must be increasing")
    if args.lr_step_size is not None and args.lr_step_size < 1:
        raise UserError(f"--lr-step-size {args.lr_step_size} must be at least 1")
    if args.lr_steps is not None and args.lr_steps[-1] >= args.epochs and not args.test_only:
        print(f"warning: --lr-steps {args.lr_steps[-1]} is not before --epochs {args.epochs}; that step never "
              f"happens", file=sys.stderr)
    if not 0 <= args.max_bad_samples <= 1:
        raise UserError(f"--max-bad-samples {args.max_bad_samples} must be a share between 0 and 1")
    if args.rois_per_image is not None and args.rois_per_image < 1:
        raise UserError(f"--rois-per-image {args.rois_per_image} must be at least 1")
    if args.eval_batch_size < 1:
        raise UserError(f"--eval-batch-size {args.eval_batch_size} must be at least 1")
    if args.backend == "tv_tensor" and not args.use_v2:
        raise UserError("--backend tv_tensor works with torchvision.transforms.v2 only; add --use-v2")
    if args.use_copypaste and (args.data_augmentation != "lsj" or "segm" not in iou_types(args.model)):
        raise UserError("--use-copypaste pastes instances by their masks onto lsj's fixed-size images; use it "
                        "with --data-augmentation lsj and a maskrcnn model")
    if "keypoints" in iou_types(args.model) and args.dataset != "coco_kp":
        raise UserError(f"--model {args.model} learns keypoints; use --dataset coco_kp")
    if args.dataset == "coco_kp" and args.use_v2:
        raise UserError("--use-v2 cannot flip keypoints' left and right; leave --use-v2 out for coco_kp")
    if args.cudnn_benchmark and args.use_deterministic_algorithms:
        raise UserError("--cudnn-benchmark picks kernels by timing them, which --use-deterministic-algorithms "
                        "rules out; give one of the two")
    if args.print_freq < 1:
        raise UserError(f"--print-freq {args.print_freq} must be at least 1")
    if args.weights_backbone.lower() == "none":
        args.weights_backbone = None
    elif args.weights_backbone == "default":
        args.weights_backbone = default_backbone_weights(args.model)
    if args.trainable_backbone_layers is not None and args.weights is None and args.weights_backbone is None:
        raise UserError("--trainable-backbone-layers applies to pretrained weights; from scratch every backbone "
                        "stage trains, so leave it out or give --weights-backbone")


def pick_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        utils.print_once("CUDA is not available: running on the CPU")
        return torch.device("cpu")
    return torch.device(name)


def lr_milestones(args: argparse.Namespace) -> list[int]:
    if args.lr_steps is not None:
        return args.lr_steps
    if args.lr_step_size is not None:
        return list(range(args.lr_step_size, args.epochs, args.lr_step_size))
    return [16, 22]


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """SGD or AdamW; normalization layers get --norm-weight-decay when it is set."""
    norm_types = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm)
    norm_params, other_params = [], []
    for module in model.modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        (norm_params if isinstance(module, norm_types) else other_params).extend(params)
    if args.norm_weight_decay is None:
        groups = [{"params": other_params + norm_params, "weight_decay": args.weight_decay}]
    else:
        groups = [{"params": other_params, "weight_decay": args.weight_decay},
                  {"params": norm_params, "weight_decay": args.norm_weight_decay}]
    if args.opt == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)
    return torch.optim.AdamW(groups, lr=args.lr)


def make_loaders(args: argparse.Namespace, train_set, val_set) -> tuple:
    """Training loader (shuffled, shard per process, aspect-ratio batches) and evaluation loader."""
    world, rank = utils.get_world_size(), utils.get_rank()
    # Workers restart each epoch so that they see the dataset's epoch (augmentation seeds); they ignore stop
    # signals, which the main process handles; the loader's own generator leaves the global one to the model.
    loader_kwargs = {"num_workers": args.workers, "collate_fn": utils.collate_fn,
                     "pin_memory": args.device.type == "cuda", "worker_init_fn": ignore_stop_signals,
                     "generator": torch.Generator().manual_seed(args.seed)}
    train_loader = None
    if train_set is not None:
        sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=args.seed)
        if args.aspect_ratio_group_factor >= 0:
            groups = create_aspect_ratio_groups(train_set.aspect_ratios(), k=args.aspect_ratio_group_factor)
            batch_sampler = GroupedBatchSampler(sampler, groups, args.batch_size)
        else:
            batch_sampler = torch.utils.data.BatchSampler(sampler, args.batch_size, drop_last=True)
        if len(batch_sampler) == 0:
            raise UserError(f"--batch-size {args.batch_size} x {world} processes is more than the "
                            f"{len(train_set)} training images; lower --batch-size")
        batch_sampler = ResumableBatchSampler(batch_sampler)
        collate = presets.CopyPasteCollate(train_set) if args.use_copypaste else utils.collate_fn
        train_loader = torch.utils.data.DataLoader(train_set, batch_sampler=batch_sampler,
                                                   **{**loader_kwargs, "collate_fn": collate})
    val_sampler = torch.utils.data.DistributedSampler(val_set, num_replicas=world, rank=rank, shuffle=False)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.eval_batch_size, sampler=val_sampler,
                                             **loader_kwargs)
    return train_loader, val_loader


def primary_ap(metrics: dict) -> float:
    """What model_best.pth is chosen by: mask or keypoint AP, or box AP for models that give neither."""
    return next(metrics[kind]["AP"] for kind in ("segm", "keypoints", "bbox") if kind in metrics)


def prediction_pictures(model, dataset, indices: list[int], device: torch.device,
                        amp_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Ground truth beside prediction for the given samples of dataset, by image id."""
    model.eval()
    pictures = {}
    with torch.inference_mode():
        for index in indices:
            image_id = dataset.ids[index]
            try:
                image, target = dataset.load_image(image_id), dataset.load_target(image_id, [])
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
    return str(path) if path.is_file() else ""


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by this script, checked to hold what resuming reads."""
    checkpoint = load_file(path, "--resume")
    if not isinstance(checkpoint, dict):
        checkpoint = {}
    missing = [k for k in ("model", "epoch", "categories", "num_classes") if k not in checkpoint]
    if missing:
        raise UserError(f"--resume {path} is not a checkpoint of this script (no '{missing[0]}'); for plain "
                        f"model weights use --weights")
    return checkpoint


def prepare_output_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--output-dir {out} is not writable ({e.strerror}); choose a folder you can write to"
                        ) from None


def main(args: argparse.Namespace) -> dict:
    check_args(args)
    args.device = pick_device(args.device)
    utils.init_distributed_mode(args)
    if args.distributed and args.device.type == "cuda":
        args.device = torch.device("cuda", args.gpu)
    device = args.device
    utils.print_once(args)
    output_dir = Path(args.output_dir)
    if utils.is_main_process():
        prepare_output_dir(output_dir)
        remove_stale_temporaries(output_dir)
    metrics_log = MetricsWriter(output_dir, enabled=utils.is_main_process(), tensorboard=not args.no_tensorboard)

    utils.seed_everything(args.seed)
    if args.use_deterministic_algorithms:
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark

    amp_dtype = utils.amp_dtype(args.amp_dtype, device) if args.amp else None

    # What the model was trained on travels with the checkpoint; a fresh run reads it from the train file.
    resume = resolve_resume(args)
    checkpoint = load_checkpoint(resume) if resume else None
    category_map = None
    if checkpoint is not None:
        category_map = CategoryMap.from_categories(checkpoint["categories"], args.dataset)

    utils.print_once("Loading data")
    train_set = None
    if not args.test_only:
        keypoint_flip = flip_order(coco_keypoint_names()) if args.dataset == "coco_kp" else None
        augmentation = presets.DetectionPresetTrain(args.data_augmentation, backend=args.backend,
                                                    use_v2=args.use_v2, keypoint_flip=keypoint_flip)
        # Decoding masks is most of a sample's loading; only models that learn masks need them.
        train_set = build_dataset(args.data_path, args.dataset, "train", augmentation, category_map, args.seed,
                                  masks="segm" in iou_types(args.model))
        category_map = train_set.category_map
    val_set = build_dataset(args.data_path, args.dataset, "val", presets.DetectionPresetEval(), category_map)
    category_map = val_set.category_map
    if not args.skip_data_check:
        for split, ds in (("train", train_set), ("val", val_set)):
            if ds is not None:
                check_before_training(ds.image_dir, list(ds.coco.imgs.values()), split, args.max_bad_samples)
    train_loader, val_loader = make_loaders(args, train_set, val_set)

    num_classes = args.num_classes or (checkpoint["num_classes"] if checkpoint else category_map.num_classes)
    if num_classes < category_map.num_classes:
        raise UserError(f"--num-classes {num_classes} is too small: the categories need "
                        f"{category_map.num_classes} (largest label + 1, background included)")

    utils.print_once(f"Creating model {args.model} with {num_classes} classes")
    model_kwargs = model_options(args.model, min_size=args.min_size, max_size=args.max_size,
                                 box_batch_size_per_image=args.rois_per_image,
                                 rpn_score_thresh=args.rpn_score_thresh)
    if args.data_augmentation in presets.RESIZING_AUGMENTATIONS:
        model_kwargs["_skip_resize"] = True  # in training only: evaluation images are resized by the model
    if checkpoint is None:
        model = build_model(args.model, num_classes, args.weights, args.weights_backbone,
                            args.trainable_backbone_layers, **model_kwargs)
    else:  # no weights file is read: the checkpoint has them all
        if checkpoint["num_classes"] != num_classes:
            raise UserError(f"--num-classes {num_classes} differs from the {checkpoint['num_classes']} classes "
                            f"of --resume {resume}; leave --num-classes out to resume")
        model = build_from_checkpoint({**checkpoint, "args": {**checkpoint["args"], "model": args.model}},
                                      f"--resume {resume}", **model_kwargs)
    model.to(device)
    channels_last = utils.use_channels_last(args.channels_last, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if utils.use_shape_buckets(args.shape_buckets, device):
        pad_to_shape_buckets(model)
    if args.distributed and args.sync_bn:
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            utils.print_once("--sync-bn: torch synchronises batch norm on GPUs only; on the CPU each process "
                             "keeps its own statistics")
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None,
            broadcast_buffers=utils.buffers_change_in_training(model))
        model_without_ddp = model.module

    optimizer = make_optimizer(model_without_ddp, args)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    if args.lr_scheduler == "multisteplr":
        lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, lr_milestones(args), args.lr_gamma)
    else:
        lr_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)

    # A checkpoint saved at the end of epoch E resumes at E + 1; one saved on a stop signal part-way through
    # epoch E resumes at E, after the steps it had done.
    start_step = 0
    if checkpoint is not None:
        if not args.test_only:
            optimizer.load_state_dict(checkpoint["optimizer"])
            lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
            if scaler is not None and checkpoint.get("scaler"):
                scaler.load_state_dict(checkpoint["scaler"])
            if checkpoint.get("rng"):
                restore_rng(checkpoint["rng"])
            step = checkpoint.get("step")
            args.start_epoch, start_step = (checkpoint["epoch"] + 1, 0) if step is None else (checkpoint["epoch"],
                                                                                              step)
            steps_per_epoch = len(train_loader.batch_sampler.batch_sampler)
            metrics_log.truncate_after(checkpoint["epoch"], step,
                                       checkpoint["epoch"] * steps_per_epoch + (steps_per_epoch if step is None
                                                                                else step))
        where = f"epoch {checkpoint['epoch']}" + (f" step {checkpoint['step']}" if checkpoint.get("step") else "")
        utils.print_once(f"Resumed from {resume} ({where})")

    # Evaluation runs a folded copy of the model, unwrapped from DDP (whose forward would broadcast buffers).
    if args.test_only:
        evaluator = CocoEvaluator(val_set.coco, category_map, iou_types(args.model), args.coco_backend)
        metrics = evaluate(inference_copy(model_without_ddp, channels_last), val_loader, device, evaluator,
                           args.print_freq, amp_dtype)
        if utils.is_main_process():
            for path in evaluator.write_results(output_dir):
                print(f"Wrote {path}")
        return metrics

    stop = StopRequest().install()
    options = TrainOptions(print_freq=args.print_freq, epochs=args.epochs, scaler=scaler, amp_dtype=amp_dtype,
                           clip_grad_norm=args.clip_grad_norm, faults=FaultLog(args.max_bad_samples),
                           stop_requested=lambda: stop.requested, on_log=metrics_log.write)

    def training_state(epoch: int, step: int | None) -> dict:
        """Everything a run needs to continue; plain data that torch.load(weights_only=True) reads."""
        return {
            "model": model_without_ddp.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch,
            "step": step,
            "rng": rng_state(),
            "args": {k: str(v) if isinstance(v, torch.device) else v for k, v in vars(args).items()},
            "categories": category_map.as_list(),
            "num_classes": num_classes,
        }

    utils.print_once("Start training")
    start_time = time.time()
    steps_per_epoch = len(train_loader.batch_sampler.batch_sampler)
    best_ap = max((primary_ap(r) for r in metrics_log.records("eval")), default=None)
    vis_indices = list(range(min(args.vis_images, len(val_set))))
    metrics: dict = {}
    for epoch in range(args.start_epoch, args.epochs):
        train_set.epoch = epoch
        train_loader.batch_sampler.set_epoch(epoch, start_step)
        result = train_one_epoch(model, optimizer, train_loader, device, epoch, options, start_step)
        start_step = 0
        if not result.finished:
            if utils.is_main_process():
                path = save_checkpoint(training_state(epoch, result.steps_done), output_dir)
                print(f"Stopped by {stop.signal_name} at epoch {epoch} step {result.steps_done}; saved {path}. "
                      f"Run the same command with --resume auto to continue.", flush=True)
            sys.exit(stop.exit_code)
        lr_scheduler.step()
        state = training_state(epoch, None)
        if utils.is_main_process():
            save_checkpoint(state, output_dir, also_as=f"model_{epoch}.pth")
            if args.keep_last:
                prune_epoch_files(output_dir, args.keep_last)
        if stop.requested:
            utils.print_once(f"Stopped by {stop.signal_name} after epoch {epoch}; --resume auto continues.")
            sys.exit(stop.exit_code)

        evaluator = CocoEvaluator(val_set.coco, category_map, iou_types(args.model), args.coco_backend)
        eval_model = inference_copy(model_without_ddp, channels_last)
        metrics = evaluate(eval_model, val_loader, device, evaluator, args.print_freq, amp_dtype)
        pictures = (prediction_pictures(eval_model, val_set, vis_indices, device, amp_dtype)
                    if utils.is_main_process() else {})
        del eval_model  # its memory is free again before the next epoch trains
        if not utils.is_main_process():
            continue
        global_step = (epoch + 1) * steps_per_epoch
        evaluator.write_results(output_dir)
        metrics_log.write({"type": "eval", "epoch": epoch, "global_step": global_step,
                           "time": round(time.time(), 3), **metrics})
        if best_ap is None or primary_ap(metrics) > best_ap:
            best_ap = primary_ap(metrics)
            save_atomic(state, output_dir / "model_best.pth")
            print(f"New best AP {best_ap:.4f}: saved {output_dir / 'model_best.pth'}")
        plot_curves(metrics_log.records("train"), metrics_log.records("eval"), output_dir / "curves.png")
        for name, picture in pictures.items():
            save_jpeg(picture, output_dir / "predictions" / f"epoch_{epoch}" / f"{name}.jpg")
        metrics_log.add_pictures(pictures, global_step)

    metrics_log.close()
    total = datetime.timedelta(seconds=int(time.time() - start_time))
    utils.print_once(f"Training time {total}")
    return metrics


def run(argv: list[str] | None = None) -> int:
    """Entry point: bad input becomes one line on stderr and exit status 2, not a traceback (--debug shows
    it)."""
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run())

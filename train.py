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
import hashlib
import inspect
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.utils.data

import presets
import speedups
import utils
from agreement import check_same_data, check_same_flags, ids_digest
from annotations import scoring_digest
from checkpoint import (
    RUN_OUTPUT_REMEDY,
    TrainingState,
    check_continuable,
    prepare_output_dir,
    previous_runs_held,
    prune_epoch_files,
    save_atomic,
    save_checkpoint,
    set_aside_previous_run,
    write_json_atomic,
)
from coco_eval import (
    COCO_MAX_DETECTIONS,
    LVIS_MAX_DETECTIONS,
    CocoEvaluator,
    check_federated,
    metric_names,
    partly_federated_note,
    scored_as_lvis,
)
from coco_utils import (
    CategoryMap,
    CocoDetection,
    SampleError,
    scored_instances_per_image,
    split_paths,
)
from data import Data, load_data
from devices import amp_dtype, autocast, grad_scaler, pick_device
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
from errors import UserError, exit_status, message_of
from flags import best_metric, builder_options, check_args, make_parser
from freed_memory import NOT_KEPT_WARNING, reuse_freed_memory_checked, reuse_wanted
from metrics import Record, Writers, duration
from models import (
    build_model,
    check_weights_name_fits,
    detections_per_image,
    evaluation_settings,
    iou_types,
    layout_of,
    trained_pretrained,
)
from optimization import make_lr_scheduler, make_optimizer, scale_learning_rate
from preemption import StopRequest
from resume import (
    already_finished,
    already_stopped,
    check_same_batches,
    check_same_layout,
    check_same_model,
    check_same_scoring,
    epochs_trained,
    from_another_run,
    note_changed_settings,
    note_other_training_images,
    read_resume_checkpoint,
    take_saved_settings,
)
from run_record import outcome_recorded, write_arguments
from visualize import plot_curves, save_jpeg, side_by_side


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The command line (flags.py), with this file's usage at the top of --help."""
    return make_parser(__doc__, add_help)


MAX_PICTURE_NAME = 200  # bytes: file systems allow 255 for a name, and ".jpg" and a temporary's suffix follow
IOU_NAMES = {"segm": "mask", "keypoints": "keypoint", "bbox": "box"}  # as the README and the curves say them


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


def note_crowded_images(val_set: CocoDetection, kept: int, scored: int = COCO_MAX_DETECTIONS,
                        federated: bool = False) -> None:
    """Say where validation images hold more instances than the model keeps detections, or more of one category
    than the scoring counts (of all categories, for a file scored as LVIS's): those can only be missed, capping
    the scores below 1."""
    annotations = val_set.coco.dataset["annotations"]
    per_image = scored_instances_per_image(annotations)
    over_kept = {image: count for image, count in per_image.items() if count > kept}
    if federated:
        over_scored = {image: count for image, count in per_image.items() if count > scored}
    else:
        per_category = scored_instances_per_image(annotations, by_category=True)
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
        limit = ("instances than the {} detections an image LVIS's scoring counts" if federated
                 else "of one category than the {} per image and category COCO's scoring counts").format(scored)
        said.append(f"more {limit} (--eval-max-dets; the most: {count}, image {image})")
    images = f"{crowded} validation images hold" if crowded > 1 else "1 validation image holds"
    utils.print_once(f"note: {images} {' or '.join(said)}, so AP and AR stay below 1 on such images however good "
                     f"the model")


def note_scored_beyond_kept(kept: int, scored: int) -> None:
    """--eval-max-dets above the detections the model keeps: its recall (AR at that many) counts only those."""
    if scored > kept:
        utils.print_once(f"note: --eval-max-dets {scored} scores up to {scored} detections an image, and the model "
                         f"keeps {kept} (--detections-per-image), so AR{scored} counts {kept} at most; give "
                         f"--detections-per-image {scored} too")


def note_lvis_limits(args: argparse.Namespace, val_set: CocoDetection, kept: int) -> None:
    """A validation file scored as LVIS's evaluation scores it counts 300 detections an image: said where this run
    counts or keeps fewer, whose AP is then not comparable with LVIS's published ones."""
    scored = args.eval_max_dets
    if scored_as_lvis(val_set.coco, iou_types(args.model)) and min(kept, scored) < LVIS_MAX_DETECTIONS:
        utils.print_once(f"note: the validation file is annotated as LVIS's, and is scored as LVIS's evaluation "
                         f"scores it, which counts {LVIS_MAX_DETECTIONS} detections an image; this run keeps {kept} "
                         f"(--detections-per-image) and counts {scored} (--eval-max-dets): give both "
                         f"{LVIS_MAX_DETECTIONS} for AP comparable with LVIS's")


def check_scoring(args: argparse.Namespace, val_set: CocoDetection) -> None:
    """Before training, what the validation file's scoring needs: for a file annotated as LVIS's, its back end
    and the categories' frequency groups (coco_eval.check_federated); --best-metric among its metrics (LVIS's
    APr, APc, APf and no AR1 or AR10 for such a file, COCO's for any other)."""
    federated = scored_as_lvis(val_set.coco, iou_types(args.model))
    if federated:
        check_federated(val_set.coco, args.coco_backend)
    elif (note := partly_federated_note(val_set.coco)) is not None:  # the file check's finding, said here too
        utils.print_once(f"note: the validation file: {note}")
    kind, name = best_metric(args)
    names = metric_names(kind, args.eval_max_dets, federated and kind != "keypoints")
    if name not in names:
        scoring = "LVIS's, as the file is annotated as LVIS's" if federated else "COCO's"
        raise UserError(f"--best-metric {kind}/{name} is no metric of this validation file's scoring ({scoring}); "
                        f"choose one of {', '.join(f'{kind}/{n}' for n in names)}")
    if federated and name in ("APr", "APc", "APf"):
        group = {c["id"] for c in val_set.coco.dataset["categories"] if c["frequency"] == name[-1]}
        if not any(ann["category_id"] in group for ann in val_set.coco.dataset["annotations"]):
            raise UserError(f"--best-metric {kind}/{name}: no instance of the validation file is of a category of "
                            f"frequency {name[-1]!r}, so {name} is always -1 and never improves; choose another")


def create_model(args: argparse.Namespace, num_classes: int, checkpoint: dict | None,
                 categories: CategoryMap) -> torch.nn.Module:
    """torchvision's model, with its weights read from local files; for a checkpoint, laid out as its run was
    (the sizes and settings main took from it unless given) and not read from anywhere (the checkpoint has every
    weight)."""
    utils.print_once(f"Creating model {args.model} with {num_classes} classes")
    options = builder_options(args)
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
                               new_class_heads=not args.test_only, categories=categories, **options)
        except UserError as e:
            if not args.test_only:
                raise
            raise UserError(f"{e}. --test-only --weights takes weights trained for this dataset's categories "
                            f"({num_classes} classes with background); a checkpoint of train.py goes to --resume, "
                            f"which brings its own categories") from None
    saved = checkpoint["args"]
    if not args.test_only:
        check_same_layout(args, saved)
    args.pretrained_layout = trained_pretrained(saved)  # the run's layout, recorded again in this run's checkpoints
    args.trainable_backbone_layers = saved.get("trainable_backbone_layers")
    return build_model(args.model, num_classes, None, None, args.trainable_backbone_layers,
                       pretrained_layout=args.pretrained_layout, **options)


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
    ids = data.train_set.ids if data.train_set is not None else None
    return TrainingState(model, optimizer, make_lr_scheduler(optimizer, args), grad_scaler(run.device, run.amp_dtype),
                         args, data.category_map, num_classes, ema,
                         training_images=(len(ids), ids_digest(ids)) if ids is not None else None)


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
            note_other_training_images(checkpoint, state.training_images, resume)
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


def nothing_left_to_train(run: Run, checkpoint: dict, of_another_folder: bool) -> bool:
    """Whether the checkpoint's run has trained --epochs epochs already, and evaluated the last where it was due
    (as far as this folder's metrics say: for a checkpoint of another folder, nothing)."""
    return (epochs_trained(checkpoint) >= run.args.epochs
            and (of_another_folder or not saved_but_not_evaluated(run, checkpoint["epoch"], checkpoint.get("step"))))


def run_evaluation(run: Run, data: Data, model: torch.nn.Module, stop_requested: Callable[[], bool] | None = None
                   ) -> tuple[CocoEvaluator, dict, torch.nn.Module]:
    """COCO evaluation of the model's inference copy over every rank's share of the validation set; during
    training (stop_requested given), a stop signal ends it unfinished (EvaluationStopped)."""
    evaluator = CocoEvaluator(data.val_set.coco, iou_types(run.args.model), data.category_map,
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
    a checkpoint's), the validation files, and what decided the detections and scores besides the weights."""
    ann_file = split_paths(args.data_path, args.dataset, "val", args.val_images, args.val_annotations)[1]
    position = {"epoch": checkpoint.get("epoch"), "step": checkpoint.get("step")} if checkpoint else {}
    return {"time": round(time.time(), 3), "evaluated": str(Path(resume).resolve()) if resume else args.weights,
            "weights": "model_ema" if state.ema is not None else "model", **position,
            "val_annotations": str(ann_file.resolve()), "val_images": len(data.val_set),
            "settings": {**evaluation_settings(state.model), "eval_max_dets": args.eval_max_dets}}


def keep_previous_outputs(output_dir: Path) -> None:
    """A fresh run: what another training run wrote in the folder is moved aside, not continued or overwritten."""
    moved_to = set_aside_previous_run(output_dir)
    if moved_to is not None:
        runs, size = previous_runs_held(output_dir)
        print(f"{output_dir} held another run's outputs (checkpoints, metrics, events, best weights): moved to "
              f"{moved_to}; to continue that run instead, resume from the checkpoint there. {moved_to.parent} "
              f"holds {utils.counted(runs, 'run')} set aside ({size / 2**30:.1f} GB): delete those you no "
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
    run's evaluations of the same validation data, annotations.scoring_digest), and how many evaluations have passed
    without a better one."""

    def __init__(self, run: Run, validation: str) -> None:
        self.run, self.validation = run, validation
        self.kind, self.metric = best_metric(run.args)
        # records of the metric (an evaluation of an earlier version may lack one, such as LVIS's APr, or the
        # validation digest, which is then taken as this run's)
        scored = [r for r in run.writers.records("eval") if self.metric in r.get(self.kind, {})]
        records = [r for r in scored if r.get("validation", validation) == validation]
        if len(records) < len(scored):  # its APs measure another set: the best of them may never be beaten
            utils.print_once(f"note: {utils.counted(len(scored) - len(records), 'earlier evaluation')} of this run "
                             f"scored other validation data (images, instances or categories) than this run reads: "
                             f"model_best.pth and --patience leave them out"
                             + ("" if records else ", and the next evaluation's weights replace model_best.pth"))
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
              f"{utils.counted(self.since_best, 'evaluation')} without improvement{patience}")
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
    """An image id as a name of a file in its folder: an id that is a string may hold a '/' or be '..', or be
    longer than a file name may be; one changed so ends in a digest of the id, so that it names no other id's
    file ("a/b" and "a_b")."""
    name = re.sub(r"[/\\\x00]", "_", image_id)
    name = name if name.strip(".") else f"_{name}"
    if name == image_id and len(name.encode()) <= MAX_PICTURE_NAME:
        return name
    shortened = name.encode()[:MAX_PICTURE_NAME - 9].decode(errors="ignore")
    return f"{shortened}-{hashlib.sha256(image_id.encode()).hexdigest()[:8]}"


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
        about = {"seconds": round(time.perf_counter() - started, 3), "validation": best.validation}
        evaluator.write_results(run.output_dir)
        about["new_best"] = best.update(metrics, state, epoch)
        report_evaluation(run, data, eval_model, epoch, {**metrics, **raw}, at, about)
    return metrics


def stop_early(run: Run, state: TrainingState, best: BestModel) -> None:
    """--patience ran out: say so, and mark the checkpoint so that --resume auto knows."""
    utils.print_once(f"Stopping early: the {IOU_NAMES[best.kind]} {best.metric} has not improved on "
                     f"{best.best:.4f} for {utils.counted(run.args.patience, 'evaluation')} (--patience); "
                     f"model_best.pth holds the best weights")
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
    best, metrics = BestModel(run, scoring_digest(data.val_set.coco.dataset)), {}
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
        result = train_one_epoch(model, state.optimizer, data.train_loader, run.device, epoch, options=options,
                                 start_step=start_step, carried=state.epoch_so_far if start_step else None)
        state.global_step = data.train_loader.batch_sampler.global_step(epoch, result.steps_done)
        state.epoch_so_far = result.so_far
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
    # At the last epoch the run ends anyway: not stopped early, so that more --epochs can continue it
    if epoch < run.args.epochs - 1 and best.out_of_patience(run.args.patience):
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
    if checkpoint is not None:
        check_same_model(args, checkpoint, resume)
    take_saved_settings(args, checkpoint.get("args") if checkpoint is not None else None)
    of_another_folder = (checkpoint is not None and not args.test_only
                         and from_another_run(resume, checkpoint, run.output_dir))
    if checkpoint is not None and not args.test_only:  # before anything of the folder's run is cut back
        check_continuable(checkpoint, f"--resume {resume}")  # before "nothing left", whose advice it would undo
        if checkpoint.get("stopped_early"):
            return already_stopped(resume, checkpoint)
        if nothing_left_to_train(run, checkpoint, of_another_folder):
            return already_finished(resume, checkpoint, args.epochs)
    data = load_data(args, checkpoint)
    check_same_data(args, data)
    check_scoring(args, data.val_set)
    start_reusing_freed_memory(args)
    num_classes = class_count(args, data, checkpoint)
    model = wrap_for_devices(run, create_model(args, num_classes, checkpoint, data.category_map))
    bare_model = getattr(model, "module", model)  # without DDP's wrapper
    note_crowded_images(data.val_set, detections_per_image(bare_model), args.eval_max_dets,
                        scored_as_lvis(data.val_set.coco, iou_types(args.model)))
    note_scored_beyond_kept(detections_per_image(bare_model), args.eval_max_dets)
    note_lvis_limits(args, data.val_set, detections_per_image(bare_model))
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

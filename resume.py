"""Resuming: the checkpoint --resume names (or finds), checked to fit this run (its model, layout, batches and
scoring), the settings this run takes from it, and where its run already ended."""

from __future__ import annotations

import argparse
from pathlib import Path

import utils
from agreement import check_same_on_every_rank
from checkpoint import (
    epoch_files,
    from_reference_checkpoint,
    is_reference_checkpoint,
    last_set_aside_checkpoint,
    load_file,
)
from coco_eval import COCO_MAX_DETECTIONS
from errors import UserError
from models import trained_pretrained
from run_record import plain


def own_checkpoint(output_dir: str) -> Path:
    """The checkpoint --resume auto continues: the run's own, in its output folder."""
    return Path(output_dir) / "checkpoint.pth"


def continues_a_checkpoint(args: argparse.Namespace) -> bool:
    """Whether this run starts from a checkpoint: --resume given, and for 'auto' the run's own is there."""
    return bool(args.resume) and (args.resume != "auto" or own_checkpoint(args.output_dir).is_file())


def resolve_resume(args: argparse.Namespace) -> str:
    """The checkpoint to resume from: --resume as given, or for 'auto' the run's own if it exists."""
    if args.resume != "auto":
        return args.resume
    path = own_checkpoint(args.output_dir)
    if path.is_file():
        return str(path)
    if not args.test_only:  # a mistyped --output-dir would otherwise start afresh without a word
        utils.print_once(f"--resume auto: no {path}, so this is a new run{_what_could_continue(Path(args.output_dir))}")
    return ""


def _what_could_continue(output_dir: Path) -> str:
    """Where a run without checkpoint.pth could still be continued from: the newest epoch's model_E.pth in its
    folder (which the new run moves aside), or the last run moved aside from it."""
    epochs = epoch_files(output_dir)
    if epochs:
        newest = epochs[max(epochs)]
        return f"; {newest} is an epoch's checkpoint: to continue from it, give --resume {newest}"
    set_aside = last_set_aside_checkpoint(output_dir)
    return (f"; the last run moved aside from this folder is in {set_aside.parent}: to continue it, move its "
            f"files back into {output_dir} and run again") if set_aside else ""


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


def read_resume_checkpoint(args: argparse.Namespace) -> tuple[dict | None, str]:
    """The checkpoint --resume names (or finds, for 'auto'), and its path; (None, "") for a fresh run."""
    path = resolve_resume(args)
    if args.test_only and not path and not args.weights:  # the model as built: random heads, an AP of 0
        raise UserError(f"--test-only evaluates trained weights, and there are none: give --resume CHECKPOINT or "
                        f"--weights FILE{' (no checkpoint.pth in --output-dir for auto)' if args.resume else ''}")
    checkpoint = load_checkpoint(path) if path else None
    check_same_on_every_rank(checkpoint, args.resume)
    return checkpoint, path


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


# Model settings that a checkpoint's evaluation and continuation keep from its run unless they are given again.
SAVED_MODEL_SETTINGS = ("min_size", "max_size", "rois_per_image", "detections_per_image", "rpn_score_thresh",
                        "box_score_thresh")


def take_saved_settings(args: argparse.Namespace, saved: dict | None) -> None:
    """The settings this run leaves to their defaults, as the checkpoint's run had them (saved: its arguments,
    None without one): the model's sizes and limits, and --eval-max-dets (else COCO's); says which it takes."""
    saved = saved or {}
    taken = {name: saved[name] for name in (*SAVED_MODEL_SETTINGS, "eval_max_dets")
             if getattr(args, name) is None and saved.get(name) is not None}
    for name, value in taken.items():
        setattr(args, name, value)
    if args.eval_max_dets is None:
        args.eval_max_dets = COCO_MAX_DETECTIONS
    said = [f"--{name.replace('_', '-')} {value}" for name, value in taken.items()
            if (name, value) != ("eval_max_dets", COCO_MAX_DETECTIONS)]
    if said:
        utils.print_once(f"As the checkpoint's run: {' '.join(said)}")


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


def note_other_training_images(checkpoint: dict, read: tuple[int, str], resume: str) -> None:
    """Say where a checkpoint saved part-way through an epoch was trained on other images than this run reads
    (its file edited since, as after bad samples): the rest of the epoch is then not the one its run began."""
    saved = checkpoint.get("training_images")
    if saved is None or tuple(saved) == tuple(read):
        return
    count = f"{read[0]} against {saved[0]}" if read[0] != saved[0] else f"as many, {read[0]}, with other ids"
    utils.print_once(f"note: --resume {resume} was saved at step {checkpoint['step']} of epoch {checkpoint['epoch']} "
                     f"of a run over other training images ({count}): the rest of that epoch is drawn from the "
                     f"images read now, so some train twice in it or not at all")


# Training settings a resumed run may give otherwise (at an epoch's end; part-way, BATCH_LAYOUT's are refused):
# said, as they make the run other than one run of one command. The optimizer's are noted on their own
# (optimization.keep_this_runs_settings).
NOTED_ON_RESUME = (*(name for name in BATCH_LAYOUT if name != "world_size"), "data_augmentation", "use_copypaste",
                   "use_v2", "clip_grad_norm", "amp", "amp_dtype", "model_ema", "model_ema_decay", "model_ema_steps",
                   "data_path", "train_images", "train_annotations", "no_speedups", *SAVED_MODEL_SETTINGS)


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
        they = "it applies" if len(changed) == 1 else "they apply"
        utils.print_once(f"--resume {resume}: given otherwise than in its run: {flags}; {they} from here on")


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


def already_finished(resume: str, checkpoint: dict, epochs: int) -> dict:
    """The run's end when its checkpoint has trained --epochs already: says so and how to go on; no metrics."""
    utils.print_once(f"--resume {resume}: its run has trained {utils.counted(epochs_trained(checkpoint), 'epoch')}, "
                     f"and --epochs is {epochs}: nothing is left to train; raise --epochs to train more, or evaluate "
                     f"it with --test-only")
    return {}


def already_stopped(resume: str, checkpoint: dict) -> dict:
    """The run's end when its checkpoint stopped early (--patience): says so and what to do; no metrics."""
    utils.print_once(f"--resume {resume}: this run stopped early at epoch {checkpoint['epoch']} (--patience), so "
                     f"there is nothing to continue; model_best.pth beside it holds its best weights (to train on "
                     f"regardless, resume from model_{checkpoint['epoch']}.pth, saved before the stop, with a larger "
                     f"--patience)")
    return {}

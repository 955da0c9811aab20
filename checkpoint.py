"""What a checkpoint holds (TrainingState), written atomically, and checkpoints and weights files read safely
(tensors and plain data only)."""

from __future__ import annotations

import argparse
import atexit
import errno
import itertools
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import torch
from torch import nn

import utils
from errors import UserError
from optimization import (
    check_state_fits,
    drop_empty_groups,
    keep_implementation,
    keep_this_runs_settings,
    settings_of,
)

try:
    import fcntl
except ImportError:  # not on Windows: runs there are not guarded against sharing a folder
    fcntl = None

# Read once, at import, while no other thread can create files under the briefly changed mask.
_UMASK = os.umask(0)
os.umask(_UMASK)

if TYPE_CHECKING:
    from coco_utils import CategoryMap
    from ema import ModelEma


def _first_along_chain(error: BaseException | None, kinds: tuple[type, ...]) -> BaseException | None:
    """The first exception of the given kinds along an exception's chain (torch's zip writer raises a
    RuntimeError on exit after the OSError, or the KeyboardInterrupt, that stopped a write)."""
    while error is not None and not isinstance(error, kinds):
        error = error.__context__ or error.__cause__
    return error


def _cause(error: OSError) -> str:
    """Why a write failed, in words."""
    known = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
             errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EROFS: "read-only filesystem",
             errno.EFBIG: "file larger than the file-size limit (ulimit -f; raise it) or the filesystem allows"}
    return known.get(error.errno, (error.strerror or str(error)).lower())


OUTPUT_REMEDY = "free space in --output-dir, make it writable, or choose another"
CHECKPOINT_REMEDY = f"no checkpoint written before was touched; {OUTPUT_REMEDY}"
# What a run writes beside its checkpoints (metrics, predictions, pictures, curves, events)
RUN_OUTPUT_REMEDY = f"the checkpoints written so far are intact; {OUTPUT_REMEDY}"


@contextmanager
def writing(path: Path, remedy: str = CHECKPOINT_REMEDY) -> Iterator[None]:
    """A failed write to path (full disk, no permission, ...) becomes a UserError naming the file, the cause and
    what to do; a Ctrl-C is a KeyboardInterrupt again; an error that is not the filesystem's is left to show
    whole."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        cause = _first_along_chain(e, (OSError, KeyboardInterrupt))
        if cause is None:
            raise
        if isinstance(cause, KeyboardInterrupt):  # a Ctrl-C, or errors.Terminated: raised again as it was
            raise cause from None
        raise UserError(f"could not write {path}: {_cause(cause)}; {remedy}") from None


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object], remedy: str = CHECKPOINT_REMEDY,
                 sync: bool = True) -> None:
    """Write a file by write(file) so that path is always either the old complete file or the new complete one
    (with sync, after a power cut too). A failed write raises a UserError naming the file, the cause and the
    remedy, and leaves no temporary file."""
    path = Path(path)
    tmp = None
    try:
        with writing(path, remedy):
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's file is private; these are files like any other
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                if sync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        if tmp is not None:
            remove_quietly(Path(tmp))


def write_json_atomic(path: str | Path, data: object, remedy: str) -> None:
    """data as JSON at path, written as write_atomic writes."""
    encoded = json.dumps(data).encode()
    write_atomic(path, lambda f: f.write(encoded), remedy=remedy)


def remove_quietly(path: Path) -> None:
    """Remove a temporary file if it is there; a filesystem that fails even this (gone read-only) has already
    raised the error worth showing."""
    with suppress(OSError):
        path.unlink(missing_ok=True)


def save_atomic(state: dict, path: str | Path) -> None:
    """torch.save of state to path, atomically (write_atomic)."""
    write_atomic(path, lambda f: torch.save(state, f))


def share_file(source: Path, target: Path) -> None:
    """Make target name source's bytes: a hard link where the filesystem allows one (no bytes written), else a
    copy written as write_atomic writes (synced before it takes the name); target is replaced atomically either
    way."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        os.link(source, tmp)
    except OSError:
        def copy_source(copy: BinaryIO) -> None:
            with open(source, "rb") as original:
                shutil.copyfileobj(original, copy)

        write_atomic(target, copy_source)
        return
    try:
        with writing(target):
            os.replace(tmp, target)
    finally:
        remove_quietly(tmp)


def load_file(path: str | Path, flag: str) -> dict:
    """torch.load with weights_only=True: code hidden in a pickle is refused, never run."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file in it, such as {path / 'checkpoint.pth'}")
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file; check the path")
    with path.open("rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save's zip, or a raw pickle
        raise UserError(f"{flag} {path} is not a readable checkpoint (not a file written by torch.save)")
    if head.startswith(b"PK"):
        _check_sums(path, flag)
    try:
        # torchvision's reference saves its arguments as a Namespace, which is plain data: that class and no
        # other joins what weights_only reads.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        raise UserError(f"{flag} {path} was refused: it holds more than tensors and plain data "
                        f"({detail.group(1).strip() if detail else 'unsupported content'}); only load files "
                        f"you trust, re-saved as plain state dicts") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{flag} {path} is not a readable checkpoint (truncated or not a torch file: "
                        f"{_first_sentence(e)}); give another file (for a run's damaged checkpoint.pth: an "
                        f"earlier epoch's model_E.pth beside it)") from None


def _first_sentence(error: Exception) -> str:
    """The first sentence of an error's message (torch's go on with advice for its own developers)."""
    text = str(error).strip()
    return text.splitlines()[0].split(". ")[0][:150] if text else type(error).__name__


def _check_sums(path: Path, flag: str) -> None:
    """Each record of a torch.save zip read against its checksum, which torch.load does not check: a damaged
    copy would load as other weights. Records saved without one (torch's compute_crc32 off) are not checked."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError):
        return  # torch.load says what is wrong with the file
    with archive:
        for record in archive.infolist():
            if record.CRC == 0 and record.file_size > 0:
                continue
            try:
                with archive.open(record) as data:
                    while data.read(1 << 24):
                        pass
            except (NotImplementedError, RuntimeError):
                return  # a compression or encryption this zipfile cannot read: left to torch.load
            except (zipfile.BadZipFile, zlib.error, EOFError):
                raise UserError(f"{flag} {path} is damaged: its record {record.filename} fails its checksum; give "
                                f"another file (for a run's checkpoint.pth: an earlier epoch's model_E.pth beside "
                                f"it)") from None


# The class heads: the only tensors whose shapes depend on the number of classes (or keypoints).
CLASS_HEAD_PREFIXES = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.",
                       "roi_heads.keypoint_predictor.", "head.classification_head.")
def load_model_weights(model: nn.Module, state: dict, source: str, new_class_heads: bool = False,
                       kept_fresh: Collection[str] = ()) -> list[str]:
    """Load a state dict; any missing, unexpected or differently shaped tensor is an error naming the first.

    With new_class_heads (fine-tuning on other categories), class heads of another size keep their fresh
    values instead, and so do the tensors named in kept_fresh whatever their size (the category layers of
    weights trained on categories that the same labels do not name here); all are named in the result.
    """
    own = model.state_dict()
    reinitialised = []
    for key, value in own.items():
        if key not in state and not key.endswith("num_batches_tracked"):
            raise UserError(f"{source} does not fit this model: it has no tensor {key}; "
                            f"check --model and that the file is a checkpoint of it")
        if new_class_heads and key in kept_fresh:
            reinitialised.append(key)
        elif key in state and state[key].shape != value.shape:
            class_head = key.startswith(CLASS_HEAD_PREFIXES)
            if new_class_heads and class_head:
                reinitialised.append(key)
                continue
            why = "a head sized for another number of classes or keypoints" if class_head else "check --model"
            raise UserError(f"{source} does not fit this model: {key} has shape {tuple(state[key].shape)}, the "
                            f"model needs {tuple(value.shape)} ({why})")
    # Frozen batch norm keeps no batch counter, so files saved with ordinary batch norm carry a spare one.
    unexpected = sorted(k for k in set(state) - set(own) if not k.endswith("num_batches_tracked"))
    if unexpected:
        raise UserError(f"{source} does not fit this model: unexpected tensor {unexpected[0]}; check --model")
    model.load_state_dict({k: v for k, v in state.items() if k not in reinitialised}, strict=False)
    return reinitialised


@dataclass
class TrainingState:
    """Everything a run needs to continue, saved and restored as one: the model (unwrapped from DDP), its
    moving average (--model-ema), optimizer, schedule, gradient scaler, random generators, the run's arguments
    and categories, and where it stands.

    epoch is the epoch of the last save; step is the number of steps done in it when saved mid-epoch, None when
    the epoch was complete; global_step is the run's optimizer steps by then (the records' x axis);
    stopped_early says that --patience ended the run; training_images, the count and digest of the training
    images' ids, which a resumed run's rest of an epoch is drawn from; epoch_so_far, a part-way save's sums of
    the epoch's steps (StepMeters.so_far) and its data faults, so that the epoch's record covers them. A checkpoint
    is plain data that torch.load(weights_only=True) reads.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler | None
    args: argparse.Namespace
    category_map: CategoryMap
    num_classes: int
    ema: ModelEma | None = None
    epoch: int = -1
    step: int | None = None
    global_step: int | None = None
    stopped_early: bool = False
    training_images: tuple[int, str] | None = None
    epoch_so_far: dict | None = None

    def weights_dict(self) -> dict:
        """What evaluation and prediction need (model_best.pth holds this): the weights, their moving average,
        the categories and the run's arguments; no optimizer."""
        return {
            "model": self.model.state_dict(),
            **({"model_ema": self.ema.state_dict()} if self.ema is not None else {}),
            "epoch": self.epoch,
            "args": {k: str(v) if isinstance(v, torch.device) else v for k, v in vars(self.args).items()},
            "categories": self.category_map.as_list(),
            "labels_are_category_ids": self.category_map.keep_ids,
            "num_classes": self.num_classes,
        }

    def state_dict(self) -> dict:
        """Everything, to continue the run (checkpoint.pth, model_{epoch}.pth)."""
        return {
            **self.weights_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step,
            "global_step": self.global_step,
            "rng": rng_state(),
            **({"stopped_early": True} if self.stopped_early else {}),
            **({"training_images": list(self.training_images)} if self.training_images else {}),
            **({"epoch_so_far": self.epoch_so_far} if self.step is not None and self.epoch_so_far else {}),
        }

    def load_state_dict(self, checkpoint: dict, source: str, weights_only: bool = False) -> None:
        """Take a checkpoint's weights (and their average, when both keep one), and unless weights_only,
        everything else needed to continue the run."""
        load_model_weights(self.model, checkpoint["model"], source)
        if self.ema is not None and "model_ema" in checkpoint:
            load_model_weights(self.ema.module, checkpoint["model_ema"]["model"], f"{source} (model_ema)")
            self.ema.updates = checkpoint["model_ema"]["updates"]
        elif self.ema is not None:  # an average begun now starts from the weights read, not the model as built
            self.ema.module.load_state_dict(self.model.state_dict())
        if weights_only:
            return
        check_continuable(checkpoint, source)
        drop_empty_groups(checkpoint)
        check_state_fits(self.optimizer, checkpoint["optimizer"], source)
        own = settings_of(self.optimizer, self.lr_scheduler)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        keep_implementation(self.optimizer)  # this run's kernel, whatever the writer's device and settings
        changed = keep_this_runs_settings(self.optimizer, self.lr_scheduler, own, checkpoint["lr_scheduler"])
        if changed:
            rate = self.optimizer.param_groups[0]["lr"]
            they = "it applies" if len(changed) == 1 else "they apply"
            utils.print_once(f"{source}: {', '.join(changed)} given otherwise than in its run: {they} from "
                             f"the saved epoch, on this run's schedule (learning rate {rate:g} now)")
        if self.scaler is not None and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        if checkpoint.get("rng"):
            restore_rng(checkpoint["rng"])
        self.epoch, self.step = checkpoint["epoch"], checkpoint.get("step")
        self.epoch_so_far = checkpoint.get("epoch_so_far")

    @property
    def resume_at(self) -> tuple[int, int]:
        """(epoch, step) where training goes on: after a complete epoch E at E + 1, after a stop part-way
        through E at E, after the steps it had done."""
        return (self.epoch + 1, 0) if self.step is None else (self.epoch, self.step)


def check_continuable(checkpoint: dict, source: str) -> None:
    """One clear error where a file to continue training from holds weights only."""
    if "optimizer" not in checkpoint:
        raise UserError(f"{source} holds weights only, no optimizer state to continue training from (a "
                        f"model_best.pth); to fine-tune from it, pass it to --weights instead")


def is_reference_checkpoint(content) -> bool:
    """Whether a file's content is a checkpoint of torchvision's references/detection/train.py: the model,
    optimizer and schedule, the run's arguments as a Namespace, and no category list."""
    return (isinstance(content, dict) and isinstance(content.get("args"), argparse.Namespace)
            and "model" in content and "categories" not in content)


def from_reference_checkpoint(content: dict) -> dict:
    """A checkpoint of torchvision's reference in this project's form. The reference trains with the files'
    category ids as labels and keeps no category list, so the categories come from the dataset's files; the
    class count is the box head's (91 for COCO where there is none to read)."""
    args = vars(content["args"])
    head = content["model"].get("roi_heads.box_predictor.cls_score.weight")
    num_classes = len(head) if head is not None else (2 if args.get("dataset") == "coco_kp" else 91)
    return {**content, "args": dict(args), "categories": None, "num_classes": num_classes, "step": None,
            "labels_are_category_ids": True, "from_reference": True}


def rng_state() -> dict:
    """The random generators' state, so that a resumed run draws what the uninterrupted one would have."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict, output_dir: Path, also_as: str | None = None) -> Path:
    """Write state to output_dir/checkpoint.pth, and name the same bytes output_dir/also_as (an epoch's file);
    a failed write is one clear error that leaves the previous files as they were."""
    path = output_dir / "checkpoint.pth"
    if also_as is None:
        save_atomic(state, path)
    else:  # checkpoint.pth last: --resume auto sees it only once the rest is written
        save_atomic(state, output_dir / also_as)
        share_file(output_dir / also_as, path)
    return path


def prepare_output_dir(out: Path) -> None:
    """The output folder made and checked writable, before any work, for train.py and tools/predict.py alike;
    claimed for this process (claim_output_dir), then temporaries of interrupted saves cleared."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out} is a file, not a folder; give a folder (it is made if missing)")
    if not out.exists():
        remove_at_exit_if_empty(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--output-dir {out} is not writable or cannot be made ({e.strerror}); choose a folder you "
                        f"can write to") from None
    claim_output_dir(out)
    remove_stale_temporaries(out)


def remove_at_exit_if_empty(folder: Path) -> None:
    """The folder this process makes is removed when the process ends with nothing in it (a start that failed
    before writing anything leaves no empty folder behind)."""
    atexit.register(_remove_if_empty, folder)


def _remove_if_empty(folder: Path) -> None:
    with suppress(OSError):  # not empty, or gone: nothing to do
        folder.rmdir()


_CLAIMED: dict[Path, int] = {}  # folder -> its open descriptor, locked until the process ends


def claim_output_dir(out: Path) -> None:
    """Hold an exclusive lock on the folder for the rest of this process (on the folder itself: no file is left
    in it), so that a second run started there stops with one line: it would move the first one's files aside,
    or delete its saves under way. Filesystems without locks are let through."""
    folder = out.resolve()
    if fcntl is None or folder in _CLAIMED:
        return
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # a folder one may write but not read: let through, as without locks
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(descriptor)
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise UserError(f"--output-dir {out} is in use by another run (a train.py or tools/predict.py process: "
                            f"`fuser {out}` names it); wait for it to end, or choose another --output-dir") from None
        return
    _CLAIMED[folder] = descriptor


def _release_in_child() -> None:
    """A forked child (a data loader's worker) closes its copies of the lock's descriptors: a worker outliving a
    killed run would otherwise hold the folder against its restart."""
    for descriptor in _CLAIMED.values():
        with suppress(OSError):
            os.close(descriptor)
    _CLAIMED.clear()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_release_in_child)


# Temporary files of write_atomic and share_file (".NAME.*.tmp") for the files train.py and tools/predict.py write
# there; no other file, since --output-dir may be any folder of the user's
_TEMPORARIES = (".*.pth.*.tmp", ".metrics.jsonl.*.tmp", ".predictions*.json.*.tmp", ".images.json.*.tmp",
                ".args.json.*.tmp", ".evaluation.json.*.tmp", ".predict_args.json.*.tmp",
                ".curves.png.*.tmp", ".*.jpg.*.tmp", "predictions/epoch_[0-9]*/.*.jpg.*.tmp")


def remove_stale_temporaries(output_dir: Path) -> None:
    """Temporary files of writes that a kill interrupted; they are never read."""
    for pattern in _TEMPORARIES:
        for tmp in output_dir.glob(pattern):
            remove_quietly(tmp)


# What a training run writes in its output folder, and nothing else (tools/predict.py's default folder is
# predictions/ too, with pictures of its own).
RUN_OUTPUTS = ("checkpoint.pth", "model_[0-9]*.pth", "model_best.pth", "metrics.jsonl", "args.json",
               "events.out.tfevents.*", "curves.png", "predictions_bbox.json", "predictions_segm.json",
               "predictions_keypoints.json", "evaluation.json", "predictions/epoch_[0-9]*")


def set_aside_previous_run(output_dir: Path) -> Path | None:
    """Before a fresh run in a folder that holds another run's outputs: move them to previous_runs/<time of the
    newest>/, so that the new run's checkpoints, best model, patience and curves are its own and the old ones are
    kept whole. Returns that folder (None when there was nothing to move)."""
    found = [path for pattern in RUN_OUTPUTS for path in sorted(output_dir.glob(pattern))]
    if all(path.name == "args.json" for path in found):  # a start that trained nothing: its args.json is replaced
        return None
    newest = max(path.stat().st_mtime for path in found)
    name = time.strftime("%Y%m%d-%H%M%S", time.localtime(newest))
    folder = output_dir / "previous_runs" / name
    for n in itertools.count(2):  # two runs set aside in one second keep their own folders
        if not folder.exists():
            break
        folder = folder.with_name(f"{name}-{n}")
    try:
        folder.mkdir(parents=True)
        for path in found:
            target = folder / path.relative_to(output_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            path.replace(target)
    except OSError as e:
        raise UserError(f"could not move the previous run's outputs in {output_dir} aside to {folder} "
                        f"({e.strerror}); move or delete them, or give another --output-dir") from None
    return folder


def previous_runs_held(output_dir: Path) -> tuple[int, int]:
    """The runs set aside in output_dir's previous_runs/ and the bytes their files take."""
    runs = [folder for folder in (output_dir / "previous_runs").glob("*") if folder.is_dir()]
    return len(runs), sum(path.stat().st_size for run in runs for path in run.rglob("*") if path.is_file())


def last_set_aside_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint of the newest run set_aside_previous_run moved out of output_dir, if any."""
    found = (output_dir / "previous_runs").glob("*/checkpoint.pth")
    return max(found, key=lambda path: _set_aside_order(path.parent), default=None)


def _set_aside_order(folder: Path) -> tuple[str, int]:
    """Where set_aside_previous_run's folder comes in the order they were set aside: by its time, then by the
    number it took within that second (TIME-10 after TIME-9, which text puts first)."""
    stamp, _, number = folder.name.rpartition("-")
    if stamp.count("-") == 1 and number.isdigit():
        return stamp, int(number)
    return folder.name, 1


def epoch_files(output_dir: Path) -> dict[int, Path]:
    """The model_{E}.pth files in output_dir, by epoch (model_best.pth is no epoch's)."""
    return {int(p.stem[len("model_"):]): p for p in output_dir.glob("model_*.pth") if p.stem[len("model_"):].isdigit()}


def prune_epoch_files(output_dir: Path, keep_last: int, epoch: int) -> list[Path]:
    """Delete all but the keep_last newest model_{E}.pth files up to the epoch just saved (model_best.pth is a
    file of its own). Later epochs' files, left by a run resumed from an earlier epoch, are not this run's
    newest: they stay until this run writes those epochs again."""
    epochs = epoch_files(output_dir)
    doomed = [epochs[e] for e in sorted(e for e in epochs if e <= epoch)[:-keep_last]]
    removed = []
    for path in doomed:
        try:
            path.unlink(missing_ok=True)
            removed.append(path)
        except OSError as e:  # the run and its checkpoints are sound: a file left over is no reason to stop
            utils.print_once(f"warning: --keep-last could not delete {path} ({_cause(e)}); delete it by hand",
                             file=sys.stderr)
    return removed

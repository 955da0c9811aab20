"""What every process of a distributed job must share, checked at the start: its flags (but those a node may
give its own way), the images and categories it read, and the checkpoint it resumes."""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Sequence

import utils
from coco_utils import CocoDetection, id_array
from data import Data
from errors import UserError
from run_record import plain

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


def _run_digest(checkpoint: dict) -> str:
    """A digest of the arguments of the run that wrote a checkpoint: copies of one file agree, two runs' do not."""
    arguments = checkpoint.get("args") or {}
    return hashlib.sha256(repr(sorted((k, plain(v)) for k, v in arguments.items())).encode()).hexdigest()


def ids_digest(ids: Sequence) -> str:
    """A digest of every id in order, for a list or the compact NumPy array alike (NumPy's repr of an array of
    over 1,000 elements shows only its ends)."""
    return hashlib.sha256(repr(id_array(ids).tolist()).encode()).hexdigest()


# What differs where a part of the data read has the same count on two ranks.
INSTANCE_CONTENTS = "labels, boxes or outlines (or their images' file names or sizes)"
SAME_COUNT_DIFFERS = {"training images": "ids", "validation images": "ids", "categories": "names or ids",
                      "training instances": INSTANCE_CONTENTS, "validation instances": INSTANCE_CONTENTS}


def check_same_data(args: argparse.Namespace, data: Data) -> None:
    """Every process read the same images, instances and categories, whatever its paths: otherwise their samplers
    would split other images into other numbers of steps, and a collective fail an epoch later, or the ranks
    would learn from other labels of the same images."""
    if utils.get_world_size() == 1:  # nothing to compare with
        return

    def images(dataset: CocoDetection | None) -> tuple[int, str]:
        ids = [] if dataset is None else dataset.ids
        return len(ids), ids_digest(ids)

    def instances(dataset: CocoDetection | None) -> tuple[int, int]:
        return (0, 0) if dataset is None else dataset.instances_read()

    read = {"training images": images(data.train_set), "validation images": images(data.val_set),
            "training instances": instances(data.train_set), "validation instances": instances(data.val_set),
            "categories": (len(data.category_map.ids), data.category_map)}
    other = utils.first_other_rank(read)
    if other is not None:
        rank, theirs, first = other
        everyone = utils.all_gather_object(args.data_path)  # on every rank, as each found the same difference
        differing = [part for part in read if theirs[part] != first[part]]
        counts = "; ".join(f"{theirs[part][0]} {part} against {first[part][0]}" if theirs[part][0] != first[part][0]
                           else f"{first[part][0]} {part} on both, with other {SAME_COUNT_DIFFERS[part]}"
                           for part in differing)
        parts = " and ".join([", ".join(differing[:-1]), differing[-1]] if len(differing) > 1 else differing)
        raise UserError(f"rank {rank} read other {parts} than rank 0 ({counts}; its --data-path "
                        f"{everyone[rank]}, rank 0's {everyone[0]}): every node must read the same files")


def check_same_on_every_rank(checkpoint: dict | None, resume: str) -> None:
    """Every process resumes the same position of the same run: a node that cannot see the output folder's
    checkpoint (not on a shared filesystem) would otherwise start afresh beside ranks that resume, and train apart
    until a collective fails; one that reads another run's checkpoint would take that run's settings (sizes,
    --eval-max-dets) and score apart."""
    found = utils.all_gather_object(None if checkpoint is None else
                                    (checkpoint.get("epoch"), checkpoint.get("step"), _run_digest(checkpoint)))
    if len(set(found)) == 1:
        return
    ranks: dict = {}
    for rank, position in enumerate(found):
        ranks.setdefault(position, []).append(str(rank))
    runs = list(dict.fromkeys(p[2] for p in found if p is not None))  # the first found is "a run", others "another"
    where = {p: "none" if p is None else f"epoch {p[0]}" + ("" if p[1] is None else f" step {p[1]}")
             + ("" if len(runs) == 1 else f" of run {runs.index(p[2]) + 1}") for p in ranks}
    said = "; ".join(f"rank {', '.join(r)}: {where[p]}" for p, r in ranks.items())
    raise UserError(f"--resume {resume}: the processes found different checkpoints ({said}); every node must read "
                    f"the same file: give --output-dir on a filesystem all nodes share, or --resume one file")

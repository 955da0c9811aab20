"""The data a run trains and evaluates on: the datasets of both splits, checked, and their loaders (shuffled and
sharded over the processes, batched by aspect ratio, optionally repeated by category rarity)."""

from __future__ import annotations

import argparse
import copy
import gc
from collections.abc import Callable
from dataclasses import dataclass

import torch

import coco_utils
import presets
import utils
from annotations import collection_paused
from coco_utils import (
    FROM_CHECKPOINT,
    FROM_TRAINING_FILE,
    CategoryMap,
    CocoDetection,
    build_dataset,
    coco_keypoint_names,
    flip_order,
)
from dataset_check import check_before_training
from errors import UserError
from freed_memory import ReleasingCollate, restore_malloc_defaults
from group_by_aspect_ratio import GroupedBatchSampler, ResumableBatchSampler, create_aspect_ratio_groups
from models import iou_types
from preemption import end_workers_at_exit, ignore_stop_signals
from repeat_factors import RepeatFactorSampler, rarest_share, repeat_factors


@dataclass
class Data:
    """The two splits, their loaders and the categories the model learns; val_loss_loader (--val-loss) gives the
    validation images with training targets."""

    train_set: CocoDetection | None
    val_set: CocoDetection
    train_loader: torch.utils.data.DataLoader | None
    val_loader: torch.utils.data.DataLoader
    category_map: CategoryMap
    val_loss_loader: torch.utils.data.DataLoader | None = None


def collate(args: argparse.Namespace, collate_fn: Callable) -> Callable:
    """collate_fn, releasing the memory freed while building each batch unless --no-release-freed-memory."""
    return ReleasingCollate(collate_fn) if args.release_freed_memory else collate_fn


def start_worker_with_malloc_defaults(worker_id: int) -> None:
    """worker_init_fn where the main process keeps its freed memory (--reuse-freed-memory): the worker ignores
    stop signals and goes back to glibc's malloc settings, so that it hands freed memory back as before."""
    ignore_stop_signals(worker_id)
    restore_malloc_defaults()


def loader_options(args: argparse.Namespace) -> dict:
    """The DataLoader settings both splits' loaders share."""
    # Workers restart each epoch so that they see the dataset's epoch (augmentation seeds); they ignore stop
    # signals, which the main process handles; the loader's own generator leaves the global one to the model.
    start_worker = start_worker_with_malloc_defaults if args.reuse_freed_memory else ignore_stop_signals
    if args.workers:
        end_workers_at_exit()
    return {"num_workers": args.workers, "collate_fn": collate(args, utils.collate_fn),
            "pin_memory": args.device.type == "cuda",
            "worker_init_fn": start_worker, "generator": torch.Generator().manual_seed(args.seed)}


def train_sampler(args: argparse.Namespace, train_set: CocoDetection) -> torch.utils.data.Sampler:
    """The epoch's order of training samples for this process: shuffled and sharded by DistributedSampler, or
    with --repeat-factor-threshold each image repeated by its rarest category."""
    world, rank = utils.get_world_size(), utils.get_rank()
    if args.repeat_factor_threshold is None:
        return torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                                   seed=args.seed)
    image_categories = train_set.image_categories()
    factors = repeat_factors(image_categories, args.repeat_factor_threshold)
    sampler = RepeatFactorSampler(factors, args.seed, world, rank)
    utils.print_once(f"Repeat-factor sampling (threshold {args.repeat_factor_threshold:g}): an epoch is expected to "
                     f"hold {sampler.expected_length():.1f} images per process, where each image once gives "
                     f"{len(train_set) / world:.1f}; largest factor {factors.max():.2f}")
    if factors.max() <= 1.0:
        utils.print_once(f"note: no image repeats: the rarest category is in a share of "
                         f"{rarest_share(image_categories):.3g} of the training images, at or above "
                         f"--repeat-factor-threshold {args.repeat_factor_threshold:g}; a threshold above a category's "
                         f"share repeats its images")
    return sampler


def make_train_loader(args: argparse.Namespace, train_set: CocoDetection) -> torch.utils.data.DataLoader:
    """Batches of similar aspect ratio from the epoch's order, in epochs that can start part-way."""
    sampler = train_sampler(args, train_set)
    if args.aspect_ratio_group_factor >= 0:
        groups = create_aspect_ratio_groups(train_set.aspect_ratios(), k=args.aspect_ratio_group_factor)
        batch_sampler = GroupedBatchSampler(sampler, groups, args.batch_size)
    else:
        batch_sampler = torch.utils.data.BatchSampler(sampler, args.batch_size, drop_last=True)
    batches = ResumableBatchSampler(batch_sampler, args.grad_accum_steps)
    if batches.steps(0) == 0:
        raise UserError(f"--batch-size {args.batch_size} x {utils.get_world_size()} processes x "
                        f"--grad-accum-steps {args.grad_accum_steps} is more than the {len(train_set)} training "
                        f"images; lower one of them")
    collate_fn = presets.CopyPasteCollate(train_set) if args.use_copypaste else utils.collate_fn
    return torch.utils.data.DataLoader(train_set, batch_sampler=batches,
                                       **{**loader_options(args), "collate_fn": collate(args, collate_fn)})


def make_val_loader(args: argparse.Namespace, val_set: CocoDetection, batch_size: int
                    ) -> torch.utils.data.DataLoader:
    sampler = torch.utils.data.DistributedSampler(val_set, num_replicas=utils.get_world_size(),
                                                  rank=utils.get_rank(), shuffle=False)
    return torch.utils.data.DataLoader(val_set, batch_size=batch_size, sampler=sampler, **loader_options(args))


def with_training_targets(val_set: CocoDetection, args: argparse.Namespace) -> CocoDetection:
    """The validation images with the targets a loss needs (masks drawn for models that learn them)."""
    copied = copy.copy(val_set)
    copied.with_masks = "segm" in iou_types(args.model)
    return copied


def ready_for_workers(dataset: CocoDetection, args: argparse.Namespace, split: str, release_index: bool) -> None:
    """The start-of-run check of a split's image files, then the dataset compacted for loader workers (its
    index released when nothing else reads it)."""
    if not args.skip_data_check:
        check_before_training(dataset.image_dir, list(dataset.coco.imgs.values()), split, args.max_bad_samples)
    note_large_images(dataset, split)
    dataset.compact(release_index=release_index)


def note_large_images(dataset: CocoDetection, split: str) -> None:
    """One line for a split's images of many megapixels (their sizes from the annotation file), read whole each
    time a worker loads one."""
    sizes = {i: (img["width"], img["height"]) for i, img in dataset.coco.imgs.items()
             if img["width"] * img["height"] > coco_utils.LARGE_IMAGE_PIXELS}
    if sizes:
        largest = max(sizes, key=lambda i: sizes[i][0] * sizes[i][1])
        path = dataset.image_dir / dataset.coco.imgs[largest]["file_name"]
        utils.print_once(f"note: {len(sizes)} {split} images of over {coco_utils.LARGE_IMAGE_PIXELS / 1e6:.0f} "
                         f"megapixels; the largest: {coco_utils.large_image_note(path, *sizes[largest])}")


# The check's kinds of finding on instances that a model learning masks may leave out for want of an outline.
WITHOUT_OUTLINE = ("no segmentation", "segmentation format", "polygon under 3 points")


def note_what_does_not_train(train_set: CocoDetection, model: str) -> None:
    """A line each for what the training file holds that the model learns nothing from: categories without
    instances, and, for a model that learns masks, instances without an outline, whose objects then train as
    background wherever they show (the check's warnings, which tools/check_dataset.py lists in full)."""
    warned = train_set.coco.warned
    if "category without instances" in warned:
        utils.print_once(f"note: {train_set.coco.source}: {warned['category without instances'][1]}")
    if not train_set.with_masks or not any(kind in warned for kind in WITHOUT_OUTLINE):
        return  # counted only where the check found some: a pass over every instance
    without = coco_utils.instances_without_outline(train_set.coco)
    if without:
        utils.print_once(f"note: {train_set.coco.source}: {len(without)} instances have no outline to learn a mask "
                         f"from, so {model} leaves them out and their objects train as background wherever they "
                         f"show; give them outlines, or train a box model such as --model fasterrcnn_resnet50_fpn "
                         f"(the first: {without[0]})")


def load_data(args: argparse.Namespace, checkpoint: dict | None) -> Data:
    """The datasets and loaders. What the model was trained on travels with a checkpoint; a fresh run reads its
    categories from the training file."""
    utils.print_once("Loading data")
    keep_ids = checkpoint.get("labels_are_category_ids") if checkpoint else None
    category_map, categories_from = None, FROM_TRAINING_FILE
    if checkpoint and checkpoint["categories"] is not None:
        category_map = CategoryMap.from_categories(checkpoint["categories"], args.dataset, keep_ids)
        categories_from = FROM_CHECKPOINT
    # The collector stays off while the annotation files become datasets: they are millions of objects without
    # cycles, and its passes over them would cost as much as the parsing (the training index is freed before
    # they end).
    with collection_paused():
        train_set = None
        if not args.test_only:
            keypoint_flip = flip_order(coco_keypoint_names()) if args.dataset == "coco_kp" else None
            augmentation = presets.DetectionPresetTrain(args.data_augmentation, backend=args.backend,
                                                        use_v2=args.use_v2, keypoint_flip=keypoint_flip)
            # Decoding masks is most of a sample's loading; only models that learn masks need them.
            train_set = build_dataset(args.data_path, args.dataset, "train", augmentation, category_map, args.seed,
                                      masks="segm" in iou_types(args.model), keep_ids=keep_ids,
                                      paths=(args.train_images, args.train_annotations),
                                      categories_from=categories_from)
            category_map = train_set.category_map  # the checkpoint's, where it has them
            note_what_does_not_train(train_set, args.model)
            # Released before the validation file is read: at COCO's size the training index is gigabytes.
            ready_for_workers(train_set, args, "train", release_index=True)
        val_set = build_dataset(args.data_path, args.dataset, "val", presets.DetectionPresetEval(), category_map,
                                keep_ids=keep_ids, paths=(args.val_images, args.val_annotations),
                                categories_from=categories_from)
        ready_for_workers(val_set, args, "val", release_index=False)  # evaluation scores against val_set.coco
    train_loader = make_train_loader(args, train_set) if train_set is not None else None
    val_loss_loader = None
    if args.val_loss and train_set is not None:
        val_loss_loader = make_val_loader(args, with_training_targets(val_set, args), args.batch_size)
    data = Data(train_set, val_set, train_loader, make_val_loader(args, val_set, args.eval_batch_size),
                val_set.category_map, val_loss_loader)
    # Workers fork from this process each epoch. The objects made so far (the validation index, the modules)
    # go to the collector's permanent generation, so that its passes in the workers do not write to their
    # headers and copy their pages; garbage is collected first, as frozen objects are never freed.
    gc.collect()
    gc.freeze()
    return data

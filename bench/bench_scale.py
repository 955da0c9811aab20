"""COCO's size: start-up time and data-worker memory of ours and of torchvision's reference on the same
generated annotation files.

    python3 bench/bench_scale.py [--images 118287] [--workers 4] [--samples-per-worker 2000] \
        [--reference /path/to/vision/references/detection] [--root DIR] [--keep]

The files are written here: --images training images (val2017 gets COCO's share of them, 5,000 per 118,287),
~7.3 instances each, grouped by category in the file as COCO's are, polygons of ~24 vertices (some in two
parts), 1% crowd regions as uncompressed RLE, COCO's image fields and categories; the JSON size is reported.
Every image names one of a pool of 64 generated JPEGs of the size it declares (names repeat).

Each implementation runs alone in a fresh process (never both at once), started from here:
- start-up: seconds from the process's launch (before Python imports torch) to the first training batch,
  through ours' data.load_data with train.py's arguments (start-of-run data check on), or the reference's
  train.get_dataset and the sampler and loader its main builds;
- memory, once the first loader is shut down: a loader with persistent workers over the same training
  dataset, each worker loading exactly --samples-per-worker samples (batches go round-robin), then for the
  main process and each worker the unique set size (USS: Private_Clean + Private_Dirty of
  /proc/PID/smaps_rollup) and proportional anonymous memory (Pss_Anon), with the main process's before
  the workers start. Pages that a worker inherits and leaves alone are shared, so they are in nobody's USS:
  the sum of the USS after less the main's before is not the growth. The workers' USS is what they hold on
  their own (the pages they wrote: copies of inherited ones and their own allocations); the group's growth
  is the sum of Pss_Anon after less the main's before (anonymous pages are shared only within the group).
  The workers' USS is also taken once each has delivered its first batch: what they gain between then and the
  end (workers_uss_growth_mb) is what loading samples costs, apart from what any worker holds from its start;
  and every 50 batches while they load, for the largest sum seen (workers_uss_peak_mb), as a worker's memory
  between two batches can be above what it holds at the end.
Prints one JSON object, with the load average before and after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULT = "SCALE_RESULT "
POOL_IMAGES = 64
VAL_PER_TRAIN = 5000 / 118287  # COCO 2017's val2017 to train2017
INSTANCES_PER_IMAGE = 7.3  # COCO train2017: 860,001 instances in 118,287 images
EMPTY_SHARE = 0.009  # COCO train2017: 1,021 images without instances
CROWD_SHARE = 0.01
TWO_PART_SHARE = 0.08
PEAK_POLL_BATCHES = 50  # the workers' memory is also read every this many batches, for its peak


# ---------------------------------------------------------------------------------------------------------
# The dataset


def write_pool(root: Path, count: int, seed: int) -> list[tuple[str, int, int]]:
    """count JPEGs of shapes on textured backgrounds, 360-640 px a side, in both image folders: (name, w, h)."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from tools.make_coco_dataset import DatasetSpec, make_image

    spec = DatasetSpec(min_size=360, max_size=640, instances=7)
    pool = []
    for index in range(count):
        image, _ = make_image(np.random.default_rng([seed, index]), spec, index, [0])
        name = f"pool_{index:03d}.jpg"
        for split in ("train2017", "val2017"):
            (root / split).mkdir(parents=True, exist_ok=True)
            image.save(root / split / name, quality=90)
        pool.append((name, image.width, image.height))
    return pool


def coco_categories() -> list[dict]:
    sys.path.insert(0, str(ROOT))
    from coco_utils import coco_category_names

    return [{"supercategory": "object", "id": i, "name": n} for i, n in coco_category_names().items()]


def image_records(rng, count: int, pool: list, split: str) -> tuple[list[dict], object, object]:
    """COCO's image fields for count images (ids with gaps, listed out of order), and their widths and heights."""
    import numpy as np

    ids = np.sort(rng.choice(np.arange(1, 5 * count + 10), size=count, replace=False))
    which = rng.integers(len(pool), size=count)
    widths = np.array([pool[i][1] for i in which])
    heights = np.array([pool[i][2] for i in which])
    records = [{"license": int(1 + i % 8), "file_name": pool[p][0],
                "coco_url": f"http://images.cocodataset.org/{split}2017/{image_id:012d}.jpg",
                "height": int(heights[i]), "width": int(widths[i]), "date_captured": "2013-11-14 11:18:45",
                "flickr_url": f"http://farm{1 + i % 9}.staticflickr.com/{image_id % 9000}/{image_id}_a1b2c3d4e5_z.jpg",
                "id": int(image_id)} for i, (image_id, p) in enumerate(zip(ids, which))]
    order = rng.permutation(count)
    return [records[i] for i in order], ids, (widths, heights)


def polygon_vertices(rng, poly_k, cx, cy, r, w, h):
    """Star-shaped outlines around (cx, cy): vertices at jittered even angles, radii 55-100% of r, clipped to the
    image and rounded to 2 decimals as COCO's are. Flat x and y of all polygons, one after another."""
    import numpy as np

    poly = np.repeat(np.arange(len(poly_k)), poly_k)
    starts = np.concatenate([[0], np.cumsum(poly_k)[:-1]])
    j = np.arange(len(poly)) - starts[poly]
    phase = rng.uniform(0, 2 * np.pi, size=len(poly_k))
    angle = phase[poly] + 2 * np.pi * (j + rng.uniform(-0.3, 0.3, size=len(poly))) / poly_k[poly]
    radius = r[poly] * rng.uniform(0.55, 1.0, size=len(poly))
    x = np.round(np.clip(cx[poly] + radius * np.cos(angle), 0, w[poly]), 2)
    y = np.round(np.clip(cy[poly] + radius * np.sin(angle), 0, h[poly]), 2)
    return x, y, starts


def polygon_annotations(rng, w, h) -> list[tuple[list[list[float]], float, list[float]]]:
    """(segmentation, area, bbox) of instances in images of the given sizes: sizes spread from a few pixels to
    half the image, as COCO's small, medium and large are; 8% in two parts."""
    import numpy as np

    n = len(w)
    r = np.exp(rng.uniform(np.log(3.0), np.log(0.45 * np.minimum(w, h))))
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    parts = 1 + (rng.random(n) < TWO_PART_SHARE)
    k = np.clip(np.round(rng.lognormal(np.log(22), 0.6, size=n)), 4, 300).astype(int)
    owner = np.repeat(np.arange(n), parts)
    second = np.concatenate([[False], owner[1:] == owner[:-1]])
    poly_k = np.where(second, np.maximum(4, k[owner] // 3), k[owner])
    shift = np.where(second, 1.6 * r[owner], 0.0)
    x, y, starts = polygon_vertices(rng, poly_k, cx[owner] + shift, cy[owner], np.where(second, r[owner] / 2,
                                    r[owner]), w[owner], h[owner])
    nxt = np.arange(len(x)) + 1
    ends = starts + poly_k
    nxt[ends - 1] = starts
    area = np.abs(np.add.reduceat(x * y[nxt] - x[nxt] * y, starts)) / 2
    area = np.add.reduceat(area, np.flatnonzero(~second))
    vertex_owner = np.repeat(owner, poly_k)
    first_vertex = np.flatnonzero(np.concatenate([[True], vertex_owner[1:] != vertex_owner[:-1]]))
    x0, x1 = np.minimum.reduceat(x, first_vertex), np.maximum.reduceat(x, first_vertex)
    y0, y1 = np.minimum.reduceat(y, first_vertex), np.maximum.reduceat(y, first_vertex)
    coords = np.empty(2 * len(x))
    coords[0::2], coords[1::2] = x, y
    polygons = [p.tolist() for p in np.split(coords, 2 * ends[:-1])]
    segmentations, p = [], 0
    for count in parts.tolist():
        segmentations.append(polygons[p:p + count])
        p += count
    boxes = np.round(np.stack([x0, y0, x1 - x0, y1 - y0], axis=1), 2).tolist()
    return list(zip(segmentations, area.tolist(), boxes))


def crowd_annotation(rng, w: int, h: int) -> tuple[dict, float, list[float]]:
    """A rectangular crowd region as COCO stores them: uncompressed RLE over the column-major pixels."""
    bw, bh = int(rng.integers(8, max(9, w // 2))), int(rng.integers(8, max(9, h // 2)))
    x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
    counts = [x0 * h + y0] + [bh, h - bh] * (bw - 1) + [bh, h * w - ((x0 + bw - 1) * h + y0 + bh)]
    return {"counts": counts, "size": [h, w]}, float(bw * bh), [float(x0), float(y0), float(bw), float(bh)]


def annotation_chunks(rng, ids, sizes, categories: list[dict], first_id: int, chunk: int = 20000):
    """The instances, grouped by category as in COCO's files (so one image's are spread over the file), as JSON
    text in chunks."""
    import numpy as np

    widths, heights = sizes
    counts = rng.poisson(INSTANCES_PER_IMAGE - 1, size=len(ids)) + 1
    counts[rng.random(len(ids)) < EMPTY_SHARE] = 0
    image = np.repeat(np.arange(len(ids)), counts)
    category = rng.choice([c["id"] for c in categories], size=len(image))
    order = np.lexsort((rng.random(len(image)), category))
    for start in range(0, len(order), chunk):
        index = order[start:start + chunk]
        img = image[index]
        crowd = rng.random(len(index)) < CROWD_SHARE
        plain = iter(polygon_annotations(rng, widths[img][~crowd], heights[img][~crowd]) if (~crowd).any() else [])
        anns = []
        for offset, (i, is_crowd) in enumerate(zip(img.tolist(), crowd.tolist())):
            segmentation, area, bbox = crowd_annotation(rng, int(widths[i]), int(heights[i])) if is_crowd \
                else next(plain)
            anns.append({"segmentation": segmentation, "area": area, "iscrowd": int(is_crowd),
                         "image_id": int(ids[i]), "bbox": bbox, "category_id": int(category[index[offset]]),
                         "id": first_id + start + offset})
        yield json.dumps(anns, separators=(",", ":"))[1:-1], len(anns)


def write_split(path: Path, split: str, count: int, pool: list, categories: list[dict], seed: int) -> dict:
    """One annotation file, written as it is made; its image and instance counts and size."""
    import numpy as np

    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    images, ids, sizes = image_records(rng, count, pool, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    instances = 0
    with open(path, "w") as f:
        f.write('{"info":{"description":"bench_scale: generated at COCO\'s size","version":"1.0","year":2017},'
                '"licenses":' + json.dumps([{"id": i, "name": f"license {i}", "url": ""} for i in range(1, 9)]))
        f.write(',"images":' + json.dumps(images, separators=(",", ":")) + ',"annotations":[')
        for text, n in annotation_chunks(rng, ids, sizes, categories, 1 if split == "train" else 10**8):
            f.write(("," if instances else "") + text)
            instances += n
        f.write('],"categories":' + json.dumps(categories, separators=(",", ":")) + "}")
    return {"images": count, "instances": instances, "file_mb": round(path.stat().st_size / 2**20, 1)}


def prepare_dataset(root: Path, images: int, seed: int, keep: bool) -> dict:
    """The generated dataset at root (reused with --keep when made with the same settings): what it holds."""
    marker = root / "bench_scale.json"
    wanted = {"images": images, "seed": seed, "pool": POOL_IMAGES}
    if keep and marker.is_file():
        made = json.loads(marker.read_text())
        if made["settings"] == wanted:
            return {**made["dataset"], "generated_s": None}
    if root.exists() and any(root.iterdir()) and not marker.is_file():
        sys.exit(f"error: --root {root} holds files this benchmark did not write; give an empty or new folder")
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    pool = write_pool(root, POOL_IMAGES, seed)
    categories = coco_categories()
    dataset = {"pool_images": len(pool)}
    for split, count in (("train", images), ("val", max(8, round(images * VAL_PER_TRAIN)))):
        path = root / "annotations" / f"instances_{split}2017.json"
        dataset[split] = write_split(path, split, count, pool, categories, seed)
    marker.write_text(json.dumps({"settings": wanted, "dataset": dataset}))
    return {**dataset, "generated_s": round(time.perf_counter() - started, 1)}


# ---------------------------------------------------------------------------------------------------------
# Measuring, in the process of one implementation


def process_memory(pid: int) -> dict:
    """USS (Private_Clean + Private_Dirty) and Pss_Anon of a process, in MB, from /proc/PID/smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0])
    return {"uss_mb": round((fields["Private_Clean"] + fields["Private_Dirty"]) / 1024, 1),
            "pss_anon_mb": round(fields.get("Pss_Anon", 0) / 1024, 1)}


def first_batch(loader) -> None:
    """Start the loader's workers, take one batch, and shut them down."""
    iterator = iter(loader)
    next(iterator)
    iterator._shutdown_workers()


def worker_memory(dataset, loader_kwargs: dict, workers: int, per_worker: int) -> dict:
    """Memory of the main process before its workers start, and of it and each worker once each has loaded
    exactly per_worker samples of a shuffled order (persistent workers: they stay up after the epoch)."""
    import torch

    batch = 2 if per_worker % 2 == 0 else 1
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    indices = order.repeat(-(-workers * per_worker // len(dataset)))[:workers * per_worker].tolist()
    loader = torch.utils.data.DataLoader(dataset, sampler=indices, batch_size=batch, num_workers=workers,
                                         persistent_workers=True, **loader_kwargs)
    before = process_memory(os.getpid())
    started = time.perf_counter()
    iterator = iter(loader)
    pids = [w.pid for w in iterator._workers]
    loaded, early, peak = 0, None, 0.0
    for step, (images, _) in enumerate(iterator):
        loaded += len(images)
        if early is None and loaded >= workers * batch:  # each worker has delivered a batch
            early = [process_memory(pid) for pid in pids]
        if step % PEAK_POLL_BATCHES == 0:
            peak = max(peak, sum(process_memory(pid)["uss_mb"] for pid in pids))
    seconds = time.perf_counter() - started
    main, per_process = process_memory(os.getpid()), [process_memory(pid) for pid in pids]
    iterator._shutdown_workers()
    workers_uss = sum(m["uss_mb"] for m in per_process)
    peak = max(peak, workers_uss)
    group_pss = main["pss_anon_mb"] + sum(m["pss_anon_mb"] for m in per_process)
    return {"samples_loaded": loaded, "batch_size": batch, "loading_s": round(seconds, 1),
            "main_before_workers": before, "main_after": main, "workers": per_process,
            "workers_after_first_batches": early,
            "workers_uss_mb": round(workers_uss, 1), "workers_uss_peak_mb": round(peak, 1),
            "total_uss_mb": round(main["uss_mb"] + workers_uss, 1),
            "workers_uss_growth_mb": round(workers_uss - sum(m["uss_mb"] for m in early), 1),
            "group_pss_anon_mb": round(group_pss, 1),
            "growth_pss_anon_mb": round(group_pss - before["pss_anon_mb"], 1)}


def run_ours(root: Path, workers: int, elapsed) -> tuple[object, dict]:
    """Our training dataset and loader options, after taking the first batch of train.py's own loader."""
    sys.path.insert(0, str(ROOT))
    import torch

    import data
    import train

    args = train.get_args_parser().parse_args(["--data-path", str(root), "--workers", str(workers), "--device",
                                               "cpu", "--batch-size", "2"])
    args.device, args.reuse_freed_memory = torch.device("cpu"), True  # as train.start_run settles them on the CPU
    loaded = data.load_data(args, None)
    train.start_reusing_freed_memory(args)
    ready = elapsed()
    first_batch(loaded.train_loader)
    timing = {"start_to_loaders_s": round(ready, 2), "start_to_first_batch_s": round(elapsed(), 2)}
    options = {k: v for k, v in data.loader_options(args).items() if k != "num_workers"}
    return loaded.train_set, {"loader_kwargs": options, **timing}


def run_reference(root: Path, workers: int, reference: str, elapsed) -> tuple[object, dict]:
    """The reference's training dataset and loader options, after taking the first batch of the loader its
    train.py's main builds (get_dataset for both splits, RandomSampler, aspect-ratio groups, DataLoader)."""
    sys.path.insert(0, str(Path(reference).resolve()))
    import torch

    import train as reference_train  # the reference's, with the imports its main runs after
    import utils as reference_utils
    from group_by_aspect_ratio import GroupedBatchSampler, create_aspect_ratio_groups

    args = reference_train.get_args_parser().parse_args(["--data-path", str(root), "--workers", str(workers),
                                                         "--device", "cpu", "--batch-size", "2"])
    dataset, _ = reference_train.get_dataset(is_train=True, args=args)
    dataset_test, _ = reference_train.get_dataset(is_train=False, args=args)
    group_ids = create_aspect_ratio_groups(dataset, k=args.aspect_ratio_group_factor)
    batches = GroupedBatchSampler(torch.utils.data.RandomSampler(dataset), group_ids, args.batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=args.workers,
                                         collate_fn=reference_utils.collate_fn)
    torch.utils.data.DataLoader(dataset_test, batch_size=1, sampler=torch.utils.data.SequentialSampler(dataset_test),
                                num_workers=args.workers, collate_fn=reference_utils.collate_fn)
    ready = elapsed()
    first_batch(loader)
    timing = {"start_to_loaders_s": round(ready, 2), "start_to_first_batch_s": round(elapsed(), 2)}
    return dataset, {"loader_kwargs": {"collate_fn": reference_utils.collate_fn}, **timing}


def child(args: argparse.Namespace) -> None:
    """One implementation's figures, as one marked line on stdout (the implementations print their own)."""
    import resource

    def elapsed() -> float:
        return time.time() - args.started

    if args.child == "ours":
        dataset, found = run_ours(args.root, args.workers, elapsed)
    else:
        dataset, found = run_reference(args.root, args.workers, args.reference, elapsed)
    memory = worker_memory(dataset, found.pop("loader_kwargs"), args.workers, args.samples_per_worker)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(RESULT + json.dumps({**found, "training_samples": len(dataset), "main_peak_rss_mb": round(peak, 1),
                               "memory": memory}), flush=True)


# ---------------------------------------------------------------------------------------------------------
# The parent: the dataset, then each implementation alone


def available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def measure(implementation: str, args: argparse.Namespace) -> dict:
    """Run one implementation's process and return its figures (or its error), with the machine's state."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", implementation, "--root", str(args.root),
               "--workers", str(args.workers), "--samples-per-worker", str(args.samples_per_worker)]
    if args.reference:
        command += ["--reference", args.reference]
    state = {"load_average_before": [round(v, 2) for v in os.getloadavg()], "available_mb_before": available_mb()}
    command += ["--started", repr(time.time())]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    state["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT)]
    if result.returncode != 0 or not lines:
        return {**state, "error": f"exit status {result.returncode}: {result.stderr.strip()[-1500:]}"}
    return {**json.loads(lines[-1][len(RESULT):]), **state}


def ratio(ours: float, reference: float, digits: int = 4) -> float | None:
    """ours / reference, or None where the reference measured nothing (tiny runs can grow by 0 MB)."""
    return round(ours / reference, digits) if reference > 0 else None


def compare(ours: dict, reference: dict) -> dict:
    """The targets: start-up no slower than the reference's; worker memory growth at most a tenth of its."""
    if "error" in ours or "error" in reference:
        return {}
    memory, reference_memory = ours["memory"], reference["memory"]
    start = ratio(ours["start_to_first_batch_s"], reference["start_to_first_batch_s"], 3)
    workers = ratio(memory["workers_uss_mb"], reference_memory["workers_uss_mb"])
    peak = ratio(memory["workers_uss_peak_mb"], reference_memory["workers_uss_peak_mb"])
    growth = ratio(memory["growth_pss_anon_mb"], reference_memory["growth_pss_anon_mb"])
    loading = ratio(memory["workers_uss_growth_mb"], reference_memory["workers_uss_growth_mb"])
    found = (workers, peak, growth)
    return {"start_up_ratio": start, "workers_uss_ratio": workers, "workers_uss_peak_ratio": peak,
            "growth_pss_anon_ratio": growth, "workers_uss_growth_ratio": loading,
            "start_up_target_met": start is not None and start <= 1.0,
            "worker_memory_target_met": None if None in found else max(found) <= 0.1}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=118287, help="training images (COCO train2017: 118,287)")
    parser.add_argument("--workers", type=int, default=4, help="loader workers")
    parser.add_argument("--samples-per-worker", type=int, default=2000, help="samples each worker loads")
    parser.add_argument("--reference", help="torchvision's references/detection folder, measured after ours")
    parser.add_argument("--root", type=Path, help="where the dataset is written (default: a folder in /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the dataset at --root, and reuse it if made alike")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.images < 8 or args.workers < 1 or args.samples_per_worker < 1:
        parser.error("--images must be at least 8, --workers and --samples-per-worker at least 1")
    if args.root is None:
        args.root = Path("/tmp") / f"bench_scale_{args.images}_{args.seed}"
    if args.child:
        child(args)
        return

    dataset = prepare_dataset(args.root, args.images, args.seed, args.keep)
    result = {"benchmark": "scale", "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in
                                                 vars(args).items() if k not in ("child", "started")},
              "dataset": dataset, "ours": measure("ours", args)}
    if args.reference:
        result["reference"] = measure("reference", args)
        result["comparison"] = compare(result["ours"], result["reference"])
    if not args.keep:  # the COCO-sized files are ~0.5 GB
        shutil.rmtree(args.root, ignore_errors=True)
    sys.path.insert(0, str(BENCH))
    import torch

    from common import emit, environment

    emit({**result, "environment": environment(torch.device("cpu"))})


if __name__ == "__main__":
    main()

"""Evaluation at COCO scale without a model: peak host memory and wall time of our evaluator and of
torchvision's reference CocoEvaluator on the same synthetic detections.

    python3 bench/bench_coco_scale.py [--images 5000] [--detections 100] [--height 480] [--width 640] \
        [--processes 2] [--backend auto [pycocotools ...]] [--reference /path/to/vision/references/detection]

The ground truth is a COCO annotation file written here (COCO's own category ids, a few polygons per image,
no image files: evaluation reads annotations only). Detections are made per image from a seed as a Mask
R-CNN returns them on the CPU (boxes, scores, labels = category ids, masks as (N, 1, H, W) float32
probabilities), some of them near the ground truth so that AP is not zero, and handed to the evaluator one
image at a time as the evaluation loops do, then dropped. Each rank takes every processes-th image, as a
DistributedSampler does, and the ranks merge over gloo on 127.0.0.1.

Each implementation (and each --backend of ours) runs in its own group of fresh processes, so that their
peaks do not mix. Per process it measures: wall time from the first image to the scores (update loop, merge,
COCOeval; each of our ranks scores its share of the IoU types, as engine.evaluate does, and the reference's
ranks all score every image, as its engine does), the part of it spent making detections (not the
evaluator's work: evaluation_s leaves it out), peak RSS (getrusage's ru_maxrss, the process's high-water mark,
libraries and the interpreter included), the same high-water mark just before the first image (imports and
ground truth loaded), and the peak of the unique set
size (private pages, read from /proc/self/smaps_rollup every 0.2 s) where Linux has it. Prints the 12 box and
12 mask numbers of both and their largest difference, as one JSON object.

glibc's malloc matters here. With its defaults, freed mask buffers of ~30 MB (under its 32 MB cap for mmap)
come back to the heap, which the reference's long-lived per-image results then fragment, so that its
processes grow with every image they evaluate (figures in docs/PERFORMANCE.md), past 24 GB well before
5,000 images.
MALLOC_MMAP_THRESHOLD_=4194304 in the environment keeps such buffers out of the heap in every rank of both
sides, for a comparison of what each evaluator holds; the JSON names any MALLOC_ variable that was set.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import math
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import ROOT, emit, environment, use_implementation  # noqa: E402

RESULT = "RANK_RESULT "
IOU_TYPES = ("bbox", "segm")


# ---------------------------------------------------------------------------------------------------------
# Synthetic data: the same for both implementations, from (seed, image id) alone.


def make_ground_truth(images: int, height: int, width: int, seed: int) -> dict:
    """A COCO annotation file's content: images of height x width, 2-12 polygons each (7 on average, as
    COCO val2017), sizes from small to large, COCO's own category ids and names."""
    from pycocotools import mask as mask_utils

    from coco_utils import coco_category_names  # ours: only the parent process imports it

    categories = [{"id": i, "name": name, "supercategory": "thing"} for i, name in coco_category_names().items()]
    category_ids = np.array([c["id"] for c in categories])
    rng = np.random.default_rng(seed)
    side = min(height, width)
    annotations = []
    for image_id in range(1, images + 1):
        for _ in range(int(rng.integers(2, 13))):
            # Radii log-uniform over 1-30% of the short side: about 40% of objects are COCO-small (< 32^2).
            radius = max(2.0, math.exp(rng.uniform(math.log(0.01 * side), math.log(0.3 * side))))
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            angles = np.sort(rng.uniform(0, 2 * math.pi, 12))
            radii = radius * rng.uniform(0.8, 1.2, 12)
            xs = np.clip(cx + radii * np.cos(angles), 0, width)
            ys = np.clip(cy + radii * np.sin(angles), 0, height)
            polygon = np.stack([xs, ys], 1).flatten().round(2).tolist()
            area = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))))
            if area < 1:
                continue  # clipped to a sliver on the border
            x0, y0 = float(xs.min()), float(ys.min())
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(rng.choice(category_ids)), "segmentation": [polygon],
                                "area": area, "bbox": [x0, y0, float(xs.max()) - x0, float(ys.max()) - y0],
                                "iscrowd": 0})
    return {"info": {"description": "bench_coco_scale synthetic ground truth"},
            "images": [{"id": i, "file_name": f"{i:012d}.jpg", "height": height, "width": width}
                       for i in range(1, images + 1)],
            "annotations": annotations, "categories": categories}


class DetectionMaker:
    """Makes one image's detections at a time, as a Mask R-CNN returns them on the CPU, from (seed, image id)."""

    def __init__(self, coco_gt, count: int, seed: int) -> None:
        self.coco_gt, self.count, self.seed = coco_gt, count, seed
        self.category_ids = np.array(sorted(coco_gt.cats))
        # The probabilities go into one buffer, cleared where the previous image wrote: zeroing a fresh
        # 100 x 480 x 640 float tensor per image would cost more than either evaluator's work. It is safe to
        # reuse because neither evaluator holds the float masks after update returns: ours gets them
        # run-length encoded (as engine.compact_masks does), the reference thresholds them inside update.
        self._buffer = torch.zeros(0)
        self._written: list[tuple[int, int, int, int, int]] = []

    def __call__(self, image_id: int) -> dict[str, torch.Tensor]:
        """Detections sorted by score: one to three near each ground-truth object (most with its category),
        the rest anywhere; each mask is an ellipse in its box, probabilities falling off from the centre
        (0.5 on the ellipse)."""
        rng = np.random.default_rng([self.seed, image_id])
        image = self.coco_gt.imgs[image_id]
        height, width = image["height"], image["width"]
        anns = self.coco_gt.imgToAnns[image_id]
        boxes, labels, scores = [], [], []
        for ann in anns:
            x, y, w, h = ann["bbox"]
            for copy in range(int(rng.integers(1, 4))):
                jitter = rng.normal(0, 0.08, 4) * (w, h, w, h)
                boxes.append((x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]))
                labels.append(ann["category_id"] if rng.random() < 0.85 else int(rng.choice(self.category_ids)))
                scores.append(rng.beta(5, 2) if copy == 0 else rng.beta(2, 4))
        own = [a["category_id"] for a in anns] or list(self.category_ids)
        side = min(height, width)
        while len(boxes) < self.count:
            size = np.exp(rng.uniform(math.log(0.02 * side), math.log(0.6 * side), 2))
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            boxes.append((cx - size[0] / 2, cy - size[1] / 2, cx + size[0] / 2, cy + size[1] / 2))
            labels.append(int(rng.choice(own)) if rng.random() < 0.5 else int(rng.choice(self.category_ids)))
            scores.append(rng.beta(1.5, 6))
        order = np.argsort(-np.array(scores), kind="stable")[: self.count]
        box_array = np.array(boxes, dtype=np.float64).reshape(-1, 4)[order]
        box_array[:, 0::2] = box_array[:, 0::2].clip(0, width)
        box_array[:, 1::2] = box_array[:, 1::2].clip(0, height)
        box_array[:, 2:] = np.maximum(box_array[:, 2:], box_array[:, :2] + 0.5)
        masks = self._masks(box_array, height, width)
        return {"boxes": torch.from_numpy(box_array).float(), "scores": torch.tensor(np.array(scores)[order]).float(),
                "labels": torch.tensor(np.array(labels, dtype=np.int64)[order]), "masks": masks}

    def _masks(self, boxes: np.ndarray, height: int, width: int) -> torch.Tensor:
        if self._buffer.shape != (len(boxes), 1, height, width):
            self._buffer, self._written = torch.zeros(len(boxes), 1, height, width), []
        for k, top, bottom, left, right in self._written:
            self._buffer[k, 0, top:bottom, left:right] = 0
        self._written = []
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            left, top = int(x0), int(y0)
            right, bottom = min(width, math.ceil(x1)), min(height, math.ceil(y1))
            dx = ((np.arange(left, right) + 0.5 - (x0 + x1) / 2) / ((x1 - x0) / 2)) ** 2
            dy = ((np.arange(top, bottom) + 0.5 - (y0 + y1) / 2) / ((y1 - y0) / 2)) ** 2
            self._buffer[k, 0, top:bottom, left:right] = torch.from_numpy(
                np.clip(1 - 0.5 * (dy[:, None] + dx[None]), 0, 1))
            self._written.append((k, top, bottom, left, right))
        return self._buffer


def shard(images: int, rank: int, world_size: int) -> list[int]:
    """The image ids rank sees: DistributedSampler's order without shuffling, padded with the first images
    so that every rank gets as many."""
    ids = list(range(1, images + 1))
    total = math.ceil(images / world_size) * world_size
    ids += ids[: total - images]
    return ids[rank::world_size]


# ---------------------------------------------------------------------------------------------------------
# Measuring one process.


def megabytes(kilobytes: float) -> float:
    """KB to MB, to 0.1 MB."""
    return round(kilobytes / 1024, 1)


def peak_rss_kb() -> int:
    """This process's high-water mark of resident memory (ru_maxrss is in KB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


class UssSampler:
    """Peak unique set size (private clean + dirty pages) sampled from /proc/self/smaps_rollup: unlike RSS it
    leaves out the shared libraries' pages, so it is closer to what the process itself allocated."""

    PATH = Path("/proc/self/smaps_rollup")

    def __init__(self, interval: float = 0.2) -> None:
        self.peak_kb = 0
        self.available = self.PATH.exists()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def sample(self) -> int:
        fields = dict(line.split(":", 1) for line in self.PATH.read_text().splitlines()[1:])
        return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty"))

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak_kb = max(self.peak_kb, self.sample())

    def __enter__(self) -> UssSampler:
        if self.available:
            self.peak_kb = self.sample()
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.available:
            self._stop.set()
            self._thread.join()
            self.peak_kb = max(self.peak_kb, self.sample())


def feed(evaluator, make_detections, image_ids: list[int], clock: dict, prepare) -> None:
    """Each image's detections, made (timed apart) and prepared as the implementation's loop does, into its
    evaluator's update; nothing of them is kept here."""
    for image_id in image_ids:
        started = time.perf_counter()
        output = make_detections(image_id)
        generated = time.perf_counter()
        clock["generate_s"] += generated - started
        evaluator.update({image_id: prepare(output)})
        del output
        clock["update_s"] += time.perf_counter() - generated


def evaluate_ours(args, coco_gt, image_ids: list[int], clock: dict) -> dict[str, list[float]] | None:
    """Our CocoEvaluator as engine.evaluate drives it on the CPU (every rank scores its share of the IoU types);
    the 24 numbers on rank 0, None elsewhere."""
    import utils
    from coco_eval import CocoEvaluator, metric_names
    from coco_utils import CategoryMap
    from engine import compact_masks

    evaluator = CocoEvaluator(coco_gt, IOU_TYPES, CategoryMap.from_categories(coco_gt.dataset["categories"], "coco"),
                              args.backend)
    # What engine.evaluate does to CPU masks (compact_masks), then update: both are the evaluation's work.
    feed(evaluator, DetectionMaker(coco_gt, args.detections, args.seed), image_ids, clock,
         lambda output: {**output, "masks": compact_masks(output["masks"])})
    started = time.perf_counter()
    evaluator.synchronize_between_processes()
    clock["synchronize_s"] = time.perf_counter() - started
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = evaluator.summarize()
    clock["score_s"] = time.perf_counter() - started
    if not utils.is_main_process():
        return None
    clock["images_scored"] = len(evaluator.per_image)
    clock["resolved_backend"] = evaluator.backend
    return {t: [metrics[t][name] for name in metric_names(t)] for t in IOU_TYPES}


def evaluate_reference(args, coco_gt, image_ids: list[int], clock: dict) -> dict[str, list[float]] | None:
    """The reference's CocoEvaluator as its engine.evaluate drives it (every rank accumulates and
    summarizes); the 24 numbers on rank 0."""
    from coco_eval import CocoEvaluator  # the reference's: its folder is first on sys.path

    evaluator = CocoEvaluator(coco_gt, list(IOU_TYPES))
    feed(evaluator, DetectionMaker(coco_gt, args.detections, args.seed), image_ids, clock, lambda output: output)
    started = time.perf_counter()
    evaluator.synchronize_between_processes()
    clock["synchronize_s"] = time.perf_counter() - started
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.accumulate()
        evaluator.summarize()
    clock["score_s"] = time.perf_counter() - started
    clock["images_scored"] = len(evaluator.coco_eval["bbox"].params.imgIds)
    if torch.distributed.get_rank() != 0:
        return None
    return {t: [float(v) for v in evaluator.coco_eval[t].stats] for t in IOU_TYPES}


def rank_main(args) -> None:
    """One rank of one implementation: join the gloo group, evaluate its shard, print its figures."""
    use_implementation(args.reference if args.side == "reference" else None)
    from pycocotools.coco import COCO

    # The evaluator's modules load before the clock starts, as they would with a model to evaluate.
    ours = ("coco_eval", "coco_utils", "engine", "utils")
    for module in ("coco_eval", "utils") if args.side == "reference" else ours:
        importlib.import_module(module)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(hours=3))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(args.annotations)
    image_ids = shard(len(coco_gt.imgs), rank, world_size)
    clock = {"generate_s": 0.0, "update_s": 0.0}
    rss_before = peak_rss_kb()
    torch.distributed.barrier()  # the ranks start together, as after a model is loaded
    with UssSampler() as uss:
        started = time.perf_counter()
        evaluate = evaluate_reference if args.side == "reference" else evaluate_ours
        stats = evaluate(args, coco_gt, image_ids, clock)
        wall = time.perf_counter() - started
    figures = {"rank": rank, "images": len(image_ids), "wall_s": round(wall, 2),
               "evaluation_s": round(wall - clock["generate_s"], 2),
               **{k: round(v, 2) if isinstance(v, float) else v for k, v in clock.items()},
               "rss_before_mb": megabytes(rss_before), "peak_rss_mb": megabytes(peak_rss_kb()),
               "peak_uss_mb": megabytes(uss.peak_kb) if uss.available else None}
    if stats is not None:
        figures["stats"] = stats
    torch.distributed.destroy_process_group()
    print(RESULT + json.dumps(figures), flush=True)


# ---------------------------------------------------------------------------------------------------------
# The parent: ground truth, one group of processes per implementation, the comparison.


def free_port() -> int:
    """A TCP port free on the loopback now, for the group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_all(ranks: list[subprocess.Popen]) -> None:
    """Wait until every rank has ended; when one fails, end the others, which would wait for it in a collective."""
    while any(rank.poll() is None for rank in ranks):
        if any(rank.returncode for rank in ranks):
            for rank in ranks:
                if rank.poll() is None:
                    rank.kill()
                    rank.wait()
            return
        time.sleep(0.5)


def run_group(args, side: str, backend: str, annotations: Path) -> dict:
    """Start args.processes ranks of one implementation and gather their figures."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(args.processes), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.processes))}
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's own connections on the loopback too
    command = [sys.executable, __file__, "--side", side, "--annotations", str(annotations), "--detections",
               str(args.detections), "--seed", str(args.seed), "--backend", backend]
    if side == "reference":
        command += ["--reference", args.reference]
    logs = [annotations.with_name(f"{side}-{backend}-rank{r}.log") for r in range(args.processes)]
    load_before = os.getloadavg()  # other work on the machine slows both sides alike only if it is steady
    ranks = []
    for r, log in enumerate(logs):
        with log.open("w") as out:  # a file, not a pipe: a rank never blocks on output nobody reads yet
            ranks.append(subprocess.Popen(command, cwd=ROOT, env={**env, "RANK": str(r)}, stdout=out,
                                          stderr=subprocess.STDOUT))
    wait_for_all(ranks)
    figures = []
    for rank, log in zip(ranks, logs):
        output = log.read_text()
        lines = [line for line in output.splitlines() if line.startswith(RESULT)]
        if rank.returncode != 0 or not lines:
            raise SystemExit(f"{side} ({backend}) rank failed (exit {rank.returncode}):\n{output[-4000:]}")
        figures.append(json.loads(lines[-1].removeprefix(RESULT)))
    figures.sort(key=lambda f: f["rank"])
    group = {"processes": figures, "stats": figures[0].pop("stats"),
             "load_average": {"before": [round(v, 2) for v in load_before],
                              "after": [round(v, 2) for v in os.getloadavg()]}}
    for key in ("wall_s", "evaluation_s", "peak_rss_mb", "peak_uss_mb"):
        values = [f[key] for f in figures if f[key] is not None]
        group[f"max_{key}"] = max(values) if values else None
    return group


def largest_difference(ours: dict[str, list[float]], reference: dict[str, list[float]]) -> dict[str, float]:
    """The largest absolute difference of the 12 numbers per IoU type, and over both."""
    per_type = {t: max(abs(a - b) for a, b in zip(ours[t], reference[t])) for t in IOU_TYPES}
    return {**per_type, "all": max(per_type.values())}


def main() -> None:
    """Parse the flags; as a rank (hidden --side), evaluate one shard; else run every group and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--detections", type=int, default=100, help="per image")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", nargs="+", default=["auto"], choices=("auto", "pycocotools", "faster"),
                        help="our COCOeval back end(s), each measured in its own processes")
    parser.add_argument("--reference", help="folder of torchvision's references/detection to measure as well")
    parser.add_argument("--side", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--annotations", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        args.backend = args.backend[0]
        rank_main(args)
        return
    if args.reference:
        args.reference = str(Path(args.reference).resolve())

    use_implementation(None)
    result = {"benchmark": "coco_scale", "environment": environment(torch.device("cpu")), "settings": vars(args)}
    # glibc's malloc settings change both evaluators' peaks a great deal (see the docstring): say which held.
    result["environment"]["malloc"] = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    with tempfile.TemporaryDirectory(prefix="bench_coco_scale_") as folder:
        annotations = Path(folder) / "instances_val.json"
        started = time.perf_counter()
        ground_truth = make_ground_truth(args.images, args.height, args.width, args.seed)
        annotations.write_text(json.dumps(ground_truth))
        result["ground_truth"] = {"images": len(ground_truth["images"]),
                                  "annotations": len(ground_truth["annotations"]),
                                  "seconds": round(time.perf_counter() - started, 2)}
        del ground_truth
        result["ours"] = {backend: run_group(args, "ours", backend, annotations) for backend in args.backend}
        if args.reference:
            reference = result["reference"] = run_group(args, "reference", "auto", annotations)
            result["comparison"] = {
                backend: {"peak_rss_ratio": round(ours["max_peak_rss_mb"] / reference["max_peak_rss_mb"], 3),
                          "peak_uss_ratio": round(ours["max_peak_uss_mb"] / reference["max_peak_uss_mb"], 3)
                          if ours["max_peak_uss_mb"] and reference["max_peak_uss_mb"] else None,
                          "evaluation_time_ratio": round(ours["max_evaluation_s"] / reference["max_evaluation_s"], 3),
                          # ours encodes on a thread that also slows the loop's detection making, which
                          # evaluation_s leaves out: the wall-time ratio bounds the time ratio from above
                          "wall_time_ratio": round(ours["max_wall_s"] / reference["max_wall_s"], 3),
                          "largest_difference": largest_difference(ours["stats"], reference["stats"])}
                for backend, ours in result["ours"].items()}
    emit(result)


if __name__ == "__main__":
    main()

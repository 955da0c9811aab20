"""The mask predictor's training cost as the class count grows: torchvision's way (every class's logits computed,
the loss keeping each region's matched class) against the matched-class speed-up (speedups/matched_class_masks.py),
at a given number of positive regions.

Each way runs in a process of its own, so that its peak memory is its own: the predictor's forward, the loss and
the backward on random mask-head features, timed past a warm-up. On the CPU the memory is the process's peak
resident size, and its growth over the size before the first pass, with glibc mapping every block over 64 KB
apart and unmapping it when freed (so that the peak is the tensors', not what the heap keeps); on a GPU the
allocator's peak. A training step runs this part at the end of its forward, while the backbone's activations are
held, so what it adds there adds to the step's peak. How many positive regions a step has depends on the model:
up to 128 an image with torchvision's defaults, few while the proposals are still poor.

    python3 bench/bench_mask_predictor.py --regions 256 --classes 1204
    python3 bench/bench_mask_predictor.py --regions 256 --classes 91 --channels-last

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import available_device, emit, environment, use_implementation

WAYS = ("torchvision", "matched_class")


def rss_mb() -> float:
    """The process's resident size now, in MB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(args: argparse.Namespace, way: str) -> dict:
    """ms per pass (forward, loss, backward) and the peak memory of one way, in this process."""
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    from speedups.matched_class_masks import matched_class_logits

    device = available_device(args.device)
    torch.manual_seed(0)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    predictor = MaskRCNNPredictor(256, 256, args.classes).to(device, memory_format=layout)
    features = torch.randn(args.regions, 256, 14, 14, device=device).contiguous(memory_format=layout)
    features.requires_grad_()
    classes = torch.randint(1, args.classes, (args.regions,), device=device)
    targets = torch.rand(args.regions, 28, 28, device=device)
    rows = torch.arange(args.regions, device=device)

    def one_pass() -> None:
        if way == "torchvision":
            logits = predictor(features)[rows, classes]
        else:
            logits = matched_class_logits(predictor, features, classes)
        F.binary_cross_entropy_with_logits(logits, targets).backward()

    before = rss_mb()
    for _ in range(args.warmup):
        one_pass()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        one_pass()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result = {"ms": round(1000 * (time.perf_counter() - start) / args.steps, 1)}
    if device.type == "cuda":
        result["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result.update(peak_rss_mb=round(peak), peak_growth_mb=round(peak - before))
    return result


def run_apart(argv: list[str], way: str) -> dict:
    """measure(way) in a child process of this script."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    child = subprocess.run([sys.executable, __file__, *argv, "--way", way], capture_output=True, text=True, env=env)
    if child.returncode != 0:
        raise SystemExit(f"error: the {way} pass failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regions", type=int, default=256, help="positive regions in the batch (default 256: two "
                        "images at torchvision's 128)")
    parser.add_argument("--classes", type=int, default=91, help="the model's classes, background included")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels-last", action="store_true", help="the predictor's weights and the mask head's "
                        "features channels-last, as the model has them on the CPU by default")
    parser.add_argument("--steps", type=int, default=5, help="passes timed, after the warm-up")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--way", choices=WAYS, help=argparse.SUPPRESS)  # the child's: one way only
    return parser


def main() -> None:
    args = get_args_parser().parse_args()
    if args.regions < 1 or args.classes < 2 or args.steps < 1 or args.warmup < 0:
        raise SystemExit("error: give --regions >= 1, --classes >= 2, --steps >= 1 and --warmup >= 0")
    use_implementation(None)
    if args.way:
        print(json.dumps(measure(args, args.way)))
        return
    ways = {way: run_apart(sys.argv[1:], way) for way in WAYS}
    result = {"benchmark": "mask_predictor", "environment": environment(available_device(args.device)),
              "settings": vars(args), **ways,
              "ms_ratio": round(ways["matched_class"]["ms"] / ways["torchvision"]["ms"], 3)}
    memory = "peak_memory_mb" if "peak_memory_mb" in ways["torchvision"] else "peak_growth_mb"
    if ways["torchvision"][memory] > 0:
        result["memory_ratio"] = round(ways["matched_class"][memory] / ways["torchvision"][memory], 3)
    emit(result)


if __name__ == "__main__":
    main()

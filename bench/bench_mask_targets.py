"""The mask targets' cost on the CPU: torchvision's `project_masks_on_boxes` (a float copy of all of an image's
masks, then one RoIAlign over the regions) against the cropped targets (speedups/cropped_mask_targets.py: a
RoIAlign call per region on a crop of its mask), for an image of given size, instances and positive regions, and
which of the two the speed-up chooses there (`crops_pay`).

    python3 bench/bench_mask_targets.py --instances 200 --regions 128
    python3 bench/bench_mask_targets.py --instances 3 --regions 32 --height 480 --width 640

Masks are random pixels; regions are boxes of 20-200 px on the image. Each way is timed on the same inputs, the
best of --repeats passes after one warm-up. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from common import emit, environment, use_implementation


def example(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masks (instances, height, width), boxes (regions, 4) and each region's matched instance."""
    generator = torch.Generator().manual_seed(0)
    masks = (torch.rand(args.instances, args.height, args.width, generator=generator) > 0.5).to(torch.uint8)
    corners = torch.rand(args.regions, 2, generator=generator) * torch.tensor([args.width, args.height]) * 0.8
    sides = 20 + torch.rand(args.regions, 2, generator=generator) * 180
    boxes = torch.cat([corners, corners + sides], 1)
    return masks, boxes, torch.randint(0, args.instances, (args.regions,), generator=generator)


def best_ms(targets, inputs: tuple, repeats: int) -> float:
    """The fastest of `repeats` calls of targets on inputs, after one, in ms."""
    targets(*inputs, 28)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        targets(*inputs, 28)
        times.append(time.perf_counter() - started)
    return round(min(times) * 1000, 3)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--regions", type=int, default=128, help="positive regions (at most 128 an image by default)")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1216)
    parser.add_argument("--repeats", type=int, default=3)
    return parser


def main() -> None:
    args = get_args_parser().parse_args()
    if min(args.instances, args.regions, args.height, args.width, args.repeats) < 1:
        sys.exit("error: give --instances, --regions, --height, --width and --repeats of 1 or more")
    use_implementation(None)
    from torchvision.models.detection.roi_heads import project_masks_on_boxes

    from speedups.cropped_mask_targets import cropped_mask_targets, crops_pay

    inputs = example(args)
    ways = {"torchvision": best_ms(project_masks_on_boxes, inputs, args.repeats),
            "cropped": best_ms(cropped_mask_targets, inputs, args.repeats)}
    emit({"benchmark": "mask_targets", "environment": environment(torch.device("cpu")), "settings": vars(args),
          "ms": ways, "ms_ratio": round(ways["cropped"] / ways["torchvision"], 3),
          "crops_chosen": crops_pay(inputs[0], inputs[1])})


if __name__ == "__main__":
    main()

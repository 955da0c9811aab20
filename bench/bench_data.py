"""Data pipeline throughput: samples/s of one loader worker (decode, targets, augmentation, collate) for the
training and the evaluation pipelines, and optionally of a whole DataLoader with N workers.

    python3 bench/bench_data.py --data-path ./datasets/coco-like [--samples 200] [--loader-workers 8]
    python3 bench/bench_data.py --data-path ... --reference /path/to/vision/references/detection

With --reference, the same is measured for torchvision's reference pipeline instead of ours.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import emit, environment, use_implementation  # noqa: E402


def build(args: argparse.Namespace, split: str):
    """(dataset, collate_fn) of one split, for our implementation or the reference's."""
    if args.reference:
        import coco_utils
        import presets
        import utils

        transforms = presets.DetectionPresetTrain(data_augmentation="hflip") if split == "train" \
            else presets.DetectionPresetEval()
        return coco_utils.get_coco(args.data_path, split, transforms), utils.collate_fn
    import presets
    import utils
    from coco_utils import build_dataset
    from freed_memory import ReleasingCollate

    transforms = presets.DetectionPresetTrain("hflip") if split == "train" else presets.DetectionPresetEval()
    return build_dataset(args.data_path, "coco", split, transforms), ReleasingCollate(utils.collate_fn)


def tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def one_worker(dataset, collate_fn, samples: int, batch_size: int) -> dict:
    """What a single loader worker does, timed in this process with one thread, as workers run."""
    torch.set_num_threads(1)
    count = min(samples, len(dataset))
    for i in range(min(4, count)):  # warm-up: file cache, lazy imports
        dataset[i]
    sent = 0
    started = time.perf_counter()
    for start in range(0, count, batch_size):
        batch = collate_fn([dataset[i] for i in range(start, min(start + batch_size, count))])
        sent += tensor_bytes(batch)
    seconds = time.perf_counter() - started
    return {"samples": count, "seconds": round(seconds, 3), "samples_per_s": round(count / seconds, 2),
            "mb_per_sample": round(sent / count / 2**20, 3)}


def whole_loader(dataset, collate_fn, workers: int, batch_size: int, samples: int) -> dict:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=collate_fn, pin_memory=torch.cuda.is_available())
    count = 0
    started = None
    for images, _ in loader:
        if started is None:  # from the first batch on: worker start-up is not throughput
            started = time.perf_counter()
            continue
        count += len(images)
        if count >= samples:
            break
    seconds = time.perf_counter() - started
    return {"workers": workers, "samples": count, "samples_per_s": round(count / seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", required=True)
    parser.add_argument("--reference", help="folder of torchvision's references/detection to measure instead")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--loader-workers", type=int, default=0, help="also time a DataLoader with N workers")
    args = parser.parse_args()
    use_implementation(args.reference)

    result = {"benchmark": "data", "implementation": "reference" if args.reference else "ours",
              "environment": environment(torch.device("cpu")), "settings": vars(args)}
    for split in ("train", "val"):
        dataset, collate_fn = build(args, split)
        result[split] = one_worker(dataset, collate_fn, args.samples, args.batch_size)
        if args.loader_workers:
            torch.set_num_threads(max(1, torch.get_num_threads()))
            result[split]["loader"] = whole_loader(dataset, collate_fn, args.loader_workers, args.batch_size,
                                                   args.samples)
    emit(result)


if __name__ == "__main__":
    main()

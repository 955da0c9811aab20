"""The whole pipeline on a generated dataset: make the data, train Mask R-CNN from scratch, evaluate.

    .venv/bin/python tools/demo.py [--output-dir ./output/demo]

A few minutes on a CPU (a GPU is used when there is one). It prints the train.py command it runs, so the
same can be done by hand, and ends with the box and mask mAP of the last evaluation. Stopped part-way
(Ctrl-C), it continues from its checkpoint when run again.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from errors import exit_status  # noqa: E402
from metrics import read_records  # noqa: E402
from tools.make_coco_dataset import DatasetSpec, generate_dataset  # noqa: E402

# Small images of large shapes and a short schedule: enough for a from-scratch model to find the shapes on
# two CPU cores. Gradient clipping keeps the first steps of a model without pretrained weights from diverging;
# 128 sampled regions per image instead of 512 make the mask head, most of a step's cost, four times cheaper.
DEMO_SPEC = DatasetSpec(train_images=96, val_images=24, min_size=128, max_size=128, instances=3,
                        radius=(0.12, 0.25), seed=0)
TRAIN_FLAGS = ["--dataset", "coco", "--model", "maskrcnn_resnet50_fpn", "--weights-backbone", "none",
               "--epochs", "4", "--batch-size", "4", "--lr", "0.02", "--lr-steps", "3", "--clip-grad-norm", "10",
               "--min-size", "128", "--max-size", "128", "--rois-per-image", "128", "--workers", "0",
               "--print-freq", "6"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", default=str(ROOT / "datasets" / "shapes-demo"))
    parser.add_argument("--output-dir", default=str(ROOT / "output" / "demo"))
    args = parser.parse_args()
    return exit_status(lambda: demo(args), "the demo did not end; run it again")


def demo(args: argparse.Namespace) -> int:
    """Generate the data once, train and evaluate with train.py, and print the last evaluation's mAP."""
    started = time.time()
    data_path = Path(args.data_path)
    # generate_dataset writes this file last and atomically: an interrupted run leaves it absent, never cut short.
    if not (data_path / "annotations" / "instances_val2017.json").is_file():
        generate_dataset(data_path, DEMO_SPEC)
        print(f"Generated {DEMO_SPEC.train_images} training and {DEMO_SPEC.val_images} validation images "
              f"in {data_path}")
    command = [sys.executable, str(ROOT / "train.py"), "--data-path", str(data_path),
               "--output-dir", args.output_dir, "--resume", "auto", *TRAIN_FLAGS]
    print("Running:", shlex.join(command), flush=True)
    returncode = run_training(command)
    if returncode in (128 + signal.SIGINT.value, 128 + signal.SIGTERM.value):  # train.py stopped, saving first
        print("The demo stopped; run it again to continue from its checkpoint")
    if returncode != 0:
        return returncode

    last = [r for _, r in read_records(Path(args.output_dir) / "metrics.jsonl") if r["type"] == "eval"][-1]
    minutes = (time.time() - started) / 60
    print(f"\nDemo finished in {minutes:.1f} min: box mAP {last['bbox']['AP']:.3f}, "
          f"mask mAP {last['segm']['AP']:.3f} (epoch {last['epoch']}). Output in {args.output_dir}")
    return 0


def run_training(command: list[str]) -> int:
    """Run train.py and return its exit status. A terminal's Ctrl-C (or a SIGTERM to the process group, as
    timeout and schedulers send) reaches train.py as well, which stops with a checkpoint: the demo waits for it
    rather than stopping first and killing it."""
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    # Handlers, not SIG_IGN, which the child would inherit through exec.
    previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in stop_signals}
    try:
        return subprocess.run(command, cwd=ROOT).returncode
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())

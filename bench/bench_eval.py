"""Evaluation wall time: `train.py --test-only` on a checkpoint, ours and (with --reference) torchvision's
reference side by side on the same data and machine, with the AP each prints and our time breakdown (model,
data, mask encoding, COCOeval).

    python3 bench/bench_eval.py --data-path ./datasets/coco-like --checkpoint output/checkpoint.pth \
        [--reference /path/to/vision/references/detection] [-- extra flags for our train.py]

Both commands run as a user would run them, in fresh processes, so start-up is counted for both. With
`--rounds N` they take turns N times, each round in the order the last one ended with (ours, the reference; the
reference, ours; ...), so that a machine slowing down or speeding up during the run weighs on both sides alike;
wall_ratio is then the median of the rounds' ratios ("ours" and "reference" hold the last round's runs, "rounds"
every round's walls). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import ROOT, available_device, emit, environment  # noqa: E402

AP_LINE = re.compile(r"Average Precision  \(AP\) @\[ IoU=0\.50:0\.95 \| area=   all \| maxDets=100 \] = (-?[\d.]+)")
BREAKDOWN = re.compile(r"Evaluation of \d+ images: .*")


def timed(command: list[str], cwd: Path, output_dir: Path) -> dict:
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    box_ap, mask_ap = (float(v) for v in AP_LINE.findall(result.stdout)[:2])
    found = {"wall_s": round(seconds, 2), "box_AP": box_ap, "mask_AP": mask_ap}
    breakdown = BREAKDOWN.search(result.stdout)
    if breakdown:
        found["breakdown"] = breakdown.group(0)
    return found


def side_by_side(run_ours, run_reference, rounds: int) -> dict:
    """Each round's wall times and ratio, the two taking turns in ABBA order, the median ratio, and the last
    round's two runs."""
    runners = {"ours": run_ours, "reference": run_reference}
    results = []
    for index in range(rounds):
        order = ("ours", "reference") if index % 2 == 0 else ("reference", "ours")
        found = {name: runners[name]() for name in order}
        results.append({"first": order[0], "ours_s": found["ours"]["wall_s"],
                        "reference_s": found["reference"]["wall_s"],
                        "ratio": round(found["ours"]["wall_s"] / found["reference"]["wall_s"], 3)})
    return {"ours": found["ours"], "reference": found["reference"], "rounds": results,
            "wall_ratio": round(statistics.median(r["ratio"] for r in results), 3)}


def get_args_parser() -> argparse.ArgumentParser:
    """The command line: the checkpoint and data to evaluate, and the rounds to take turns."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", required=True)
    parser.add_argument("--checkpoint", required=True, help="a train.py checkpoint of a 91-class model")
    parser.add_argument("--reference", help="folder of torchvision's references/detection to run as well")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--output-dir", default="/tmp/bench_eval")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --reference: how many times the two take turns (wall_ratio: the median ratio)")
    parser.add_argument("extra", nargs="*", help="more flags for our train.py (after --)")
    return parser


def not_comparable(path: str) -> str | None:
    """Why the reference's --test-only --resume (its flags' layout, the raw weights) would evaluate another model
    than ours from this checkpoint, or None."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if "model_ema" in checkpoint:
        return "keeps a moving average (--model-ema), which ours evaluates and the reference does not"
    saved = checkpoint.get("args", {})
    if saved.get("weights") or saved.get("weights_backbone"):
        return "was trained from pretrained weights (frozen batch norms), a layout the reference's flags here lack"
    return None


def main() -> None:
    parser = get_args_parser()
    args = parser.parse_args()
    if args.rounds < 1 or (args.rounds > 1 and not args.reference):
        parser.error(f"--rounds {args.rounds}: give 1 or more, and more than 1 only with --reference")
    device = available_device(args.device)
    if args.reference:
        problem = not_comparable(args.checkpoint)
        if problem:
            parser.error(f"{args.checkpoint} {problem}; give one trained from scratch without it, as cpu_suite.sh "
                         f"makes")
    common = ["--data-path", str(Path(args.data_path).resolve()), "--dataset", "coco", "--model",
              "maskrcnn_resnet50_fpn", "--device", device.type, "--test-only", "--resume",
              str(Path(args.checkpoint).resolve()), "-j", str(args.workers)]
    out = Path(args.output_dir).resolve()  # each side runs from its own folder (ours: the repository)
    result = {"benchmark": "eval", "environment": environment(device), "settings": vars(args)}

    def run_ours() -> dict:
        # The reference evaluates at torchvision's sizes; ours would take the checkpoint's run's unless given.
        return timed([sys.executable, str(ROOT / "train.py"), *common, "--output-dir", str(out / "ours"),
                      "--min-size", "800", "--max-size", "1333", *args.extra], ROOT, out / "ours")

    if not args.reference:
        result["ours"] = run_ours()
        emit(result)
        return
    reference = Path(args.reference).resolve()

    def run_reference() -> dict:
        return timed([sys.executable, str(reference / "train.py"), *common, "--output-dir", str(out / "reference")],
                     reference, out / "reference")

    result.update(side_by_side(run_ours, run_reference, args.rounds))
    emit(result)


if __name__ == "__main__":
    main()

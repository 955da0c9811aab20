"""Check a COCO-format dataset folder before training and print a report.

    python3 tools/check_dataset.py ./datasets/coco [--splits train val] [--no-decode] [--strict]

Errors are faults that would break a run (unreadable annotation files, entries without an id or without what
every image or category needs, unknown or duplicate ids, more missing or unreadable images than
--max-bad-samples allows): exit status 1. Warnings are faults the loader repairs or skips (degenerate boxes,
short or flat polygons, outlines that cannot be drawn, missing areas, a few bad images): exit status 0, or 1
with --strict. Notes say what sound data may hold (images without annotations) and never fail the check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coco_utils import DATASET_LAYOUTS, add_split_paths  # noqa: E402
from dataset_check import SplitReport, check_split, format_report  # noqa: E402
from errors import exit_status  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_path", nargs="?", default=None,
                        help="dataset root (default ./datasets/coco, as train.py's --data-path, which is taken "
                             "too; not needed for splits given apart)")
    parser.add_argument("--data-path", dest="data_path_flag", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dataset", default="coco", choices=sorted(DATASET_LAYOUTS))
    add_split_paths(parser)
    parser.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    parser.add_argument("--no-decode", action="store_true", help="only look the images up; do not decode them")
    parser.add_argument("--max-bad-samples", type=float, default=0.01,
                        help="share of unusable images that is still a warning (as train.py's flag)")
    parser.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    parser.add_argument("--workers", type=int, default=8,
                        help="threads that read images (0: read them in the main thread, as train.py's -j 0 loads)")
    args = parser.parse_args(argv)
    if args.data_path is not None and args.data_path_flag is not None and args.data_path != args.data_path_flag:
        parser.error(f"two dataset roots, {args.data_path} and --data-path {args.data_path_flag}; give one")
    args.data_path = args.data_path or args.data_path_flag or "./datasets/coco"
    if args.workers < 0:
        parser.error(f"--workers {args.workers} must be 0 or more")
    if not 0 <= args.max_bad_samples <= 1:
        parser.error(f"--max-bad-samples {args.max_bad_samples} must be a share between 0 and 1")
    return exit_status(lambda: check(args), "the check did not end")


def check(args: argparse.Namespace) -> int:
    """Check the splits and print the report; 1 when it failed."""
    reports: list[SplitReport] = []
    trained = trained_instances = None  # the training file's categories and instances, once read
    for split in sorted(set(args.splits), key=["train", "val"].index):
        reports.append(check_split(Path(args.data_path), args.dataset, split, decode=not args.no_decode,
                                   max_bad_share=args.max_bad_samples, workers=args.workers,
                                   paths=(getattr(args, f"{split}_images"), getattr(args, f"{split}_annotations")),
                                   trained_categories=trained, trained_instances=trained_instances))
        trained = reports[-1].categories or None
        trained_instances = reports[-1].instances_by_category if trained else None
    print(format_report(reports))
    errors = sum(len(r.errors) for r in reports)
    warnings = sum(len(r.warnings) for r in reports)
    verdict = "FAILED" if errors or (args.strict and warnings) else "OK"
    print(f"{verdict}: {errors} errors, {warnings} warnings")
    return 1 if verdict == "FAILED" else 0


if __name__ == "__main__":
    sys.exit(main())

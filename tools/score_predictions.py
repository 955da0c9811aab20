"""Score COCO results files against an annotation file, as an evaluation in train.py scores a model's detections.

    python3 tools/score_predictions.py output/predictions_segm.json output/predictions_bbox.json \\
        --data-path ./datasets/coco
    python3 tools/score_predictions.py coco_instances_results.json --val-annotations val.json --output scores.json

The files are lists of detections in COCO's results format, as --test-only, tools/predict.py (with --annotations,
for the file's image ids), Detectron2 and MMDetection write them. Each is scored as every IoU type all its
detections carry (a file with boxes and masks, as Detectron2's, as both), over every image of the annotation
file (an image without detections has its instances missed), with the same tables, metric names and scoring as
train.py's evaluation: a file annotated as LVIS's is scored as LVIS's evaluation, --eval-max-dets and
--coco-backend as train.py takes them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpoint import write_json_atomic  # noqa: E402
from coco_eval import (  # noqa: E402
    COCO_MAX_DETECTIONS,
    COCOEVAL_BACKENDS,
    LVIS_MAX_DETECTIONS,
    as_lvis_keeps,
    backend_for,
    check_federated,
    named_metrics,
    partly_federated_note,
    print_tables,
    score,
    scored_as_lvis,
)
from coco_utils import (  # noqa: E402
    DATASET_LAYOUTS,
    NOTHING_TO_SCORE,
    CocoIndex,
    check_person_keypoints,
    complete_keypoints,
    counts_for_scoring,
    load_coco,
    scoring_ground_truth,
)
from errors import UserError, exit_status  # noqa: E402
from results_file import GEOMETRY, checked_records, iou_types_in, read_results  # noqa: E402
from tools import predict  # noqa: E402

EVALUATION_RECORD, RUN_RECORD = "evaluation.json", "args.json"  # --test-only's and a training run's, in their folder
EVALUATION_SCORE_THRESH = 0.05  # torchvision's R-CNNs' box_score_thresh, which --test-only keeps
WRITE_REMEDY = "free space there, make its folder writable, or give another --output"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", nargs="+", type=Path, help="COCO results files (JSON lists of detections)")
    parser.add_argument("--data-path", default="./datasets/coco",
                        help="dataset root whose validation annotation file scores them (as train.py's)")
    parser.add_argument("--dataset", default="coco", choices=sorted(DATASET_LAYOUTS),
                        help="--data-path's layout: coco (instances_val2017.json) or coco_kp "
                             "(person_keypoints_val2017.json)")
    parser.add_argument("--val-annotations", default=None, metavar="FILE",
                        help="the annotation file to score against, instead of --data-path's")
    parser.add_argument("--iou-types", nargs="+", choices=list(GEOMETRY), default=None,
                        help="score only these (default: every type the detections carry)")
    parser.add_argument("--eval-max-dets", type=int, default=None, metavar="N",
                        help="the most detections of an image, per category, that the box and mask scores count "
                             "(of an image over all categories for a file annotated as LVIS's), as train.py's "
                             "(default: that of the run whose evaluation.json or args.json is beside "
                             "predictions_*.json, else 100)")
    parser.add_argument("--coco-backend", default="auto", choices=COCOEVAL_BACKENDS,
                        help="COCOeval's implementation: faster-coco-eval where installed (auto), or pycocotools")
    parser.add_argument("--output", default=None, metavar="FILE",
                        help="also write the metrics as JSON (as evaluation.json names them)")
    args = parser.parse_args(argv)
    if args.eval_max_dets is not None and args.eval_max_dets <= 10:
        parser.error(f"--eval-max-dets {args.eval_max_dets} must be more than 10 (the scores count 1 and 10 too)")
    return exit_status(lambda: score_files(args), "nothing was written")


def score_files(args: argparse.Namespace) -> None:
    """Read and check the predictions files, score each IoU type, print the tables and write --output."""
    started = time.perf_counter()
    output = _output_path(args.output)
    ann_file = _annotation_file(args)
    by_type = _records_by_type(args.predictions, args.iou_types)
    if args.eval_max_dets is None:
        args.eval_max_dets = _runs_eval_max_dets([path for path, _ in by_type.values()])
    coco_gt = _ground_truth(ann_file, "keypoints" in by_type)
    federated = scored_as_lvis(coco_gt, list(by_type))
    backend = (check_federated(coco_gt, args.coco_backend, "the annotation file") if federated
               else backend_for(coco_gt, args.coco_backend))
    _note_scoring(coco_gt, federated, args.eval_max_dets)
    checked = {iou_type: _checked(path, records, coco_gt, iou_type) for iou_type, (path, records) in by_type.items()}
    sources = {iou_type: path for iou_type, (path, _) in by_type.items()}
    del by_type  # the files' own records: at COCO's size, GBs no longer needed
    image_ids = coco_gt.getImgIds()
    for path in dict.fromkeys(sources.values()):  # once a file, before LVIS's cut
        _say_images_without_detections(path, {r["image_id"] for t, p in sources.items() if p == path
                                               for r in checked[t]}, len(image_ids))
    metrics = _scored(checked, coco_gt, backend, args.eval_max_dets, federated)
    print_tables(metrics, args.eval_max_dets, federated)
    if output is not None:
        record = {"time": round(time.time(), 3),
                  "predictions": {iou_type: str(path.resolve()) for iou_type, path in sources.items()},
                  "val_annotations": str(ann_file.resolve()), "val_images": len(image_ids),
                  "settings": {"eval_max_dets": args.eval_max_dets, "backend": backend},
                  "seconds": round(time.perf_counter() - started, 3)} | metrics
        write_json_atomic(output, record, remedy=WRITE_REMEDY)
        print(f"Wrote {args.output}")


def _scored(checked: dict[str, list[dict]], coco_gt: CocoIndex, backend: str, max_dets: int, federated: bool
            ) -> dict[str, dict]:
    """Each IoU type's metrics (emptying checked: each type's records are let go once scored)."""
    metrics = {}
    for iou_type in list(checked):
        records = checked.pop(iou_type)
        if federated:
            records = as_lvis_keeps(scoring_ground_truth(coco_gt, iou_type), records, max_dets)
        evaluator = score(coco_gt, records, iou_type, coco_gt.getImgIds(), backend, copy_results=False,
                          max_dets=max_dets, federated=federated)
        del records
        metrics[iou_type] = named_metrics(evaluator, coco_gt, iou_type, max_dets, federated)
        del evaluator  # before the next type's is built
    return metrics


def _output_path(given: str | None) -> Path | None:
    """--output's file, checked before anything is scored: a regular file or none yet (a link is written
    through to its target, which the atomic write would otherwise replace)."""
    if given is None:
        return None
    path = Path(given)
    if not given or path.is_dir():
        raise UserError(f"--output {given!r} is no file name; give the JSON file to write, such as scores.json")
    if path.exists() and not path.resolve().is_file():
        raise UserError(f"--output {given} is no regular file (a device or pipe); give a file to write (the tables "
                        f"are printed anyway)")
    return path.resolve()


def _annotation_file(args: argparse.Namespace) -> Path:
    """--val-annotations, else --data-path's validation annotation file (its images are not needed)."""
    if args.val_annotations is not None:
        path = Path(args.val_annotations)
        if not path.is_file():
            raise UserError(f"--val-annotations {path} is no file; give the COCO JSON file the predictions were "
                            f"made on")
        return path
    path = Path(args.data_path) / DATASET_LAYOUTS[args.dataset]["val"][1]
    if not path.is_file():
        raise UserError(f"annotation file {path} is missing; give --val-annotations FILE, or a --data-path holding "
                        f"the COCO layout")
    return path


def _runs_eval_max_dets(paths: list[Path]) -> int:
    """--eval-max-dets left out: that of the run that wrote our predictions files (the evaluation.json of a
    --test-only call, the args.json of a training run, in their folder), said where it is not 100; else 100."""
    found = {}
    for path in paths:
        if path.name not in {f"predictions_{iou_type}.json" for iou_type in GEOMETRY}:
            continue
        for record, section in ((EVALUATION_RECORD, "settings"), (RUN_RECORD, "args")):
            value = _read_value(path.parent / record, (section, "eval_max_dets"))
            if isinstance(value, int) and not isinstance(value, bool):
                found[str(path.parent / record)] = value
    if len(set(found.values())) > 1:
        said = ", ".join(f"{value} in {where}" for where, value in found.items())
        raise UserError(f"the runs beside the predictions scored up to different numbers of detections ({said}); "
                        f"give --eval-max-dets")
    value = next(iter(found.values()), COCO_MAX_DETECTIONS)
    if value != COCO_MAX_DETECTIONS:
        print(f"As the run that wrote them ({', '.join(found)}): --eval-max-dets {value}")
    return value


def _read_value(path: Path, keys: tuple[str, ...]) -> object:
    """A value inside a JSON file, None where the file, or the value, is not there."""
    try:
        value = json.loads(path.read_text())
        for key in keys:
            value = value[key]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value


def _ground_truth(ann_file: Path, keypoints: bool) -> CocoIndex:
    """The annotation file's index, checked and completed as train.py's validation set reads it."""
    coco_gt = load_coco(ann_file)
    if not any(counts_for_scoring(ann) for ann in coco_gt.dataset["annotations"]):
        raise UserError(f"{ann_file}: {NOTHING_TO_SCORE}")
    if keypoints:
        check_person_keypoints(coco_gt.dataset["categories"], ann_file, needs="keypoint scoring")
        complete_keypoints(coco_gt.dataset["annotations"], ann_file)
    return coco_gt


def _records_by_type(paths: list[Path], wanted: list[str] | None) -> dict[str, tuple[Path, list[dict]]]:
    """Each IoU type scored, with the file that gives it and that file's records: where two files carry a type
    (MMDetection writes boxes into its masks' file too), the one that carries fewer other types."""
    files = []
    for path in dict.fromkeys(paths):
        records = read_results(path)
        if not records:
            raise UserError(f"{path} holds no detections, so there is nothing to score (every AP would be 0)")
        carried = iou_types_in(records)
        _say_types_not_scored(path, records, carried)
        _say_predict_threshold(path)
        if not carried:
            raise UserError(f"{path}: its detections do not all carry a bbox, a segmentation or keypoints; give "
                            f"each the geometry of the IoU type to score")
        files.append((path, records, carried))
    by_type = {}
    for iou_type in GEOMETRY:
        givers = [(len(carried), path, records) for path, records, carried in files if iou_type in carried]
        least = min((giver[0] for giver in givers), default=None)
        fewest = [giver for giver in givers if giver[0] == least]
        if len(fewest) > 1:
            raise UserError(f"{fewest[0][1]} and {fewest[1][1]} both hold {iou_type} detections; give one file of "
                            f"each IoU type")
        if fewest and (wanted is None or iou_type in wanted):
            by_type[iou_type] = fewest[0][1:]
    missing = [t for t in wanted or [] if t not in by_type]
    if missing:
        raise UserError(f"--iou-types {' '.join(missing)}: no file's detections all carry "
                        f"{' or '.join(GEOMETRY[t] for t in missing)}; give the file of that type")
    return by_type


def _checked(path: Path, records: list[dict], coco_gt: CocoIndex, iou_type: str) -> list[dict]:
    """The records of one IoU type checked (results_file.checked_records); those of unknown categories left out
    with a warning, or an error where that is every one."""
    kept, unknown = checked_records(records, coco_gt, iou_type, path)
    if not unknown:
        return kept
    ids = ", ".join(f"{category_id!r}: {count}" for category_id, count in sorted(unknown.items(), key=str))
    said = f"{sum(unknown.values())} of {len(records)} detections have category ids that are no category of the " \
           f"annotation file ({ids})"
    if not kept:
        raise UserError(f"{path}: {said}; write each detection's category id as the annotation file has it (a "
                        f"model's label numbers are not the file's ids where its categories are not 1, 2, ...)")
    category_ids = sorted(coco_gt.getCatIds())
    numbered = category_ids == list(range(1, len(category_ids) + 1))
    if numbered and set(unknown) == {0} and max(record["category_id"] for record in kept) < len(category_ids):
        said += ("; the ids look like 0-based class indices where the file numbers its categories from 1, and "
                 "then every other detection is scored as the next category: add 1 to each id")
    print(f"warning: {path}: {said} and are left out", file=sys.stderr)
    return kept


def _note_scoring(coco_gt: CocoIndex, federated: bool, max_dets: int) -> None:
    """Where the scoring is not what LVIS's published figures count, or a file is partly annotated as LVIS's."""
    if federated and max_dets < LVIS_MAX_DETECTIONS:
        print(f"note: the annotation file is annotated as LVIS's, whose evaluation counts {LVIS_MAX_DETECTIONS} "
              f"detections an image, and this scoring counts {max_dets}: give --eval-max-dets {LVIS_MAX_DETECTIONS} "
              f"for AP comparable with LVIS's")
    elif not federated and (note := partly_federated_note(coco_gt)) is not None:
        print(f"note: the annotation file: {note}")


def _say_types_not_scored(path: Path, records: list[dict], carried: tuple[str, ...]) -> None:
    """A type some detections of a file carry and others lack is not scored from it: said, not left unsaid."""
    for iou_type, key in GEOMETRY.items():
        having = sum(key in record for record in records)
        if iou_type not in carried and having:
            print(f"note: {path}: {iou_type} is not scored from this file: {len(records) - having} of its "
                  f"{len(records)} detections have no {key}")


def _say_predict_threshold(path: Path) -> None:
    """tools/predict.py's file keeps the detections at its --score-thresh (0.5 unless given), which AP counts
    lower than an evaluation's, whose model keeps them from its own threshold: said where its record shows so."""
    threshold = _read_value(path.parent / predict.CALL_RECORD, ("score_thresh",)) if path.name == predict.RESULTS \
        else None
    if isinstance(threshold, (int, float)) and threshold > EVALUATION_SCORE_THRESH:
        print(f"note: {path} was written by tools/predict.py with --score-thresh {threshold}, so the detections "
              f"scoring below it are not there and AP counts lower than an evaluation's (the R-CNNs keep them from "
              f"{EVALUATION_SCORE_THRESH}): run it with --score-thresh {EVALUATION_SCORE_THRESH} for numbers "
              f"comparable with --test-only's")


def _say_images_without_detections(path: Path, detected: set, images: int) -> None:
    without = images - len(detected)
    if without:
        print(f"note: {path}: {without} of the annotation file's {images} images have no detection, so their "
              f"instances count as missed (predictions made on only some of the images score lower so)")


if __name__ == "__main__":
    sys.exit(main())

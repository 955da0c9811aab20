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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotations import PARTLY_FEDERATED  # noqa: E402
from checkpoint import write_json_atomic  # noqa: E402
from coco_eval import (  # noqa: E402
    COCO_MAX_DETECTIONS,
    COCOEVAL_BACKENDS,
    LVIS_MAX_DETECTIONS,
    backend_for,
    check_federated,
    lvis_keeps,
    named_metrics,
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
    split_paths,
)
from errors import UserError, exit_status  # noqa: E402
from results_file import GEOMETRY, checked_records, iou_types_in, read_results  # noqa: E402

WRITE_REMEDY = "free space there, make its folder writable, or give another --output"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", nargs="+", type=Path, help="COCO results files (JSON lists of detections)")
    parser.add_argument("--data-path", default="./datasets/coco",
                        help="dataset root whose validation annotation file scores them (as train.py's)")
    parser.add_argument("--dataset", default="coco", choices=sorted(DATASET_LAYOUTS))
    parser.add_argument("--val-annotations", default=None, metavar="FILE",
                        help="the annotation file to score against, instead of --data-path's")
    parser.add_argument("--iou-types", nargs="+", choices=list(GEOMETRY), default=None,
                        help="score only these (default: every type the detections carry)")
    parser.add_argument("--eval-max-dets", type=int, default=COCO_MAX_DETECTIONS, metavar="N",
                        help="the most detections of an image, per category, that the box and mask scores count "
                             "(of an image over all categories for a file annotated as LVIS's), as train.py's")
    parser.add_argument("--coco-backend", default="auto", choices=COCOEVAL_BACKENDS,
                        help="COCOeval's implementation: faster-coco-eval where installed (auto), or pycocotools")
    parser.add_argument("--output", type=Path, default=None, metavar="FILE",
                        help="also write the metrics as JSON (as evaluation.json names them)")
    args = parser.parse_args(argv)
    if args.eval_max_dets <= 10:
        parser.error(f"--eval-max-dets {args.eval_max_dets} must be more than 10 (the scores count 1 and 10 too)")
    return exit_status(lambda: score_files(args), "nothing was written")


def score_files(args: argparse.Namespace) -> None:
    """Read, check and score the predictions files; print the tables and write --output."""
    started = time.perf_counter()
    ann_file = _annotation_file(args)
    by_type = _records_by_type(args.predictions, args.iou_types)
    coco_gt = _ground_truth(ann_file, "keypoints" in by_type)
    federated = scored_as_lvis(coco_gt, list(by_type))
    backend = check_federated(coco_gt, args.coco_backend) if federated else backend_for(coco_gt, args.coco_backend)
    _note_scoring(coco_gt, federated, args.eval_max_dets)
    image_ids = coco_gt.getImgIds()
    metrics, sources = {}, {}
    for iou_type, (path, raw) in by_type.items():
        records, unknown = checked_records(raw, coco_gt, iou_type, path)
        _say_left_out(path, unknown)
        if federated:
            records = _as_lvis_keeps(scoring_ground_truth(coco_gt, iou_type), records, args.eval_max_dets)
        evaluator = score(coco_gt, records, iou_type, image_ids, backend, copy_results=False,
                          max_dets=args.eval_max_dets, federated=federated)
        metrics[iou_type] = named_metrics(evaluator, coco_gt, iou_type, args.eval_max_dets, federated)
        sources[iou_type] = str(path.resolve())
        _say_images_without_detections(path, records, len(image_ids))
    print_tables(metrics, args.eval_max_dets, federated)
    if args.output is not None:
        record = {"time": round(time.time(), 3), "predictions": sources, "val_annotations": str(ann_file.resolve()),
                  "val_images": len(image_ids), "settings": {"eval_max_dets": args.eval_max_dets, "backend": backend},
                  "seconds": round(time.perf_counter() - started, 3)} | metrics
        write_json_atomic(args.output, record, remedy=WRITE_REMEDY)
        print(f"Wrote {args.output}")


def _annotation_file(args: argparse.Namespace) -> Path:
    if args.val_annotations is not None:
        path = Path(args.val_annotations)
        if not path.is_file():
            raise UserError(f"--val-annotations {path} is no file; give the COCO JSON file the predictions were "
                            f"made on")
        return path
    return split_paths(args.data_path, args.dataset, "val")[1]


def _ground_truth(ann_file: Path, keypoints: bool) -> CocoIndex:
    """The annotation file's index, checked and completed as train.py's validation set reads it."""
    coco_gt = load_coco(ann_file)
    if not any(counts_for_scoring(ann) for ann in coco_gt.dataset["annotations"]):
        raise UserError(f"{ann_file}: {NOTHING_TO_SCORE}")
    if keypoints:
        check_person_keypoints(coco_gt.dataset["categories"], ann_file)
        complete_keypoints(coco_gt.dataset["annotations"], ann_file)
    return coco_gt


def _records_by_type(paths: list[Path], wanted: list[str] | None) -> dict[str, tuple[Path, list[dict]]]:
    """Each IoU type scored, with the file that gives it and that file's records."""
    by_type: dict[str, tuple[Path, list[dict]]] = {}
    for path in paths:
        records = read_results(path)
        if not records:
            raise UserError(f"{path} holds no detections, so there is nothing to score (every AP would be 0)")
        carried = iou_types_in(records)
        if not carried:
            raise UserError(f"{path}: its detections do not all carry a bbox, a segmentation or keypoints; give "
                            f"each the geometry of the IoU type to score")
        for iou_type in carried if wanted is None else [t for t in carried if t in wanted]:
            if iou_type in by_type:
                raise UserError(f"{by_type[iou_type][0]} and {path} both hold {iou_type} detections; give one "
                                f"file of each type (or --iou-types)")
            by_type[iou_type] = (path, records)
    missing = [t for t in wanted or [] if t not in by_type]
    if missing:
        raise UserError(f"--iou-types {' '.join(missing)}: no file's detections all carry "
                        f"{' or '.join(GEOMETRY[t] for t in missing)}; give the file of that type")
    return dict(sorted(by_type.items(), key=lambda item: list(GEOMETRY).index(item[0])))


def _as_lvis_keeps(ground_truth, records: list[dict], max_dets: int) -> list[dict]:
    """The records LVIS's evaluation takes of each image (coco_eval.lvis_keeps)."""
    per_image: dict = {}
    for record in records:
        per_image.setdefault(record["image_id"], []).append(record)
    return [kept for image_id, image in per_image.items() for kept in lvis_keeps(ground_truth, image_id, image,
                                                                                  max_dets)]


def _note_scoring(coco_gt: CocoIndex, federated: bool, max_dets: int) -> None:
    """Where the scoring is not what LVIS's published figures count, or a file is partly annotated as LVIS's."""
    if federated and max_dets < LVIS_MAX_DETECTIONS:
        print(f"note: the annotation file is annotated as LVIS's, whose evaluation counts {LVIS_MAX_DETECTIONS} "
              f"detections an image, and this scoring counts {max_dets}: give --eval-max-dets {LVIS_MAX_DETECTIONS} "
              f"for AP comparable with LVIS's")
    elif not federated and PARTLY_FEDERATED in coco_gt.warned:
        print(f"note: the annotation file: {coco_gt.warned[PARTLY_FEDERATED][1]}")


def _say_left_out(path: Path, unknown) -> None:
    if unknown:
        ids = ", ".join(f"{category_id!r}: {count}" for category_id, count in sorted(unknown.items(), key=str))
        print(f"warning: {path}: {sum(unknown.values())} detections have category ids that are no category of the "
              f"annotation file ({ids}) and are left out; were they written with the model's label numbers?",
              file=sys.stderr)


def _say_images_without_detections(path: Path, records: list[dict], images: int) -> None:
    without = images - len({record["image_id"] for record in records})
    if without:
        print(f"note: {path}: {without} of the annotation file's {images} images have no detection, so their "
              f"instances count as missed (predictions made on only some of the images score lower so)")


if __name__ == "__main__":
    sys.exit(main())

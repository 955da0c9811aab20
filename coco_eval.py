"""Collect predictions from every rank, turn them into COCO results and score them with COCOeval."""

from __future__ import annotations

import contextlib
import copy
import io
import time
import unicodedata
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import utils
from annotations import FEDERATED_LISTS, FREQUENCY_GROUPS, PARTLY_FEDERATED, is_id_list, rle_areas
from checkpoint import RUN_OUTPUT_REMEDY, write_json_atomic
from coco_utils import CategoryMap, id_array, labels_of, plain_id, scoring_ground_truth
from errors import UserError

IOU_TYPES = ("bbox", "segm", "keypoints")  # what COCOeval scores: boxes, masks, keypoints
# The order of COCOeval.stats, named, and what each line of the standard summary says of it:
# (precision or recall, IoU range, object size, detections per image).
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
KEYPOINT_METRIC_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
_KEYPOINT_ROWS = [(kind, iou, area, 20) for kind in ("AP", "AR")
                  for iou, area in (("0.50:0.95", "all"), ("0.50", "all"), ("0.75", "all"), ("0.50:0.95", "medium"),
                                    ("0.50:0.95", "large"))]
# COCOeval's maxDets for boxes and masks: the most detections of an image it scores per category, whatever the
# model keeps (--eval-max-dets changes the last; keypoints keep their own 20).
COCO_MAX_DETECTIONS = 100
# LVIS's evaluation counts this many detections an image, over all categories.
LVIS_MAX_DETECTIONS = 300
FEDERATED_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf", "AR300", "ARs", "ARm",
                          "ARl")


def _summary_rows(max_dets: int, federated: bool = False) -> list[tuple[str, str, str, int, str]]:
    """(precision or recall, IoU range, object size, detections per image, categories: all or a frequency group)
    of each box or mask metric: COCO's 12, or for a federated file LVIS's 13 (AP of each frequency group, and
    recall at the most detections only)."""
    whole = "0.50:0.95"
    precision = [("AP", whole, "all", max_dets, "all"), ("AP", "0.50", "all", max_dets, "all"),
                 ("AP", "0.75", "all", max_dets, "all"),
                 *(("AP", whole, area, max_dets, "all") for area in ("small", "medium", "large"))]
    areas = [("AR", whole, area, max_dets, "all") for area in ("small", "medium", "large")]
    if federated:
        return [*precision, *(("AP", whole, "all", max_dets, group) for group in FREQUENCY_GROUPS),
                ("AR", whole, "all", max_dets, "all"), *areas]
    return [*precision, ("AR", whole, "all", 1, "all"), ("AR", whole, "all", 10, "all"),
            ("AR", whole, "all", max_dets, "all"), *areas]


def format_summary(stats: Sequence[float], iou_type: str = "bbox", max_dets: int = COCO_MAX_DETECTIONS,
                   federated: bool = False) -> str:
    """The lines COCO tools print for a stats vector (12, or 10 for keypoints), whichever back end computed it;
    LVIS's 13, with the categories each covers, for a federated file."""
    kinds = {"AP": "Average Precision  (AP)", "AR": "Average Recall     (AR)"}
    rows = ([(*row, "all") for row in _KEYPOINT_ROWS] if iou_type == "keypoints"
            else _summary_rows(max_dets, federated))
    return "\n".join(f" {kinds[kind]} @[ IoU={iou:<9} | area={area:>6} | maxDets={dets:>3}"
                     f"{f' catIds={cats:>3}' if federated else ''} ] = {value:0.3f}"
                     for (kind, iou, area, dets, cats), value in zip(rows, stats))


def metric_names(iou_type: str, max_dets: int = COCO_MAX_DETECTIONS, federated: bool = False) -> tuple[str, ...]:
    """The metrics' names in the order of the stats (COCOeval's, or LVIS's for a federated file); the recall at
    the most detections is AR<max_dets>."""
    if iou_type == "keypoints":
        return KEYPOINT_METRIC_NAMES
    names = FEDERATED_METRIC_NAMES if federated else METRIC_NAMES
    return tuple(f"AR{max_dets}" if name in ("AR100", "AR300") else name for name in names)


def is_federated(coco_gt: COCO) -> bool:
    """Whether a ground truth is annotated as LVIS's is: each image lists the categories checked and found absent
    (neg_category_ids) and those whose instances are not all annotated (not_exhaustive_category_ids)."""
    images = coco_gt.dataset.get("images", [])
    return bool(images) and all(all(key in image for key in FEDERATED_LISTS) for image in images)


def scored_as_lvis(coco_gt: COCO, iou_types: Sequence[str]) -> bool:
    """Whether predictions of these IoU types on this ground truth are scored as LVIS's evaluation scores them:
    a federated file, for boxes and masks (LVIS has no keypoints, and a keypoint model's boxes score as COCO's)."""
    return "keypoints" not in iou_types and is_federated(coco_gt)


def partly_federated_note(coco_gt: COCO) -> str | None:
    """The file check's note on a file where only some images list LVIS's categories checked (scored as COCO's
    then), or None."""
    warned = getattr(coco_gt, "warned", {})
    return warned[PARTLY_FEDERATED][1] if PARTLY_FEDERATED in warned else None


def check_federated(coco_gt: COCO, backend: str = "auto", what: str = "the validation file") -> str:
    """The back end that scores a federated file (faster-coco-eval, whose lvis_style is LVIS's evaluation;
    pycocotools has none), checked before a run trains: one installed, ids it reads, and each category's
    frequency group. what: the file, as the errors name it."""
    where = f"{what} is annotated as LVIS's (each image's neg_category_ids and not_exhaustive_category_ids)"
    if backend == "pycocotools":
        raise UserError(f"{where}, which faster-coco-eval scores: leave --coco-backend at auto, or give faster")
    if resolve_backend("auto") != "faster":
        raise UserError(f"{where}, which faster-coco-eval scores: pip install faster-coco-eval")
    if not _faster_reads_ids(coco_gt):
        raise UserError(f"{where}, whose scoring needs image and category ids that are integers from 0 to 2**53")
    for category in coco_gt.dataset["categories"]:
        if category.get("frequency") not in FREQUENCY_GROUPS:
            has = f"'frequency' {category['frequency']!r}" if "frequency" in category else "no 'frequency'"
            raise UserError(f"{where}, whose scoring groups the categories by 'frequency' (r, c or f), and "
                            f"category {category['id']} ({category.get('name', 'unnamed')}) has {has}: give each "
                            f"category one")
    for image in coco_gt.dataset["images"]:
        for key in FEDERATED_LISTS:
            if not is_id_list(image[key]):
                raise UserError(f"{where}, and image {image.get('id')!r} has {key} {image[key]!r}: give a list of "
                                f"category ids (empty where none)")
    return "faster"


def to_coco_results(image_id: int, output: dict[str, torch.Tensor], category_map: CategoryMap,
                    iou_types: tuple[str, ...]) -> dict[str, list[dict]]:
    """One image's model output as COCO result records per IoU type, with the file's category ids.

    Masks are the model's probabilities (N, 1, H, W) or RunLengths made of them. Keypoints (N, K, 3) become
    COCO's flat [x, y, v, ...] lists.
    """
    encoded = encode(image_id, output, category_map, iou_types)
    return {iou_type: encoded.records(iou_type) for iou_type in ("bbox", "keypoints", "segm") if iou_type in iou_types}


@dataclass
class EncodedImage:
    """One image's detections as the evaluator keeps them from encoding to scoring: arrays and compressed RLE
    strings. COCO result records (dicts of Python floats and strings) take about four times the memory; they are
    built from this per IoU type only while that type is scored or written."""

    image_id: int
    boxes: np.ndarray  # (N, 4) x0, y0, x1, y1, as the model gave them
    scores: np.ndarray  # (N,)
    category_ids: np.ndarray  # (N,) the file's ids
    mask_size: tuple[int, int] = (0, 0)  # (height, width)
    rles: list[bytes] | None = None  # each mask's compressed RLE counts, when segm is scored
    mask_areas: np.ndarray | None = None  # (N,) pixels set in each mask
    mask_boxes: np.ndarray | None = None  # (N, 4) x, y, width, height of each mask's set pixels
    keypoints: np.ndarray | None = None  # (N, K * 3) x, y, v, ..., when keypoints are scored
    left_out: dict[int, int] = field(default_factory=dict)  # label: detections whose label is no category

    def records(self, iou_type: str, scoring: bool = False) -> list[dict]:
        """COCO result records of one IoU type (new dicts on every call: loadRes may add fields to them). For
        scoring, masks' records also carry the area and box that loadRes would otherwise compute one by one."""
        scores, category_ids = self.scores.tolist(), self.category_ids.tolist()
        if iou_type == "bbox":
            return [{"image_id": self.image_id, "category_id": c, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": s}
                    for (x0, y0, x1, y1), s, c in zip(self.boxes.tolist(), scores, category_ids)]
        if iou_type == "keypoints" and self.keypoints is not None:
            return [{"image_id": self.image_id, "category_id": c, "keypoints": k, "score": s}
                    for k, s, c in zip(self.keypoints.tolist(), scores, category_ids)]
        if iou_type == "segm" and self.rles is not None:
            height, width = self.mask_size
            records = [{"image_id": self.image_id, "category_id": c,
                        "segmentation": {"size": [height, width], "counts": r.decode("ascii")}, "score": s}
                       for r, s, c in zip(self.rles, scores, category_ids)]
            if scoring:
                for record, area, box in zip(records, self.mask_areas.tolist(), self.mask_boxes.tolist()):
                    record["area"], record["bbox"] = area, box
            return records
        raise KeyError(iou_type)

    __getitem__ = records  # per_image[image_id][iou_type] reads as it did when per_image held the records


def _host_array(values: torch.Tensor) -> np.ndarray:
    """A tensor's values as a NumPy array of its own: a view would keep the tensor's whole storage alive."""
    values = values.detach().cpu()
    if values.dtype == torch.bfloat16:  # NumPy has no bfloat16; float32 holds each of its values exactly
        values = values.float()
    return values.numpy().copy()


def _detections(output: dict, keep: list[bool]) -> dict:
    """The output with only the detections where keep is True (masks as tensors or RunLengths)."""
    mask = torch.tensor(keep, dtype=torch.bool)
    kept = {k: v[mask] if isinstance(v, torch.Tensor) else v for k, v in output.items()}
    if isinstance(output.get("masks"), RunLengths):
        runs = output["masks"]
        kept["masks"] = RunLengths([c for c, k in zip(runs.counts, keep) if k], runs.size)
    return kept


def encode(image_id: int, output: dict[str, torch.Tensor], category_map: CategoryMap,
           iou_types: tuple[str, ...]) -> EncodedImage:
    """One image's model output in the form the evaluator keeps (masks as in to_coco_results); nothing of the
    output tensors is referenced afterwards."""
    labels = output["labels"].tolist()
    category_ids = [category_map.category_id(label) for label in labels]
    known = [c is not None for c in category_ids]
    left_out = dict(Counter(label for label, k in zip(labels, known) if not k))
    if left_out:  # a model with more classes than the files have categories: those labels predict nothing
        output, category_ids = _detections(output, known), [c for c in category_ids if c is not None]
    encoded = EncodedImage(image_id, _host_array(output["boxes"]), _host_array(output["scores"]),
                           id_array(category_ids), left_out=left_out)
    if "keypoints" in iou_types:
        encoded.keypoints = _host_array(output["keypoints"].flatten(1))
    if "segm" in iou_types:
        masks = output["masks"]
        if not isinstance(masks, RunLengths):
            masks = windowed_run_lengths(masks.cpu())
        encoded.mask_size = masks.size
        height, width = masks.size
        rles = mask_utils.frPyObjects([{"counts": c, "size": [height, width]} for c in masks.counts],
                                      height, width) if masks.counts else []
        encoded.rles = [r["counts"] for r in rles]
        encoded.mask_areas = rle_areas(rles)
        encoded.mask_boxes = mask_utils.toBbox(rles) if rles else np.zeros((0, 4))
    return encoded


@dataclass
class RunLengths:
    """Masks as COCO's uncompressed RLE: per mask, run lengths over its pixels in column-major order,
    starting with a run of zeros; size is (height, width)."""

    counts: list[np.ndarray]
    size: tuple[int, int]


def run_lengths(probabilities: torch.Tensor) -> RunLengths:
    """(N, 1, H, W) mask probabilities cut at 0.5 and run-length encoded where they are (on a GPU: only the
    run boundaries, a few thousand numbers per image, come back to the host instead of N x H x W bytes)."""
    count, _, height, width = probabilities.shape
    flat = (probabilities[:, 0] > 0.5).transpose(1, 2).reshape(count, height * width)
    changes = (flat[:, 1:] != flat[:, :-1]).nonzero()
    # One copy to the host: each mask's first pixel, then (mask, position) of every change.
    packed = torch.cat([flat[:, 0].long(), changes.flatten()]).cpu().numpy()
    first_set, changes = packed[:count].astype(bool), packed[count:].reshape(-1, 2)
    per_mask = np.split(changes[:, 1] + 1, np.searchsorted(changes[:, 0], np.arange(1, count)))
    counts = []
    for starts_set, boundaries in zip(first_set, per_mask):
        runs = np.diff(boundaries, prepend=0, append=height * width).astype(np.uint32)
        counts.append(np.insert(runs, 0, 0) if starts_set else runs)
    return RunLengths(counts, (height, width))


def windowed_run_lengths(probabilities: torch.Tensor) -> RunLengths:
    """(N, 1, H, W) CPU mask probabilities cut at 0.5 and run-length encoded, each inside a window that holds
    all its pixels above 0.5: a detection's mask is mostly zeros, and thresholding every pixel of every mask
    would cost more than the rest of evaluation."""
    count, _, height, width = probabilities.shape
    probabilities = probabilities[:, 0]
    # One pass over every pixel: the maximum of each column in bands of rows. A NaN maximum keeps its band and
    # column in the window, where the comparison itself leaves NaN unset.
    set_in_band = (~(_band_maxima(probabilities) <= 0.5)).numpy()
    columns_set, bands_set = set_in_band.any(axis=1), set_in_band.any(axis=2)
    values = probabilities.numpy() if probabilities.dtype != torch.bfloat16 else None  # NumPy has no bfloat16
    counts = []
    for k in range(count):
        columns, bands = np.flatnonzero(columns_set[k]), np.flatnonzero(bands_set[k])
        if len(columns) == 0:
            counts.append(np.array([height * width], dtype=np.uint32))
            continue
        top, bottom = int(bands[0]) * _BAND, min(height, (int(bands[-1]) + 1) * _BAND)
        left, right = int(columns[0]), int(columns[-1]) + 1
        window = (values[k, top:bottom, left:right] if values is not None
                  else probabilities[k, top:bottom, left:right].float().numpy())
        counts.append(_window_runs(window, top, left, height, width))
    return RunLengths(counts, (height, width))


_BAND = 16  # rows per band: the maxima of a band are 1/16 of the masks' size, and a window is at most 30 rows taller


def _band_maxima(probabilities: torch.Tensor) -> torch.Tensor:
    """(N, H, W) to (N, ceil(H / _BAND), W): each column's maximum over each band of _BAND rows."""
    count, height, width = probabilities.shape
    whole = height // _BAND
    maxima = probabilities[:, :whole * _BAND].reshape(count, whole, _BAND, width).amax(dim=2)
    if height % _BAND:
        maxima = torch.cat([maxima, probabilities[:, whole * _BAND:].amax(dim=1, keepdim=True)], dim=1)
    return maxima


def _window_runs(window: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    """COCO run lengths of a height x width mask cut at 0.5, given the probabilities of a window (rows, columns)
    whose top-left pixel is (top, left) and outside which no pixel is set."""
    window_height = window.shape[0]
    padded = np.zeros((window.shape[1], window_height + 2), dtype=bool)  # column by column, unset above and below
    np.greater(window.T, 0.5, out=padded[:, 1:-1])
    column, row = np.divmod(np.flatnonzero(padded[:, 1:] != padded[:, :-1]), window_height + 1)
    # Where each run starts or ends, in the whole image's column-major order.
    boundaries = (left + column) * height + top + row
    # A window as tall as the image: a column that ends set meets the next one that starts set, one run.
    joined = boundaries[1:] == boundaries[:-1]
    if joined.any():
        keep = np.ones(len(boundaries), dtype=bool)
        keep[1:] &= ~joined
        keep[:-1] &= ~joined
        boundaries = boundaries[keep]
    if len(boundaries) and boundaries[-1] == height * width:  # the last pixel is set: no empty run after it
        boundaries = boundaries[:-1]
    edges = np.empty(len(boundaries) + 2, dtype=np.int64)
    edges[0], edges[1:-1], edges[-1] = 0, boundaries, height * width
    return (edges[1:] - edges[:-1]).astype(np.uint32)


COCOEVAL_BACKENDS = ("auto", "pycocotools", "faster")


def resolve_backend(name: str) -> str:
    """'auto' is faster-coco-eval (C++ COCOeval) when it is installed, else pycocotools."""
    if name != "auto":
        return name
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return "pycocotools"
    return "faster"


def backend_for(coco_gt: COCO, name: str) -> str:
    """resolve_backend's choice, or pycocotools for a file whose image or category ids are not all integers from
    0 to 2**53 (faster-coco-eval reads every id as an integer, matches them as doubles, which hold integers
    exactly up to 2**53, and refuses a negative image id when it scores masks)."""
    backend = resolve_backend(name)
    if backend == "faster" and not _faster_reads_ids(coco_gt):
        _say_scoring_with_pycocotools()
        return "pycocotools"
    return backend


def _faster_reads_ids(coco_gt: COCO) -> bool:
    return all(type(i) is int and 0 <= i <= 2**53 for i in (*coco_gt.getImgIds(), *coco_gt.getCatIds()))


@cache
def _say_scored_as_lvis(max_dets: int) -> None:
    """Said at a process's first evaluation of a federated file, not at every one."""
    print(f"Scored as LVIS's federated evaluation (the file lists each image's neg_category_ids and "
          f"not_exhaustive_category_ids): an image's detections of categories it was not checked for are left "
          f"out, unmatched ones of a category not exhaustively annotated there count neither way, at most "
          f"{max_dets} detections an image; APr, APc and APf average the rare, common and frequent categories "
          f"(their 'frequency')")


@cache
def _say_scoring_with_pycocotools() -> None:
    """Said once a process (at a run's first evaluation), not at each (every epoch's, the moving average's)."""
    utils.print_once("The image or category ids are not all integers from 0 to 2**53, which faster-coco-eval "
                     "requires: scoring with pycocotools")


def _empty_results(coco_gt: COCO, coco_class: type) -> COCO:
    """A results index with no detections (loadRes cannot take an empty list): everything scores zero."""
    coco_dt = coco_class()
    coco_dt.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                       "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt.createIndex()
    return coco_dt


def _scored_masks(coco_gt: COCO, results: list[dict], coco_class: type) -> COCO:
    """A results index of mask records that carry their area and box: what loadRes makes of them (ids from 1,
    no crowds), without its call per record to compute them."""
    for number, record in enumerate(results, start=1):
        record["id"], record["iscrowd"] = number, 0
    coco_dt = coco_class()
    coco_dt.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                       "annotations": results}
    coco_dt.createIndex()
    return coco_dt


def summary_stats(evaluator, max_dets: int, frequencies: dict | None = None) -> np.ndarray:
    """The box or mask metrics of a COCOeval accumulated at maxDets (1, 10, max_dets), or (max_dets) for a
    federated file, averaged as its summary does (pycocotools' summary looks for 100 among them for AP, so it
    cannot give them for another). frequencies, each category id's LVIS frequency group, makes LVIS's 13."""
    params = evaluator.params
    areas, most = list(params.areaRngLbl), list(params.maxDets)
    stats = []
    for kind, iou, area, dets, group in _summary_rows(max_dets, federated=frequencies is not None):
        # precision: [IoU, recall, category, area, maxDets]; recall: [IoU, category, area, maxDets]
        values = evaluator.eval["precision" if kind == "AP" else "recall"][..., areas.index(area), most.index(dets)]
        if iou != "0.50:0.95":
            values = values[np.isclose(params.iouThrs, float(iou))]
        if group != "all":
            values = values[..., [k for k, c in enumerate(params.catIds) if frequencies.get(c) == group]]
        defined = values[values > -1]
        stats.append(defined.mean() if defined.size else -1.0)
    return np.array(stats)


def score(coco_gt: COCO, results: list[dict], iou_type: str, image_ids: list[int], backend: str = "pycocotools",
          copy_results: bool = True, max_dets: int = COCO_MAX_DETECTIONS, federated: bool = False,
          category_ids: list | None = None):
    """Run COCOeval (pycocotools', or faster-coco-eval's C++ one) on result records over the given images, against
    the ground truth as training reads it (coco_utils.scoring_ground_truth); returns the evaluator (stats,
    eval["precision"]). Boxes and masks are scored over at most max_dets detections of an image per category.
    federated scores as LVIS's evaluation does (faster-coco-eval's lvis_style, on records already cut to max_dets
    an image): an image's detections of categories it was not checked for are left out, and those unmatched in
    a category not exhaustively annotated there are neither true nor false. category_ids: the categories scored
    (all by default).

    loadRes adds fields to the records it is given, so they are copied first unless copy_results is False (for
    records made for this call alone: at COCO scale the copy is hundreds of MB)."""
    if federated and backend != "faster":
        raise ValueError("federated scoring is faster-coco-eval's (lvis_style)")
    gt, coco_class, evaluator_class, kwargs = _backend_classes(scoring_ground_truth(coco_gt, iou_type), backend)
    coco_dt = _results_index(gt, copy.deepcopy(results) if copy_results else results, iou_type, coco_class)
    evaluator = evaluator_class(gt, coco_dt, iouType=iou_type, **kwargs, **({"lvis_style": True} if federated else {}))
    evaluator.params.imgIds = sorted(image_ids)
    if category_ids is not None:
        evaluator.params.catIds = sorted(category_ids)
    other_max_dets = iou_type != "keypoints" and max_dets != COCO_MAX_DETECTIONS
    if federated:
        evaluator.params.maxDets = [max_dets]
    elif other_max_dets:
        evaluator.params.maxDets = [1, 10, max_dets]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        if federated:
            frequencies = {c["id"]: c["frequency"] for c in coco_gt.dataset["categories"]}
            evaluator.stats = summary_stats(evaluator, max_dets, frequencies)
        elif other_max_dets:
            evaluator.stats = summary_stats(evaluator, max_dets)
        else:
            evaluator.summarize()
    return evaluator


def _results_index(gt: COCO, results: list[dict], iou_type: str, coco_class: type) -> COCO:
    """The results as the back end's COCO index (loadRes, or its equivalents for no records and for mask records
    that carry their area and box)."""
    with contextlib.redirect_stdout(io.StringIO()):
        if not results:
            return _empty_results(gt, coco_class)
        if iou_type == "segm" and "area" in results[0]:
            return _scored_masks(gt, results, coco_class)
        return gt.loadRes(results)


def _backend_classes(coco_gt: COCO, backend: str) -> tuple[COCO, type, type, dict]:
    """The ground truth as the back end's COCO, its COCO and COCOeval classes and COCOeval's keyword arguments."""
    if backend != "faster":
        return coco_gt, COCO, COCOeval, {}
    from faster_coco_eval import COCO as FasterCOCO
    from faster_coco_eval import COCOeval_faster

    gt = FasterCOCO()
    gt.dataset = coco_gt.dataset
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt, FasterCOCO, COCOeval_faster, {"print_function": print}


class CocoEvaluator:
    """Gathers each image's detections during evaluation, encoded compactly, and scores them once at the end.

    Encoding runs on a background thread: it overlaps with the next forward pass, which releases the GIL.
    Called as torchvision's reference calls its own (CocoEvaluator(coco, iou_types), update, synchronize,
    accumulate, summarize, then coco_eval[iou_type].stats), it gives the same numbers.
    """

    def __init__(self, coco_gt: COCO, iou_types: Sequence[str] = ("bbox", "segm"),
                 category_map: CategoryMap | None = None, backend: str | None = None,
                 max_dets: int = COCO_MAX_DETECTIONS) -> None:
        unknown = [t for t in iou_types if t not in IOU_TYPES]
        if isinstance(iou_types, str) or unknown:
            raise ValueError(f"iou_types {iou_types!r}: give a sequence of {', '.join(IOU_TYPES)}")
        self.coco_gt = coco_gt
        self.category_map = category_map or labels_of(coco_gt)  # model labels to the file's category ids
        self.iou_types = tuple(iou_types)
        self.max_dets = max_dets  # boxes' and masks' maxDets
        self.federated = scored_as_lvis(coco_gt, self.iou_types)
        # None: pycocotools' COCOeval, as the reference scores, or faster-coco-eval's for a federated file
        self.backend = (check_federated(coco_gt, backend or "auto") if self.federated
                        else backend_for(coco_gt, backend or "pycocotools"))
        self.per_image: dict[int, EncodedImage] = {}
        self._pending: dict[int, Future] = {}
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rle")
        self.timings = {"encode_wait": 0.0, "score": 0.0}
        self.ground_truth = "the annotation file"  # where the categories come from, in what it prints
        # COCOeval by IoU type: unscored ones whose params.catIds a script may narrow (as the reference's allow),
        # replaced by the scored ones once accumulate() has run
        self.coco_eval: dict = {iou_type: COCOeval(coco_gt, iouType=iou_type) for iou_type in self.iou_types}
        self.accumulated = False
        self.chosen_categories: dict[str, list | None] = {}  # by IoU type, as accumulate() first found them

    def update(self, outputs: dict[int, dict[str, torch.Tensor]]) -> None:
        """Add model outputs keyed by image id (an int, or a one-element tensor); they are encoded in the
        background, and nothing of the output tensors is kept once they are."""
        for image_id, output in outputs.items():
            image_id = plain_id(image_id)
            self._pending[image_id] = self._encoder.submit(encode, image_id, output, self.category_map,
                                                           self.iou_types)
        self._collect(wait=False)

    def _collect(self, wait: bool = True) -> None:
        """Move encoded images from their futures to per_image: all of them, or (wait=False) those done so far."""
        started = time.perf_counter()
        for image_id, future in list(self._pending.items()):
            if not wait and not future.done():
                break
            self.per_image[image_id] = future.result()
            del self._pending[image_id]
        if wait:
            self.timings["encode_wait"] += time.perf_counter() - started

    def synchronize_between_processes(self) -> None:
        """Merge every rank's images; an image seen by two ranks (sampler padding) counts once."""
        self._collect()
        self._encoder.shutdown()  # every image is in: its thread would otherwise idle for the rest of the run
        merged: dict[int, EncodedImage] = {}
        for part in utils.all_gather_object(self.per_image):
            merged.update(part)
        self.per_image = merged

    def results(self, iou_type: str, scoring: bool = False) -> list[dict]:
        """COCO result records of one IoU type over all images, by image id (new dicts on every call); for
        scoring a federated file, each image's max_dets of highest score, as LVIS's evaluation keeps them."""
        self._collect()
        records = []
        for image_id in sorted(self.per_image):
            image = self.per_image[image_id].records(iou_type, scoring)
            if scoring and self.federated:
                image = lvis_keeps(scoring_ground_truth(self.coco_gt, iou_type), image_id, image, self.max_dets)
            records += image
        return records

    def accumulate(self) -> None:
        """Score every IoU type on this rank and keep each COCOeval in coco_eval, for scripts that read its stats
        or precision tables (the reference's call; summarize() alone shares the types among the ranks and keeps
        none of them)."""
        started = time.perf_counter()
        self._collect()
        if not self.accumulated:  # the categories are chosen on the unscored COCOevals, once
            self.chosen_categories = {iou_type: self._chosen_categories(iou_type) for iou_type in self.iou_types}
        self.coco_eval = {iou_type: self._cocoeval(iou_type, self.chosen_categories[iou_type])
                          for iou_type in self.iou_types}
        self.accumulated = True
        self.timings["score"] += time.perf_counter() - started

    def summarize(self) -> dict[str, dict]:
        """Score each IoU type, on every rank at once: each scores its share of the types (all of them when
        alone), unless accumulate() scored them already. Rank 0 prints the tables and AP per category.

        Returns {iou_type: {metric name: value, ..., "per_category": {category name: AP}}} on every rank.
        """
        started = time.perf_counter()
        self._collect()
        if self.accumulated:
            metrics = {iou_type: self._metrics(iou_type, self.coco_eval[iou_type]) for iou_type in self.iou_types}
        else:
            share = self.iou_types[utils.get_rank()::utils.get_world_size()]
            scored = {}
            for part in utils.all_gather_object({t: self._metrics(t, self._cocoeval(t)) for t in share}):
                scored.update(part)
            metrics = {iou_type: scored[iou_type] for iou_type in self.iou_types}
        if utils.is_main_process():
            self._say_what_the_tables_leave_unsaid()
            print_tables(metrics, self.max_dets, self.federated)
        self.timings["score"] += time.perf_counter() - started
        return metrics

    def _chosen_categories(self, iou_type: str) -> list | None:
        """The categories a script chose by coco_eval[iou_type].params.catIds (None: all); a ValueError for the
        other params, which this evaluator does not take from there."""
        params, default = self.coco_eval[iou_type].params, COCOeval(iouType=iou_type).params
        for name in ("iouThrs", "recThrs", "maxDets", "areaRng", "areaRngLbl", "useCats"):
            if not np.array_equal(np.asarray(getattr(params, name)), np.asarray(getattr(default, name))):
                raise ValueError(f"coco_eval[{iou_type!r}].params.{name} was changed: this evaluator scores with "
                                 f"COCOeval's own (and max_dets for the most detections), only catIds may be chosen")
        chosen = list(params.catIds)
        return None if chosen == sorted(self.coco_gt.getCatIds()) else chosen

    def _cocoeval(self, iou_type: str, category_ids: list | None = None):
        """One IoU type scored (over the given categories, else all): the COCOeval, evaluated and accumulated."""
        # The records are made for this call alone, so COCOeval may keep them without a copy.
        return score(self.coco_gt, self.results(iou_type, scoring=True), iou_type, list(self.per_image),
                     self.backend, copy_results=False, max_dets=self.max_dets, federated=self.federated,
                     category_ids=category_ids)

    def _metrics(self, iou_type: str, evaluator) -> dict:
        return named_metrics(evaluator, self.coco_gt, iou_type, self.max_dets, self.federated)

    def _say_what_the_tables_leave_unsaid(self) -> None:
        """Once per evaluation: the detections whose label is no category of the files (not written, not scored),
        and that there were none at all, where so (every AP is then 0 for want of detections, not of matches)."""
        if self.per_image and not any(len(encoded.scores) for encoded in self.per_image.values()):
            print(f"note: the model made no detection on any of the {len(self.per_image)} images, so every AP "
                  f"below is 0: it has not learned to detect yet (train longer, or check the learning rate and the "
                  f"data)")
        left_out: Counter = Counter()
        for encoded in self.per_image.values():
            left_out.update(encoded.left_out)
        if left_out:
            labels = ", ".join(f"label {label}: {n}" for label, n in sorted(left_out.items()))
            print(f"{sum(left_out.values())} detections had labels that are no category of {self.ground_truth} "
                  f"({labels}) and were left out; the model has more classes than {self.ground_truth} has "
                  f"categories")

    def write_results(self, output_dir: str | Path) -> list[Path]:
        """predictions_{iou_type}.json in COCO results format, as the evaluation server takes them."""
        paths = []
        for iou_type in self.iou_types:
            path = Path(output_dir) / f"predictions_{iou_type}.json"
            write_json_atomic(path, self.results(iou_type), remedy=RUN_OUTPUT_REMEDY)
            paths.append(path)
        return paths


def lvis_keeps(ground_truth: COCO, image_id, records: list[dict], max_dets: int) -> list[dict]:
    """An image's max_dets records of highest score, then those of the categories it was checked for (its
    instances' and its neg_category_ids), as LVIS's evaluation takes them. faster-coco-eval leaves the others out
    itself, but fails on masks of an image with none of them."""
    if len(records) > max_dets:
        records = sorted(records, key=lambda record: record["score"], reverse=True)[:max_dets]
    checked = {*ground_truth.imgs[image_id]["neg_category_ids"],
               *(ann["category_id"] for ann in ground_truth.imgToAnns[image_id])}
    return [record for record in records if record["category_id"] in checked]


def as_lvis_keeps(ground_truth: COCO, records: list[dict], max_dets: int) -> list[dict]:
    """lvis_keeps of every image's records."""
    by_image: dict = {}
    for record in records:
        by_image.setdefault(record["image_id"], []).append(record)
    return [kept for image_id, image in by_image.items() for kept in lvis_keeps(ground_truth, image_id, image,
                                                                                 max_dets)]


def named_metrics(evaluator, coco_gt: COCO, iou_type: str, max_dets: int, federated: bool) -> dict:
    """A scored COCOeval's metrics by name (as metrics.jsonl names them), and its AP per category."""
    names = metric_names(iou_type, max_dets, federated)
    metrics = dict(zip(names, (float(v) for v in evaluator.stats)))
    metrics["per_category"] = per_category_ap(evaluator, coco_gt)
    return metrics


def print_tables(metrics: dict[str, dict], max_dets: int, federated: bool) -> None:
    """The summary table of each IoU type and the table of AP per category, as an evaluation prints them."""
    if federated:
        _say_scored_as_lvis(max_dets)
    for iou_type, values in metrics.items():
        print(f"IoU metric: {iou_type}")
        names = metric_names(iou_type, max_dets, federated)
        print(format_summary([values[name] for name in names], iou_type, max_dets, federated))
    print(format_per_category(metrics))


def per_category_ap(evaluator, coco_gt: COCO) -> dict[str, float]:
    """AP at IoU 0.50:0.95, all areas, the most detections, of each category that has ground truth, by name (with
    the id where categories share a name)."""
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # [iou, recall, category]
    names = {category_id: category.get("name", str(category_id)) for category_id, category in coco_gt.cats.items()}
    uses = Counter(names.values())
    result = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k]
        values = values[values > -1]
        name = names[category_id]
        if values.size:
            result[name if uses[name] == 1 else f"{name} (id {category_id})"] = float(values.mean())
    return result


# Up to this many categories the table lists each by name; beyond, the highest and lowest AP's half each.
MOST_CATEGORY_ROWS = 40


def format_per_category(metrics: dict[str, dict]) -> str:
    """A table of AP per category, one column per IoU type; for many categories (LVIS-like files) the highest
    and lowest by the last IoU type's AP (masks' or keypoints' where scored), the rest left to metrics.jsonl."""
    iou_types = list(metrics)
    names = sorted({n for m in metrics.values() for n in m["per_category"]})
    title, left_out = "AP per category", None
    primary = metrics[iou_types[-1]]["per_category"]
    if len(names) > MOST_CATEGORY_ROWS:
        # A category scored for boxes but not masks (no outline to score) ranks lowest, shown as n/a.
        ranked = sorted(names, key=lambda n: (-primary.get(n, -1.0), n))
        half = MOST_CATEGORY_ROWS // 2
        names, left_out = ranked[:half] + ranked[-half:], len(names) - 2 * half
        title += (f": the {half} highest and {half} lowest {iou_types[-1]} AP of {len(ranked)} categories (each "
                  f"one's is in metrics.jsonl)")
    width = max([len("category")] + [_columns(n) for n in names])
    lines = [title, f"{'category':<{width}}  " + "  ".join(f"{t:>6}" for t in iou_types)]
    for row, name in enumerate(names):
        if row == MOST_CATEGORY_ROWS // 2 and left_out:
            lines.append(f"... {left_out} more")
        cells = [metrics[t]["per_category"].get(name) for t in iou_types]
        padding = " " * (width - _columns(name))
        lines.append(f"{name}{padding}  " + "  ".join("   n/a" if c is None else f"{c:6.3f}" for c in cells))
    return "\n".join(lines)


def _columns(text: str) -> int:
    """The terminal columns text takes: two for wide characters (CJK), none for marks and format characters."""
    return sum(0 if unicodedata.category(c) in ("Mn", "Me", "Cf") else 2 if unicodedata.east_asian_width(c) in "WF"
               else 1 for c in text)

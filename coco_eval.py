"""Collect predictions from every rank, turn them into COCO results and score them with COCOeval."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import utils
from coco_utils import CategoryMap

# The order of COCOeval.stats, named, and what each line of the standard summary says of it:
# (precision or recall, IoU range, object size, detections per image).
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
KEYPOINT_METRIC_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
_KEYPOINT_ROWS = [(kind, iou, area, 20) for kind in ("AP", "AR")
                  for iou, area in (("0.50:0.95", "all"), ("0.50", "all"), ("0.75", "all"), ("0.50:0.95", "medium"),
                                    ("0.50:0.95", "large"))]
_SUMMARY_ROWS = [("AP", "0.50:0.95", "all", 100), ("AP", "0.50", "all", 100), ("AP", "0.75", "all", 100),
                 ("AP", "0.50:0.95", "small", 100), ("AP", "0.50:0.95", "medium", 100),
                 ("AP", "0.50:0.95", "large", 100), ("AR", "0.50:0.95", "all", 1), ("AR", "0.50:0.95", "all", 10),
                 ("AR", "0.50:0.95", "all", 100), ("AR", "0.50:0.95", "small", 100),
                 ("AR", "0.50:0.95", "medium", 100), ("AR", "0.50:0.95", "large", 100)]


def format_summary(stats, iou_type: str = "bbox") -> str:
    """The lines COCO tools print for a stats vector (12, or 10 for keypoints), whichever back end computed it."""
    kinds = {"AP": "Average Precision  (AP)", "AR": "Average Recall     (AR)"}
    rows = _KEYPOINT_ROWS if iou_type == "keypoints" else _SUMMARY_ROWS
    return "\n".join(f" {kinds[kind]} @[ IoU={iou:<9} | area={area:>6} | maxDets={dets:>3} ] = {value:0.3f}"
                     for (kind, iou, area, dets), value in zip(rows, stats))


def metric_names(iou_type: str) -> tuple[str, ...]:
    return KEYPOINT_METRIC_NAMES if iou_type == "keypoints" else METRIC_NAMES


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
    keypoints: np.ndarray | None = None  # (N, K * 3) x, y, v, ..., when keypoints are scored
    left_out: dict[int, int] = field(default_factory=dict)  # label: detections whose label is no category

    def records(self, iou_type: str) -> list[dict]:
        """COCO result records of one IoU type (new dicts on every call: loadRes may add fields to them)."""
        scores, category_ids = self.scores.tolist(), self.category_ids.tolist()
        if iou_type == "bbox":
            return [{"image_id": self.image_id, "category_id": c, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": s}
                    for (x0, y0, x1, y1), s, c in zip(self.boxes.tolist(), scores, category_ids)]
        if iou_type == "keypoints" and self.keypoints is not None:
            return [{"image_id": self.image_id, "category_id": c, "keypoints": k, "score": s}
                    for k, s, c in zip(self.keypoints.tolist(), scores, category_ids)]
        if iou_type == "segm" and self.rles is not None:
            height, width = self.mask_size
            return [{"image_id": self.image_id, "category_id": c,
                     "segmentation": {"size": [height, width], "counts": r.decode("ascii")}, "score": s}
                    for r, s, c in zip(self.rles, scores, category_ids)]
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
                           np.array(category_ids, dtype=np.int64), left_out=left_out)
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
    """(N, 1, H, W) CPU mask probabilities cut at 0.5 and run-length encoded, each inside the smallest window
    that holds all its pixels above 0.5: a detection's mask is mostly zeros, and thresholding every pixel of
    every mask would cost more than the rest of evaluation."""
    count, _, height, width = probabilities.shape
    probabilities = probabilities[:, 0]
    # A NaN maximum keeps its row or column in the window, where the comparison itself leaves NaN unset.
    columns_set = ~(probabilities.amax(dim=1) <= 0.5).numpy()
    rows_set = ~(probabilities.amax(dim=2) <= 0.5).numpy()
    counts = []
    for k in range(count):
        columns, rows = np.flatnonzero(columns_set[k]), np.flatnonzero(rows_set[k])
        if len(columns) == 0 or len(rows) == 0:
            counts.append(np.array([height * width], dtype=np.uint32))
            continue
        left, top = int(columns[0]), int(rows[0])
        window = probabilities[k, top:rows[-1] + 1, left:columns[-1] + 1] > 0.5
        counts.append(_window_runs(window.T.numpy(), top, left, height, width))
    return RunLengths(counts, (height, width))


def _window_runs(columns: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    """COCO run lengths of a height x width mask that is set only inside a window, given column by column
    (window width, window height) with its top-left pixel at (top, left)."""
    window_height = columns.shape[1]
    padded = np.zeros((columns.shape[0], window_height + 2), dtype=bool)  # unset pixels above and below
    padded[:, 1:-1] = columns
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
    return np.diff(boundaries, prepend=0, append=height * width).astype(np.uint32)


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


def _empty_results(coco_gt: COCO, coco_class: type) -> COCO:
    """A results index with no detections (loadRes cannot take an empty list): everything scores zero."""
    coco_dt = coco_class()
    coco_dt.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                       "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt.createIndex()
    return coco_dt


def score(coco_gt: COCO, results: list[dict], iou_type: str, image_ids: list[int], backend: str = "pycocotools",
          copy_results: bool = True):
    """Run COCOeval (pycocotools', or faster-coco-eval's C++ one) on result records over the given images;
    prints the standard 12-line summary and returns the evaluator (stats, eval["precision"]).

    loadRes adds fields to the records it is given, so they are copied first unless copy_results is False (for
    records made for this call alone: at COCO scale the copy is hundreds of MB)."""
    if backend == "faster":
        from faster_coco_eval import COCO as FasterCOCO
        from faster_coco_eval import COCOeval_faster

        gt = FasterCOCO()
        gt.dataset = coco_gt.dataset
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
        coco_class, evaluator_class, kwargs = FasterCOCO, COCOeval_faster, {"print_function": print}
    else:
        gt, coco_class, evaluator_class, kwargs = coco_gt, COCO, COCOeval, {}
    with contextlib.redirect_stdout(io.StringIO()):
        if results and copy_results:
            results = copy.deepcopy(results)
        coco_dt = gt.loadRes(results) if results else _empty_results(gt, coco_class)
    evaluator = evaluator_class(gt, coco_dt, iouType=iou_type, **kwargs)
    evaluator.params.imgIds = sorted(image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    print(format_summary(evaluator.stats, iou_type))
    return evaluator


class CocoEvaluator:
    """Gathers each image's detections during evaluation, encoded compactly, and scores them once at the end.

    Encoding runs on a background thread: it overlaps with the next forward pass, which releases the GIL.
    """

    def __init__(self, coco_gt: COCO, category_map: CategoryMap, iou_types: tuple[str, ...] = ("bbox", "segm"),
                 backend: str = "pycocotools") -> None:
        self.coco_gt = coco_gt
        self.category_map = category_map
        self.iou_types = iou_types
        self.backend = resolve_backend(backend)
        self.per_image: dict[int, EncodedImage] = {}
        self._pending: dict[int, Future] = {}
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rle")
        self.timings = {"encode_wait": 0.0, "score": 0.0}

    def update(self, outputs: dict[int, dict[str, torch.Tensor]]) -> None:
        """Add model outputs (on the CPU) keyed by image id; they are encoded in the background, and nothing of
        the output tensors is kept once they are."""
        for image_id, output in outputs.items():
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

    def results(self, iou_type: str) -> list[dict]:
        """COCO result records of one IoU type over all images, by image id (new dicts on every call)."""
        self._collect()
        return [r for image_id in sorted(self.per_image) for r in self.per_image[image_id].records(iou_type)]

    def summarize(self) -> dict[str, dict]:
        """Score each IoU type and print its table and AP per category.

        Returns {iou_type: {metric name: value, ..., "per_category": {category name: AP}}}.
        """
        started = time.perf_counter()
        self._collect()
        self._say_what_was_left_out()
        metrics = {}
        for iou_type in self.iou_types:
            print(f"IoU metric: {iou_type}")
            # The records are made for this call alone, so COCOeval may keep them without a copy.
            evaluator = score(self.coco_gt, self.results(iou_type), iou_type, list(self.per_image), self.backend,
                              copy_results=False)
            metrics[iou_type] = dict(zip(metric_names(iou_type), (float(v) for v in evaluator.stats)))
            metrics[iou_type]["per_category"] = per_category_ap(evaluator, self.coco_gt)
            del evaluator  # with its records, before the next IoU type's are made
        print(format_per_category(metrics))
        self.timings["score"] += time.perf_counter() - started
        return metrics

    def _say_what_was_left_out(self) -> None:
        """Once per evaluation: the detections whose label is no category of the files (not written, not scored)."""
        left_out: Counter = Counter()
        for encoded in self.per_image.values():
            left_out.update(encoded.left_out)
        if left_out:
            labels = ", ".join(f"label {label}: {n}" for label, n in sorted(left_out.items()))
            print(f"{sum(left_out.values())} detections had labels that are no category of the annotation file "
                  f"({labels}) and were left out; the model has more classes than the file has categories")

    def write_results(self, output_dir: str | Path) -> list[Path]:
        """predictions_{iou_type}.json in COCO results format, as the evaluation server takes them."""
        paths = []
        for iou_type in self.iou_types:
            path = Path(output_dir) / f"predictions_{iou_type}.json"
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.results(iou_type)))
            tmp.replace(path)
            paths.append(path)
        return paths


def per_category_ap(evaluator, coco_gt: COCO) -> dict[str, float]:
    """AP at IoU 0.50:0.95, all areas, the most detections, of each category that has ground truth."""
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # [iou, recall, category]
    result = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k]
        values = values[values > -1]
        if values.size:
            result[coco_gt.cats[category_id]["name"]] = float(values.mean())
    return result


def format_per_category(metrics: dict[str, dict]) -> str:
    """A table of AP per category, one column per IoU type."""
    iou_types = list(metrics)
    names = sorted({n for m in metrics.values() for n in m["per_category"]})
    width = max([len("category")] + [len(n) for n in names])
    lines = ["AP per category", f"{'category':<{width}}  " + "  ".join(f"{t:>6}" for t in iou_types)]
    for name in names:
        cells = [metrics[t]["per_category"].get(name) for t in iou_types]
        lines.append(f"{name:<{width}}  " + "  ".join("   n/a" if c is None else f"{c:6.3f}" for c in cells))
    return "\n".join(lines)

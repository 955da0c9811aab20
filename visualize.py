"""Pictures of a run: ground truth beside prediction for a few images, and curves of losses, lr and AP."""

from __future__ import annotations

import io
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import draw_bounding_boxes, draw_keypoints, draw_segmentation_masks

from checkpoint import OUTPUT_REMEDY, RUN_OUTPUT_REMEDY, write_atomic, writing
from coco_utils import CategoryMap
from utils import print_once

MIN_PICTURE_SIDE = 320
# Small images are enlarged no further than this on their long side (a long thin strip would grow huge).
MAX_ENLARGED_SIDE = 4096
JPEG_MAX_SIDE = 65500  # the format's limit
# Label text height as a share of the picture's shorter side, within bounds that stay legible.
FONT_SHARE, MIN_FONT, MAX_FONT = 0.035, 11, 28
TRUTH_ALPHA, PREDICTION_ALPHA = 0.3, 0.45  # ground truth lighter, so the image shows through
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255)]


@cache
def font_path() -> str | None:
    """DejaVu Sans, which matplotlib ships, for labels that scale; None (torchvision's small bitmap font) when
    matplotlib cannot find it."""
    from matplotlib import font_manager

    try:
        return font_manager.findfont("DejaVu Sans", fallback_to_default=False)
    except ValueError:
        return None


@cache
def _characters(path: str) -> frozenset[int]:
    """The code points a font file draws (empty for one that PIL cannot load at any size, such as colour emoji
    fonts of fixed sizes)."""
    from matplotlib.ft2font import FT2Font

    try:
        ImageFont.truetype(path, MIN_FONT)
        return frozenset(FT2Font(path).get_charmap())
    except (OSError, RuntimeError, ValueError):
        return frozenset()


PLACEHOLDER_FAMILY = "Last Resort"  # matplotlib ships one in its own fonts (LastResortHE)
_SAID_MISSING: set[int] = set()  # characters no installed font draws, said once a process


@cache
def _font_having(needed: frozenset[int]) -> str | None:
    """label_font's choice for a set of code points."""
    from matplotlib import font_manager

    default = font_path()
    if default is None or needed <= _characters(default):
        return default
    # Last Resort maps every code point to a glyph naming its Unicode block: no font to write labels in.
    candidates = {entry.fname for entry in font_manager.fontManager.ttflist
                  if not entry.name.startswith(PLACEHOLDER_FAMILY)}
    for path in sorted(candidates):
        if needed <= _characters(path):
            return path
    missing = needed - _characters(default) - _SAID_MISSING
    if missing:
        _SAID_MISSING.update(missing)
        print_once(f"note: no installed font draws {''.join(map(chr, sorted(missing)))!r} of the labels, so "
                   f"pictures show those characters as empty boxes; install a font that has them (Noto Sans CJK "
                   f"for Chinese, Japanese or Korean names: the fonts-noto-cjk package on Debian and Ubuntu)")
    return default


def label_font(texts: Iterable[str]) -> str | None:
    """The font to write these texts in: DejaVu Sans where it has every character, else the first installed
    font that has them all (one of Chinese, Japanese or Korean, for category names in those scripts)."""
    return _font_having(frozenset(ord(c) for text in texts for c in text if not c.isspace()))


def font_size(image: torch.Tensor) -> int:
    return int(min(MAX_FONT, max(MIN_FONT, round(FONT_SHARE * min(image.shape[1:])))))


def caption(image: torch.Tensor, text: str) -> torch.Tensor:
    """The image with text written at its bottom left (box labels sit at the tops of boxes), light on dark."""
    picture = Image.fromarray(image.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(picture)
    path = label_font([text])
    font = ImageFont.truetype(path, font_size(image)) if path else ImageFont.load_default()
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    origin = (4, picture.height - bottom - 4)
    draw.rectangle((0, origin[1] - 2, right + 8, picture.height), fill=(0, 0, 0))
    draw.text(origin, text, fill=(255, 255, 255), font=font)
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)


def text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light colours, white on dark ones (by perceived brightness), so a label reads on its box's."""
    red, green, blue = background
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else (255, 255, 255)


def draw_instances(image: torch.Tensor, boxes: torch.Tensor, labels: list[str] | None, masks: torch.Tensor | None,
                   colors: list[tuple[int, int, int]], keypoints: torch.Tensor | None = None,
                   alpha: float = PREDICTION_ALPHA) -> torch.Tensor:
    """uint8 CHW image with the instances' masks filled in (probabilities (N, 1, H, W) are cut at 0.5) and
    their boxes, labels (in a font sized to the image) and visible keypoints drawn over."""
    if len(boxes) == 0:
        return image
    if masks is not None and len(masks):
        masks = masks[:, 0] > 0.5 if masks.dim() == 4 else masks.bool()
        image = draw_segmentation_masks(image, masks, alpha=alpha, colors=colors)
    image = draw_bounding_boxes(image, boxes, labels=labels, colors=colors, width=2, font=label_font(labels or []),
                                font_size=font_size(image), fill_labels=True,
                                label_colors=[text_color(color) for color in colors])
    if keypoints is not None and len(keypoints):
        image = draw_keypoints(image, keypoints[..., :2], visibility=keypoints[..., 2] > 0, colors="white",
                               radius=2)
    return image


def side_by_side(image: torch.Tensor, target: dict, output: dict, category_map: CategoryMap,
                 score_thresh: float = 0.5) -> torch.Tensor:
    """Ground truth on the left, prediction (scores of at least score_thresh, written on it) on the right, one
    CHW image (enlarged by a whole factor when the image is smaller than MIN_PICTURE_SIDE, as far as
    MAX_ENLARGED_SIDE allows)."""

    def color(label: int) -> tuple[int, int, int]:
        return PALETTE[label % len(PALETTE)]

    # Small images are drawn enlarged, so that labels stay legible.
    scale = max(1, min(-(-MIN_PICTURE_SIDE // min(image.shape[1:])), MAX_ENLARGED_SIDE // max(image.shape[1:])))
    if scale > 1:
        image = image.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
        target = {**target, "boxes": target["boxes"] * scale}
        if target.get("masks") is not None:
            target["masks"] = target["masks"].repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
        output = {**output, "boxes": output["boxes"] * scale}
        for points in (target, output):
            if points.get("keypoints") is not None:
                points["keypoints"] = points["keypoints"] * torch.tensor([scale, scale, 1.0])
        if "masks" in output:
            output["masks"] = output["masks"].repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)

    gt_labels = target["labels"].tolist()
    left = draw_instances(image, target["boxes"], [category_map.name(i) for i in gt_labels],
                          target.get("masks"), [color(i) for i in gt_labels], target.get("keypoints"), TRUTH_ALPHA)
    keep = (output["scores"] >= score_thresh) & category_map.known(output["labels"])
    labels = output["labels"][keep].tolist()
    names = [f"{category_map.name(i)} {s:.2f}" for i, s in zip(labels, output["scores"][keep].tolist())]
    masks = output["masks"][keep] if "masks" in output else None
    points = output["keypoints"][keep] if "keypoints" in output else None
    right = draw_instances(image, output["boxes"][keep], names, masks, [color(i) for i in labels], points)
    gap = torch.full((3, image.shape[1], 8), 255, dtype=torch.uint8)
    return torch.cat([caption(left, "ground truth"), gap, caption(right, f"score >= {score_thresh:.2f}")], dim=2)


def save_jpeg(picture: torch.Tensor, path: Path) -> None:
    """A uint8 CHW picture as a JPEG file, written whole or not at all (a failed write is one clear error); one
    past JPEG's size limit is shrunk by a whole factor to fit."""
    with writing(path, OUTPUT_REMEDY):
        path.parent.mkdir(parents=True, exist_ok=True)
    step = -(-max(picture.shape[1:]) // JPEG_MAX_SIDE)
    picture = picture[:, ::step, ::step]
    encoded = io.BytesIO()  # encoded first: PIL's encoder writes to a file's descriptor, past its write()
    Image.fromarray(picture.permute(1, 2, 0).numpy()).save(encoded, format="JPEG", quality=90)
    # not synced: a picture is cheap to draw again, and a sync each would slow prediction down on a fast device
    write_atomic(path, lambda f: f.write(encoded.getvalue()), remedy=OUTPUT_REMEDY, sync=False)


def plot_curves(train: list[dict], evals: list[dict], out_path: Path, val: list[dict] = ()) -> Path | None:
    """curves.png from metrics.jsonl's training, evaluation and validation-loss records: losses (training as
    lines, validation as dots) and lr over steps, box and mask AP over epochs."""
    if not train:
        return None
    fig = curves_figure(train, evals, val)
    write_atomic(out_path, lambda f: fig.savefig(f, format="png"), remedy=RUN_OUTPUT_REMEDY)
    return out_path


def curves_figure(train: list[dict], evals: list[dict], val: list[dict] = ()):
    """plot_curves' figure, of at least one training record: a plain Figure, which draws without pyplot's
    display backends and is freed with its last reference."""
    from matplotlib.figure import Figure

    steps = [r["global_step"] for r in train]
    point = "o" if len(steps) == 1 else None  # a line through one point draws nothing
    loss_names = sorted(k for k in train[-1] if k.startswith("loss"))
    fig = Figure(figsize=(15, 4), dpi=80)
    axes = fig.subplots(1, 3)
    for name in loss_names:
        (line,) = axes[0].plot(steps, [r.get(name) for r in train], label=name, linewidth=1, marker=point)
        points = [(r["global_step"], r[name]) for r in val if r.get(name) is not None]
        if points:
            axes[0].plot(*zip(*points), "o--", color=line.get_color(), markersize=4, linewidth=0.8)
    axes[0].set(title="losses (dots: validation)" if val else "training losses", xlabel="step", yscale="log")
    axes[0].legend(fontsize=7)
    axes[1].plot(steps, [r["lr"] for r in train], color="tab:purple", marker=point)
    axes[1].set(title="learning rate", xlabel="step")
    draw_ap(axes[2], evals)
    if axes[2].lines:  # no evaluation yet: no legend to show
        axes[2].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def draw_ap(ax, evals: list[dict]) -> None:
    """AP over epochs, a line per IoU type; evaluations of other validation data than the last one's (another
    "validation" digest; a record without one counts as the last one's) as dashed lines, one a data set, since
    their APs measure another set."""
    latest = evals[-1].get("validation") if evals else None
    by_data: dict[str | None, list[dict]] = {}
    for r in evals:
        by_data.setdefault(r.get("validation", latest), []).append(r)
    others = [records for data, records in by_data.items() if data != latest]
    for iou_type, label in (("bbox", "box AP"), ("segm", "mask AP"), ("keypoints", "keypoint AP")):
        points = [(r["epoch"], r[iou_type]["AP"]) for r in by_data.get(latest, []) if iou_type in r]
        if not points:
            continue
        (line,) = ax.plot(*zip(*points), marker="o", label=label)
        other_label = f"{label}, other validation data"  # in the legend once
        for records in others:
            before = [(r["epoch"], r[iou_type]["AP"]) for r in records if iou_type in r]
            if before:
                ax.plot(*zip(*before), "o--", color=line.get_color(), alpha=0.5, label=other_label)
                other_label = None
    ax.set(title="AP (0.50:0.95)", xlabel="epoch")  # COCO's or, for a file annotated as LVIS's, LVIS's

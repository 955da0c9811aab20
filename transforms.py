"""Joint transforms of an image and its target: boxes, masks and keypoints move with the pixels.

The image may be a PIL image or a uint8 CHW tensor (--backend pil or tensor): pixel work goes through
torchvision.transforms.v2.functional, which takes both. Targets hold plain tensors: boxes (N, 4) as x0, y0,
x1, y1; masks (N, H, W); keypoints (N, K, 3) as x, y, visibility, with unlabelled keypoints all zero.

Random transforms draw from the generator they are given (the dataset seeds one per sample), so that a
sample's augmentation does not depend on which process loads it or on what else used the global generator.
"""

from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.ops import box_iou
from torchvision.transforms import InterpolationMode

# Target entries with one row per instance, which are kept or dropped together.
PER_INSTANCE = ("boxes", "labels", "masks", "keypoints", "area", "iscrowd")


def uniform(generator: torch.Generator | None, low: float = 0.0, high: float = 1.0) -> float:
    """A number drawn uniformly from [low, high) with the given generator."""
    return low + (high - low) * torch.rand(1, generator=generator).item()


def image_size(image) -> tuple[int, int]:
    """(height, width) of a PIL image or a CHW tensor."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[-2]), int(image.shape[-1])


def keep_instances(target: dict, keep: torch.Tensor) -> dict:
    """The target with only the instances where keep is True."""
    return {k: v[keep] if k in PER_INSTANCE else v for k, v in target.items()}


def _shift_keypoints(keypoints: torch.Tensor, dx: float, dy: float, height: int, width: int) -> torch.Tensor:
    """Keypoints moved by (dx, dy); those that land outside a height x width image become unlabelled."""
    moved = keypoints.clone()
    labelled = keypoints[..., 2] > 0
    moved[..., 0] += dx
    moved[..., 1] += dy
    inside = (moved[..., 0] >= 0) & (moved[..., 0] <= width) & (moved[..., 1] >= 0) & (moved[..., 1] <= height)
    moved[~(labelled & inside)] = 0
    return moved


def resize(image, target: dict, size: tuple[int, int]) -> tuple:
    """Resize to size (height, width): the image bilinearly with antialiasing, masks to the nearest pixel."""
    height, width = image_size(image)
    scale_x, scale_y = size[1] / width, size[0] / height
    image = F.resize(image, list(size), antialias=True)
    target = dict(target)
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.tensor([scale_x, scale_y, scale_x, scale_y])
    if "masks" in target:
        target["masks"] = F.resize(target["masks"], list(size), interpolation=InterpolationMode.NEAREST)
    if "keypoints" in target:
        target["keypoints"] = target["keypoints"] * torch.tensor([scale_x, scale_y, 1.0])
    if "area" in target:
        target["area"] = target["area"] * (scale_x * scale_y)
    return image, target


def crop(image, target: dict, top: int, left: int, height: int, width: int) -> tuple:
    """Cut out a window; boxes are clipped to it and instances left without extent dropped."""
    image = F.crop(image, top, left, height, width)
    target = dict(target)
    if "boxes" in target:
        boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"][:, top:top + height, left:left + width]
    if "keypoints" in target:
        target["keypoints"] = _shift_keypoints(target["keypoints"], -left, -top, height, width)
    if "boxes" in target:
        boxes = target["boxes"]
        target = keep_instances(target, (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
    return image, target


def place(image, target: dict, top: int, left: int, height: int, width: int, fill: list[float]) -> tuple:
    """Put the image on a height x width canvas of colour fill, its top-left corner at (top, left)."""
    old_height, old_width = image_size(image)
    padding = [left, top, width - old_width - left, height - old_height - top]
    fill = [int(round(v)) for v in fill] if isinstance(image, Image.Image) else fill
    image = F.pad(image, padding, fill=fill)
    target = dict(target)
    if "boxes" in target:
        target["boxes"] = target["boxes"] + torch.tensor([left, top, left, top], dtype=torch.float32)
    if "masks" in target:
        target["masks"] = F.pad(target["masks"], padding, fill=0)
    if "keypoints" in target:
        target["keypoints"] = _shift_keypoints(target["keypoints"], left, top, height, width)
    return image, target


class Compose:
    """Apply transforms in order to (image, target)."""

    def __init__(self, transforms: list) -> None:
        self.transforms = transforms

    def __call__(self, image, target: dict, generator: torch.Generator | None = None) -> tuple:
        for t in self.transforms:
            image, target = t(image, target, generator)
        return image, target


class PILToTensor:
    """PIL image to uint8 CHW tensor (a tensor passes unchanged)."""

    def __call__(self, image, target: dict, generator: torch.Generator | None = None) -> tuple:
        return (F.pil_to_tensor(image) if isinstance(image, Image.Image) else image), target


class ToDtype:
    """The image tensor as dtype, taken from 0-255 to 0-1 where scale is set (as torchvision's tutorial asks for
    its own datasets; this project's loaders keep uint8, which the training loop scales on the device)."""

    def __init__(self, dtype: torch.dtype, scale: bool = False) -> None:
        self.dtype, self.scale = dtype, scale

    def __call__(self, image: torch.Tensor, target: dict, generator: torch.Generator | None = None) -> tuple:
        return (F.convert_image_dtype(image, self.dtype) if self.scale else image.to(self.dtype)), target


class TensorToPIL:
    """uint8 CHW tensor to PIL image, for transforms to run on PIL images (--backend pil)."""

    def __call__(self, image, target: dict, generator: torch.Generator | None = None) -> tuple:
        return (F.to_pil_image(image) if isinstance(image, torch.Tensor) else image), target


class RandomHorizontalFlip:
    """Mirror the image left-right with probability p, with its boxes, masks and keypoints; keypoints also
    swap roles (a left wrist becomes a right wrist) by keypoint_flip, each keypoint's mirror index."""

    def __init__(self, p: float = 0.5, keypoint_flip: list[int] | None = None) -> None:
        self.p = p
        self.keypoint_flip = keypoint_flip

    def __call__(self, image, target: dict, generator: torch.Generator | None = None) -> tuple:
        if uniform(generator) >= self.p:
            return image, target
        width = image_size(image)[1]
        image = F.horizontal_flip(image)
        target = dict(target)
        if "boxes" in target:
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
            target["boxes"] = boxes
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        if "keypoints" in target:
            points = target["keypoints"].clone()
            if self.keypoint_flip is not None:
                points = points[:, self.keypoint_flip]
            labelled = points[..., 2] > 0
            points[..., 0] = torch.where(labelled, width - points[..., 0], points[..., 0])
            target["keypoints"] = points
        return image, target


class ScaleJitter:
    """Resize by a random factor in scale_range of the scale that fits the image in target_size (h, w)."""

    def __init__(self, target_size: tuple[int, int], scale_range: tuple[float, float] = (0.1, 2.0)) -> None:
        self.target_size = target_size
        self.scale_range = scale_range

    def __call__(self, image, target: dict, generator: torch.Generator | None = None) -> tuple:
        height, width = image_size(image)
        fit = min(self.target_size[0] / height, self.target_size[1] / width)
        scale = fit * uniform(generator, *self.scale_range)
        return resize(image, target, (max(1, int(height * scale)), max(1, int(width * scale))))


class FixedSizeCrop:
    """Make the image exactly size (h, w): a random window where it is larger, padding with fill at the
    bottom and right where it is smaller."""

    def __init__(self, size: tuple[int, int], fill: list[float]) -> None:
        self.size = size
        self.fill = list(fill)

    def __call__(self, image, target: dict, generator: torch.Generator | None = None) -> tuple:
        height, width = image_size(image)
        out_height, out_width = self.size
        if height > out_height or width > out_width:
            top = int(uniform(generator) * (max(height - out_height, 0) + 1))
            left = int(uniform(generator) * (max(width - out_width, 0) + 1))
            image, target = crop(image, target, top, left, min(height, out_height), min(width, out_width))
        return place(image, target, 0, 0, out_height, out_width, self.fill)


class RandomShortestSize:
    """Resize the short side to a size drawn from min_sizes, unless that makes the long side exceed
    max_size, in which case the long side becomes max_size."""

    def __init__(self, min_sizes: tuple[int, ...], max_size: int) -> None:
        self.min_sizes = min_sizes
        self.max_size = max_size

    def __call__(self, image, target: dict, generator: torch.Generator | None = None) -> tuple:
        height, width = image_size(image)
        short = self.min_sizes[int(torch.randint(len(self.min_sizes), (1,), generator=generator))]
        scale = min(short / min(height, width), self.max_size / max(height, width))
        return resize(image, target, (int(height * scale), int(width * scale)))


class RandomPhotometricDistort:
    """SSD's colour distortion: brightness, contrast (before or after the next two), saturation and hue, each
    with probability p, then a random channel order with probability p."""

    def __init__(self, contrast: tuple[float, float] = (0.5, 1.5), saturation: tuple[float, float] = (0.5, 1.5),
                 hue: tuple[float, float] = (-0.05, 0.05), brightness: tuple[float, float] = (0.875, 1.125),
                 p: float = 0.5) -> None:
        self.contrast, self.saturation, self.hue, self.brightness, self.p = contrast, saturation, hue, brightness, p

    def __call__(self, image, target: dict, generator: torch.Generator | None = None) -> tuple:
        draws = torch.rand(6, generator=generator).tolist()
        if draws[0] < self.p:
            image = F.adjust_brightness(image, uniform(generator, *self.brightness))
        contrast_first = draws[1] < 0.5
        if draws[2] < self.p and contrast_first:
            image = F.adjust_contrast(image, uniform(generator, *self.contrast))
        if draws[3] < self.p:
            image = F.adjust_saturation(image, uniform(generator, *self.saturation))
        if draws[4] < self.p:
            image = F.adjust_hue(image, uniform(generator, *self.hue))
        if draws[2] < self.p and not contrast_first:
            image = F.adjust_contrast(image, uniform(generator, *self.contrast))
        if draws[5] < self.p:
            channels = 3 if isinstance(image, Image.Image) else image.shape[-3]
            image = F.permute_channels(image, torch.randperm(channels, generator=generator).tolist())
        return image, target


class RandomZoomOut:
    """With probability p, put the image at a random place on a canvas side_range times its size, filled
    with fill: objects become smaller."""

    def __init__(self, fill: list[float], side_range: tuple[float, float] = (1.0, 4.0), p: float = 0.5) -> None:
        if not 1.0 <= side_range[0] <= side_range[1]:
            raise ValueError(f"side_range {side_range} must satisfy 1 <= low <= high")
        self.fill, self.side_range, self.p = list(fill), side_range, p

    def __call__(self, image, target: dict, generator: torch.Generator | None = None) -> tuple:
        if uniform(generator) >= self.p:
            return image, target
        height, width = image_size(image)
        ratio = uniform(generator, *self.side_range)
        canvas_height, canvas_width = int(height * ratio), int(width * ratio)
        top = int((canvas_height - height) * uniform(generator))
        left = int((canvas_width - width) * uniform(generator))
        return place(image, target, top, left, canvas_height, canvas_width, self.fill)


class RandomIoUCrop:
    """SSD's crop: draw a minimum overlap from options (1.0 leaves the image as it is), then windows of
    scale and aspect ratio in range until one holds the centre of some box and overlaps at least one of those
    boxes that much (SSD's rule, and torchvision's); keep the boxes whose centres it holds."""

    def __init__(self, min_scale: float = 0.3, max_scale: float = 1.0, min_aspect_ratio: float = 0.5,
                 max_aspect_ratio: float = 2.0, options: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0),
                 trials: int = 40) -> None:
        self.min_scale, self.max_scale = min_scale, max_scale
        self.min_aspect_ratio, self.max_aspect_ratio = min_aspect_ratio, max_aspect_ratio
        self.options, self.trials = options, trials

    def __call__(self, image, target: dict, generator: torch.Generator | None = None) -> tuple:
        height, width = image_size(image)
        boxes = target["boxes"]
        if len(boxes) == 0:
            return image, target
        # Bounded so that a sample no window can satisfy ends uncropped instead of looping for ever.
        for _ in range(50):
            min_overlap = self.options[int(torch.randint(len(self.options), (1,), generator=generator))]
            if min_overlap >= 1.0:
                return image, target
            for _ in range(self.trials):
                scale_w = uniform(generator, self.min_scale, self.max_scale)
                scale_h = uniform(generator, self.min_scale, self.max_scale)
                new_w, new_h = int(width * scale_w), int(height * scale_h)
                if new_w < 1 or new_h < 1 or not self.min_aspect_ratio <= new_w / new_h <= self.max_aspect_ratio:
                    continue
                left = int((width - new_w) * uniform(generator))
                top = int((height - new_h) * uniform(generator))
                centers = (boxes[:, :2] + boxes[:, 2:]) / 2
                holds = ((centers[:, 0] > left) & (centers[:, 0] < left + new_w) & (centers[:, 1] > top)
                         & (centers[:, 1] < top + new_h))
                if not holds.any():
                    continue
                window = torch.tensor([[left, top, left + new_w, top + new_h]], dtype=boxes.dtype)
                if box_iou(boxes[holds], window).max() < min_overlap:
                    continue
                return crop(image, keep_instances(target, holds), top, left, new_h, new_w)
        return image, target


def boxes_of_masks(masks: torch.Tensor) -> torch.Tensor:
    """(N, 4) boxes that just hold each (N, H, W) mask's pixels (zeros for an empty mask)."""
    present = masks.bool()
    rows, cols = present.any(2), present.any(1)  # (N, H), (N, W): lines with a pixel

    def first_and_end(lines: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = lines.to(torch.uint8).argmax(1)
        end = lines.shape[1] - lines.flip(1).to(torch.uint8).argmax(1)
        return first, end

    (y0, y1), (x0, x1) = first_and_end(rows), first_and_end(cols)
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    return boxes * rows.any(1, keepdim=True)


def copy_paste(image: torch.Tensor, target: dict, source: torch.Tensor, source_target: dict,
               generator: torch.Generator | None = None, blend: bool = True) -> tuple[torch.Tensor, dict]:
    """Simple Copy-Paste: a random subset of source's instances is pasted over image (resized to its size
    first if needed, edges softened with a Gaussian when blend). Pasted instances without a pixel and covered
    instances left with none are dropped; every box is redrawn round its mask."""
    count = len(source_target["masks"])
    if count == 0:
        return image, target
    chosen = torch.randint(count, (count,), generator=generator).unique()
    pasted = {k: source_target[k][chosen] for k in ("masks", "labels", "iscrowd") if k in source_target}
    size = image_size(image)
    if image_size(source) != size:
        source = F.resize(source, list(size), antialias=True)
        pasted["masks"] = F.resize(pasted["masks"], list(size), interpolation=InterpolationMode.NEAREST)
    # A mask that a downscale (lsj's, or the resize above) left empty would get a box without extent, which
    # stops torchvision's training step.
    present = pasted["masks"].flatten(1).bool().any(1)
    pasted = {k: v[present] for k, v in pasted.items()}
    cover = pasted["masks"].bool().any(0)
    alpha = cover[None].float()
    if blend:
        alpha = F.gaussian_blur(alpha, kernel_size=[5, 5], sigma=[2.0])
    image = (image.float() * (1 - alpha) + source.float() * alpha).round().to(image.dtype)
    masks = target["masks"] * ~cover
    target = keep_instances({**target, "masks": masks}, masks.flatten(1).bool().any(1))
    out = dict(target)
    for key in ("masks", "labels", "iscrowd"):
        if key in target and key in pasted:
            out[key] = torch.cat([target[key], pasted[key].to(target[key].dtype)])
    out["boxes"] = boxes_of_masks(out["masks"])
    if "area" in target:
        out["area"] = out["masks"].flatten(1).sum(1).float()
    return image, out

"""Paste the model's small per-detection masks into full-size images in a few batched steps on the device.

What it changes: at inference, the model's transform pastes masks with `paste_masks` instead of torchvision's
paste_masks_in_image, which pastes one detection at a time and reads each box back to the host to size its
resize (with 100 detections per image, hundreds of small kernels and host syncs per image). Bilinear resizing is
separable, so each detection's resized-and-placed mask is Wy @ mask @ Wx^T with two sparse weight matrices built
from the same integer box and sampling rule that torchvision uses; one batched matrix product does every
detection of a chunk at once, and the numbers agree with torchvision's to float rounding. It relies on
GeneralizedRCNNTransform's settings and postprocess, and on torchvision's expand_boxes and expand_masks;
`self_check` compares a paste with torchvision's.
"""

from __future__ import annotations

import torch
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks, paste_masks_in_image
from torchvision.models.detection.transform import GeneralizedRCNNTransform

# Detections pasted per matrix product: bounds the (chunk, H, W) float buffer to ~256 MB at 800x1333.
_ELEMENTS_PER_CHUNK = 64 * 2**20


def _axis_weights(start: torch.Tensor, end: torch.Tensor, source: int, length: int) -> torch.Tensor:
    """(N, length, source) weights that resize N rows of `source` samples to the integer spans
    [start, end] (inclusive) of an axis of `length` pixels, with align_corners=False bilinear sampling;
    pixels outside a span (or the image) get no weight."""
    pixel = torch.arange(length, device=start.device)
    span = (end - start + 1).clamp(min=1)
    offset = pixel[None, :] - start[:, None]
    inside = (offset >= 0) & (pixel[None, :] <= end[:, None])
    step = source / span.to(torch.float32)
    position = ((offset.to(torch.float32) + 0.5) * step[:, None] - 0.5).clamp(min=0)
    low = position.to(torch.int64).clamp(max=source - 1)
    high = (low + 1).clamp(max=source - 1)
    upper_share = (position - low.to(torch.float32)) * inside
    lower_share = (1 - (position - low.to(torch.float32))) * inside
    weights = torch.zeros((*low.shape, source), dtype=torch.float32, device=start.device)
    weights.scatter_add_(2, low[..., None], lower_share[..., None])
    weights.scatter_add_(2, high[..., None], upper_share[..., None])
    return weights


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int], padding: int = 1
                ) -> torch.Tensor:
    """(N, 1, M, M) mask probabilities placed in their (N, 4) boxes on an image of image_size (h, w):
    (N, 1, h, w) float32, as torchvision's paste_masks_in_image gives them."""
    height, width = int(image_size[0]), int(image_size[1])
    with torch.autocast(masks.device.type, enabled=False):
        padded, scale = expand_masks(masks.float(), padding=padding)
        corners = expand_boxes(boxes.float(), scale).to(torch.int64)
        out = padded.new_empty((len(masks), 1, height, width))
        source = padded.shape[-1]
        chunk = max(1, _ELEMENTS_PER_CHUNK // max(1, height * width))
        for first in range(0, len(masks), chunk):
            part = slice(first, first + chunk)
            rows = _axis_weights(corners[part, 1], corners[part, 3], source, height)
            columns = _axis_weights(corners[part, 0], corners[part, 2], source, width)
            torch.matmul(rows, padded[part, 0] @ columns.transpose(1, 2), out=out[part, 0])
    return out


class DevicePasteTransform(GeneralizedRCNNTransform):
    """The model's resize-and-normalise step, with masks pasted by paste_masks at inference."""

    def postprocess(self, result, image_shapes, original_image_sizes):
        if self.training:
            return result
        small_masks = [r.pop("masks", None) for r in result]
        result = super().postprocess(result, image_shapes, original_image_sizes)
        for prediction, masks, size in zip(result, small_masks, original_image_sizes):
            if masks is not None:
                prediction["masks"] = paste_masks(masks, prediction["boxes"], size)
        return result


_TRANSFORM_SETTINGS = ("min_size", "max_size", "image_mean", "image_std", "size_divisible", "fixed_size",
                       "_skip_resize")


def self_check() -> str | None:
    """None when the transform has the settings copied over and a small paste equals torchvision's."""
    transform = GeneralizedRCNNTransform(64, 64, [0.5] * 3, [0.2] * 3)
    missing = [name for name in _TRANSFORM_SETTINGS if not hasattr(transform, name)]
    if missing:
        return f"torchvision's GeneralizedRCNNTransform has no {missing[0]}"
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand((5, 1, 28, 28), generator=generator)
    corners = torch.rand((5, 2), generator=generator) * 30
    boxes = torch.cat([corners, corners + 1 + torch.rand((5, 2), generator=generator) * 30], 1)
    try:
        difference = (paste_masks(masks, boxes, (50, 60)) - paste_masks_in_image(masks, boxes, (50, 60))).abs()
    except (TypeError, RuntimeError, ValueError) as e:
        return f"torchvision's mask pasting changed ({type(e).__name__}: {e})"
    return None if difference.max() < 1e-4 else "pasted masks differ from torchvision's paste_masks_in_image"


def use_device_paste(model: torch.nn.Module) -> torch.nn.Module:
    """Give a torchvision detection model that predicts masks the batched mask paste (same settings; no weights
    involved); others keep their transform."""
    heads = getattr(model, "roi_heads", None)
    if heads is None or not heads.has_mask():
        return model
    old = model.transform
    model.transform = DevicePasteTransform(old.min_size, old.max_size, old.image_mean, old.image_std,
                                           old.size_divisible, old.fixed_size, _skip_resize=old._skip_resize)
    return model

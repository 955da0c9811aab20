"""A training image's masks resized as bytes.

What it changes: torchvision's transform resizes an image's masks by nearest-neighbour interpolation of a float
copy of them, then turns the result back into bytes: two float copies of all of the image's masks (instances x
height x width floats each) at once. Nearest-neighbour interpolation only picks pixels, so here the byte masks
are interpolated as they are, to the size the image was resized to: the same masks to the bit, with no float
copy. Masks of another dtype, and an export, go through torchvision's resize. It relies on torchvision resizing
the masks by `interpolate`'s nearest mode to the image's new size; `self_check` compares with its resize.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from .exact import same_tensors
from .mixins import exporting, mix_into
from .transform_constants import KeptConstantsMixin


class ByteMaskResizeMixin:
    """In front of torchvision's GeneralizedRCNNTransform: byte masks resized without a float copy."""

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None
               ) -> tuple[Tensor, dict[str, Tensor] | None]:
        masks = None if target is None else target.get("masks")
        skipped = self.training and getattr(self, "_skip_resize", False)  # sizes the data set already chose
        if masks is None or masks.dtype != torch.uint8 or skipped or exporting():
            return super().resize(image, target)
        del target["masks"]  # the transform's own copy of the target dict
        image, target = super().resize(image, target)
        target["masks"] = F.interpolate(masks[:, None], size=image.shape[-2:], mode="nearest")[:, 0]
        return image, target


def _eligible(module: nn.Module) -> bool:
    """A transform that resizes by torchvision's method, or by the kept constants' in front of it (a subclass
    with its own keeps it)."""
    return (isinstance(module, GeneralizedRCNNTransform)
            and type(module).resize in (GeneralizedRCNNTransform.resize, KeptConstantsMixin.resize))


def resize_masks_as_bytes(model: nn.Module) -> nn.Module:
    """Give model's torchvision transforms byte mask resizing, in place; a detector without a mask head (its
    training reads no masks) is left as it is."""
    if hasattr(model, "transform") and not any(isinstance(m, RoIHeads) and m.has_mask() for m in model.modules()):
        return model
    return mix_into(model, ByteMaskResizeMixin, _eligible, "ByteMaskResize")


def example_batch(generator: torch.Generator) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Three images of odd sizes, up- and downscaled, with masks of values 0 to 2; one has no instance."""
    images, targets = [], []
    for (height, width), count in (((37, 53), 3), ((61, 29), 2), ((140, 97), 0)):
        images.append(torch.rand(3, height, width, generator=generator))
        masks = (torch.rand(count, height, width, generator=generator) * 3).to(torch.uint8)
        targets.append({"boxes": torch.tensor([[1.0, 2.0, 20.0, 25.0]] * count).reshape(-1, 4),
                        "labels": torch.ones(count, dtype=torch.int64), "masks": masks})
    return images, targets


def resized_both_ways(fixed_size: tuple[int, int] | None) -> tuple[tuple, tuple]:
    """The example batch through a byte-mask transform and through torchvision's, in training."""
    results = []
    for bytes_ in (True, False):
        transform = GeneralizedRCNNTransform((40, 47, 53), 90, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225],
                                             fixed_size=fixed_size)
        if bytes_:
            transform = resize_masks_as_bytes(transform)
        images, targets = example_batch(torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        image_list, targets = transform.train()(images, targets)
        results.append((image_list.tensors, [t["masks"] for t in targets]))
    return results[0], results[1]


def self_check() -> str | None:
    """None when the byte-mask transform gives torchvision's images and masks to the bit."""
    for fixed_size in (None, (45, 70)):
        try:
            (images, masks), (want_images, want_masks) = resized_both_ways(fixed_size)
        except (AttributeError, TypeError, RuntimeError, ValueError, KeyError) as e:
            return f"torchvision's GeneralizedRCNNTransform changed ({type(e).__name__}: {e})"
        if not same_tensors([images, *masks], [want_images, *want_masks]):
            return "the byte-mask transform gives other masks than torchvision's"
    return None

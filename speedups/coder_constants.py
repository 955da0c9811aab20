"""The box coder without blocking copies from the host to the device.

What it changes: torchvision's BoxCoder makes small tensors from Python numbers on the boxes' device each call:
encoding, its four weights; decoding, the 0.5 that halves the widths and heights, twice. Each is a blocking copy,
which on a GPU makes the host wait until everything queued before it has run. Here the weights are made once per
dtype, device and inference mode and kept, and decoding halves by the number 0.5, the same product in the same
type: the same boxes to the bit. It relies on encode_single handing its weights to torchvision's encode_boxes and
on decode_single's formula; `self_check` compares both with torchvision's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder, encode_boxes

from .exact import same_tensors
from .mixins import exporting, give_mixin, kept_like, mix_into_held


class KeptConstantsCoderMixin:
    """encode_single and decode_single without copies to the device, in front of torchvision's BoxCoder."""

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        if exporting():
            return super().encode_single(reference_boxes, proposals)
        weights = kept_like(self, "kept_weights", reference_boxes,
                            lambda dtype, device: torch.as_tensor(self.weights, dtype=dtype, device=device))
        return encode_boxes(reference_boxes, proposals, weights)

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        if exporting():
            return super().decode_single(rel_codes, boxes)
        boxes = boxes.to(rel_codes.dtype)
        widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        centre_x, centre_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        # Codes are (dx, dy, dw, dh) for each class in turn; the size codes are capped before exp overflows.
        dx, dy = rel_codes[:, 0::4] / wx, rel_codes[:, 1::4] / wy
        dw = (rel_codes[:, 2::4] / ww).clamp(max=self.bbox_xform_clip)
        dh = (rel_codes[:, 3::4] / wh).clamp(max=self.bbox_xform_clip)
        x = dx * widths[:, None] + centre_x[:, None]
        y = dy * heights[:, None] + centre_y[:, None]
        half_width = 0.5 * (dw.exp() * widths[:, None])
        half_height = 0.5 * (dh.exp() * heights[:, None])
        return torch.stack((x - half_width, y - half_height, x + half_width, y + half_height), dim=2).flatten(1)


def _eligible(coder: object) -> bool:
    """A coder that encodes and decodes by torchvision's methods (a subclass with its own keeps them)."""
    cls = type(coder)
    return (isinstance(coder, BoxCoder) and cls.encode_single is BoxCoder.encode_single
            and cls.decode_single is BoxCoder.decode_single)


def keep_coder_constants(model: nn.Module) -> nn.Module:
    """Give the torchvision box coders of model's modules encoding and decoding without copies to the device, in
    place."""
    return mix_into_held(model, "box_coder", KeptConstantsCoderMixin, _eligible, "KeptConstants")


def example_codes(generator: torch.Generator, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """Reference boxes, proposals, and codes for 3 classes of the proposals, some large enough to be capped."""
    corners = torch.rand(40, 2, generator=generator) * 300
    proposals = torch.cat([corners, corners + 1 + torch.rand(40, 2, generator=generator) * 200], dim=1)
    shift = torch.randn(40, 4, generator=generator) * 20
    reference = torch.cat([proposals[:, :2] + shift[:, :2], proposals[:, 2:] + shift[:, 2:].abs() + 40], dim=1)
    codes = torch.randn(40, 12, generator=generator)
    codes[::5, 2::4] = 30.0  # beyond the cap of log(1000 / 16) with any of the weights used here
    return reference.to(dtype), proposals.to(dtype), codes.to(dtype)


def coded_both_ways(coder: BoxCoder, reference: Tensor, proposals: Tensor, codes: Tensor
                    ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """(encoded, decoded) by coder's own methods and by torchvision's."""
    return ((coder.encode_single(reference, proposals), coder.decode_single(codes, proposals)),
            (BoxCoder.encode_single(coder, reference, proposals), BoxCoder.decode_single(coder, codes, proposals)))


def self_check() -> str | None:
    """None when encoding and decoding give torchvision's results exactly."""
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    give_mixin(coder, KeptConstantsCoderMixin, "KeptConstants")
    try:
        got, want = coded_both_ways(coder, *example_codes(torch.Generator().manual_seed(0)))
    except (AttributeError, TypeError, RuntimeError, ValueError) as e:
        return f"torchvision's BoxCoder changed ({type(e).__name__}: {e})"
    if not same_tensors(got, want):
        return "the coder gives other boxes than torchvision's BoxCoder"
    return None

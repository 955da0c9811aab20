"""The model's input transform without blocking copies from the host to the device.

What it changes: torchvision's GeneralizedRCNNTransform makes small tensors from Python numbers on the images'
device for every image: the mean and standard deviation it normalises with, and the four sizes whose ratios scale
a training image's boxes (and keypoints) after resizing. Each is a blocking copy, which on a GPU makes the host
wait until everything queued before it has run; at the start of a training step that is the previous step's
backward pass, which the host could otherwise overlap with queueing the next forward. Here the mean and deviation
are made once per dtype and device and kept, and the ratios are computed on the host in float32, the values
torchvision's tensors hold, and multiplied in as numbers: the same results to the bit. It relies on the
transform's normalize and resize (and resize_boxes and resize_keypoints, which run here on empty tensors on the
meta device); `self_check` compares both with torchvision's.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from .exact import same_tensors
from .mixins import exporting, kept_like, mix_into


def ratio(new: int, old: int) -> float:
    """new / old divided in float32, as torchvision divides its two float32 tensors of the sizes."""
    return float(np.float32(new) / np.float32(old))


def scaled_boxes(boxes: Tensor, old_size: tuple[int, int], new_size: tuple[int, int]) -> Tensor:
    """(N, 4) boxes of an image resized from old_size to new_size (height, width)."""
    height_ratio, width_ratio = ratio(new_size[0], old_size[0]), ratio(new_size[1], old_size[1])
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((x1 * width_ratio, y1 * height_ratio, x2 * width_ratio, y2 * height_ratio), dim=1)


def scaled_keypoints(keypoints: Tensor, old_size: tuple[int, int], new_size: tuple[int, int]) -> Tensor:
    """(N, K, 3) keypoints of an image resized from old_size to new_size (height, width); visibility kept."""
    scaled = keypoints.clone()
    scaled[..., 0] *= ratio(new_size[1], old_size[1])
    scaled[..., 1] *= ratio(new_size[0], old_size[0])
    return scaled


class KeptConstantsMixin:
    """normalize and resize without copies to the device, in front of torchvision's GeneralizedRCNNTransform."""

    def normalize(self, image: Tensor) -> Tensor:
        if not image.is_floating_point() or exporting():  # torchvision's refusal, or its exported graph
            return super().normalize(image)
        mean, std = kept_like(self, "normalize_constants", image, lambda dtype, device: tuple(
            torch.as_tensor(values, dtype=dtype, device=device)[:, None, None]
            for values in (self.image_mean, self.image_std)))
        return (image - mean) / std

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None
               ) -> tuple[Tensor, dict[str, Tensor] | None]:
        if target is None or "boxes" not in target or exporting():
            return super().resize(image, target)
        boxes, keypoints = target["boxes"], target.get("keypoints")
        # torchvision's resize scales these itself, making its ratios on their device: it is given empty ones on
        # the meta device, which holds no data, and they are scaled here.
        target["boxes"] = torch.empty((0, 4), device="meta")
        if keypoints is not None:
            target["keypoints"] = torch.empty((0, *keypoints.shape[1:]), device="meta")
        old_size = tuple(image.shape[-2:])
        image, target = super().resize(image, target)
        new_size = tuple(image.shape[-2:])
        target["boxes"] = scaled_boxes(boxes, old_size, new_size)
        if keypoints is not None:
            target["keypoints"] = scaled_keypoints(keypoints, old_size, new_size)
        return image, target


def _eligible(module: nn.Module) -> bool:
    """A transform that normalises and resizes by torchvision's methods (a subclass with its own keeps them)."""
    cls = type(module)
    return (isinstance(module, GeneralizedRCNNTransform) and cls.normalize is GeneralizedRCNNTransform.normalize
            and cls.resize is GeneralizedRCNNTransform.resize)


def keep_transform_constants(model: nn.Module) -> nn.Module:
    """Give model's torchvision transforms normalisation and resizing without copies to the device, in place."""
    return mix_into(model, KeptConstantsMixin, _eligible, "KeptConstants")


def example_batch(generator: torch.Generator) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Two images of different sizes with boxes, masks and keypoints, sized so that the ratios are not round."""
    images, targets = [], []
    for height, width in ((37, 53), (61, 29)):
        corners = torch.rand(3, 2, generator=generator) * 20
        keypoints = torch.rand(3, 5, 3, generator=generator) * 25
        keypoints[..., 2] = 1.0
        images.append(torch.rand(3, height, width, generator=generator))
        targets.append({"boxes": torch.cat([corners, corners + 1 + torch.rand(3, 2, generator=generator) * 9], 1),
                        "labels": torch.ones(3, dtype=torch.int64), "keypoints": keypoints,
                        "masks": (torch.rand(3, height, width, generator=generator) > 0.5).to(torch.uint8)})
    return images, targets


def transformed_both_ways(training: bool) -> tuple[tuple, tuple]:
    """The example batch through a kept-constants transform and through torchvision's, with the same random
    choice of size."""
    results = []
    for keep in (True, False):
        transform = GeneralizedRCNNTransform((40, 47, 53), 90, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        if keep:
            transform = keep_transform_constants(transform)
        images, targets = example_batch(torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        image_list, targets = transform.train(training)(images, targets)
        results.append((image_list.tensors, image_list.image_sizes, targets))
    return results[0], results[1]


def same_transform(got: tuple, want: tuple) -> bool:
    """Whether two transformed batches are equal: images, sizes and every target tensor."""
    (images, sizes, targets), (want_images, want_sizes, want_targets) = got, want
    return (same_tensors([images], [want_images]) and sizes == want_sizes and len(targets) == len(want_targets)
            and all(a.keys() == b.keys() and same_tensors([a[k] for k in a], [b[k] for k in a])
                    for a, b in zip(targets, want_targets)))


def self_check() -> str | None:
    """None when the transform gives torchvision's images and targets exactly, in training and evaluation."""
    for training in (True, False):
        try:
            got, want = transformed_both_ways(training)
        except (AttributeError, TypeError, RuntimeError, ValueError, KeyError) as e:
            return f"torchvision's GeneralizedRCNNTransform changed ({type(e).__name__}: {e})"
        if not same_transform(got, want):
            return "the transform gives other images or targets than torchvision's"
    return None

"""Joint transforms of an image tensor and its target: boxes and masks move with the pixels.

Random transforms draw from the generator they are given (the dataset seeds one per sample), so that a
sample's augmentation does not depend on which process loads it or on what else used the global generator.
"""

from __future__ import annotations

import torch


class Compose:
    """Apply transforms in order to (image, target)."""

    def __init__(self, transforms: list) -> None:
        self.transforms = transforms

    def __call__(self, image: torch.Tensor, target: dict, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, dict]:
        for t in self.transforms:
            image, target = t(image, target, generator)
        return image, target


class RandomHorizontalFlip:
    """Mirror the image left-right with probability p, with its boxes and masks."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: torch.Tensor, target: dict, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, dict]:
        if torch.rand(1, generator=generator).item() >= self.p:
            return image, target
        width = image.shape[-1]
        image = image.flip(-1)
        target = dict(target)
        if "boxes" in target:
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
            target["boxes"] = boxes
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        return image, target

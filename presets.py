"""Named augmentation policies for training and evaluation, built from transforms.py.

Images stay uint8 through the data loader (a quarter of the bytes to pass between processes); the engine
turns them into floats on the device.
"""

from __future__ import annotations

import transforms as T

TRAIN_AUGMENTATIONS = ("hflip",)


class DetectionPresetTrain:
    """The training policy named by --data-augmentation."""

    def __init__(self, data_augmentation: str = "hflip", hflip_prob: float = 0.5) -> None:
        if data_augmentation not in TRAIN_AUGMENTATIONS:
            raise ValueError(f"unknown data augmentation {data_augmentation!r}; choose from {TRAIN_AUGMENTATIONS}")
        self.transforms = T.Compose([T.RandomHorizontalFlip(hflip_prob)])

    def __call__(self, image, target, generator=None):
        return self.transforms(image, target, generator)


class DetectionPresetEval:
    """Evaluation leaves samples as they are: the model resizes and normalises them itself."""

    def __call__(self, image, target, generator=None):
        return image, target

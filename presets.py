"""Named augmentation policies for training (--data-augmentation, --use-copypaste, --use-v2, --backend), built
from transforms.py or from torchvision.transforms.v2, and the evaluation preset.

Images leave the data loader as uint8 tensors (a quarter of the bytes of floats to pass between processes);
the engine turns them into floats on the device.
"""

from __future__ import annotations

import torch

import transforms as T
import utils

TRAIN_AUGMENTATIONS = ("hflip", "lsj", "multiscale", "ssd", "ssdlite")
IMAGE_BACKENDS = ("pil", "tensor", "tv_tensor")
# ImageNet's mean colour in 0-255: padding of this colour normalises to about zero.
MEAN_FILL = (123.0, 117.0, 104.0)
LSJ_SIZE = (1024, 1024)
MULTISCALE_SIZES = tuple(range(480, 801, 32))
# These policies resize images themselves; the model must not resize them again while training.
RESIZING_AUGMENTATIONS = ("lsj", "multiscale")


def _own_policy(name: str, hflip_prob: float, keypoint_flip: list[int] | None) -> list:
    flip = T.RandomHorizontalFlip(hflip_prob, keypoint_flip)
    return {
        "hflip": [flip],
        "lsj": [T.ScaleJitter(LSJ_SIZE), T.FixedSizeCrop(LSJ_SIZE, MEAN_FILL), flip],
        "multiscale": [T.RandomShortestSize(MULTISCALE_SIZES, 1333), flip],
        "ssd": [T.RandomPhotometricDistort(), T.RandomZoomOut(MEAN_FILL), T.RandomIoUCrop(), flip],
        "ssdlite": [T.RandomIoUCrop(), flip],
    }[name]


class DetectionPresetTrain:
    """The training policy named by --data-augmentation, on the image type --backend names, with
    transforms.py's transforms or (use_v2) torchvision.transforms.v2's."""

    def __init__(self, data_augmentation: str = "hflip", hflip_prob: float = 0.5, backend: str = "tensor",
                 use_v2: bool = False, keypoint_flip: list[int] | None = None) -> None:
        if data_augmentation not in TRAIN_AUGMENTATIONS:
            raise ValueError(f"unknown data augmentation {data_augmentation!r}; choose from {TRAIN_AUGMENTATIONS}")
        if backend not in IMAGE_BACKENDS or (backend == "tv_tensor" and not use_v2):
            raise ValueError(f"backend {backend!r}: choose pil or tensor, or tv_tensor with use_v2")
        if use_v2:
            self.transforms = _V2Policy(data_augmentation, hflip_prob, backend)
            return
        steps = _own_policy(data_augmentation, hflip_prob, keypoint_flip)
        if backend == "pil":
            steps = [T.TensorToPIL(), *steps, T.PILToTensor()]
        self.transforms = T.Compose(steps)

    def __call__(self, image: torch.Tensor, target: dict, generator: torch.Generator | None = None):
        return self.transforms(image, target, generator)


class _V2Policy:
    """The same policies in torchvision.transforms.v2, on tv_tensors; plain tensors in and out.

    v2 draws from the global generator, so it is seeded from the sample's own generator for each sample.
    lsj's fixed-size crop is v2's RandomCrop with padding where needed (v2 has no crop that pads only at the
    bottom and right). Instances that a transform leaves without extent are dropped by SanitizeBoundingBoxes.
    """

    def __init__(self, name: str, hflip_prob: float, backend: str) -> None:
        import torchvision.transforms.v2 as v2
        from torchvision import tv_tensors

        self.tv_tensors = tv_tensors
        fill = {tv_tensors.Mask: 0, "others": list(MEAN_FILL)}  # a defaultdict's default is never asked for
        flip = v2.RandomHorizontalFlip(hflip_prob)
        steps = {
            "hflip": [flip],
            "lsj": [v2.ScaleJitter(LSJ_SIZE, antialias=True), v2.RandomCrop(LSJ_SIZE, pad_if_needed=True, fill=fill),
                    flip],
            "multiscale": [v2.RandomShortestSize(MULTISCALE_SIZES, 1333), flip],
            "ssd": [v2.RandomPhotometricDistort(), v2.RandomZoomOut(fill=fill), v2.RandomIoUCrop(), flip],
            "ssdlite": [v2.RandomIoUCrop(), flip],
        }[name]
        first = {"pil": [v2.ToPILImage()], "tensor": [], "tv_tensor": [v2.ToImage()]}[backend]
        self.pipeline = v2.Compose([*first, *steps, v2.ToImage(),
                                    v2.SanitizeBoundingBoxes(labels_getter=_per_instance_tensors),
                                    v2.ToPureTensor()])

    def __call__(self, image: torch.Tensor, target: dict, generator: torch.Generator | None = None):
        tv = self.tv_tensors
        wrapped = dict(target, boxes=tv.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=image.shape[-2:]))
        if "masks" in target:
            wrapped["masks"] = tv.Mask(target["masks"])
        seed = int(torch.randint(2**62, (1,), generator=generator)) if generator is not None else None
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            image, target = self.pipeline(image, wrapped)
        return image, target


def _per_instance_tensors(sample) -> tuple[torch.Tensor, ...]:
    """What SanitizeBoundingBoxes drops together with a box besides masks: labels, area and iscrowd."""
    target = sample[1]
    return tuple(target[k] for k in ("labels", "area", "iscrowd") if k in target)


class CopyPasteCollate:
    """Batches with Simple Copy-Paste (--use-copypaste): each image gets instances of the one before it in
    the batch; seeded by the dataset's seed and epoch and the batch's image ids."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __call__(self, batch):
        images, targets = utils.collate_fn(batch)
        ids = tuple(t["image_id"] for t in targets)
        generator = utils.generator_for(self.dataset.seed, self.dataset.epoch, ids)
        pasted = [T.copy_paste(image, target, images[i - 1], targets[i - 1], generator)
                  for i, (image, target) in enumerate(zip(images, targets))]
        return tuple(p[0] for p in pasted), tuple(p[1] for p in pasted)


class DetectionPresetEval:
    """Evaluation leaves samples as they are: the model resizes and normalises them itself."""

    def __call__(self, image, target, generator=None):
        return image, target

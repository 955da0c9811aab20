"""A training forward that checks the targets' boxes without waiting for the device before the backbone.

What it changes: torchvision's GeneralizedRCNN.forward checks, image by image, that every transformed target box
has positive width and height, reading each answer on the host before it queues the backbone. On a GPU each read
waits for everything queued before it, so the host cannot queue a step's backbone while the GPU still runs the
previous step's backward. Here the training forward finds degenerate boxes for the whole batch on the device
and reads that answer once, after the RPN (whose own waits have drained the queue by then); when there is one,
torchvision's forward runs the batch again and reports the box as it does. Evaluation, targets that are not
(N, 4) box tensors, and exported graphs go straight to torchvision's forward. It relies on the steps of
GeneralizedRCNN.forward in training (transform, backbone, RPN, RoI heads, postprocess, the two heads' losses);
`self_check` compares with torchvision's forward on a stub model.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from .exact import same_tensors
from .mixins import exporting, mix_into


def well_formed(images: list[Tensor], targets: list[dict[str, Tensor]] | None) -> bool:
    """Whether torchvision's forward would take these without refusing them: targets given, each with an (N, 4)
    tensor of boxes, and images of at least two dimensions."""
    return (targets is not None and all(image.dim() >= 2 for image in images)
            and all(isinstance(t.get("boxes"), Tensor) and t["boxes"].dim() == 2 and t["boxes"].shape[-1] == 4
                    for t in targets))


def any_degenerate(targets: list[dict[str, Tensor]]) -> Tensor:
    """Whether some box of the batch has no positive width or height: a one-element tensor on the boxes' device."""
    boxes = torch.cat([t["boxes"] for t in targets])
    return (boxes[:, 2:] <= boxes[:, :2]).any()


class DeferredBoxCheckMixin:
    """The training forward with the batch's box check read after the RPN, in front of GeneralizedRCNN."""

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        if not self.training or not well_formed(images, targets) or exporting():
            return super().forward(images, targets)
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        image_list, transformed = self.transform(images, targets)
        degenerate = any_degenerate(transformed)
        features = self.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        proposals, proposal_losses = self.rpn(image_list, features, transformed)
        if degenerate:  # the one wait for the device here
            return super().forward(images, targets)
        detections, detector_losses = self.roi_heads(features, proposals, image_list.image_sizes, transformed)
        self.transform.postprocess(detections, image_list.image_sizes, original_sizes)
        return {**detector_losses, **proposal_losses}


def _eligible(module: nn.Module) -> bool:
    """A detection model that runs torchvision's GeneralizedRCNN.forward (a subclass with its own keeps it)."""
    return isinstance(module, GeneralizedRCNN) and type(module).forward is GeneralizedRCNN.forward


def defer_box_check(model: nn.Module) -> nn.Module:
    """Give model, if an R-CNN, the training forward with the deferred box check, in place."""
    return mix_into(model, DeferredBoxCheckMixin, _eligible, "DeferredBoxCheck")


class _StubBackbone(nn.Module):
    """One feature map: the images' mean over channels (a tensor, as some backbones return)."""

    out_channels = 1

    def forward(self, images: Tensor) -> Tensor:
        return images.mean(dim=1, keepdim=True)


class _StubRPN(nn.Module):
    """Each image's boxes as its proposals; a loss from the features and the boxes."""

    def forward(self, images, features, targets):
        proposals = [t["boxes"] for t in targets]
        return proposals, {"loss_rpn": features["0"].sum() + sum(p.sum() for p in proposals)}


class _StubRoIHeads(nn.Module):
    """No detections; a loss from the proposals and the image sizes."""

    def forward(self, features, proposals, image_sizes, targets):
        return [], {"loss_roi": sum(p.square().sum() for p in proposals) + sum(h * w for h, w in image_sizes)}


def example_model() -> GeneralizedRCNN:
    """torchvision's GeneralizedRCNN with stub parts and one size (no random choice), in training."""
    transform = GeneralizedRCNNTransform(48, 64, [0.5] * 3, [0.25] * 3)
    return GeneralizedRCNN(_StubBackbone(), _StubRPN(), _StubRoIHeads(), transform).train()


def example_batch(degenerate: bool = False) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Two images with boxes; with degenerate, the second image's last box has no width."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 40, 50, generator=generator), torch.rand(3, 30, 44, generator=generator)]
    boxes = [torch.tensor([[2.0, 3.0, 20.0, 30.0]]), torch.tensor([[1.0, 1.0, 9.0, 7.0], [5.0, 5.0, 12.0, 9.0]])]
    if degenerate:
        boxes[1][1, 2] = boxes[1][1, 0]
    return images, [{"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64)} for b in boxes]


def outcome(model: nn.Module, degenerate: bool) -> dict[str, Tensor] | str:
    """The model's losses on the example batch, or the error it stops with."""
    try:
        return model(*example_batch(degenerate))
    except AssertionError as e:
        return str(e)


def self_check() -> str | None:
    """None when the forward gives torchvision's losses, and stops on a degenerate box as torchvision's does."""
    for degenerate in (False, True):
        try:
            got, want = outcome(defer_box_check(example_model()), degenerate), outcome(example_model(), degenerate)
        except (AttributeError, TypeError, RuntimeError, ValueError, KeyError) as e:
            return f"torchvision's GeneralizedRCNN changed ({type(e).__name__}: {e})"
        same = (got == want if isinstance(want, str) else isinstance(got, dict) and list(got) == list(want)
                and same_tensors(list(got.values()), list(want.values())))
        if not same:
            return "the training forward gives other losses or errors than torchvision's"
    return None

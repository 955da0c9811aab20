"""The mask head's logits computed for one class a region only: in training each positive region's matched
class, in evaluation each detection's predicted class.

What it changes: torchvision's mask predictor ends in a 1x1 convolution that gives every class's 28x28 logits for
each positive region, and its loss keeps the channel of the region's matched class: with C classes, C - 1 of every
C channels are computed, held and given zero gradients, so the mask head's memory and arithmetic grow with the
class count (the full logits and their gradient are each regions x C x 28 x 28 floats). Here the RoI heads'
training forward runs torchvision's code without its mask branch, then the branch on the same samples: the
positive regions, the pooler, the mask head and the predictor's layers before the last as torchvision's, the last
as each region's class's weight row times its features plus that class's bias, and torchvision's loss (masks
projected by its `project_masks_on_boxes`, binary cross-entropy on the kept channel). The weights of the classes
no region has get zero gradients, as before. In evaluation torchvision keeps the predicted class's channel of
every class's logits (its `maskrcnn_inference`): here the forward runs without its mask branch, then the branch
on the detected boxes, with the last layer as each detection's class's row, and the sigmoid of that. Export runs
torchvision's forward unchanged. It relies on the forward asking `has_mask()` for the branch and drawing its
samples by `select_training_samples`, and on the predictor being torchvision's `MaskRCNNPredictor` ending in a
1x1 convolution; `self_check` compares losses and gradients, and evaluation's detections, with torchvision's
RoIHeads. With shape buckets, whose hooks pad the mask head's regions and cut the predictor's output, the layers
before the last run on the padded regions (the recurring shapes) and the padding is
cut before the last.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import roi_heads as torchvision_roi_heads
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign

from .mixins import exporting, mix_into

SamplesT = tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]


def _one_by_one(layer: nn.Module) -> bool:
    """A plain 1x1 convolution: each output pixel is the weights times that pixel's channels, plus the bias."""
    return (isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.stride == (1, 1)
            and layer.padding == (0, 0) and layer.dilation == (1, 1) and layer.groups == 1
            and layer.padding_mode == "zeros")


def eligible_predictor(predictor: nn.Module | None) -> bool:
    """torchvision's mask predictor, run as a Sequential, whose last layer is a plain 1x1 convolution."""
    return (isinstance(predictor, MaskRCNNPredictor) and type(predictor).forward is nn.Sequential.forward
            and _one_by_one(predictor[-1]))


class _WeightRows(torch.autograd.Function):
    """Rows of a 1x1 convolution's weight (C, K, 1, 1) as (N, K), whose gradient comes back in the weight's own
    strides: indexing's would be contiguous, which a channels-last weight's are not (DDP then warns that the
    gradient does not match its bucket's layout and copies it)."""

    @staticmethod
    def forward(ctx, weight: Tensor, rows: Tensor) -> Tensor:
        ctx.save_for_backward(rows)
        ctx.weight_shape, ctx.weight_strides = weight.shape, weight.stride()
        return weight.flatten(1)[rows]

    @staticmethod
    def backward(ctx, gradient: Tensor) -> tuple[Tensor, None]:
        (rows,) = ctx.saved_tensors
        weight_gradient = torch.empty_strided(ctx.weight_shape, ctx.weight_strides, dtype=gradient.dtype,
                                              device=gradient.device).zero_()
        # As indexing's own backward accumulates (deterministically where torch is asked to be).
        weight_gradient.view(ctx.weight_shape[0], -1).index_put_((rows,), gradient, accumulate=True)
        return weight_gradient, None


def matched_class_logits(predictor: nn.Sequential, features: Tensor, classes: Tensor) -> Tensor:
    """(N, H, W): the predictor's logits of each region's class, classes (N,), from the mask head's features,
    whose rows past the N-th are empty regions that shape buckets' padding hooks added (their hook on the
    predictor's output, which this does not call, would cut them)."""
    *layers, last = predictor
    for layer in layers:
        features = layer(features)
    if len(features) > len(classes):  # a slice's backward would copy the gradient, in another layout
        features = features[:len(classes)]
    weights = _WeightRows.apply(last.weight, classes)  # (N, channels in)
    logits = torch.einsum("nchw,nc->nhw", features, weights)
    return logits if last.bias is None else logits + last.bias[classes][:, None, None]


class MatchedClassMasksMixin:
    """In front of torchvision's RoIHeads: the mask branch with the matched class's logits in training, and the
    predicted class's in evaluation."""

    _mask_branch_apart = False  # True while torchvision's forward runs without its mask branch

    def has_mask(self) -> bool:
        return not self._mask_branch_apart and super().has_mask()

    def select_training_samples(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> SamplesT:
        samples = super().select_training_samples(proposals, targets)
        if self._mask_branch_apart:
            self._samples = samples  # for the mask branch, which runs after torchvision's forward
        return samples

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None):
        if exporting() or not super().has_mask() or not eligible_predictor(self.mask_predictor):
            return super().forward(features, proposals, image_shapes, targets)
        if not self.training:
            return self.detections_with_predicted_class_masks(features, proposals, image_shapes)
        if targets is None:
            return super().forward(features, proposals, image_shapes, targets)  # torchvision's own error
        self._mask_branch_apart = True
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
            samples = self._samples
        finally:
            self._mask_branch_apart = False
            self.__dict__.pop("_samples", None)
        losses["loss_mask"] = self.matched_class_mask_loss(features, samples, image_shapes, targets)
        return result, losses

    def detections_with_predicted_class_masks(self, features: dict[str, Tensor], proposals: list[Tensor],
                                              image_shapes: list[tuple[int, int]]):
        """torchvision's evaluation forward, each detection's mask the sigmoid of its predicted class's logits."""
        self._mask_branch_apart = True
        try:
            result, losses = super().forward(features, proposals, image_shapes)
        finally:
            self._mask_branch_apart = False
        boxes = [detections["boxes"] for detections in result]
        region_features = self.mask_head(self.mask_roi_pool(features, boxes, image_shapes))
        classes = torch.cat([detections["labels"] for detections in result])
        probabilities = matched_class_logits(self.mask_predictor, region_features, classes).sigmoid()
        for detections, masks in zip(result, probabilities[:, None].split([len(b) for b in boxes])):
            detections["masks"] = masks
        return result, losses

    def matched_class_mask_loss(self, features: dict[str, Tensor], samples: SamplesT,
                                image_shapes: list[tuple[int, int]], targets: list[dict[str, Tensor]]) -> Tensor:
        """torchvision's mask loss over the positive samples, from their matched classes' logits alone."""
        proposals, matched_idxs, labels, _ = samples
        positives = [torch.where(image_labels > 0)[0] for image_labels in labels]
        regions = [boxes[kept] for boxes, kept in zip(proposals, positives)]
        matched = [indices[kept] for indices, kept in zip(matched_idxs, positives)]
        region_features = self.mask_head(self.mask_roi_pool(features, regions, image_shapes))
        classes = torch.cat([target["labels"][indices] for target, indices in zip(targets, matched)])
        logits = matched_class_logits(self.mask_predictor, region_features, classes)
        mask_targets = torch.cat([self.mask_targets(target["masks"], boxes, indices, logits.shape[-1])
                                  for target, boxes, indices in zip(targets, regions, matched)])
        if mask_targets.numel() == 0:
            return logits.sum() * 0  # no positive region: a zero that still reaches every mask weight
        return F.binary_cross_entropy_with_logits(logits, mask_targets)

    def mask_targets(self, masks: Tensor, boxes: Tensor, matched: Tensor, size: int) -> Tensor:
        """(R, size, size) targets of R regions' boxes on the masks of their matched instances: torchvision's."""
        return torchvision_roi_heads.project_masks_on_boxes(masks, boxes, matched, size)


def _eligible(module: nn.Module) -> bool:
    return isinstance(module, RoIHeads) and module.has_mask() and eligible_predictor(module.mask_predictor)


def use_matched_class_masks(model: nn.Module) -> nn.Module:
    """Give model's torchvision RoI heads that predict masks the one-class mask branch (the matched class in
    training, the predicted one in evaluation), in place."""
    return mix_into(model, MatchedClassMasksMixin, _eligible, "MatchedClassMasks")


def example_heads(num_classes: int = 6) -> RoIHeads:
    """Small torchvision RoI heads with a mask branch, for one 8-channel feature map at a quarter of the image."""
    return RoIHeads(MultiScaleRoIAlign(["0"], 7, 2), TwoMLPHead(8 * 7 * 7, 16), FastRCNNPredictor(16, num_classes),
                    0.5, 0.5, 64, 0.25, None, 0.05, 0.5, 100, mask_roi_pool=MultiScaleRoIAlign(["0"], 14, 2),
                    mask_head=MaskRCNNHeads(8, [8, 8], 1), mask_predictor=MaskRCNNPredictor(8, 8, num_classes))


def example_batch(generator: torch.Generator, box_counts: tuple[int, ...] = (5, 0, 3), num_classes: int = 6,
                  size: int = 64) -> tuple[dict[str, Tensor], list[Tensor], list[tuple[int, int]], list[dict]]:
    """Features, proposals, image shapes and targets of len(box_counts) images (one without boxes by default);
    the proposals include jittered copies of the boxes, so that every image with boxes has positives."""
    def boxes(count: int) -> Tensor:
        corners = torch.rand(count, 2, generator=generator) * size * 0.6
        return torch.cat([corners, corners + 4 + torch.rand(count, 2, generator=generator) * size * 0.4], 1)

    targets, proposals = [], []
    for count in box_counts:
        gt = boxes(count)
        masks = (torch.rand(count, size, size, generator=generator) > 0.5).to(torch.uint8)
        labels = torch.randint(1, num_classes, (count,), generator=generator)
        targets.append({"boxes": gt, "labels": labels, "masks": masks})
        proposals.append(torch.cat([boxes(30), gt + torch.rand(count, 4, generator=generator)]))
    features = {"0": torch.randn(len(box_counts), 8, size // 4, size // 4, generator=generator)}
    return features, proposals, [(size, size)] * len(box_counts), targets


def losses_and_gradients(heads: RoIHeads, batch: tuple, seed: int) -> tuple[dict[str, Tensor], list[Tensor]]:
    """heads' training losses on batch after seeding torch's generator (the samplers draw), and the gradients of
    their sum for each parameter (zeros where none)."""
    heads.train().zero_grad()
    torch.manual_seed(seed)
    _, losses = heads(*batch)
    sum(losses.values()).backward()
    return losses, [torch.zeros_like(p) if p.grad is None else p.grad for p in heads.parameters()]


def detections(heads: RoIHeads, batch: tuple) -> list[dict[str, Tensor]]:
    """heads' evaluation output on batch's features, proposals and image shapes."""
    with torch.no_grad():
        return heads.eval()(*batch[:3])[0]


def same_detections(got: list[dict[str, Tensor]], want: list[dict[str, Tensor]]) -> bool:
    """The same detections, their masks to float rounding."""
    return len(got) == len(want) and all(
        a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6)
                                     for k in b) for a, b in zip(got, want))


def self_check() -> str | None:
    """None when the one-class branch gives torchvision's losses, gradients and detections to float rounding."""
    torch.manual_seed(0)
    plain = example_heads()
    fast = use_matched_class_masks(copy.deepcopy(plain))
    batch = example_batch(torch.Generator().manual_seed(1))
    try:
        (got, got_gradients), (want, want_gradients) = (losses_and_gradients(heads, batch, 2)
                                                        for heads in (fast, plain))
        got_detections, want_detections = detections(fast, batch), detections(plain, batch)
    except (AttributeError, TypeError, RuntimeError, ValueError, KeyError) as e:
        return f"torchvision's RoIHeads changed ({type(e).__name__}: {e})"
    if list(got) != list(want) or not all(torch.allclose(got[name], want[name], rtol=1e-4, atol=1e-6)
                                          for name in want):
        return "the matched-class mask branch gives other losses than torchvision's RoIHeads"
    if not all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(got_gradients, want_gradients)):
        return "the matched-class mask branch gives other gradients than torchvision's RoIHeads"
    if not same_detections(got_detections, want_detections):
        return "the predicted-class mask branch gives other detections than torchvision's RoIHeads"
    return None

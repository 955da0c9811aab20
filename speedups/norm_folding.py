"""Batch norms folded into the convolution before them.

What it changes: in training, each of torchvision's frozen batch norms that directly follows a convolution is
applied through that convolution's weights (one convolution with scaled weights instead of a convolution and
two passes over its output), with the same parameters, gradients and state-dict keys; under autocast the
backbone then stays in half precision, where torchvision's frozen norm turns every activation back into float32.
For inference, every batch norm after a convolution is baked into the convolution's weights.
It relies on torchvision's ResNet modules applying `bnK` directly to `convK`'s output, and on FrozenBatchNorm2d's
buffers (weight, bias, running_mean, running_var, eps); `self_check` verifies both numerically.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from .mixins import rebased

# Modules whose forward applies bnK directly to convK's output (ResNet's stem and blocks). In any
# nn.Sequential a convolution followed by a batch norm is such a pair as well.
_NAMED_PAIRS = (BasicBlock, Bottleneck, ResNet, IntermediateLayerGetter)


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A frozen batch norm that the convolution before it applies: it passes its input on, keeps its buffers
    (and so the model's state-dict keys) and gives its affine map as a scale and shift."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def scale_and_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """weight / sqrt(running_var + eps) and bias - running_mean * scale, computed again only when a buffer
        has been replaced or written to (moved to a device, loaded, broadcast by DDP)."""
        buffers = (self.weight, self.bias, self.running_mean, self.running_var)
        versions = tuple(b._version for b in buffers)
        cached = self.__dict__.get("_cached")
        if cached is None or cached[1] != versions or any(a is not b for a, b in zip(cached[0], buffers)):
            # No autograd graph, and ordinary tensors even when first called under inference mode.
            with torch.inference_mode(False), torch.no_grad():
                scale = self.weight * (self.running_var + self.eps).rsqrt()
                shift = self.bias - self.running_mean * scale
            cached = self.__dict__["_cached"] = (buffers, versions, scale.view(-1, 1, 1, 1), shift)
        return cached[2], cached[3]


class FrozenNormConv2d(nn.Conv2d):
    """A convolution followed by a frozen batch norm, computed as one convolution with scaled weights: one pass
    over the output instead of three. Its gradients are those of the convolution and norm in sequence."""

    frozen_norm: FoldedFrozenBatchNorm2d  # kept out of the module tree: the norm stays where it was

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.frozen_norm.scale_and_shift()
        bias = shift if self.bias is None else shift + self.bias * scale.flatten()
        return self._conv_forward(x, self.weight * scale, bias)


def _is_foldable_norm(module: nn.Module) -> bool:
    """A 2-D batch norm that, in evaluation, is a fixed per-channel affine map."""
    if isinstance(module, FrozenBatchNorm2d):
        return True
    return isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)) and module.running_mean is not None


def _is_bare_conv(module: nn.Module | None) -> bool:
    """A 2-D convolution that applies no norm of its own (other speed-ups may have changed its class)."""
    return isinstance(module, nn.Conv2d) and not isinstance(module, FrozenNormConv2d)


def _conv_norm_pairs(module: nn.Module) -> list[tuple[nn.Conv2d, str]]:
    """(convolution, name of the norm after it) for the direct children of module that form such a pair."""
    children = dict(module.named_children())
    if isinstance(module, nn.Sequential):
        names = list(children)
        return [(children[a], b) for a, b in zip(names, names[1:])
                if _is_bare_conv(children[a]) and _is_foldable_norm(children[b])]
    if isinstance(module, _NAMED_PAIRS):
        return [(children[f"conv{name[2:]}"], name) for name, child in children.items()
                if name.startswith("bn") and _is_foldable_norm(child)
                and _is_bare_conv(children.get(f"conv{name[2:]}"))]
    return []


def fold_frozen_norms(model: nn.Module) -> nn.Module:
    """Have each convolution followed by a frozen batch norm apply that norm through its weights, in place (for
    training and evaluation alike). Returns the model."""
    for module in list(model.modules()):
        for conv, norm_name in _conv_norm_pairs(module):
            norm = getattr(module, norm_name)
            if type(norm) is FrozenBatchNorm2d:
                norm.__class__ = FoldedFrozenBatchNorm2d
                conv.__class__ = FrozenNormConv2d
                object.__setattr__(conv, "frozen_norm", norm)  # a plain attribute, not a second registration
    return model


def unfold_frozen_norms(model: nn.Module) -> nn.Module:
    """Undo fold_frozen_norms, in place: convolutions followed by frozen batch norms again, each convolution
    keeping the other speed-ups' mixins it was given."""
    for conv in model.modules():
        if isinstance(conv, FrozenNormConv2d):
            norm = conv.__dict__.pop("frozen_norm")
            norm.__dict__.pop("_cached", None)
            norm.__class__ = FrozenBatchNorm2d
            conv.__class__ = rebased(type(conv), FrozenNormConv2d, nn.Conv2d)
    return model


def _max_difference(block: nn.Module, fold) -> float:
    """How far block's output moves when fold is applied to it, on a random input."""
    generator = torch.Generator().manual_seed(0)
    for norm in block.modules():
        if isinstance(norm, FrozenBatchNorm2d):
            for name in ("weight", "bias", "running_mean"):
                getattr(norm, name).copy_(torch.rand(norm.weight.shape, generator=generator) - 0.5)
            norm.running_var.copy_(torch.rand(norm.weight.shape, generator=generator) + 0.5)
    image = torch.rand((1, 8, 9, 9), generator=generator)
    with torch.no_grad():
        before = block(image)
        fold(block)
        return float((block(image) - before).abs().max())


def self_check() -> str | None:
    """None when folding a small torchvision ResNet block leaves its output as it was, both ways."""
    try:
        for fold in (fold_frozen_norms, fold_batch_norms):
            block = Bottleneck(8, 2, norm_layer=FrozenBatchNorm2d).eval()
            if _max_difference(block, fold) > 1e-4:
                return f"folding changed the output of torchvision's ResNet block ({fold.__name__})"
    except (AttributeError, TypeError, RuntimeError) as e:
        return f"torchvision's frozen batch norm or ResNet block changed ({type(e).__name__}: {e})"
    return None


def fold_batch_norms(model: nn.Module) -> int:
    """Fold every batch norm that directly follows a convolution into that convolution's weights and bias, in
    place (the norm becomes an identity). Only valid for evaluation. Returns how many were folded."""
    unfold_frozen_norms(model)
    folded = 0
    for module in list(model.modules()):
        for conv, norm_name in _conv_norm_pairs(module):
            norm = getattr(module, norm_name)
            conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean,
                                                          norm.running_var, norm.eps, norm.weight, norm.bias)
            setattr(module, norm_name, nn.Identity())
            folded += 1
    return folded

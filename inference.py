"""The model as evaluation and prediction run it: a copy with each batch norm folded into the convolution
before it, in the memory layout asked for. Training keeps its own model untouched."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

# Modules whose forward applies bnK directly to convK's output (ResNet's stem and blocks). In any
# nn.Sequential a convolution followed by a batch norm is such a pair as well.
_NAMED_PAIRS = (BasicBlock, Bottleneck, ResNet, IntermediateLayerGetter)


def _is_foldable_norm(module: nn.Module) -> bool:
    """A 2-D batch norm that, in evaluation, is a fixed per-channel affine map."""
    if isinstance(module, FrozenBatchNorm2d):
        return True
    return isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)) and module.running_mean is not None


def _fold(conv: nn.Conv2d, norm: nn.Module) -> None:
    weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps,
                                        norm.weight, norm.bias)
    conv.weight, conv.bias = weight, bias


def _conv_norm_pairs(module: nn.Module) -> list[tuple[nn.Conv2d, str]]:
    """(convolution, name of the norm after it) for the direct children of module that form such a pair."""
    children = dict(module.named_children())
    if isinstance(module, nn.Sequential):
        names = list(children)
        return [(children[a], b) for a, b in zip(names, names[1:])
                if type(children[a]) is nn.Conv2d and _is_foldable_norm(children[b])]
    if isinstance(module, _NAMED_PAIRS):
        return [(children[f"conv{name[2:]}"], name) for name, child in children.items()
                if name.startswith("bn") and _is_foldable_norm(child)
                and type(children.get(f"conv{name[2:]}")) is nn.Conv2d]
    return []


def fold_batch_norms(model: nn.Module) -> int:
    """Fold every batch norm that directly follows a convolution into that convolution's weights and bias, in
    place (the norm becomes an identity). Only valid for evaluation. Returns how many were folded."""
    folded = 0
    for module in list(model.modules()):
        for conv, norm_name in _conv_norm_pairs(module):
            _fold(conv, getattr(module, norm_name))
            setattr(module, norm_name, nn.Identity())
            folded += 1
    return folded


def inference_copy(model: nn.Module, channels_last: bool) -> nn.Module:
    """A copy of model for evaluation: eval mode, no gradients, batch norms folded, and channels-last if asked."""
    clone = copy.deepcopy(model).eval().requires_grad_(False)
    fold_batch_norms(clone)
    if channels_last:
        clone = clone.to(memory_format=torch.channels_last)
    return clone

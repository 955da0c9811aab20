"""The model as evaluation and prediction run it: a copy with each batch norm folded into the convolution
before it, in the memory layout asked for. Training keeps its own model untouched."""

from __future__ import annotations

import copy

import torch
from torch import nn

from norm_folding import fold_batch_norms


def inference_copy(model: nn.Module, channels_last: bool) -> nn.Module:
    """A copy of model for evaluation: eval mode, no gradients, batch norms folded, and channels-last if asked."""
    clone = copy.deepcopy(model).eval().requires_grad_(False)
    fold_batch_norms(clone)
    if channels_last:
        clone = clone.to(memory_format=torch.channels_last)
    return clone

"""What the self-checks mean by "the same to the bit": tensors equal in type and in every value."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def same_tensors(got: Sequence[Tensor], want: Sequence[Tensor]) -> bool:
    """Whether two sequences of tensors are as long and equal pair by pair, in type and in every value."""
    return len(got) == len(want) and all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, want))


def same_tensor_lists(got: Sequence[Sequence[Tensor]], want: Sequence[Sequence[Tensor]]) -> bool:
    """same_tensors for sequences of them (such as one list of tensors an image, for each of several results)."""
    return len(got) == len(want) and all(same_tensors(a, b) for a, b in zip(got, want))

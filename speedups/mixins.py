"""One way to change how chosen modules of a model (or the helper objects they hold) run: a mixin put in front of
each one's class, in place, so that its parameters, buffers and state-dict keys stay as they are."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from functools import cache
from typing import TypeVar

import torch
import torchvision
from torch import Tensor, nn

T = TypeVar("T")


def exporting() -> bool:
    """Whether the model is being traced or scripted for export, where a mixin leaves torchvision's code to run."""
    return torchvision._is_tracing() or torch.jit.is_scripting()


@cache
def _mixed(mixin: type, cls: type, suffix: str) -> type:
    return type(f"{cls.__name__}{suffix}", (mixin, cls), {})


def rebased(cls: type, base: type, replacement: type) -> type:
    """cls, made by giving mixins to base, as those mixins given to replacement instead (in the same order)."""
    if cls is base:
        return replacement
    mixin, inner = cls.__bases__
    return _mixed(mixin, rebased(inner, base, replacement), cls.__name__[len(inner.__name__):])


def kept_like(owner: object, name: str, like: Tensor, make: Callable[[torch.dtype, torch.device], T]) -> T:
    """make(dtype, device) for like's dtype and device, made once and kept on owner under name, apart for
    inference mode (tensors made there cannot be saved for a backward pass later)."""
    key = (like.dtype, like.device, torch.is_inference_mode_enabled())
    kept = owner.__dict__.setdefault(name, {})
    if key not in kept:
        kept[key] = make(like.dtype, like.device)
    return kept[key]


def kept_while_unchanged(owner: object, name: str, key: Hashable, source: Tensor, make: Callable[[Tensor], T]
                         ) -> T:
    """make(source), computed without gradients and kept on owner under name and key while source is the same
    tensor with the same contents (an optimizer step or a load changes them in place)."""
    # Known by identity, not address: a folded norm's scaled weights are a new tensor every forward, which may
    # land where the last one was freed. An inference tensor has no version counter, and changes only inside
    # inference mode, which our code does not do to weights.
    version = -1 if source.is_inference() else source._version
    kept = owner.__dict__.setdefault(name, {})
    same, kept_version, value = kept.get(key, (lambda: None, None, None))
    if same() is not source or kept_version != version:
        with torch.no_grad():
            value = make(source)
        kept[key] = weakref.ref(source), version, value
    return value


def give_mixin(obj: object, mixin: type, suffix: str) -> None:
    """Make obj an instance of the subclass (mixin, its class), named with suffix, in place."""
    obj.__class__ = _mixed(mixin, type(obj), suffix)


def mix_into(model: nn.Module, mixin: type, eligible: Callable[[nn.Module], bool], suffix: str) -> nn.Module:
    """Give each module of model that is eligible and lacks mixin the subclass (mixin, its class), named with
    suffix; in place, returns model."""
    for module in model.modules():
        if not isinstance(module, mixin) and eligible(module):
            give_mixin(module, mixin, suffix)
    return model


def mix_into_held(model: nn.Module, attribute: str, mixin: type, eligible: Callable[[object], bool],
                  suffix: str) -> nn.Module:
    """As mix_into, for the helper objects (not modules) that model's modules hold as `attribute`."""
    for module in model.modules():
        held = getattr(module, attribute, None)
        if held is not None and not isinstance(held, mixin) and eligible(held):
            give_mixin(held, mixin, suffix)
    return model

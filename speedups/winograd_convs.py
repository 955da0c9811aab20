"""3x3 convolutions on large feature maps by NNPACK's Winograd transform on the CPU.

What it changes: on the CPU, each 3x3 convolution with stride 1, no dilation and no groups whose channels and
output are large enough (the FPN's and RPN's on the finest levels, the mask head's over many RoIs) computes its
output, and its input gradient when training, with NNPACK (bundled with torch) instead of oneDNN: its Winograd
transform needs several times fewer multiplications than a direct convolution, which is what a CPU without
AVX-512 is short of. Large maps go one image at a time (NNPACK's batch path is slower for them), small ones in
one call; outputs keep the input's memory layout. Smaller convolutions, where the transforms and layout copies
cost more than they save, stay with torch (figures in docs/PERFORMANCE.md). Weight gradients are
conv_gradients' (Winograd's F(2x2, 3x3) in matrix products), bias gradients sums. Numbers agree with torch's
convolution to the float32 rounding of the transform, about ten times oneDNN's; a subclass is swapped in, so
state-dict keys do not change. NNPACK sizes its thread pool from torch's thread count when it is first used.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .conv_gradients import weight_grad
from .mixins import mix_into

# Below this many output pixels an image's map is small enough that NNPACK's batch path (one call for the
# whole batch) beats a call per image.
_PER_IMAGE_PIXELS = 64 * 64
# NNPACK runs a convolution with at least this many input and output channels and output pixels (all images
# together); below either, oneDNN was as fast or faster on 2 AVX2 cores with the layout copies counted.
MIN_CHANNELS = 256
MIN_PIXELS = 12_000


def _worth_it(x: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int]) -> bool:
    pixels = x.shape[0] * (x.shape[2] + 2 * padding[0] - 2) * (x.shape[3] + 2 * padding[1] - 2)
    return min(weight.shape[:2]) >= MIN_CHANNELS and pixels >= MIN_PIXELS


def _standard_layout(x: torch.Tensor) -> torch.Tensor:
    """x in the standard (N, C, H, W) layout, copied a row at a time from any other: torch's one-piece copy out
    of channels-last was several times slower (docs/PERFORMANCE.md)."""
    if x.is_contiguous():
        return x
    standard = torch.empty(x.shape, dtype=x.dtype)
    for row in range(x.shape[2]):
        standard[:, :, row] = x[:, :, row]
    return standard


def winograd_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    padding: tuple[int, int]) -> torch.Tensor:
    """A stride-1, ungrouped float32 3x3 convolution of x by NNPACK, returned in x's memory layout."""
    n, _, height, width = x.shape
    out_height, out_width = height + 2 * padding[0] - 2, width + 2 * padding[1] - 2
    layout = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
              else torch.contiguous_format)
    weight = weight.contiguous()
    if n == 1 or out_height * out_width < _PER_IMAGE_PIXELS:
        output = torch._nnpack_spatial_convolution(_standard_layout(x), weight, bias, list(padding), [1, 1])
        return output.contiguous(memory_format=layout)
    output = torch.empty((n, weight.shape[0], out_height, out_width), dtype=x.dtype, memory_format=layout)
    for i in range(n):  # the copy into output also changes the layout where it differs
        output[i:i + 1] = torch._nnpack_spatial_convolution(_standard_layout(x[i:i + 1]), weight, bias,
                                                           list(padding), [1, 1])
    return output


def _winograd_input_grad(grad_output: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    """The input gradient of a stride-1 3x3 convolution: the output gradient convolved with the weights flipped
    and their channels swapped, padded by what the forward pass did not pad."""
    flipped = weight.flip(2, 3).transpose(0, 1)
    return winograd_conv2d(grad_output, flipped, None, (2 - padding[0], 2 - padding[1]))


class _WinogradConv(torch.autograd.Function):
    """conv2d by NNPACK, whose backward computes the input gradient by NNPACK too, the weight gradient by
    conv_gradients.weight_grad and the bias gradient as a sum."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        return winograd_conv2d(x, weight, bias, padding)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        wants_input, wants_weight, wants_bias = ctx.needs_input_grad[:3]
        grad_input = _winograd_input_grad(grad_output, weight, ctx.padding) if wants_input else None
        grad_weight = weight_grad(grad_output, x, (3, 3), ctx.padding, (1, 1)) if wants_weight else None
        grad_bias = grad_output.sum((0, 2, 3)) if wants_bias else None
        return grad_input, grad_weight, grad_bias, None


class _ConvByWinograd:
    """Mixed into a Conv2d class: large enough float32 CPU inputs without autocast go through _WinogradConv."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        padding = tuple(self.padding)
        if (x.device.type == "cpu" and x.dim() == 4 and x.dtype == weight.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu") and _worth_it(x, weight, padding)):
            if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
                return _WinogradConv.apply(x, weight, bias, padding)
            return winograd_conv2d(x, weight, bias, padding)
        return super()._conv_forward(x, weight, bias)


def _eligible(module: nn.Module) -> bool:
    """A 3x3 Conv2d with stride 1, no dilation or groups, and zero padding of 0-2 pixels given in pixels."""
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3) and module.stride == (1, 1)
            and module.dilation == (1, 1) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str) and all(0 <= p <= 2 for p in module.padding))


def use_winograd_convs(model: nn.Module) -> nn.Module:
    """Swap each eligible convolution of model for its subclass computed by NNPACK, in place; returns it."""
    torch._nnpack_available()  # NNPACK's calls fail until this has initialised it
    return mix_into(model, _ConvByWinograd, _eligible, "ByWinograd")


def _gradients(conv: nn.Conv2d, x: torch.Tensor, by_winograd: bool) -> tuple[torch.Tensor, ...]:
    """conv's output and the gradients of its input and parameters, by NNPACK or by torch."""
    x = x.detach().requires_grad_()
    output = (_WinogradConv.apply(x, conv.weight, conv.bias, tuple(conv.padding)) if by_winograd else conv(x))
    (output * torch.linspace(-1, 1, output.numel()).view(output.shape)).sum().backward()
    return output.detach(), x.grad, conv.weight.grad, conv.bias.grad


def self_check() -> str | None:
    """None when NNPACK is there and its convolutions, both paths, give torch's outputs and gradients."""
    if not torch._nnpack_available():
        return "this torch was built without NNPACK"
    generator = torch.Generator().manual_seed(1)
    with torch.enable_grad():  # whatever the caller's mode
        for shape in ((2, 3, 66, 65), (3, 3, 9, 7)):  # one call per image; one call for the batch
            plain = nn.Conv2d(3, 4, 3, padding=1).to(memory_format=torch.channels_last)
            fast = copy.deepcopy(plain)
            x = torch.rand(shape, generator=generator).to(memory_format=torch.channels_last)
            expected = _gradients(plain, x, by_winograd=False)
            try:
                got = _gradients(fast, x, by_winograd=True)
            except RuntimeError as e:
                return f"NNPACK's convolution failed ({e})"
            if not all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(expected, got)):
                return f"NNPACK's convolution differed from torch's for a batch of shape {shape}"
    return None

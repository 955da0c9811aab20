"""Gradients of channels-last convolutions on the CPU, computed without oneDNN's slow channels-last weight pass.

What it changes: with the model channels-last on the CPU, each convolution with a kernel wider than 1x1 keeps
its forward pass and its input gradient in channels-last, where oneDNN is fastest, but its weight gradient is
computed as matrix products over channels-last pixels (3x3 kernels without dilation: by Winograd's F(2x2, 3x3),
16 products a 2x2 tile instead of 36, the windows read in place; other kernels: one product per kernel tap over
zero-padded copies; strided or grouped convolutions: by oneDNN on standard-layout copies) and its bias gradient
as a sum, because oneDNN's channels-last weight and bias pass for such kernels can take several times as long as
the rest of the convolution (AVX2 CPUs; figures in docs/PERFORMANCE.md). Outputs and gradients are the same to
float rounding; modules keep their class's behaviour otherwise (a subclass is swapped in; state-dict keys do not
change).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .mixins import mix_into


def framed(x: torch.Tensor, height: int, width: int, top: int = 0, left: int = 0) -> torch.Tensor:
    """x (N, C, H, W) copied channels-last into an (N, height, width, C) zero frame at (top, left); only the frame
    is zeroed, as zeroing all of it first costs a pass over the copy."""
    n, channels, x_height, x_width = x.shape
    bottom, right = top + x_height, left + x_width
    framed = x.new_empty((n, height, width, channels))
    framed[:, top:bottom, left:right] = x.permute(0, 2, 3, 1)
    framed[:, :top].zero_()
    framed[:, bottom:].zero_()
    framed[:, top:bottom, :left].zero_()
    framed[:, top:bottom, right:].zero_()
    return framed


def tap_product_weight_grad(grad_output: torch.Tensor, x: torch.Tensor, kernel_size: tuple[int, int],
                            padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """The weight gradient of a stride-1, ungrouped 2-D convolution as one matrix product per kernel tap.

    With the output gradient written into a zero grid as wide as the padded input, the pixels a tap reads are
    the padded input's pixels shifted by one flat offset, so each tap is (pixels x out)^T @ (pixels x in) on
    two channels-last matrices; the grid's zero margin cancels what a shift carries across rows and images.
    """
    n, out_channels, out_height, out_width = grad_output.shape
    (pad_h, pad_w), (dil_h, dil_w) = padding, dilation
    height, width = x.shape[2] + 2 * pad_h, x.shape[3] + 2 * pad_w
    padded, grid = framed(x, height, width, pad_h, pad_w), framed(grad_output, height, width)
    pixels = n * height * width
    inputs, grads = padded.view(pixels, -1), grid.view(pixels, out_channels)
    grad_weight = grad_output.new_empty((out_channels, x.shape[1], *kernel_size))
    for i in range(kernel_size[0]):
        for j in range(kernel_size[1]):
            shift = i * dil_h * width + j * dil_w
            torch.mm(grads[:pixels - shift].t(), inputs[shift:], out=grad_weight[:, :, i, j])
    return grad_weight


# Winograd's F(2x2, 3x3) for the weight gradient: each 2x2 tile of the output gradient meets the 4x4 window of
# the padded input under it. With both transformed to 4x4 (the input by window_rows' sums and differences, the
# gradient by _tile_rows'), the 3x3 weight gradient is 16 products a tile where a direct sum takes 36: one
# batched matrix product over all tiles, then _BACK maps the 4x4 sums to 3x3 (Y = B^T M B).
_BACK = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, -1.0, 1.0], [0.0, 0.0, 1.0]])
_HALVES = torch.tensor([1.0, 0.5, 0.5, 1.0])  # the gradient transform's weights, applied once to the sums
TILES_PER_CHUNK = 512  # tiles transformed at a time: their transforms stay in cache for the product


def window_rows(d: list[torch.Tensor], out: torch.Tensor) -> None:
    """The input's 1-D transform of four rows (or columns) d0..d3 of each window, into out[0..3]."""
    torch.sub(d[0], d[2], out=out[0])
    torch.add(d[1], d[2], out=out[1])
    torch.sub(d[2], d[1], out=out[2])
    torch.sub(d[3], d[1], out=out[3])


def pixels_of(x: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W) as channels-last pixels (N, H, W, C): a view where x is channels-last, else a copy."""
    pixels = x.permute(0, 2, 3, 1)
    return pixels if pixels.is_contiguous() else pixels.contiguous()


def _rows(pixels: torch.Tensor, first: int, count: int, step: int) -> torch.Tensor:
    """Rows first, first + step, ... (count of them) of pixels (N, H, W, C): a view where all lie inside, else a
    copy with zeros for the rows outside (the padding's)."""
    height, last = pixels.shape[1], first + step * (count - 1)
    if first >= 0 and last < height:
        return pixels[:, first:last + 1:step]
    rows = pixels.new_zeros((pixels.shape[0], count, *pixels.shape[2:]))
    inside = [k for k in range(count) if 0 <= first + step * k < height]
    if inside:
        rows[:, inside[0]:inside[-1] + 1] = pixels[:, first + step * inside[0]:first + step * inside[-1] + 1:step]
    return rows


def transformed_rows(pixels: torch.Tensor, first: int, count: int, step: int, reads: int, writes: int, width: int,
                     left: int, rows_transform: Callable[[list[torch.Tensor], torch.Tensor], None]) -> torch.Tensor:
    """(writes, N, count, width, C): rows_transform of the reads rows of each window whose first rows are first,
    first + step, ... of pixels (N, H, W, C) placed at column left in a zero map width wide, rows outside the
    map zero too. The padding is never copied whole: only rows past the map's edges are made, as zeros."""
    n, _, map_width, channels = pixels.shape
    out = pixels.new_empty((writes, n, count, width, channels))
    out[..., :left, :].zero_()
    out[..., left + map_width:, :].zero_()
    rows_transform([_rows(pixels, first + r, count, step) for r in range(reads)], out[..., left:left + map_width, :])
    return out


def transformed_windows(pixels: torch.Tensor, top: int, count: int, cols: int, padding: tuple[int, int],
                        size: int = 2, rows_transform: Callable[[list[torch.Tensor], torch.Tensor], None] = window_rows
                        ) -> torch.Tensor:
    """(size + 2, size + 2, N, count, cols, C): the (size + 2)-wide windows, size pixels apart, of tile rows top ..
    top + count - 1 of pixels (N, H, W, C) zero-padded by padding (top, left) and as far as the tiles reach,
    transformed by rows_transform along both axes."""
    n, channels = pixels.shape[0], pixels.shape[3]
    span = size + 2
    windows = transformed_rows(pixels, first=size * top - padding[0], count=count, step=size, reads=span, writes=span,
                               width=size * cols + 2, left=padding[1], rows_transform=rows_transform)
    inputs = pixels.new_empty((span, span, n, count, cols, channels))
    # Along the columns for all span rows in one call a step (inputs[i, j] from windows[i]'s columns j..).
    rows_transform([windows[..., c:c + size * cols:size, :] for c in range(span)], inputs.transpose(0, 1))
    return inputs


def _tile_rows(e: list[torch.Tensor], out: torch.Tensor) -> None:
    """The gradient's 1-D transform of two rows (or columns) e0, e1 of each tile, into out[0..3] (halves
    left out)."""
    out[0].copy_(e[0])
    torch.add(e[0], e[1], out=out[1])
    torch.sub(e[0], e[1], out=out[2])
    out[3].copy_(e[1])


def winograd_weight_grad(grad_output: torch.Tensor, x: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    """The weight gradient of a stride-1, ungrouped 3x3 convolution without dilation, by Winograd's F(2x2, 3x3),
    in chunks of rows of tiles."""
    n, out_channels, out_height, out_width = grad_output.shape
    in_channels = x.shape[1]
    rows, cols = (out_height + 1) // 2, (out_width + 1) // 2  # of tiles; odd sizes get a zero row or column
    # The input read as zero-padded to cover every tile's window, the gradient as zero-padded to whole tiles.
    pixels, grad_pixels = pixels_of(x), pixels_of(grad_output)
    sums = x.new_zeros((16, out_channels, in_channels))
    step = max(1, TILES_PER_CHUNK // (n * cols))
    for top in range(0, rows, step):
        count = min(step, rows - top)
        inputs = transformed_windows(pixels, top, count, cols, padding)
        tiles = transformed_rows(grad_pixels, first=2 * top, count=count, step=2, reads=2, writes=4, width=2 * cols,
                                 left=0, rows_transform=_tile_rows)
        grads = grad_output.new_empty((4, 4, n, count, cols, out_channels))
        _tile_rows([tiles[..., c::2, :] for c in range(2)], grads.transpose(0, 1))
        torch.baddbmm(sums, grads.view(16, -1, out_channels).transpose(1, 2), inputs.view(16, -1, in_channels),
                      out=sums)
    halves = (_HALVES[:, None] * _HALVES[None, :]).to(sums.dtype).view(4, 4, 1, 1)
    back = _BACK.to(sums.dtype)
    return torch.einsum("ai,abkc,bj->kcij", back, sums.view(4, 4, out_channels, in_channels) * halves, back)


def weight_grad(grad_output: torch.Tensor, x: torch.Tensor, kernel_size: tuple[int, int],
                padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """The weight gradient of a stride-1, ungrouped convolution: Winograd's for 3x3 kernels without dilation
    (fewer multiplications), tap products for the others."""
    if grad_output.numel() == 0:  # no images (a mask head without regions): both paths fail on empty tensors
        return grad_output.new_zeros((grad_output.shape[1], x.shape[1], *kernel_size))
    if tuple(kernel_size) == (3, 3) and tuple(dilation) == (1, 1):
        return winograd_weight_grad(grad_output, x, tuple(padding))
    return tap_product_weight_grad(grad_output, x, kernel_size, padding, dilation)


class _FastCpuGradients(torch.autograd.Function):
    """conv2d whose backward computes the input gradient in the tensors' own layout, the weight gradient by
    weight_grad (or, strided or grouped, oneDNN in the standard layout) and the bias gradient as a sum."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        wants_input, wants_weight, wants_bias = ctx.needs_input_grad[:3]
        grad_input = grad_weight = grad_bias = None
        if wants_input:
            grad_input = torch.ops.aten.convolution_backward(
                grad_output, x, weight, None, stride, padding, dilation, False, [0, 0], groups,
                [True, False, False])[0]
        if wants_weight and stride == [1, 1] and groups == 1:
            grad_weight = weight_grad(grad_output, x, weight.shape[2:], padding, dilation)
        elif wants_weight:
            grad_weight = torch.ops.aten.convolution_backward(
                grad_output.contiguous(), x.contiguous(), weight.contiguous(), None, stride, padding, dilation,
                False, [0, 0], groups, [False, True, False])[1]
        if wants_bias:
            grad_bias = grad_output.sum((0, 2, 3))
        return grad_input, grad_weight, grad_bias, None, None, None, None


class _ConvWithFastCpuGradients:
    """Mixed into a Conv2d class: while gradients are recorded for a channels-last CPU convolution without
    autocast, its backward is _FastCpuGradients'."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (torch.is_grad_enabled() and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
                and (x.requires_grad or weight.requires_grad)
                and weight.is_contiguous(memory_format=torch.channels_last)):
            return _FastCpuGradients.apply(x, weight, bias, list(self.stride), list(self.padding),
                                           list(self.dilation), self.groups)
        return super()._conv_forward(x, weight, bias)


def _eligible(module: nn.Module) -> bool:
    """A Conv2d wider than 1x1 (1x1 ones are fast in oneDNN) with zero padding given in pixels."""
    return (isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1) and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def use_fast_cpu_gradients(model: nn.Module) -> nn.Module:
    """Swap each eligible convolution of model for its subclass with these gradients, in place; returns it."""
    return mix_into(model, _ConvWithFastCpuGradients, _eligible, "WithFastCpuGradients")


def _gradients(conv: nn.Module, shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(shape, generator=generator).to(memory_format=torch.channels_last).requires_grad_()
    output = conv(x)
    (output * torch.rand(output.shape, generator=generator)).sum().backward()
    return x.grad, conv.weight.grad, conv.bias.grad


def self_check() -> str | None:
    """None when convolutions of each kind (3x3 by Winograd's transform; dilated by tap products; strided and
    grouped) get torch's own gradients, channels-last, to float rounding."""
    with torch.enable_grad():
        for options in ({"padding": 1}, {"padding": 2, "dilation": 2}, {"stride": 2, "padding": 1, "groups": 2}):
            plain = nn.Conv2d(4, 6, 3, **options).to(memory_format=torch.channels_last)
            fast = use_fast_cpu_gradients(copy.deepcopy(plain))
            try:
                expected, got = _gradients(plain, (2, 4, 9, 7)), _gradients(fast, (2, 4, 9, 7))
            except (RuntimeError, TypeError) as e:
                return f"torch's convolution_backward operator changed ({type(e).__name__}: {e})"
            if not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(expected, got)):
                return f"a convolution's gradients differed from torch's own ({options})"
    return None

"""3x3 convolutions with many channels by Winograd's transforms on the CPU: NNPACK's for large maps (on CPUs without
AVX-512), F(4x4, 3x3) or F(2x2, 3x3) tiles in batched matrix products for the other channels-last ones.

What it changes: on the CPU, each 3x3 convolution with stride 1, no dilation and no groups whose input and output
channels are many enough computes its output, and its input gradient when training, with fewer multiplications
than oneDNN's direct convolution, which is what a CPU is short of. Where the CPU lacks AVX-512, maps with many
output pixels (the FPN's and RPN's on the finest levels, the mask head's over many RoIs) go to NNPACK (bundled
with torch), large ones an image at a time (its batch path is slower for them), small ones in one call; NNPACK
needs the standard layout, and outputs come back in the input's. Other channels-last maps (ResNet's last stages,
the coarser pyramid levels, the mask head's over few RoIs; with AVX-512 the large ones too) are transformed here:
4x4 tiles of output from 36 products each (2.25 a pixel instead of 9), or 2x2 tiles from 16 where 4x4 ones
would pad the map too much, one batched matrix product over each chunk of tiles, no layout copies; a module
keeps its weights' transforms while they stay the same. Convolutions with fewer channels stay with torch
(figures in docs/PERFORMANCE.md). Weight gradients are conv_gradients' (Winograd in matrix products too), bias
gradients sums. Outputs differ from float64's by float32 rounding: 2x2 tiles' below oneDNN's, 4x4 tiles' and
NNPACK's several times above it; a subclass is swapped in, so state-dict keys do not change. NNPACK sizes its
thread pool from torch's thread count when it is first used.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .conv_gradients import TILES_PER_CHUNK, pixels_of, transformed_windows, weight_grad, window_rows
from .mixins import kept_while_unchanged, mix_into

# Below this many output pixels an image's map is small enough that NNPACK's batch path (one call for the
# whole batch) beats a call per image.
_PER_IMAGE_PIXELS = 64 * 64
# A convolution with at least MIN_CHANNELS input and output channels takes a Winograd transform: NNPACK's from
# MIN_PIXELS output pixels (all images together), F(2x2, 3x3) here below that for channels-last maps. With fewer
# channels oneDNN was as fast or faster on 2 AVX2 cores, and with fewer pixels NNPACK's layout copies cost more.
MIN_CHANNELS = 256
MIN_PIXELS = 12_000
# NNPACK's x86 kernels are AVX2's: on a CPU with AVX-512, oneDNN's convolutions and F(2x2, 3x3) tiles both beat
# it on the largest maps too, the tiles most, so large maps take tiles there (docs/PERFORMANCE.md, stop 32).
LARGE_MAPS_BY_NNPACK = torch.backends.cpu.get_cpu_capability() != "AVX512"
NNPACK, TILES, TORCH = "NNPACK", "tiles", "torch"


def _path(x: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int]) -> str:
    """Which computes this convolution: NNPACK, Winograd tiles, or torch's own."""
    if min(weight.shape[:2]) < MIN_CHANNELS:
        return TORCH
    out_height, out_width = _output_size(x, padding)
    pixels = x.shape[0] * out_height * out_width
    if pixels >= MIN_PIXELS and LARGE_MAPS_BY_NNPACK:
        return NNPACK
    return TILES if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else TORCH


def _standard_layout(x: torch.Tensor) -> torch.Tensor:
    """x in the standard (N, C, H, W) layout, copied a row at a time from any other: torch's one-piece copy out
    of channels-last was several times slower (docs/PERFORMANCE.md)."""
    if x.is_contiguous():
        return x
    standard = torch.empty(x.shape, dtype=x.dtype)
    for row in range(x.shape[2]):
        standard[:, :, row] = x[:, :, row]
    return standard


def nnpack_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, int]
                  ) -> torch.Tensor:
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


class Tiling(NamedTuple):
    """Winograd's F(size x size, 3x3): a (size + 2)-wide window d of the padded input and a 3x3 kernel g give a
    size x size tile of output, A^T [(G g G^T) * (B^T d B)] A, from (size + 2)^2 products."""

    size: int
    kernel_transform: torch.Tensor  # G (x) G, ((size + 2)^2, 9): a flattened 3x3 kernel to its transform
    window_rows: Callable[[list[torch.Tensor], torch.Tensor], None]  # B^T along one axis of the windows
    output_transform: torch.Tensor  # A^T (x) A^T, (size^2, (size + 2)^2), applied as one matrix product
    bias_product: int  # the product whose column of A^T (x) A^T is all ones: a bias added there reaches every pixel


def _wide_window_rows(d: list[torch.Tensor], out: torch.Tensor) -> None:
    """F(4x4, 3x3)'s input transform B^T of six rows (or columns) d0..d5 of each window into out[0..5], with
    out's rows as scratch: 4d0 - 5d2 + d4, (d3 + d4) - 4(d1 + d2), (d4 - d3) + 4(d1 - d2), (d4 - d2) + 2(d3 - d1),
    (d4 - d2) - 2(d3 - d1), 4d1 - 5d3 + d5."""
    torch.sub(d[4], d[2], out=out[1])
    torch.sub(d[0], d[2], out=out[0])
    torch.add(out[1], out[0], alpha=4, out=out[0])
    torch.sub(d[3], d[1], out=out[5])
    torch.add(out[1], out[5], alpha=2, out=out[3])
    torch.sub(out[1], out[5], alpha=2, out=out[4])
    torch.add(d[1], d[2], out=out[1])
    torch.add(d[3], d[4], out=out[2])
    torch.sub(out[2], out[1], alpha=4, out=out[1])
    torch.sub(d[5], d[3], out=out[2])
    torch.sub(out[2], out[5], alpha=4, out=out[5])
    torch.sub(d[1], d[2], out=out[2])
    torch.add(d[4], out[2], alpha=4, out=out[2])
    torch.sub(out[2], d[3], out=out[2])


def _tiling(size: int, kernel_rows: list[list[float]], window_rows: Callable[[list[torch.Tensor], torch.Tensor], None],
            output_rows: list[list[float]]) -> Tiling:
    """The tiling of G's rows (kernel_rows), B^T's operators (window_rows) and A^T's rows (output_rows)."""
    kernel, output = torch.tensor(kernel_rows, dtype=torch.float64), torch.tensor(output_rows)
    output_transform = torch.kron(output, output)
    all_ones = int((output_transform == 1).all(0).nonzero()[0])  # the point 1's column
    return Tiling(size, torch.kron(kernel, kernel), window_rows, output_transform, all_ones)


# F(2x2, 3x3) at the points 0, 1, -1 and infinity. B^T is conv_gradients.window_rows, whose last row is d3 - d1;
# G's last row carries the same sign, so that the two cancel in the product.
SMALL_TILES = _tiling(2, [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, -1]], window_rows,
                      [[1, 1, 1, 0], [0, 1, -1, -1]])
# F(4x4, 3x3) at the points 0, 1, -1, 2, -2 and infinity: 2.25 products a pixel where F(2x2, 3x3) takes 4, and
# transforms with larger coefficients, whose rounding errors are several times oneDNN's (docs/PERFORMANCE.md).
LARGE_TILES = _tiling(4, [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                          [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], _wide_window_rows,
                      [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]])
_TILINGS = {tiling.kernel_transform.shape[0]: tiling for tiling in (SMALL_TILES, LARGE_TILES)}
# Large tiles pad a map to a multiple of 4 pixels: where that covers more than this much more than small tiles
# do (14x14 regions: 31% more, 13x17: 27%), small tiles were faster; at 25x34 (14% more) large ones still were.
MAX_LARGE_TILES_PADDING = 1.2


def tiling_for(out_height: int, out_width: int) -> Tiling:
    """Large tiles unless they would pad an output of this size much more than small ones."""
    def area(size: int) -> int:
        return -(-out_height // size) * size * -(-out_width // size) * size
    return LARGE_TILES if area(4) <= MAX_LARGE_TILES_PADDING * area(2) else SMALL_TILES


def tile_weights(weight: torch.Tensor, tiling: Tiling) -> torch.Tensor:
    """(products, in, out): the 3x3 kernels of weight (out, in, 3, 3) transformed for tiled_winograd_conv2d."""
    # In the weights' type: training transforms them each step, and for 512 channels float64 took three times as
    # long; G's sixths round in float32, a relative 6e-8, far below the large tiles' own rounding.
    transform = tiling.kernel_transform.to(weight.dtype)
    return (transform @ weight.permute(2, 3, 1, 0).reshape(9, -1)).view(-1, weight.shape[1], weight.shape[0])


def tiled_winograd_conv2d(x: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None,
                          padding: tuple[int, int]) -> torch.Tensor:
    """A stride-1, ungrouped 3x3 convolution by Winograd's transform with weights from tile_weights (their
    tiling told by their count of products), in chunks of rows of tiles, channels-last out whatever x's layout."""
    tiling = _TILINGS[weights.shape[0]]
    size, products_per_tile = tiling.size, weights.shape[0]
    n, in_channels, height, width = x.shape
    out_channels = weights.shape[2]
    out_height, out_width = height + 2 * padding[0] - 2, width + 2 * padding[1] - 2
    rows, cols = -(-out_height // size), -(-out_width // size)  # of tiles; the last may stick out, then cropped
    input_pixels = pixels_of(x)
    # Not a view, which autograd would refuse to let an in-place ReLU change: written through its NHWC view.
    output = torch.empty((n, out_channels, size * rows, size * cols), dtype=x.dtype,
                         memory_format=torch.channels_last)
    output_pixels = output.permute(0, 2, 3, 1)
    transform = tiling.output_transform.to(x.dtype)
    # As many transformed values a chunk as TILES_PER_CHUNK small tiles have.
    step = max(1, TILES_PER_CHUNK * 16 // (products_per_tile * n * cols))
    for top in range(0, rows, step):
        count = min(step, rows - top)
        inputs = transformed_windows(input_pixels, top, count, cols, padding, size, tiling.window_rows)
        products = torch.bmm(inputs.view(products_per_tile, -1, in_channels), weights)
        if bias is not None:
            products[tiling.bias_product] += bias
        # (row i, column j of each tile, ...) written to output rows size * tile row + i, columns size * col + j.
        tiles = torch.mm(transform, products.view(products_per_tile, -1)).view(size, size, n, count, cols,
                                                                               out_channels)
        block = output_pixels[:, size * top:size * (top + count)].view(n, count, size, cols, size, out_channels)
        block.copy_(tiles.permute(2, 3, 0, 4, 1, 5))
    if (size * rows, size * cols) != (out_height, out_width):
        output = output[:, :, :out_height, :out_width].contiguous(memory_format=torch.channels_last)
    return output


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, int], path: str,
          weights: torch.Tensor | None = None) -> torch.Tensor:
    """The convolution by the given path (weights: weight's tile_weights for this map's tiling, where known)."""
    if path == NNPACK:
        return nnpack_conv2d(x, weight, bias, padding)
    if path == TILES:
        if weights is None:
            weights = tile_weights(weight, tiling_for(*_output_size(x, padding)))
        return tiled_winograd_conv2d(x, weights, bias, padding)
    return F.conv2d(x, weight, bias, padding=padding)


def _output_size(x: torch.Tensor, padding: tuple[int, int]) -> tuple[int, int]:
    return x.shape[2] + 2 * padding[0] - 2, x.shape[3] + 2 * padding[1] - 2


def _winograd_input_grad(grad_output: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int], path: str
                         ) -> torch.Tensor:
    """The input gradient of a stride-1 3x3 convolution by the forward pass's path: the output gradient convolved
    with the weights flipped and their channels swapped, padded by what the forward pass did not pad."""
    flipped = weight.flip(2, 3).transpose(0, 1)
    return _conv(grad_output, flipped, None, (2 - padding[0], 2 - padding[1]), path)


class _WinogradConv(torch.autograd.Function):
    """conv2d by a Winograd path, whose backward computes the input gradient by the path that suits it, the
    weight gradient by conv_gradients.weight_grad and the bias gradient as a sum."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding, path, weights):
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.path = padding, path
        return _conv(x, weight, bias, padding, path, weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        wants_input, wants_weight, wants_bias = ctx.needs_input_grad[:3]
        grad_input = _winograd_input_grad(grad_output, weight, ctx.padding, ctx.path) if wants_input else None
        grad_weight = weight_grad(grad_output, x, (3, 3), ctx.padding, (1, 1)) if wants_weight else None
        grad_bias = grad_output.sum((0, 2, 3)) if wants_bias else None
        return grad_input, grad_weight, grad_bias, None, None, None


class _ConvByWinograd:
    """Mixed into a Conv2d class: float32 CPU inputs without autocast whose _path is not torch's go through
    _WinogradConv."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        padding = tuple(self.padding)
        path = (_path(x, weight, padding) if x.device.type == "cpu" and x.dim() == 4
                and x.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu") else TORCH)
        if path == TORCH:
            return super()._conv_forward(x, weight, bias)
        weights = self._tile_weights(weight, tiling_for(*_output_size(x, padding))) if path == TILES else None
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _WinogradConv.apply(x, weight, bias, padding, path, weights)
        return _conv(x, weight, bias, padding, path, weights)

    def _tile_weights(self, weight: torch.Tensor, tiling: Tiling) -> torch.Tensor:
        """weight's tile_weights for tiling, kept while weight is the same tensor, unchanged (until an optimizer
        step or a load); one set a tiling, as a convolution shared by maps of several sizes (the RPN head's)
        may need both."""
        return kept_while_unchanged(self, "_kept_tile_weights", tiling.size, weight,
                                    lambda w: tile_weights(w, tiling))


def _eligible(module: nn.Module) -> bool:
    """A 3x3 Conv2d with stride 1, no dilation or groups, and zero padding of 0-2 pixels given in pixels."""
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3) and module.stride == (1, 1)
            and module.dilation == (1, 1) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str) and all(0 <= p <= 2 for p in module.padding))


def use_winograd_convs(model: nn.Module) -> nn.Module:
    """Swap each eligible convolution of model for its subclass computed by NNPACK, in place; returns it."""
    torch._nnpack_available()  # NNPACK's calls fail until this has initialised it
    return mix_into(model, _ConvByWinograd, _eligible, "ByWinograd")


def _gradients(conv: nn.Conv2d, x: torch.Tensor, path: str) -> tuple[torch.Tensor, ...]:
    """conv's output and the gradients of its input and parameters, by the given path."""
    x = x.detach().requires_grad_()
    output = conv(x) if path == TORCH else _WinogradConv.apply(x, conv.weight, conv.bias, tuple(conv.padding), path,
                                                               None)
    (output * torch.linspace(-1, 1, output.numel()).view(output.shape)).sum().backward()
    return output.detach(), x.grad, conv.weight.grad, conv.bias.grad


def self_check() -> str | None:
    """None when NNPACK is there and both Winograd paths (NNPACK's two ways; small and large tiles, of odd sizes)
    give torch's outputs and gradients."""
    if not torch._nnpack_available():
        return "this torch was built without NNPACK"
    generator = torch.Generator().manual_seed(1)
    with torch.enable_grad():  # whatever the caller's mode
        # NNPACK one call per image, and one call for the batch; small tiles in two chunks, the last short (5 rows
        # would pad to 8 with large ones), large ones in three.
        for shape, path in (((2, 3, 66, 65), NNPACK), ((3, 3, 9, 7), NNPACK), ((2, 3, 5, 255), TILES),
                            ((2, 3, 12, 255), TILES)):
            plain = nn.Conv2d(3, 4, 3, padding=1).to(memory_format=torch.channels_last)
            fast = copy.deepcopy(plain)
            x = torch.rand(shape, generator=generator).to(memory_format=torch.channels_last)
            expected = _gradients(plain, x, TORCH)
            try:
                got = _gradients(fast, x, path)
            except RuntimeError as e:
                return f"the {path} convolution failed ({e})"
            if not all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(expected, got)):
                return f"the {path} convolution differed from torch's for a batch of shape {shape}"
    return None

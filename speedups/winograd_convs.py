"""3x3 convolutions with many channels by Winograd's transforms on the CPU: NNPACK's for large maps (on CPUs without
AVX-512), F(2x2, 3x3) in batched matrix products for the other channels-last ones.

What it changes: on the CPU, each 3x3 convolution with stride 1, no dilation and no groups whose input and output
channels are many enough computes its output, and its input gradient when training, with fewer multiplications
than oneDNN's direct convolution, which is what a CPU is short of. Where the CPU lacks AVX-512, maps with many
output pixels (the FPN's and RPN's on the finest levels, the mask head's over many RoIs) go to NNPACK (bundled
with torch), large ones an image at a time (its batch path is slower for them), small ones in one call; NNPACK
needs the standard layout, and outputs come back in the input's. Other channels-last maps (ResNet's last stages,
the coarser pyramid levels, the mask head's over few RoIs; with AVX-512 the large ones too) are transformed here:
Winograd's F(2x2, 3x3), 16 products a 2x2 tile of output instead of 36, one batched matrix product over each
chunk of tiles, no layout copies; a module keeps its weights' transform while they stay the same. Convolutions
with fewer channels stay with torch (figures in docs/PERFORMANCE.md). Weight gradients are conv_gradients'
(Winograd in matrix products too), bias gradients sums. Numbers agree with torch's convolution to float32
rounding (NNPACK's about ten times oneDNN's, F(2x2, 3x3)'s below oneDNN's); a subclass is swapped in, so
state-dict keys do not change. NNPACK sizes its thread pool from torch's thread count when it is first used.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .conv_gradients import TILES_PER_CHUNK, framed, transformed_windows, weight_grad
from .mixins import mix_into

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
    """Which computes this convolution: NNPACK, F(2x2, 3x3) tiles, or torch's own."""
    if min(weight.shape[:2]) < MIN_CHANNELS:
        return TORCH
    pixels = x.shape[0] * (x.shape[2] + 2 * padding[0] - 2) * (x.shape[3] + 2 * padding[1] - 2)
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


# Winograd's F(2x2, 3x3): a 4x4 window d of the padded input and the 3x3 kernel g give a 2x2 tile of output
# A^T [(G g G^T) * (B^T d B)] A. B^T is conv_gradients.window_rows' transform, whose last row is d3 - d1; _G's last
# row carries the same sign, so that the two cancel in the product.
_G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, -1.0]])


def tile_weights(weight: torch.Tensor) -> torch.Tensor:
    """(16, in, out): the 3x3 kernels of weight (out, in, 3, 3) transformed for tiled_winograd_conv2d."""
    transform = torch.kron(_G, _G).to(weight.dtype)  # (16, 9): the 2-D transform of a flattened 3x3 kernel
    return (transform @ weight.permute(2, 3, 1, 0).reshape(9, -1)).view(16, weight.shape[1], weight.shape[0])


# A^T, the output's 1-D transform: a tile's two outputs from four products, m0 + m1 + m2 and m1 - m2 - m3. Its 2-D
# form (4, 16) is applied as one matrix product over a chunk's products: one pass over them, where the two 1-D
# passes in elementwise operators took twelve (twice as long on the AVX-512 machine, docs/PERFORMANCE.md).
_OUTPUT_TRANSFORM = torch.kron(*[torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]])] * 2)


def tiled_winograd_conv2d(x: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None,
                          padding: tuple[int, int]) -> torch.Tensor:
    """A stride-1, ungrouped 3x3 convolution by Winograd's F(2x2, 3x3) with weights from tile_weights, in chunks
    of rows of tiles, channels-last out whatever x's layout."""
    n, in_channels, height, width = x.shape
    out_channels = weights.shape[2]
    out_height, out_width = height + 2 * padding[0] - 2, width + 2 * padding[1] - 2
    rows, cols = (out_height + 1) // 2, (out_width + 1) // 2  # of tiles; odd sizes get a row or column to drop
    padded = framed(x, 2 * rows + 2, 2 * cols + 2, *padding)
    # Not a view, which autograd would refuse to let an in-place ReLU change: written through its NHWC view.
    output = torch.empty((n, out_channels, 2 * rows, 2 * cols), dtype=x.dtype, memory_format=torch.channels_last)
    pixels = output.permute(0, 2, 3, 1)
    transform = _OUTPUT_TRANSFORM.to(x.dtype)
    step = max(1, TILES_PER_CHUNK // (n * cols))
    for top in range(0, rows, step):
        count = min(step, rows - top)
        inputs = transformed_windows(padded, top, count, cols)
        products = torch.bmm(inputs.view(16, -1, in_channels), weights)
        if bias is not None:  # A^T's second column is all ones: a bias added to products (1, 1) reaches every pixel
            products[5] += bias
        # (row i, column j of each 2x2 tile, ...) written to output rows 2 * tile row + i, columns 2 * tile col + j.
        quads = torch.mm(transform, products.view(16, -1)).view(2, 2, n, count, cols, out_channels)
        block = pixels[:, 2 * top:2 * (top + count)].view(n, count, 2, cols, 2, out_channels)
        block.copy_(quads.permute(2, 3, 0, 4, 1, 5))
    if (2 * rows, 2 * cols) != (out_height, out_width):
        output = output[:, :, :out_height, :out_width].contiguous(memory_format=torch.channels_last)
    return output


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, int], path: str,
          weights: torch.Tensor | None = None) -> torch.Tensor:
    """The convolution by the given path (weights: weight's tile_weights, where known)."""
    if path == NNPACK:
        return nnpack_conv2d(x, weight, bias, padding)
    if path == TILES:
        return tiled_winograd_conv2d(x, tile_weights(weight) if weights is None else weights, bias, padding)
    return F.conv2d(x, weight, bias, padding=padding)


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
        weights = self._tile_weights(weight) if path == TILES else None
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _WinogradConv.apply(x, weight, bias, padding, path, weights)
        return _conv(x, weight, bias, padding, path, weights)

    def _tile_weights(self, weight: torch.Tensor) -> torch.Tensor:
        """weight's tile_weights, kept until weight changes (an optimizer step, a load)."""
        # An inference tensor has no version counter, and changes only inside inference mode, which our code
        # does not do to weights.
        key = (weight.data_ptr(), -1 if weight.is_inference() else weight._version, weight.shape)
        if self.__dict__.get("_tile_weights_of") != key:
            with torch.no_grad():
                self._kept_tile_weights = tile_weights(weight)
            self._tile_weights_of = key
        return self._kept_tile_weights


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
    """None when NNPACK is there and both Winograd paths (NNPACK's two ways, F(2x2, 3x3) tiles with odd sizes)
    give torch's outputs and gradients."""
    if not torch._nnpack_available():
        return "this torch was built without NNPACK"
    generator = torch.Generator().manual_seed(1)
    with torch.enable_grad():  # whatever the caller's mode
        # NNPACK one call per image, and one call for the batch; tiles of odd sizes in two chunks, the last short.
        for shape, path in (((2, 3, 66, 65), NNPACK), ((3, 3, 9, 7), NNPACK), ((2, 3, 5, 255), TILES)):
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

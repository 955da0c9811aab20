"""Gradients of channels-last CPU convolutions: torch's own to float rounding, and used only where they apply."""

import copy

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import speedups
from models import build_model
from speedups import conv_gradients
from speedups.conv_gradients import (
    tap_product_weight_grad,
    transformed_rows,
    use_fast_cpu_gradients,
    weight_grad,
    winograd_weight_grad,
)
from speedups.norm_folding import fold_batch_norms, fold_frozen_norms


@pytest.mark.parametrize("kernel, padding, dilation", [((3, 3), (1, 1), (1, 1)), ((3, 3), (2, 2), (2, 2)),
                                                       ((5, 5), (2, 2), (1, 1)), ((3, 1), (1, 0), (1, 1)),
                                                       ((3, 3), (0, 0), (1, 1)), ((2, 2), (0, 0), (1, 1))])
def test_tap_products_give_torchs_weight_gradient(kernel, padding, dilation):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand((2, 4, 9, 7), generator=generator, dtype=torch.float64).to(memory_format=torch.channels_last)
    weight = torch.rand((6, 4, *kernel), generator=generator, dtype=torch.float64)
    output = nn.functional.conv2d(x, weight, padding=padding, dilation=dilation)
    grad = torch.rand(output.shape, generator=generator, dtype=torch.float64).to(memory_format=torch.channels_last)
    expected = torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], list(padding), list(dilation),
                                                   False, [0, 0], 1, [False, True, False])[1]
    torch.testing.assert_close(tap_product_weight_grad(grad, x, kernel, padding, dilation), expected,
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("first, count", [(-1, 3), (1, 2), (3, 2), (-2, 5)])  # top edge; inside; bottom; both
def test_window_rows_are_the_zero_padded_maps_rows_read_in_place_inside_it(first, count):
    pixels = torch.arange(1.0, 61.0).view(2, 5, 3, 2)  # (N, H, W, C)
    left, width, step = 1, 6, 2
    padded = torch.zeros(2, 5 + 2 * 8, width, 2)
    padded[:, 8:13, left:left + 3] = pixels
    read_in_place = []

    def copied_rows(d: list[torch.Tensor], out: torch.Tensor) -> None:
        for row, source in zip(out, d):
            read_in_place.append(source.untyped_storage().data_ptr() == pixels.untyped_storage().data_ptr())
            row.copy_(source)

    rows = transformed_rows(pixels, first, count, step, 3, 3, width, left, copied_rows)
    for r in range(3):
        torch.testing.assert_close(rows[r], padded[:, 8 + first + r:8 + first + r + step * count:step], rtol=0, atol=0)
    assert read_in_place == [first + r >= 0 and first + r + step * (count - 1) < 5 for r in range(3)]


def _float64_weight_grad(shape: tuple[int, ...], padding: tuple[int, int], layout: torch.memory_format):
    """An input, an output gradient and torch's weight gradient of a 3x3 convolution of 5 channels, in float64."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=generator, dtype=torch.float64).to(memory_format=layout)
    weight = torch.rand((5, shape[1], 3, 3), generator=generator, dtype=torch.float64)
    output = nn.functional.conv2d(x, weight, padding=padding)
    grad = torch.randn(output.shape, generator=generator, dtype=torch.float64).to(memory_format=layout)
    expected = torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], list(padding), [1, 1], False,
                                                   [0, 0], 1, [False, True, False])[1]
    return grad, x, expected


@pytest.mark.parametrize("shape", [(2, 4, 9, 7), (1, 3, 8, 8), (3, 2, 13, 4), (1, 2, 1, 2)])
@pytest.mark.parametrize("padding", [(1, 1), (0, 0), (2, 2), (1, 0)])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("tiles_per_chunk", [512, 3])  # one chunk; several, the last one short
def test_winograd_gives_torchs_weight_gradient(shape, padding, layout, tiles_per_chunk, monkeypatch):
    if shape[2] + 2 * padding[0] < 3 or shape[3] + 2 * padding[1] < 3:
        padding = (1, 1)  # a 1x2 map needs padding for a 3x3 kernel
    monkeypatch.setattr(conv_gradients, "TILES_PER_CHUNK", tiles_per_chunk)
    grad, x, expected = _float64_weight_grad(shape, padding, layout)
    torch.testing.assert_close(winograd_weight_grad(grad, x, padding), expected, rtol=0, atol=1e-12)


def test_winograd_in_float32_is_as_close_to_float64_as_tap_products():
    grad, x, expected = _float64_weight_grad((2, 16, 30, 26), (1, 1), torch.channels_last)
    scale = expected.abs().max()
    by_winograd = (winograd_weight_grad(grad.float(), x.float(), (1, 1)).double() - expected).abs().max() / scale
    by_taps = (tap_product_weight_grad(grad.float(), x.float(), (3, 3), (1, 1), (1, 1)).double()
               - expected).abs().max() / scale
    assert by_winograd < 2 * by_taps


def test_weight_grad_takes_winograd_for_3x3_kernels_without_dilation_only(monkeypatch):
    calls = []
    monkeypatch.setattr(conv_gradients, "winograd_weight_grad", lambda *args: calls.append("winograd"))
    monkeypatch.setattr(conv_gradients, "tap_product_weight_grad", lambda *args: calls.append("taps"))
    x, grad = torch.rand(1, 2, 6, 6), torch.rand(1, 3, 6, 6)
    for kernel, dilation in (((3, 3), (1, 1)), ((3, 3), (2, 2)), ((5, 5), (1, 1)), ((3, 1), (1, 1))):
        weight_grad(grad, x, kernel, (1, 1), dilation)
    assert calls == ["winograd", "taps", "taps", "taps"]


def gradients(conv: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, str, list[torch.Tensor]]:
    x = x.detach().clone().requires_grad_()
    output = conv(x)
    (output * torch.linspace(-1, 1, output.numel()).view(output.shape)).sum().backward()
    return output, type(output.grad_fn).__name__, [x.grad] + [p.grad for p in conv.parameters()]


@pytest.mark.parametrize("options", [{"padding": 1}, {"padding": 2, "dilation": 2}, {"stride": 2, "padding": 1},
                                     {"padding": 1, "groups": 2, "bias": False}])
def test_a_channels_last_convolution_gets_torchs_gradients(options):
    torch.manual_seed(0)
    plain = nn.Conv2d(4, 6, 3, **options).to(memory_format=torch.channels_last)
    fast = use_fast_cpu_gradients(copy.deepcopy(plain))
    x = torch.rand(2, 4, 11, 9).to(memory_format=torch.channels_last)
    expected_output, plain_backward, expected = gradients(plain, x)
    output, fast_backward, got = gradients(fast, x)
    assert (plain_backward, fast_backward) == ("ConvolutionBackward0", "_FastCpuGradientsBackward")
    torch.testing.assert_close(output, expected_output, rtol=0, atol=0)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [{"padding": 1}, {"padding": 2, "dilation": 2}, {"stride": 2, "padding": 1},
                                     {"kernel_size": 1}])
def test_a_batch_of_no_images_gets_torchs_zero_gradients(options):
    """The mask head's convolutions see no regions when a batch holds no instance with an outline."""
    torch.manual_seed(0)
    options = {"kernel_size": 3, **options}
    plain = nn.Conv2d(4, 6, **options).to(memory_format=torch.channels_last)
    fast = use_fast_cpu_gradients(copy.deepcopy(plain))
    x = torch.rand(0, 4, 14, 14).to(memory_format=torch.channels_last)
    _, _, expected = gradients(plain, x)
    output, _, got = gradients(fast, x)
    assert output.shape[0] == 0
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_convolution_with_a_folded_frozen_norm_keeps_both():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=False), FrozenBatchNorm2d(6))
    for name, low, high in (("weight", 0.5, 1.5), ("running_mean", -0.5, 0.5), ("running_var", 0.5, 2.0)):
        getattr(block[1], name).uniform_(low, high)
    block.to(memory_format=torch.channels_last)
    fast = use_fast_cpu_gradients(fold_frozen_norms(copy.deepcopy(block)))
    x = torch.rand(2, 4, 8, 8).to(memory_format=torch.channels_last)
    _, _, expected = gradients(block, x)
    _, backward, got = gradients(fast, x)
    assert backward == "_FastCpuGradientsBackward"
    for a, b in zip(got[:2], expected[:2], strict=True):  # the input's and the convolution weight's
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_torchs_own_convolution_runs_without_gradients_layout_or_in_1x1_kernels():
    conv = use_fast_cpu_gradients(nn.Conv2d(4, 6, 3, padding=1)).to(memory_format=torch.channels_last)
    x = torch.rand(1, 4, 8, 8).to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert conv(x).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(conv(x).grad_fn).__name__ != "_FastCpuGradientsBackward"
    assert type(conv.to(memory_format=torch.contiguous_format)(x).grad_fn).__name__ == "ConvolutionBackward0"
    pointwise = use_fast_cpu_gradients(nn.Sequential(nn.Conv2d(4, 6, 1)))
    assert type(pointwise[0]) is nn.Conv2d


def test_the_inference_copy_still_folds_batch_norms_into_swapped_convolutions():
    head = use_fast_cpu_gradients(nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)).eval())
    assert fold_batch_norms(head) == 1


@pytest.mark.parametrize("helper", ["tap_product_weight_grad", "winograd_weight_grad"])
def test_the_self_check_finds_wrong_gradients(monkeypatch, helper):
    assert conv_gradients.self_check() is None
    monkeypatch.setattr(conv_gradients, helper, lambda grad, x, *geometry: torch.zeros(
        grad.shape[1], x.shape[1], 3, 3))
    assert "gradients differed" in conv_gradients.self_check()


def test_applied_with_channels_last_on_the_cpu_only():
    model = build_model("fasterrcnn_mobilenet_v3_large_fpn", 3, None, None, None)

    def names(device: str, channels_last: bool) -> list[str]:
        config = speedups.SpeedupConfig(channels_last=channels_last, shape_buckets=False)
        return speedups.applied(speedups.for_training(copy.deepcopy(model), torch.device(device), config))

    assert speedups.CPU_CONV_GRADIENTS.name in names("cpu", True)
    assert speedups.CPU_CONV_GRADIENTS.name not in names("cpu", False)
    assert speedups.CPU_CONV_GRADIENTS.name not in names("meta", True)

"""Winograd convolutions, NNPACK's and F(2x2, 3x3) and F(4x4, 3x3) tiles: torch's outputs and gradients to float
rounding, each used only where it applies."""

import copy

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from speedups import conv_gradients, winograd_convs
from speedups.norm_folding import fold_batch_norms, fold_frozen_norms
from speedups.winograd_convs import (
    LARGE_TILES,
    SMALL_TILES,
    nnpack_conv2d,
    tile_weights,
    tiled_winograd_conv2d,
    tiling_for,
    use_winograd_convs,
)

CL = torch.channels_last


# One image, one call per image (maps of 64x64 and more), one call for the batch, and a map smaller than the
# kernel, which has an output only when padded.
SHAPES_AND_PADDINGS = [(shape, padding) for shape in ((1, 3, 13, 11), (2, 3, 70, 66), (5, 3, 9, 7))
                       for padding in ((0, 0), (1, 1), (2, 1))] + [((1, 2, 1, 2), (1, 1)), ((1, 2, 1, 2), (2, 1))]


@pytest.mark.parametrize("shape, padding", SHAPES_AND_PADDINGS)
@pytest.mark.parametrize("layout", [CL, torch.contiguous_format])
def test_nnpack_gives_torchs_convolution_in_the_inputs_layout(shape, layout, padding):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=generator).to(memory_format=layout)
    weight, bias = torch.rand((4, shape[1], 3, 3), generator=generator), torch.rand(4, generator=generator)
    torch._nnpack_available()
    output = nnpack_conv2d(x, weight, bias, padding)
    expected = nn.functional.conv2d(x.double(), weight.double(), bias.double(), padding=padding)
    assert output.is_contiguous(memory_format=layout)
    torch.testing.assert_close(output.double(), expected, rtol=0, atol=2e-5 * expected.abs().max().item())
    no_bias = nnpack_conv2d(x, weight, None, padding)
    torch.testing.assert_close(no_bias, output - bias.view(1, -1, 1, 1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape, padding", SHAPES_AND_PADDINGS + [((2, 5, 10, 40), (1, 1))])
@pytest.mark.parametrize("layout", [CL, torch.contiguous_format])
@pytest.mark.parametrize("tiles_per_chunk", [512, 9])  # one chunk; several, the last one short
# Against float64: small tiles round below oneDNN's error, large ones some times above it.
@pytest.mark.parametrize("tiling, tolerance", [(SMALL_TILES, 1e-6), (LARGE_TILES, 1e-5)], ids=["small", "large"])
def test_tiles_give_torchs_convolution_channels_last(shape, layout, padding, tiles_per_chunk, tiling, tolerance,
                                                     monkeypatch):
    monkeypatch.setattr(winograd_convs, "TILES_PER_CHUNK", tiles_per_chunk)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=generator).to(memory_format=layout)
    weight, bias = torch.rand((4, shape[1], 3, 3), generator=generator), torch.rand(4, generator=generator)
    expected = nn.functional.conv2d(x.double(), weight.double(), bias.double(), padding=padding)
    output = tiled_winograd_conv2d(x, tile_weights(weight, tiling), bias, padding)
    assert output.shape == expected.shape and output.is_contiguous(memory_format=CL)
    torch.testing.assert_close(output.double(), expected, rtol=0, atol=tolerance * expected.abs().max().item())
    exact = tiled_winograd_conv2d(x.double(), tile_weights(weight.double(), tiling), None, padding)
    torch.testing.assert_close(exact, expected - bias.double().view(1, -1, 1, 1), rtol=0, atol=1e-12)


def test_large_tiles_unless_they_pad_the_output_much_more_than_small_ones():
    assert tiling_for(200, 272) is tiling_for(50, 68) is tiling_for(25, 34) is LARGE_TILES  # 0%, 4%, 14% more
    assert tiling_for(14, 14) is tiling_for(13, 17) is tiling_for(1, 1) is SMALL_TILES  # 31%, 27%, 300% more


def test_each_convolution_takes_the_path_its_channels_pixels_and_layout_call_for(monkeypatch):
    monkeypatch.setattr(winograd_convs, "LARGE_MAPS_BY_NNPACK", True)
    wide, narrow = torch.empty(256, 256, 3, 3), torch.empty(256, 128, 3, 3)
    small, large = torch.empty(1, 256, 100, 100), torch.empty(1, 256, 110, 110)  # 10,000 and 12,100 pixels
    assert winograd_convs._path(large, wide, (1, 1)) == winograd_convs.NNPACK
    assert winograd_convs._path(large.to(memory_format=CL), wide, (1, 1)) == winograd_convs.NNPACK
    assert winograd_convs._path(small.to(memory_format=CL), wide, (1, 1)) == winograd_convs.TILES
    assert winograd_convs._path(small, wide, (1, 1)) == winograd_convs.TORCH
    assert winograd_convs._path(small.to(memory_format=CL), narrow, (1, 1)) == winograd_convs.TORCH
    assert winograd_convs._path(torch.empty(64, 256, 14, 14), wide, (1, 1)) == winograd_convs.NNPACK  # 12,544
    assert winograd_convs._path(torch.empty(46, 256, 14, 14).to(memory_format=CL), wide, (1, 1)) == winograd_convs.TILES
    assert winograd_convs._path(torch.empty(1, 256, 1, 1).to(memory_format=CL), wide, (1, 1)) == winograd_convs.TORCH


def test_without_nnpack_for_large_maps_they_take_tiles_if_channels_last(monkeypatch):
    nnpack_expected = torch.backends.cpu.get_cpu_capability() != "AVX512"
    assert nnpack_expected == winograd_convs.LARGE_MAPS_BY_NNPACK
    monkeypatch.setattr(winograd_convs, "LARGE_MAPS_BY_NNPACK", False)
    wide, large = torch.empty(256, 256, 3, 3), torch.empty(1, 256, 110, 110)
    assert winograd_convs._path(large.to(memory_format=CL), wide, (1, 1)) == winograd_convs.TILES
    assert winograd_convs._path(large, wide, (1, 1)) == winograd_convs.TORCH


def test_a_module_keeps_its_weights_transforms_until_they_change():
    torch.manual_seed(0)
    conv = use_winograd_convs(nn.Conv2d(256, 256, 3, padding=1)).to(memory_format=CL)
    small, large = torch.rand(1, 256, 9, 10).to(memory_format=CL), torch.rand(1, 256, 12, 12).to(memory_format=CL)
    with torch.no_grad():
        first = conv(small), conv(large)  # a shared convolution, as the RPN head's is across levels
        kept = dict(conv._kept_tile_weights)
        assert sorted(kept) == [SMALL_TILES.size, LARGE_TILES.size]
        second = conv(small), conv(large)
        assert all(a is not b for a, b in zip(first, second))
        assert all(conv._kept_tile_weights[size][2] is kept[size][2] for size in kept)
        conv.weight.mul_(2)  # as an optimizer step changes it in place
        doubled = conv(large)
        assert conv._kept_tile_weights[LARGE_TILES.size][2] is not kept[LARGE_TILES.size][2]
        expected = nn.functional.conv2d(large, conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(doubled, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_a_folded_norms_convolution_never_runs_on_an_earlier_steps_weights():
    """The folded weights are a new tensor every forward, which may take the freed address of the last one:
    the kept transforms must not be taken for theirs."""
    torch.manual_seed(0)
    fast = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1, bias=False), FrozenBatchNorm2d(256))
    fold_frozen_norms(fast)
    use_winograd_convs(fast).to(memory_format=CL)
    optimizer = torch.optim.SGD(fast.parameters(), lr=0.5)
    x = torch.rand(1, 256, 8, 8).to(memory_format=CL)
    norm = fast[1]
    for _ in range(6):
        optimizer.zero_grad()
        y = fast(x)
        with torch.no_grad():
            scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
            expected = (nn.functional.conv2d(x, fast[0].weight, padding=1) * scale[:, None, None]
                        + (norm.bias - norm.running_mean * scale)[:, None, None])
        torch.testing.assert_close(y, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
        y.square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("shape", [(2, 8, 11, 14), (3, 8, 5, 9)])  # large tiles; small ones
def test_a_convolution_by_tiles_gets_torchs_output_and_gradients(tiles_everywhere, shape):
    assert_swapped_convolution_matches_torch(shape, CL, 1e-5)


def assert_swapped_convolution_matches_torch(shape: tuple[int, ...], layout: torch.memory_format, tolerance: float
                                             ) -> None:
    """A swapped 8->6 convolution's output and gradients equal torch's within tolerance x their largest value."""
    torch.manual_seed(0)
    plain = nn.Conv2d(8, 6, 3, padding=1).to(memory_format=layout)
    fast = use_winograd_convs(copy.deepcopy(plain))
    x = torch.rand(shape).to(memory_format=layout)
    plain_backward, expected = outputs_and_gradients(plain, x)
    fast_backward, got = outputs_and_gradients(fast, x)
    assert (plain_backward, fast_backward) == ("ConvolutionBackward0", "_WinogradConvBackward")
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=tolerance * b.abs().max().item())


def outputs_and_gradients(conv: nn.Module, x: torch.Tensor) -> tuple[str, list[torch.Tensor]]:
    x = x.detach().clone().requires_grad_()
    output = conv(x)
    (output * torch.linspace(-1, 1, output.numel()).view(output.shape)).sum().backward()
    return type(output.grad_fn).__name__, [output, x.grad] + [p.grad for p in conv.parameters()]


@pytest.mark.parametrize("shape", [(2, 8, 70, 66), (4, 8, 12, 10)])  # a call per image; one for the batch
@pytest.mark.parametrize("layout", [CL, torch.contiguous_format])
def test_a_convolution_gets_torchs_output_and_gradients(winograd_everywhere, shape, layout):
    assert_swapped_convolution_matches_torch(shape, layout, 3e-5)


def test_only_large_float32_cpu_convolutions_without_autocast_take_nnpack(monkeypatch):
    monkeypatch.setattr(winograd_convs, "LARGE_MAPS_BY_NNPACK", True)
    conv = use_winograd_convs(nn.Conv2d(256, 256, 3, padding=1))
    large, small = torch.rand(1, 256, 110, 110), torch.rand(1, 256, 100, 100)  # 12,100 and 10,000 pixels
    assert type(conv(large).grad_fn).__name__ == "_WinogradConvBackward"
    assert type(conv(small).grad_fn).__name__ == "ConvolutionBackward0"
    with torch.no_grad():
        torch.testing.assert_close(conv(large), nn.functional.conv2d(large, conv.weight, conv.bias, padding=1),
                                   rtol=0, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(conv(large).grad_fn).__name__ != "_WinogradConvBackward"
    assert conv(large[0]).shape == (256, 110, 110)  # an unbatched input: torch's own
    narrow = use_winograd_convs(nn.Conv2d(128, 256, 3, padding=1))
    assert type(narrow(torch.rand(1, 128, 110, 110)).grad_fn).__name__ == "ConvolutionBackward0"


def test_only_3x3_stride_1_ungrouped_convolutions_are_swapped():
    kinds = [nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1),
             nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.Conv2d(4, 4, 3, padding=1, groups=2),
             nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 5, padding=2), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")]
    swapped = use_winograd_convs(nn.Sequential(*kinds))
    assert [isinstance(m, winograd_convs._ConvByWinograd) for m in swapped] == [True] + [False] * 6


def test_with_channels_last_gradients_each_convolution_takes_its_own_path(winograd_everywhere, monkeypatch):
    convs = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1))
    fast = use_winograd_convs(conv_gradients.use_fast_cpu_gradients(convs.to(memory_format=CL)))
    x = torch.rand(2, 4, 10, 10).to(memory_format=CL).requires_grad_()
    assert type(fast[0](x).grad_fn).__name__ == "_WinogradConvBackward"
    assert type(fast[1](x).grad_fn).__name__ == "_FastCpuGradientsBackward"
    monkeypatch.setattr(winograd_convs, "MIN_CHANNELS", 5)  # too few now: the channels-last gradients
    assert type(fast[0](x).grad_fn).__name__ == "_FastCpuGradientsBackward"


def test_batch_norms_fold_into_a_swapped_convolution(winograd_everywhere):
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)).eval()
    block[1].running_mean.uniform_(-0.5, 0.5)
    block[1].running_var.uniform_(0.5, 2.0)
    folded = use_winograd_convs(copy.deepcopy(block))
    assert fold_batch_norms(folded) == 1
    x = torch.rand(1, 4, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), block(x), rtol=0, atol=1e-5)
    assert isinstance(folded[0], winograd_convs._ConvByWinograd)


def test_the_self_check_passes_and_finds_wrong_outputs(monkeypatch):
    assert winograd_convs.self_check() is None
    with torch.no_grad():
        assert winograd_convs.self_check() is None
    wrong = lambda x, w, b, p: torch.zeros_like(x[:, :1]).repeat(1, w.shape[2 if w.dim() == 3 else 0], 1, 1)  # noqa: E731
    for function, path in (("nnpack_conv2d", "NNPACK"), ("tiled_winograd_conv2d", "tiles")):
        with monkeypatch.context() as patch:
            patch.setattr(winograd_convs, function, wrong)
            assert f"the {path} convolution differed from torch's" in winograd_convs.self_check()


def test_applied_on_the_cpu_in_either_layout_only():
    import speedups
    from models import build_model

    model = build_model("fasterrcnn_mobilenet_v3_large_fpn", 3, None, None, None)
    for device, channels_last, expected in (("cpu", True, True), ("cpu", False, True), ("meta", False, False)):
        config = speedups.SpeedupConfig(channels_last=channels_last, shape_buckets=False)
        fast = speedups.for_training(copy.deepcopy(model), torch.device(device), config)
        assert (speedups.CPU_WINOGRAD.name in speedups.applied(fast)) == expected

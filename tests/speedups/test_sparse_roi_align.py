"""RoIAlign as weighted sums of gathered pixels pools and back-propagates as torchvision's MultiScaleRoIAlign does,
from maps in either memory layout, and gives channels-last features."""

import copy
from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from conftest import with_speedups
from models import build_model
from speedups import sparse_roi_align
from speedups.level_pooling import LevelsReadOnceMixin
from speedups.sparse_roi_align import SparseMultiScaleRoIAlign, _axis_samples, use_sparse_roi_align

IMAGE_SHAPES = [(128, 192), (120, 170)]


def pyramid(dtype: torch.dtype = torch.float32, layout: torch.memory_format = torch.contiguous_format
            ) -> OrderedDict:
    """An FPN-like batch of 2: strides 4 to 32 and a pooled level the poolers leave out."""
    generator = torch.Generator().manual_seed(0)
    maps = OrderedDict((str(level), torch.randn((2, 6, 128 // 4 // 2**level, 192 // 4 // 2**level),
                                                generator=generator, dtype=dtype
                                                ).to(memory_format=layout).requires_grad_())
                       for level in range(4))
    maps["pool"] = torch.randn((2, 6, 2, 3), generator=generator, dtype=dtype)
    return maps


def random_boxes(count: int, seed: int) -> torch.Tensor:
    """Boxes of every pyramid level, some hanging off the image, some under a pixel wide."""
    generator = torch.Generator().manual_seed(seed)
    corner = torch.rand((count, 2), generator=generator) * torch.tensor([210.0, 140.0]) - 10
    extent = torch.rand((count, 2), generator=generator) ** 3 * 250 + 0.05
    return torch.cat([corner, corner + extent], 1)


@pytest.mark.parametrize("names,output_size", [(["0", "1", "2", "3"], 7), (["0", "1", "2", "3"], (14, 14)),
                                               (["0"], 5), (["1", "2"], (4, 6))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_pooling_and_gradient_match_torchvision(names, output_size, dtype, layout):
    maps = pyramid(dtype, layout)
    boxes = [random_boxes(60, 1).to(dtype), random_boxes(45, 2).to(dtype)]
    # A canonical scale for these small images, so that every level pools some boxes.
    theirs = MultiScaleRoIAlign(names, output_size, 2, canonical_scale=56)(maps, boxes, IMAGE_SHAPES)
    ours = SparseMultiScaleRoIAlign(names, output_size, 2, canonical_scale=56)(maps, boxes, IMAGE_SHAPES)
    assert ours.shape == theirs.shape == (105, 6, *theirs.shape[-2:])
    assert ours.dtype == dtype and ours.is_contiguous(memory_format=torch.channels_last)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(ours, theirs, atol=tolerance, rtol=tolerance)
    upstream = torch.randn(theirs.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    inputs = [maps[name] for name in names]
    for ours_grad, their_grad in zip(torch.autograd.grad(ours, inputs, upstream),
                                     torch.autograd.grad(theirs, inputs, upstream)):
        assert their_grad.abs().sum() > 0
        torch.testing.assert_close(ours_grad, their_grad, atol=tolerance, rtol=tolerance)


def test_the_levels_scales_are_settled_by_the_first_batch_as_torchvisions_are():
    """A later batch of short, wide images (43 px padded to 64) would round its scales to twice the size."""
    names = ["0", "1", "2", "3"]
    plain, sparse = MultiScaleRoIAlign(names, 7, 2), SparseMultiScaleRoIAlign(names, 7, 2)
    generator = torch.Generator().manual_seed(0)
    boxes = [torch.tensor([[4.0, 4.0, 40.0, 30.0], [50.0, 2.0, 120.0, 40.0]])]
    for padded, image in (((96, 128), (96, 128)), ((64, 128), (43, 128))):
        maps = {n: torch.rand(1, 4, padded[0] // 2**(k + 2), padded[1] // 2**(k + 2), generator=generator)
                for k, n in enumerate(names)}
        torch.testing.assert_close(sparse(maps, boxes, [image]), plain(maps, boxes, [image]), atol=1e-5, rtol=1e-5)
    assert sparse.scales == plain.scales


def test_images_without_boxes():
    maps = pyramid()
    pooler = SparseMultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    assert pooler(maps, [torch.zeros((0, 4)), torch.zeros((0, 4))], IMAGE_SHAPES).shape == (0, 6, 7, 7)
    pooled = pooler(maps, [torch.zeros((0, 4)), random_boxes(3, 4)], IMAGE_SHAPES)
    expected = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(maps, [torch.zeros((0, 4)), random_boxes(3, 4)],
                                                             IMAGE_SHAPES)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)
    pooled.sum().backward()


def test_boxes_of_a_diverged_run_pool_to_nan_without_reading_outside_the_maps():
    maps = pyramid()
    good = random_boxes(6, 7)
    bad = torch.tensor([[float("nan"), 1.0, 20.0, 30.0], [0.0, 0.0, float("inf"), 40.0],
                        [float("-inf"), float("nan"), 5.0, float("inf")]])
    pooled = SparseMultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(maps, [torch.cat([good, bad]), good],
                                                                  IMAGE_SHAPES)
    expected = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(maps, [good, good], IMAGE_SHAPES)
    torch.testing.assert_close(torch.cat([pooled[:6], pooled[9:]]), expected, atol=1e-5, rtol=1e-5)
    assert pooled[6:9].isnan().any(dim=(1, 2, 3)).all()
    start = torch.tensor([float("nan"), float("inf"), float("-inf"), 3.0])
    size = torch.tensor([1, 5, 5, 5])
    low, high, _, _ = _axis_samples(start, torch.full((4,), 2.0), 7, 2, size)
    for index in (low, high):
        assert ((index >= 0) & (index < size[:, None])).all()


def test_maps_of_one_scale_pool_sparsely_every_box_from_the_first_as_torchvision_does(monkeypatch):
    """MobileNet's FPN gives two maps at stride 32: torchvision's level rule puts every box on the first."""
    generator = torch.Generator().manual_seed(0)
    maps = OrderedDict((name, torch.randn((2, 6, 4, 6), generator=generator).requires_grad_()) for name in "01")
    boxes = [random_boxes(30, 7), random_boxes(20, 8)]
    theirs = MultiScaleRoIAlign(["0", "1"], 7, 2)(maps, boxes, IMAGE_SHAPES)
    monkeypatch.setattr(MultiScaleRoIAlign, "forward", None)  # ours must not fall back to torchvision's
    ours = SparseMultiScaleRoIAlign(["0", "1"], 7, 2)(maps, boxes, IMAGE_SHAPES)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    upstream = torch.randn(theirs.shape, generator=generator)
    ours_grads = torch.autograd.grad(ours, list(maps.values()), upstream)
    their_grads = torch.autograd.grad(theirs, list(maps.values()), upstream)
    assert their_grads[0].abs().sum() > 0 and not their_grads[1].any() and not ours_grads[1].any()
    torch.testing.assert_close(ours_grads[0], their_grads[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("names,sampling_ratio", [(["0", "1", "2", "3"], 0), (["1", "3"], 2)])
def test_other_cases_pool_with_torchvision(names, sampling_ratio):
    """The adaptive sampling ratio and a pyramid with a level left out go to torchvision's kernel: bit for bit
    its result."""
    maps = pyramid()
    boxes = [random_boxes(20, 5), random_boxes(10, 6)]
    theirs = MultiScaleRoIAlign(names, 7, sampling_ratio, canonical_scale=56)(maps, boxes, IMAGE_SHAPES)
    ours = SparseMultiScaleRoIAlign(names, 7, sampling_ratio, canonical_scale=56)(maps, boxes, IMAGE_SHAPES)
    assert torch.equal(ours, theirs)


def test_half_precision_maps_pool_in_float32_as_torchvision_does_under_autocast(monkeypatch):
    maps = pyramid(torch.bfloat16)
    boxes = [random_boxes(40, 5), random_boxes(30, 6)]
    names = ["0", "1", "2", "3"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = MultiScaleRoIAlign(names, 7, 2, canonical_scale=56)(maps, boxes, IMAGE_SHAPES)
        monkeypatch.setattr(MultiScaleRoIAlign, "forward", None)  # ours must not fall back to torchvision's
        ours = SparseMultiScaleRoIAlign(names, 7, 2, canonical_scale=56)(maps, boxes, IMAGE_SHAPES)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    # Both pool in float32; the sums differ in order only, so at most one bfloat16 step apart.
    torch.testing.assert_close(ours, theirs, atol=1e-2, rtol=8e-3)
    upstream = torch.randn(theirs.shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    inputs = [maps[name] for name in names]
    for ours_grad, their_grad in zip(torch.autograd.grad(ours, inputs, upstream),
                                     torch.autograd.grad(theirs, inputs, upstream)):
        assert ours_grad.dtype == torch.bfloat16 and their_grad.abs().sum() > 0
        torch.testing.assert_close(ours_grad, their_grad, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("name", ["maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn"])
def test_models_pool_sparsely_with_their_own_settings(name):
    model = with_speedups(build_model(name, 2, None, None, None, min_size=64, max_size=64))
    poolers = [getattr(model.roi_heads, n) for n in ("box_roi_pool", "mask_roi_pool", "keypoint_roi_pool")
               if getattr(model.roi_heads, n, None) is not None]
    assert len(poolers) == 2 and all(type(p) is SparseMultiScaleRoIAlign for p in poolers)
    plain = torch.nn.Module()
    plain.roi_heads = torch.nn.Module()
    plain.roi_heads.box_roi_pool = MultiScaleRoIAlign(["0", "2"], (3, 5), 1, canonical_scale=112,
                                                      canonical_level=3)
    swapped = use_sparse_roi_align(plain).roi_heads.box_roi_pool
    assert type(swapped) is SparseMultiScaleRoIAlign
    assert (swapped.featmap_names, swapped.output_size, swapped.sampling_ratio, swapped.canonical_scale,
            swapped.canonical_level) == (["0", "2"], (3, 5), 1, 112, 3)


def test_chosen_for_models_on_the_cpu_only():
    import speedups

    model = build_model("maskrcnn_resnet50_fpn", 2, None, None, None, min_size=64, max_size=64)
    config = speedups.SpeedupConfig(shape_buckets=False)
    prepared = speedups.for_training(copy.deepcopy(model), torch.device("cpu"), config)
    assert type(prepared.roi_heads.box_roi_pool) is SparseMultiScaleRoIAlign
    prepared = speedups.for_training(copy.deepcopy(model), torch.device("meta"), config)
    assert type(prepared.roi_heads.box_roi_pool).__mro__[1:3] == (LevelsReadOnceMixin, MultiScaleRoIAlign)


@pytest.mark.parametrize("name", ["maskrcnn_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_fpn"])
def test_training_losses_equal_torchvision_pooling(name, monkeypatch):
    """One training step's losses with the sparse poolers and with torchvision's (MobileNet's: two maps of one
    scale)."""
    torch.manual_seed(0)
    model = build_model(name, 3, None, None, None, min_size=96, max_size=96)
    model = with_speedups(model).train()
    sparse_calls = []
    real_align = sparse_roi_align.multiscale_roi_align
    monkeypatch.setattr(sparse_roi_align, "multiscale_roi_align",
                        lambda *args, **kwargs: sparse_calls.append(1) or real_align(*args, **kwargs))
    images = [torch.rand(3, 90, 120), torch.rand(3, 100, 80)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]), "labels": torch.tensor([1]),
                "masks": torch.zeros((1, 90, 120), dtype=torch.uint8)},
               {"boxes": torch.tensor([[5.0, 20.0, 70.0, 90.0], [30.0, 5.0, 50.0, 30.0]]),
                "labels": torch.tensor([2, 1]), "masks": torch.ones((2, 100, 80), dtype=torch.uint8)}]
    poolers = [p for p in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool) if p is not None]
    losses = []
    for pooler_class in (SparseMultiScaleRoIAlign, MultiScaleRoIAlign):
        for pooler in poolers:
            pooler.__class__ = pooler_class
        torch.manual_seed(1)
        losses.append(torch.stack(list(model(images, targets).values())))
    assert len(sparse_calls) == len(poolers), "the sparse pooling ran"
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)

"""Anchors kept per batch shape: the same values as torchvision's generator, built once per shape."""

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from conftest import with_speedups
from models import build_model
from speedups.anchor_cache import CACHE_SIZE, CachedAnchorGenerator, cache_anchors


def pyramid(height: int, width: int, dtype=torch.float32):
    """A batch of 3 images padded to height x width and FPN-like feature maps for it."""
    images = ImageList(torch.zeros(3, 3, height, width), [(height, width - 5), (height - 7, width), (20, 30)])
    features = [torch.zeros(3, 8, -(-height // s), -(-width // s), dtype=dtype) for s in (4, 8, 16, 32, 64)]
    return images, features


def generators():
    sizes, ratios = ((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5
    plain = AnchorGenerator(sizes, ratios)
    return plain, cache_anchors(torch.nn.Sequential(AnchorGenerator(sizes, ratios)))[0]


@pytest.mark.parametrize("shape, dtype", [((96, 128), torch.float32), ((320, 448), torch.float32),
                                          ((800, 1344), torch.float32), ((128, 96), torch.float16)])
def test_equal_to_torchvision_and_built_once(shape, dtype):
    plain, cached = generators()
    images, features = pyramid(*shape, dtype)
    expected = plain(images, features)
    first = cached(images, features)
    again = cached(images, features)
    assert len(first) == len(again) == 3
    assert all(torch.equal(a, b) and a.dtype == dtype for a, b in zip(first, expected))
    assert all(a is first[0] for a in first + again)


def test_the_oldest_shape_goes_first():
    _, cached = generators()
    shapes = [(32 * (i + 1), 64) for i in range(CACHE_SIZE + 1)]
    kept = {shape: cached(*pyramid(*shape))[0] for shape in shapes}
    assert len(cached.anchor_cache) == CACHE_SIZE
    assert cached(*pyramid(*shapes[-1]))[0] is kept[shapes[-1]]
    assert cached(*pyramid(*shapes[0]))[0] is not kept[shapes[0]], "evicted, so built again"


def test_inference_mode_anchors_stay_out_of_training():
    _, cached = generators()
    images, features = pyramid(96, 128)
    with torch.inference_mode():
        made_in_inference = cached(images, features)[0]
    for_training = cached(images, features)[0]
    assert made_in_inference.is_inference() and not for_training.is_inference()


@pytest.mark.parametrize("name", ["maskrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "fcos_resnet50_fpn"])
def test_builders_get_the_cache(name):
    model = with_speedups(build_model(name, 3, None, None, None))
    assert any(isinstance(m, CachedAnchorGenerator) for m in model.modules())
    assert not any(type(m) is AnchorGenerator for m in model.modules())

"""The model's input transform without blocking copies to the device: torchvision's images and targets exactly,
with no tensor made from host data on the images' device after the first call."""

import sys

import pytest
import torch
import torchvision
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from conftest import ROOT, with_speedups
from models import build_model
from speedups import transform_constants
from speedups.mask_paste import DevicePasteTransform
from speedups.transform_constants import (
    KeptConstantsMixin,
    example_batch,
    keep_transform_constants,
    same_transform,
    transformed_both_ways,
)

sys.path.insert(0, str(ROOT / "bench"))
from bench_train import MADE_ON_DEVICE, OperatorCounter  # noqa: E402


def transform(keep: bool = True) -> GeneralizedRCNNTransform:
    plain = GeneralizedRCNNTransform((40, 47, 53), 90, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    return keep_transform_constants(plain) if keep else plain


@pytest.mark.parametrize("training", [True, False])
def test_the_same_images_and_targets_as_torchvision(training):
    got, want = transformed_both_ways(training)
    assert same_transform(got, want)
    assert got[1] != [tuple(i.shape[-2:]) for i in example_batch(torch.Generator().manual_seed(0))[0]]  # resized


def test_every_size_choice_and_many_ratios_exactly():
    generator = torch.Generator().manual_seed(1)
    for height, width in ((37, 53), (101, 67), (480, 640), (427, 640), (333, 500)):
        boxes = torch.rand(20, 4, generator=generator) * min(height, width)
        for seed in range(3):
            results = []
            for keep in (True, False):
                torch.manual_seed(seed)
                image_list, targets = transform(keep).train()([torch.rand(3, height, width)],
                                                              [{"boxes": boxes.clone()}])
                results.append((image_list.image_sizes, targets[0]["boxes"]))
            assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])


def test_ratios_are_torchvisions_float32_quotients():
    for new, old in ((800, 333), (1333, 427), (47, 37), (90, 61)):
        assert transform_constants.ratio(new, old) == float(torch.tensor(new, dtype=torch.float32)
                                                            / torch.tensor(old, dtype=torch.float32))


def test_no_tensor_made_on_the_device_after_the_first_call():
    """Counted as on a GPU, where torchvision passes an image's or a box's device (the CPU here)."""
    images, targets = example_batch(torch.Generator().manual_seed(0))
    counts = []
    for module in (transform(False).train(), transform().train()):
        for _ in range(2):
            with OperatorCounter() as counter:
                counter.active = True
                module(images, [dict(t) for t in targets])
            counts.append(counter.counts[MADE_ON_DEVICE])
    # torchvision: mean and deviation, and boxes' and keypoints' four sizes, for each of 2 images, every call.
    assert counts == [2 * 10, 2 * 10, 2, 0]


def test_constants_kept_per_dtype_device_and_inference_mode():
    module = transform().eval()
    with torch.inference_mode():
        module.normalize(torch.rand(3, 8, 8))
    image = torch.rand(3, 8, 8, requires_grad=True)
    module.normalize(image).sum().backward()  # not with the inference-mode tensors: they cannot be saved
    module.normalize(torch.rand(3, 8, 8, dtype=torch.float64))
    assert image.grad is not None and len(module.normalize_constants) == 3
    half = torch.rand(3, 8, 8).half()
    assert torch.equal(module.normalize(half), transform(False).normalize(half))


def test_integer_images_are_refused_as_torchvision_refuses_them():
    with pytest.raises(TypeError, match="floating type"):
        transform().normalize(torch.zeros((3, 4, 4), dtype=torch.uint8))


def test_an_exported_graph_keeps_torchvisions_code(monkeypatch):
    monkeypatch.setattr(torchvision, "_is_tracing", lambda: False)
    monkeypatch.setattr(torch.jit, "is_scripting", lambda: True)
    monkeypatch.setattr(transform_constants, "scaled_boxes", None)  # would fail if called
    images, targets = example_batch(torch.Generator().manual_seed(0))
    module = transform().train()
    module(images, targets)
    assert "normalize_constants" not in module.__dict__


def test_self_check_finds_swapped_ratios(monkeypatch):
    assert transform_constants.self_check() is None
    original = transform_constants.scaled_boxes
    monkeypatch.setattr(transform_constants, "scaled_boxes", lambda boxes, old, new: original(
        boxes, old[::-1], new[::-1]))
    assert "other images or targets" in transform_constants.self_check()


def test_a_transform_with_its_own_resize_keeps_it():
    own = type("OwnResize", (GeneralizedRCNNTransform,), {"resize": lambda self, image, target=None: (image, target)})
    module = own(40, 90, [0.5] * 3, [0.2] * 3)
    assert type(keep_transform_constants(module)) is own


@pytest.mark.parametrize("name", ["maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn"])
def test_models_get_it_after_the_mask_paste_and_without_speedups_not(name):
    model = with_speedups(build_model(name, 3, None, None, None))
    assert isinstance(model.transform, KeptConstantsMixin)
    assert isinstance(model.transform, DevicePasteTransform) == (name == "maskrcnn_resnet50_fpn"), "masks only"
    assert type(build_model(name, 3, None, None, None).transform) is GeneralizedRCNNTransform

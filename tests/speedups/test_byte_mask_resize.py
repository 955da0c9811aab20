"""Masks resized as bytes: torchvision's transform's images and targets to the bit, with or without the kept
constants in front, and torchvision's own resize for masks that are not bytes."""

import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from speedups import byte_mask_resize
from speedups.byte_mask_resize import ByteMaskResizeMixin, example_batch, resize_masks_as_bytes
from speedups.exact import same_tensors
from speedups.transform_constants import keep_transform_constants


def test_the_self_check_passes_on_this_torchvision():
    assert byte_mask_resize.self_check() is None


def transformed(kept_constants: bool, byte_masks: bool, dtype: torch.dtype = torch.uint8) -> list:
    transform = GeneralizedRCNNTransform((40, 47, 53), 90, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    if kept_constants:
        keep_transform_constants(transform)
    if byte_masks:
        resize_masks_as_bytes(transform)
        assert isinstance(transform, ByteMaskResizeMixin)
    images, targets = example_batch(torch.Generator().manual_seed(3))
    for target in targets:
        target["masks"] = target["masks"].to(dtype)
    torch.manual_seed(1)
    image_list, targets = transform.train()(images, targets)
    return [image_list.tensors, *(value for target in targets for value in target.values())]


@pytest.mark.parametrize("kept_constants", [False, True])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool])
def test_images_and_targets_are_torchvisions_to_the_bit(kept_constants, dtype):
    got, want = transformed(kept_constants, True, dtype), transformed(False, False, dtype)
    assert same_tensors(got, want)
    assert sum(t.numel() for t in got if t.dtype == torch.uint8) > 0


def test_a_transform_with_its_own_resize_keeps_it():
    class OwnResize(GeneralizedRCNNTransform):
        def resize(self, image, target=None):
            return image, target

    transform = resize_masks_as_bytes(OwnResize(40, 90, [0.5] * 3, [0.2] * 3))
    assert not isinstance(transform, ByteMaskResizeMixin)


def test_only_detectors_that_learn_masks_take_it():
    import torchvision

    kinds = {"maskrcnn_resnet50_fpn": True, "fasterrcnn_resnet50_fpn": False, "retinanet_resnet50_fpn": False}
    for name, learns_masks in kinds.items():
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=3)
        assert isinstance(resize_masks_as_bytes(model).transform, ByteMaskResizeMixin) is learns_masks, name


def test_the_masks_are_interpolated_as_bytes(monkeypatch):
    dtypes = []

    def interpolate(input, *args, **kwargs):
        dtypes.append(input.dtype)
        return torch_interpolate(input, *args, **kwargs)

    torch_interpolate = torch.nn.functional.interpolate
    monkeypatch.setattr(torch.nn.functional, "interpolate", interpolate)
    transformed(False, True)
    assert torch.uint8 in dtypes and dtypes.count(torch.float32) == 3, "the three images, in float"


def test_sizes_the_data_set_chose_keep_the_masks_as_they_are():
    """Large-scale jitter and multiscale training resize in the data set (train.py's _skip_resize)."""
    transform = resize_masks_as_bytes(GeneralizedRCNNTransform(40, 90, [0.5] * 3, [0.2] * 3, _skip_resize=True))
    images, targets = example_batch(torch.Generator().manual_seed(0))
    masks = targets[0]["masks"]
    _, resized = transform.train().resize(images[0], dict(targets[0]))
    assert resized["masks"] is masks

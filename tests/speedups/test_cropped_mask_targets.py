"""Mask targets pooled from crops of the matched masks: torchvision's targets, losses and gradients to rounding, in
the matched-class branch on the CPU only."""

import copy

import pytest
import torch
from torchvision.models.detection import roi_heads as torchvision_roi_heads
from torchvision.models.detection.roi_heads import project_masks_on_boxes

import speedups
from models import build_model
from speedups import cropped_mask_targets
from speedups.cropped_mask_targets import (
    CroppedMaskTargetsMixin,
    crop_mask_targets,
    crops_pay,
    example_targets,
    read_span,
)
from speedups.matched_class_masks import example_batch, example_heads, losses_and_gradients, use_matched_class_masks

cropped = cropped_mask_targets.cropped_mask_targets


def test_the_self_check_passes_on_this_torchvision():
    assert cropped_mask_targets.self_check() is None


def test_a_span_covers_the_pixels_either_side_of_every_sample_and_one_more_cut_at_the_image():
    assert read_span(3.2, 7.9, 20) == (3, 9)
    assert read_span(3.0, 7.0, 20) == (3, 8)
    assert read_span(3.2, 3.5, 20) == (3, 6)  # under a pixel: RoIAlign makes it one long
    assert read_span(-2.5, 4.0, 20) == (0, 5)
    assert read_span(17.5, 20.0, 20) == (17, 20)
    # Samples past the edge: the crop starts with the image, so that their positions round as torchvision's do.
    assert read_span(19.5, 19.7, 20) == (0, 20)
    assert read_span(22.0, 25.0, 20) == (0, 20)


def test_a_sample_on_the_images_edge_reads_its_last_pixel_as_torchvisions_does():
    """In float32, a sub-pixel box's sample at x = W in exact arithmetic rounds onto the edge (its last pixel)
    or past it (zero): from a crop's corner it would round otherwise than torchvision's."""
    masks = torch.ones((1, 37, 53), dtype=torch.uint8)
    start = 53 - 1 / 56  # the first column's samples lie on x = 53
    boxes = torch.tensor([[start, 5.0, start + 0.2, 20.0], [5.0, 37 - 1 / 56, 20.0, 37 - 1 / 56 + 0.3]])
    want = project_masks_on_boxes(masks, boxes, torch.tensor([0, 0]), 28)
    assert want[0, :, 0].eq(1).all() and want[1, 0, :].eq(1).all()
    assert torch.equal(cropped(masks, boxes, torch.tensor([0, 0]), 28), want)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("size", [14, 28])
@pytest.mark.parametrize("shape", [(45, 61), (8, 9), (61, 45)])
def test_targets_equal_torchvisions_in_float64(seed, size, shape):
    masks, boxes, matched = example_targets(torch.Generator().manual_seed(seed), torch.float64, *shape)
    want = project_masks_on_boxes(masks, boxes, matched, size)
    got = cropped(masks, boxes, matched, size)
    assert got.dtype == torch.float64 and got.shape == want.shape == (40, size, size)
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_targets_on_a_large_image_equal_torchvisions_to_the_rounding_of_float32_positions():
    masks, boxes, matched = example_targets(torch.Generator().manual_seed(3), torch.float32, 800, 1333)
    want = project_masks_on_boxes(masks, boxes, matched, 28)
    # The sample positions near 1333 px are rounded to 2^-13 in torchvision's float32 and finer from a crop's
    # corner: a bilinear weight moves by about that much.
    torch.testing.assert_close(cropped(masks, boxes, matched, 28), want, rtol=0, atol=4e-4)


def test_no_regions_give_no_targets():
    masks = torch.ones((2, 10, 10), dtype=torch.uint8)
    got = cropped(masks, torch.zeros((0, 4)), torch.zeros((0,), dtype=torch.int64), 28)
    assert got.shape == (0, 28, 28) and got.dtype == torch.float32


def heads_losses(crop: bool, seed: int) -> tuple[dict, list]:
    torch.manual_seed(0)
    heads = use_matched_class_masks(example_heads())
    if crop:
        crop_mask_targets(heads)
        assert isinstance(heads, CroppedMaskTargetsMixin)
    return losses_and_gradients(heads, example_batch(torch.Generator().manual_seed(seed), (6, 0, 9)), 2)


def test_the_heads_losses_and_gradients_are_the_matched_class_branchs(monkeypatch):
    want_losses, want_gradients = heads_losses(False, 4)
    # The example's masks are small: cropped whatever their size, and torchvision's projection never called.
    monkeypatch.setattr(cropped_mask_targets, "CROP_ABOVE_PIXELS_PER_REGION", 0)
    monkeypatch.setattr(torchvision_roi_heads, "project_masks_on_boxes", None)
    got_losses, got_gradients = heads_losses(True, 4)
    assert got_losses["loss_mask"] > 0
    for name in want_losses:
        torch.testing.assert_close(got_losses[name], want_losses[name], rtol=1e-5, atol=1e-6)
    for a, b in zip(got_gradients, want_gradients, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_crops_are_taken_where_the_masks_hold_many_pixels_per_region():
    boxes = torch.zeros((10, 4))
    assert not crops_pay(torch.zeros((3, 480, 640), dtype=torch.uint8), boxes)
    assert crops_pay(torch.zeros((200, 800, 1216), dtype=torch.uint8), boxes.repeat(12, 1))
    assert crops_pay(torch.zeros((5, 480, 640), dtype=torch.uint8), boxes) != crops_pay(
        torch.zeros((5, 480, 640), dtype=torch.uint8), boxes.repeat(2, 1))


def test_only_heads_with_the_matched_class_branch_take_it():
    plain = example_heads()
    crop_mask_targets(plain)
    assert not isinstance(plain, CroppedMaskTargetsMixin)


def test_chosen_on_the_cpu_with_the_matched_class_branch_only():
    model = build_model("maskrcnn_resnet50_fpn", 3, None, None, None)
    name = "mask targets pooled from crops on the CPU"
    config = speedups.SpeedupConfig(shape_buckets=False)
    on_cpu = speedups.for_training(copy.deepcopy(model), torch.device("cpu"), config)
    assert name in speedups.applied(on_cpu)
    assert isinstance(on_cpu.roi_heads, CroppedMaskTargetsMixin)
    as_gpu = speedups.for_training(copy.deepcopy(model), torch.device("meta"), config)  # any device but the CPU
    assert name not in speedups.applied(as_gpu)
    without_branch = copy.deepcopy(model)
    speedups._apply(without_branch, tuple(s for s in speedups.TRAINING if s.name != "mask logits of each region's "
                                          "class only"))
    assert name not in speedups.applied(without_branch)

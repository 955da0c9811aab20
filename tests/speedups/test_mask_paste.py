"""The batched mask paste gives torchvision's pasted masks, to float rounding."""

import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

import speedups
from conftest import with_speedups
from models import build_model
from speedups.mask_paste import DevicePasteTransform, paste_masks


def random_detections(generator: torch.Generator, count: int, height: int, width: int):
    """Mask probabilities and boxes clipped to the image, as the model's heads give them; a few tiny boxes."""
    masks = torch.rand((count, 1, 28, 28), generator=generator)
    corner = torch.rand((count, 2), generator=generator) * torch.tensor([width, height])
    extent = torch.rand((count, 2), generator=generator) * torch.tensor([width, height]) * 0.8
    extent[:4] = torch.rand((4, 2), generator=generator) * 2
    boxes = torch.cat([corner, corner + extent], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return masks, boxes


def test_paste_matches_torchvision():
    generator = torch.Generator().manual_seed(0)
    for height, width in [(37, 53), (120, 90), (240, 320)]:
        masks, boxes = random_detections(generator, 40, height, width)
        expected = paste_masks_in_image(masks, boxes, (height, width))
        pasted = paste_masks(masks, boxes, (height, width))
        assert pasted.shape == expected.shape == (40, 1, height, width)
        assert (pasted - expected).abs().max() < 1e-4
        assert ((pasted > 0.5) != (expected > 0.5)).sum() <= 2


def test_paste_in_chunks_equals_one_chunk(monkeypatch):
    masks, boxes = random_detections(torch.Generator().manual_seed(1), 10, 50, 60)
    whole = paste_masks(masks, boxes, (50, 60))
    monkeypatch.setattr("speedups.mask_paste._ELEMENTS_PER_CHUNK", 3 * 50 * 60)
    assert torch.equal(paste_masks(masks, boxes, (50, 60)), whole)


def test_no_detections():
    assert paste_masks(torch.zeros((0, 1, 28, 28)), torch.zeros((0, 4)), (10, 12)).shape == (0, 1, 10, 12)


def test_model_predictions_equal_torchvision_paste():
    torch.manual_seed(0)
    model = with_speedups(build_model("maskrcnn_resnet50_fpn", 5, None, None, None, min_size=64, max_size=64,
                        box_score_thresh=0.0)).eval()
    assert isinstance(model.transform, DevicePasteTransform)
    images = [torch.rand(3, 70, 90), torch.rand(3, 50, 40)]
    with torch.inference_mode():
        ours = model(images)
        model.transform.__class__ = DevicePasteTransform.__mro__[1]
        theirs = model(images)
    for a, b in zip(ours, theirs):
        assert len(a["masks"]) > 0
        assert torch.equal(a["boxes"], b["boxes"])
        assert (a["masks"] - b["masks"]).abs().max() < 1e-4


def test_only_models_that_predict_masks_get_it():
    for name, has_masks in (("maskrcnn_resnet50_fpn", True), ("fasterrcnn_resnet50_fpn", False),
                            ("keypointrcnn_resnet50_fpn", False), ("retinanet_resnet50_fpn", False)):
        model = with_speedups(build_model(name, 3, None, None, None))
        assert isinstance(model.transform, DevicePasteTransform) == has_masks, name
        assert ("batched mask paste" in speedups.applied(model)) == has_masks, name

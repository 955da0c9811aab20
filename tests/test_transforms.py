"""Horizontal flip moves boxes and masks with the pixels."""

import torch

import transforms as T


def _sample():
    image = torch.zeros(3, 20, 30, dtype=torch.uint8)
    masks = torch.zeros(1, 20, 30, dtype=torch.uint8)
    masks[0, 5:10, 2:8] = 1
    image[:, 5:10, 2:8] = 255
    return image, {"boxes": torch.tensor([[2.0, 5.0, 8.0, 10.0]]), "masks": masks, "labels": torch.tensor([1])}


def test_flip_keeps_boxes_on_masks():
    image, target = _sample()
    flipped, out = T.RandomHorizontalFlip(p=1.0)(image, target)
    assert torch.equal(out["boxes"], torch.tensor([[22.0, 5.0, 28.0, 10.0]]))
    ys, xs = torch.nonzero(out["masks"][0], as_tuple=True)
    assert (xs.min().item(), xs.max().item() + 1) == (22, 28)
    assert torch.equal(flipped[0].bool(), out["masks"][0].bool())
    assert torch.equal(target["boxes"], torch.tensor([[2.0, 5.0, 8.0, 10.0]])), "input left untouched"


def test_no_flip_with_zero_probability():
    image, target = _sample()
    same, out = T.Compose([T.RandomHorizontalFlip(p=0.0)])(image, target)
    assert same is image and out is target

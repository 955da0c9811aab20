"""Joint transforms move boxes, masks and keypoints with the pixels."""

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


def _figure():
    """One instance with three keypoints: nose (labelled), left_eye (unlabelled), right_eye (occluded)."""
    image, target = _sample()
    target["keypoints"] = torch.tensor([[[5.0, 6.0, 2.0], [0.0, 0.0, 0.0], [3.0, 7.0, 1.0]]])
    return image, target


def test_flip_swaps_left_and_right_keypoints():
    image, target = _figure()
    _, out = T.RandomHorizontalFlip(p=1.0, keypoint_flip=[0, 2, 1])(image, target)
    nose, left_eye, right_eye = out["keypoints"][0].tolist()
    assert nose == [25.0, 6.0, 2.0]
    assert left_eye == [27.0, 7.0, 1.0], "the occluded right eye is now the left one, mirrored"
    assert right_eye == [0.0, 0.0, 0.0], "an unlabelled keypoint stays unlabelled at zero"


def test_crop_drops_what_leaves_the_window_and_unlabels_keypoints():
    image, target = _figure()
    target = {**target, "boxes": torch.tensor([[2.0, 5.0, 8.0, 10.0]]), "labels": torch.tensor([1]),
              "area": torch.tensor([30.0]), "iscrowd": torch.tensor([0])}
    out_image, out = T.crop(image, target, 0, 4, 20, 10)
    assert out_image.shape[-2:] == (20, 10)
    assert torch.equal(out["boxes"], torch.tensor([[0.0, 5.0, 4.0, 10.0]]))
    assert out["keypoints"][0].tolist() == [[1.0, 6.0, 2.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    _, gone = T.crop(image, target, 0, 12, 20, 10)
    assert all(len(gone[k]) == 0 for k in ("boxes", "labels", "masks", "keypoints", "area", "iscrowd"))


def test_place_on_canvas_shifts_everything():
    image, target = _figure()
    out_image, out = T.place(image, target, 3, 4, 30, 40, [1.0, 2.0, 3.0])
    assert out_image.shape == (3, 30, 40) and out_image[:, 0, 0].tolist() == [1, 2, 3]
    assert torch.equal(out["boxes"], torch.tensor([[6.0, 8.0, 12.0, 13.0]]))
    assert torch.equal(out["masks"][0, 3:23, 4:34], target["masks"][0])
    assert out["keypoints"][0, 0].tolist() == [9.0, 9.0, 2.0] and out["keypoints"][0, 1].tolist() == [0, 0, 0]


def test_resize_scales_boxes_masks_and_keypoints():
    image, target = _figure()
    out_image, out = T.resize(image, target, (40, 60))
    assert out_image.shape[-2:] == (40, 60) and out["masks"].shape[-2:] == (40, 60)
    assert torch.equal(out["boxes"], torch.tensor([[4.0, 10.0, 16.0, 20.0]]))
    assert out["keypoints"][0, 0].tolist() == [10.0, 12.0, 2.0]
    ys, xs = torch.nonzero(out["masks"][0], as_tuple=True)
    assert (xs.min().item(), xs.max().item() + 1, ys.min().item(), ys.max().item() + 1) == (4, 16, 10, 20)

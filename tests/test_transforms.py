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


def test_resize_scales_boxes_masks_keypoints_and_areas():
    image, target = _figure()
    out_image, out = T.resize(image, {**target, "area": torch.tensor([30.0])}, (40, 60))
    assert out["area"].tolist() == [120.0]
    assert out_image.shape[-2:] == (40, 60) and out["masks"].shape[-2:] == (40, 60)
    assert torch.equal(out["boxes"], torch.tensor([[4.0, 10.0, 16.0, 20.0]]))
    assert out["keypoints"][0, 0].tolist() == [10.0, 12.0, 2.0]
    ys, xs = torch.nonzero(out["masks"][0], as_tuple=True)
    assert (xs.min().item(), xs.max().item() + 1, ys.min().item(), ys.max().item() + 1) == (4, 16, 10, 20)


def _square_target(size: int, top: int, left: int, side: int, label: int) -> dict:
    masks = torch.zeros(1, size, size, dtype=torch.uint8)
    masks[0, top:top + side, left:left + side] = 1
    box = torch.tensor([[float(left), float(top), float(left + side), float(top + side)]])
    return {"boxes": box, "labels": torch.tensor([label]), "masks": masks, "area": torch.tensor([float(side ** 2)]),
            "iscrowd": torch.tensor([0])}


def test_copy_paste_drops_pasted_instances_left_without_pixels():
    image = torch.zeros(3, 16, 16, dtype=torch.uint8)
    target = _square_target(16, 2, 2, 4, label=1)
    empty = _square_target(16, 8, 8, 2, label=2)
    empty["masks"].zero_()  # as lsj's downscale to the nearest pixel can leave it, its box still positive
    tiny = _square_target(64, 1, 1, 1, label=3)  # the resize to the image's 16 px misses its one pixel
    for source, source_target in ((image, empty), (torch.zeros(3, 64, 64, dtype=torch.uint8), tiny)):
        _, out = T.copy_paste(image, target, source, source_target, torch.Generator().manual_seed(0))
        assert out["labels"].tolist() == [1] and len(out["masks"]) == len(out["area"]) == len(out["iscrowd"]) == 1
        assert out["boxes"].tolist() == [[2.0, 2.0, 6.0, 6.0]], "no box without extent"


def _iou_crop(boxes: list[list[float]]) -> tuple[torch.Tensor, dict]:
    """RandomIoUCrop at a fixed scale (windows of 90x90 in a 100x100 image, at a random place) that asks a
    minimum overlap of 0.5."""
    image = torch.zeros(3, 100, 100, dtype=torch.uint8)
    target = {"boxes": torch.tensor(boxes), "labels": torch.arange(1, len(boxes) + 1)}
    crop = T.RandomIoUCrop(min_scale=0.9, max_scale=0.9, options=(0.5,))
    return crop(image, target, torch.Generator().manual_seed(0))


def test_iou_crop_needs_one_held_box_to_overlap_enough():
    # Every 90x90 window holds both centres and overlaps the large box by IoU > 0.79, the small one by < 0.01:
    # SSD's rule (torchvision's) takes such a window.
    image, out = _iou_crop([[5.0, 5.0, 95.0, 95.0], [40.0, 40.0, 44.0, 44.0]])
    assert image.shape[-2:] == (90, 90) and out["labels"].tolist() == [1, 2]
    image, out = _iou_crop([[40.0, 40.0, 44.0, 44.0], [50.0, 50.0, 56.0, 56.0]])
    assert image.shape[-2:] == (100, 100), "no box overlaps enough: the image stays as it was"


def test_multiscale_holds_the_long_side_to_max_size():
    image = torch.zeros(3, 100, 1000, dtype=torch.uint8)
    target = {"boxes": torch.tensor([[0.0, 0.0, 1000.0, 100.0]]), "labels": torch.tensor([1])}
    out_image, out = T.RandomShortestSize((480,), max_size=800)(image, target)
    assert out_image.shape[-2:] == (80, 800) and out["boxes"].tolist() == [[0.0, 0.0, 800.0, 80.0]]
    out_image, _ = T.RandomShortestSize((48,), max_size=800)(image, target)
    assert out_image.shape[-2:] == (48, 480), "the short side's size where the long side stays under max_size"


def test_to_dtype_scales_bytes_to_0_1_only_when_asked():
    image, target = torch.full((3, 2, 2), 255, dtype=torch.uint8), {"labels": torch.tensor([1])}
    scaled, same = T.ToDtype(torch.float, scale=True)(image, target)
    assert scaled.dtype == torch.float32 and scaled.max() == 1.0 and same is target
    assert T.Compose([T.PILToTensor(), T.ToDtype(torch.float)])(image, target)[0].max() == 255.0

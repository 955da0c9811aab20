"""Every augmentation policy, on every backend, keeps targets true to the pixels: a property test over
generated samples (boxes in the image, masks on their boxes, keypoints on their instances, per-instance fields
of one length), plus copy-paste and the seeding of torchvision.transforms.v2."""

import pytest
import torch

import presets
import transforms as T
from coco_utils import build_dataset, coco_keypoint_names, flip_order

FLIP = flip_order(coco_keypoint_names())


@pytest.fixture(scope="module")
def samples(keypoint_dataset):
    """(image, target) pairs with masks and keypoints, straight from the files."""
    ds = build_dataset(keypoint_dataset, "coco_kp", "train", None)
    return [(ds.load_image(i), ds.load_target(i, [], with_masks=True)) for i in ds.ids]


def check_target(image, target, with_keypoints: bool = True) -> None:
    assert isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.shape[0] == 3
    height, width = image.shape[-2:]
    count = len(target["boxes"])
    for key in T.PER_INSTANCE:
        if key in target:
            assert len(target[key]) == count, key
    boxes = target["boxes"]
    assert ((boxes[:, 0::2] >= 0) & (boxes[:, 0::2] <= width)).all()
    assert ((boxes[:, 1::2] >= 0) & (boxes[:, 1::2] <= height)).all()
    assert ((boxes[:, 2:] > boxes[:, :2]).all(1)).all(), "every box has extent"
    assert target["masks"].shape[-2:] == (height, width)
    # Each mask lies within its box; the slack is for edge pixels of a polygon, magnified by upscaling.
    nonempty = target["masks"].flatten(1).bool().any(1)
    tight = T.boxes_of_masks(target["masks"])[nonempty]
    slack = 2 + 0.15 * (boxes[nonempty, 2:] - boxes[nonempty, :2]).repeat(1, 2)
    assert (tight[:, :2] >= boxes[nonempty, :2] - slack[:, :2]).all()
    assert (tight[:, 2:] <= boxes[nonempty, 2:] + slack[:, 2:]).all()
    if with_keypoints:
        points = target["keypoints"]
        labelled = points[..., 2] > 0
        assert set(points[..., 2].unique().tolist()) <= {0.0, 1.0, 2.0}
        assert (points[~labelled] == 0).all(), "unlabelled keypoints stay all zero"
        low, high = boxes[:, None, :2] - 0.02, boxes[:, None, 2:] + 0.02
        inside = ((points[..., :2] >= low) & (points[..., :2] <= high)).all(-1)
        assert inside[labelled].all(), "labelled keypoints lie on their own instance"
        # The generator draws a person's left side on the image's right; a flip that swaps the sides keeps
        # it there, one that did not would put every left joint left of its right twin.
        left = [i for i, name in enumerate(coco_keypoint_names()) if name.startswith("left")]
        right = [FLIP[i] for i in left]
        both = labelled[:, left] & labelled[:, right]
        assert (points[:, left, 0] > points[:, right, 0])[both].all(), "left and right keypoints swapped"


@pytest.mark.parametrize("policy", presets.TRAIN_AUGMENTATIONS)
@pytest.mark.parametrize("backend", ["tensor", "pil"])
def test_own_policies_keep_targets_true(samples, policy, backend):
    preset = presets.DetectionPresetTrain(policy, backend=backend, keypoint_flip=FLIP)
    labelled_before = sum(int((t["keypoints"][..., 2] > 0).sum()) for _, t in samples)
    labelled_after = 0
    for seed in range(3):
        for index, (image, target) in enumerate(samples):
            out_image, out = preset(image, target, torch.Generator().manual_seed(seed * 100 + index))
            check_target(out_image, out)
            labelled_after += int((out["keypoints"][..., 2] > 0).sum())
    assert 0 < labelled_after <= 3 * labelled_before, "cropping may drop keypoints, never make them up"


@pytest.mark.parametrize("policy", presets.TRAIN_AUGMENTATIONS)
@pytest.mark.parametrize("backend", presets.IMAGE_BACKENDS)
def test_v2_policies_keep_targets_true(samples, policy, backend):
    preset = presets.DetectionPresetTrain(policy, backend=backend, use_v2=True)
    for index, (image, target) in enumerate(samples[:4]):
        target = {k: v for k, v in target.items() if k != "keypoints"}
        out_image, out = preset(image, target, torch.Generator().manual_seed(index))
        assert type(out["boxes"]) is torch.Tensor and type(out["masks"]) is torch.Tensor
        check_target(out_image, out, with_keypoints=False)


def test_v2_draws_from_the_sample_generator_only(samples):
    preset = presets.DetectionPresetTrain("ssd", use_v2=True)
    image, target = samples[0]
    target = {k: v for k, v in target.items() if k != "keypoints"}
    first = preset(image, target, torch.Generator().manual_seed(3))
    torch.manual_seed(12345)
    again = preset(image, target, torch.Generator().manual_seed(3))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1]["boxes"], again[1]["boxes"])
    state = torch.get_rng_state()
    preset(image, target, torch.Generator().manual_seed(4))
    assert torch.equal(state, torch.get_rng_state()), "the global generator is left as it was"


def test_policies_that_resize_give_their_sizes(samples):
    image, target = samples[0]
    lsj = presets.DetectionPresetTrain("lsj")
    assert lsj(image, target, torch.Generator().manual_seed(0))[0].shape[-2:] == (1024, 1024)
    multiscale = presets.DetectionPresetTrain("multiscale")
    sides = {min(multiscale(image, target, torch.Generator().manual_seed(s))[0].shape[-2:]) for s in range(8)}
    assert sides <= set(presets.MULTISCALE_SIZES) and len(sides) > 1


def test_bad_backend_is_refused():
    with pytest.raises(ValueError, match="tv_tensor with use_v2"):
        presets.DetectionPresetTrain("hflip", backend="tv_tensor")


def test_copy_paste_moves_pixels_masks_and_boxes_together(samples):
    lsj = presets.DetectionPresetTrain("lsj", keypoint_flip=FLIP)
    (image, target), (source, source_target) = (lsj(*s, torch.Generator().manual_seed(i))
                                                for i, s in enumerate(samples[:2]))
    for t in (target, source_target):
        t.pop("keypoints")
    out_image, out = T.copy_paste(image, target, source, source_target, torch.Generator().manual_seed(0),
                                  blend=False)
    check_target(out_image, out, with_keypoints=False)
    assert any(torch.equal(out["masks"][-1], m) for m in source_target["masks"]), "the last instance is pasted"
    cover = out["masks"][-1].bool()
    assert torch.equal(out_image[:, cover], source[:, cover]), "pasted pixels come from the source"
    old = out["masks"][: len(out["masks"]) - 1]
    assert torch.equal(T.boxes_of_masks(out["masks"]), out["boxes"])
    if len(old):
        assert not (old.bool() & cover).any(), "a pasted instance covers what was under it"


@pytest.mark.parametrize("use_v2", [False, True])
def test_lsj_pads_images_with_the_mean_colour_and_masks_with_zero(use_v2):
    policy = presets.DetectionPresetTrain("lsj", use_v2=use_v2)
    target = {"boxes": torch.tensor([[10.0, 10, 30, 30]]), "labels": torch.ones(1, dtype=torch.int64),
              "masks": torch.ones(1, 60, 80, dtype=torch.uint8), "area": torch.ones(1),
              "iscrowd": torch.zeros(1, dtype=torch.int64), "image_id": 1}
    mean = torch.tensor([round(v) for v in presets.MEAN_FILL], dtype=torch.uint8)[:, None]
    padded = 0
    for seed in range(6):
        image, out = policy(torch.full((3, 60, 80), 7, dtype=torch.uint8), dict(target),
                            torch.Generator().manual_seed(seed))
        pixels = image.flatten(1)
        is_mean = (pixels == mean).all(0)
        assert not (pixels == 0).all(0).any(), "no black padding"
        assert not out["masks"].flatten(1)[:, is_mean].any(), "masks are padded with zero"
        padded += int(is_mean.any())
    assert padded >= 3, "jitter's small scales pad"

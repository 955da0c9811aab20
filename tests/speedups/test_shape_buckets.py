"""Batches padded to recurring shapes: the ladder of sizes, the hooks, and what they leave unchanged."""

import copy

import pytest
import torch

from models import MODELS, build_model
from speedups.shape_buckets import RegionPadding, bucket_length, pad_to_shape_buckets


def test_ladder_of_the_800_1333_recipe():
    sides = range(32, 1344 + 1, 32)  # every side the model's padding to 32 can give at 800-1333 px
    buckets = [bucket_length(side, 800, 1344) for side in sides]
    assert [bucket_length(side, 800, 1344) for side in (800, 801, 928, 929, 1300, 1333, 1344)] == [
        800, 928, 928, 1024, 1312, 1344, 1344]
    assert all(b >= s and b % 32 == 0 and b <= 1344 for s, b in zip(sides, buckets))
    assert buckets == sorted(buckets)
    assert all(b <= 1.13 * s + 32 for s, b in zip(sides, buckets))  # at most one rung of padding
    assert len(set(buckets)) <= 32 and len(set(buckets[sides.index(800):])) == 6


def test_sides_beyond_the_cap_are_kept():
    assert bucket_length(1400, 800, 1344) == 1400
    assert bucket_length(64, 96, 96) == 64 and bucket_length(96, 96, 96) == 96


def seen_shapes(model):
    """Records the image batch the backbone gets and the regions the mask head gets."""
    shapes = {}
    model.backbone.register_forward_pre_hook(lambda m, args: shapes.__setitem__("images", args[0].shape))
    model.roi_heads.mask_head.register_forward_pre_hook(
        lambda m, args: shapes.__setitem__("regions", args[0].shape[0]))
    model.roi_heads.mask_predictor.register_forward_hook(
        lambda m, args, out: shapes.__setitem__("logits", out.shape[0]))
    return shapes


def small_model(min_size: int = 96, max_size: int = 160, **options):
    torch.manual_seed(0)
    return build_model("maskrcnn_resnet50_fpn", 4, None, None, None, min_size=min_size, max_size=max_size,
                       **options)


def test_training_batches_are_padded_to_the_ladder_and_keep_their_image_sizes():
    transform = pad_to_shape_buckets(small_model(320, 480)).transform.train()
    images = [torch.rand(3, 160, 215), torch.rand(3, 100, 110)]
    targets = [{"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]]), "labels": torch.tensor([1])} for _ in images]
    batch, _ = transform(images, targets)
    # Resized to 320 x 430 and 320 x 352, padded to 320 x 448 by the model, then to the ladder's 320 x 480.
    assert tuple(batch.tensors.shape) == (2, 3, 320, 480)
    assert batch.image_sizes == [(320, 430), (320, 352)]
    assert batch.tensors[0, :, :, 430:].abs().max() == 0 and batch.tensors[1, :, :, 352:].abs().max() == 0
    assert tuple(transform.eval()(images)[0].tensors.shape[-2:]) == (320, 448), "evaluation: the model's own"


def test_evaluation_pads_regions_only_and_predicts_exactly_the_same():
    model = small_model(320, 480, box_score_thresh=0.0).eval()
    padded = pad_to_shape_buckets(copy.deepcopy(model))
    images = [torch.rand(3, 160, 215), torch.rand(3, 100, 110)]
    shapes = seen_shapes(padded)
    with torch.inference_mode():
        plain = model(images)
        ours = padded(images)
    assert tuple(shapes["images"][-2:]) == (320, 448)
    detections = sum(len(p["boxes"]) for p in ours)
    assert detections > 0 and shapes["regions"] % 32 == 0 and shapes["regions"] > detections
    assert shapes["logits"] == detections  # the padding is cut off before the predictions are made
    for a, b in zip(ours, plain):
        assert all(torch.equal(a[key], b[key]) for key in ("boxes", "scores", "labels", "masks"))


def test_region_padding_changes_no_number_in_training():
    model = small_model()
    images = [torch.rand(3, 96, 128), torch.rand(3, 96, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 20.0, 90.0, 90.0]]),
                "labels": torch.tensor([1, 2]),
                "masks": torch.zeros((2, 96, 128), dtype=torch.uint8)} for _ in images]
    for t in targets:
        t["masks"][0, 12:70, 10:60] = 1
        t["masks"][1, 20:90, 50:90] = 1
    padded = pad_to_shape_buckets(copy.deepcopy(model))
    padded.transform._forward_hooks.clear()  # regions only: image padding moves the numbers a little
    shapes = seen_shapes(padded)
    torch.manual_seed(1)
    expected = model(images, targets)
    torch.manual_seed(1)
    losses = padded(images, targets)
    assert shapes["regions"] % 32 == 0 and shapes["logits"] < shapes["regions"]
    for name in expected:
        assert torch.allclose(losses[name], expected[name], rtol=1e-5, atol=1e-6), name
    losses["loss_mask"].backward()
    assert padded.roi_heads.mask_head[0][0].weight.grad.abs().sum() > 0


def test_copies_keep_their_own_hooks():
    model = pad_to_shape_buckets(small_model(box_score_thresh=0.0).eval())
    clone = copy.deepcopy(model)
    shapes = seen_shapes(clone)
    with torch.inference_mode():
        detections = len(clone([torch.rand(3, 100, 130)])[0]["boxes"])
    assert shapes["regions"] == 32 * max(1, -(-detections // 32)) and shapes["logits"] == detections

    def padding_of(network):
        return next(iter(network.roi_heads.mask_head._forward_pre_hooks.values())).__self__

    assert padding_of(clone).regions == detections and padding_of(model).regions == 0


def test_region_padding_keeps_the_channels_last_layout():
    features = torch.rand(5, 8, 14, 14).to(memory_format=torch.channels_last)
    (padded,) = RegionPadding().pad(None, (features,))
    assert padded.shape == (32, 8, 14, 14) and padded.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(padded[:5], features) and padded[5:].abs().max() == 0


def test_a_head_with_batch_norm_is_padded_in_evaluation_only():
    model = pad_to_shape_buckets(build_model("maskrcnn_resnet50_fpn_v2", 3, None, None, None))
    head = model.roi_heads.mask_head
    seen = []
    head[0].register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    features = torch.rand(5, 256, 14, 14)
    head.train()(features)
    head.eval()(features)
    assert seen == [5, 32]


@pytest.mark.parametrize("name", MODELS)
def test_every_builder_takes_the_hooks(name):
    model = pad_to_shape_buckets(build_model(name, 3, None, None, None)).train()
    batch, _ = model.transform([torch.rand(3, 200, 331)], [{"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]]),
                                                           "labels": torch.tensor([1])}])
    transform = model.transform
    if transform.fixed_size is None:  # each side is a rung of the model's ladder
        anchor, cap = max(transform.min_size), -(-transform.max_size // 32) * 32
        assert all(bucket_length(side, anchor, cap) == side and side % 32 == 0 for side in batch.tensors.shape[-2:])
        assert batch.tensors.shape[-1] > batch.image_sizes[0][1]  # padded past the model's own 32
    heads = [getattr(model.roi_heads, f"{kind}_head") for kind in ("mask", "keypoint")
             if getattr(getattr(model, "roi_heads", None), f"{kind}_head", None) is not None]
    assert all(len(head._forward_pre_hooks) == 1 for head in heads)

"""The mask branch with the matched class's logits only: torchvision's losses and gradients, without every class's
logits, in training only."""

import copy

import torch
from torch import nn
from torchvision.models.detection import roi_heads as torchvision_roi_heads

import speedups
from models import build_model
from speedups import matched_class_masks, shape_buckets
from speedups.matched_class_masks import (
    MatchedClassMasksMixin,
    detections,
    example_batch,
    example_heads,
    losses_and_gradients,
    use_matched_class_masks,
)


def both_ways(box_counts=(5, 0, 3), num_classes: int = 6, seed: int = 1):
    """(losses, gradients) of the heads with the speed-up, then of torchvision's, on one example batch."""
    torch.manual_seed(0)
    plain = example_heads(num_classes)
    fast = use_matched_class_masks(copy.deepcopy(plain))
    assert isinstance(fast, MatchedClassMasksMixin) and not isinstance(plain, MatchedClassMasksMixin)
    batch = example_batch(torch.Generator().manual_seed(seed), box_counts, num_classes)
    return [losses_and_gradients(heads, batch, 2) for heads in (fast, plain)]


def assert_same(got, want) -> None:
    (got_losses, got_gradients), (want_losses, want_gradients) = got, want
    assert list(got_losses) == list(want_losses) == ["loss_classifier", "loss_box_reg", "loss_mask"]
    for name in want_losses:
        torch.testing.assert_close(got_losses[name], want_losses[name], rtol=1e-5, atol=1e-7)
    for a, b in zip(got_gradients, want_gradients, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_the_self_check_passes_on_this_torchvision():
    assert matched_class_masks.self_check() is None


def test_losses_and_gradients_are_torchvisions_with_many_classes():
    got, want = both_ways((9, 4, 0, 12), num_classes=300, seed=5)
    assert_same(got, want)
    assert got[0]["loss_mask"] > 0
    # Only the classes that regions matched have gradients in the last layer's weight.
    weight_gradient = got[1][[name for name, _ in example_heads(300).named_parameters()].index(
        "mask_predictor.mask_fcn_logits.weight")]
    assert 0 < int((weight_gradient.flatten(1).abs().sum(1) > 0).sum()) <= 25


def test_without_positive_regions_the_loss_is_zero_and_every_mask_weight_gets_a_zero_gradient():
    got, want = both_ways((0, 0))
    assert_same(got, want)
    assert got[0]["loss_mask"] == 0
    mask_gradients = [g for (name, _), g in zip(example_heads().named_parameters(), got[1]) if name.startswith("mask")]
    assert mask_gradients and all(not g.any() for g in mask_gradients)


def test_the_full_logits_are_never_made_and_evaluation_gives_torchvisions_detections():
    torch.manual_seed(0)
    plain = example_heads(40)
    plain.score_thresh = 0.0  # every class's score of every region is about 1/40
    fast = use_matched_class_masks(copy.deepcopy(plain))
    calls = []
    fast.mask_predictor.mask_fcn_logits.register_forward_hook(lambda *_: calls.append(1))
    batch = example_batch(torch.Generator().manual_seed(3), (6, 0, 2), 40)
    fast.train()(*batch)
    ours, theirs = detections(fast, batch), detections(plain, batch)
    assert calls == [], "neither in training nor in evaluation"
    assert all(len(d["labels"]) for d in theirs) and len(set(torch.cat([d["labels"] for d in theirs]).tolist())) > 5
    for a, b in zip(ours, theirs, strict=True):
        assert list(a) == list(b) == ["boxes", "labels", "scores", "masks"]
        for key in ("boxes", "labels", "scores"):
            assert torch.equal(a[key], b[key]), key
        torch.testing.assert_close(a["masks"], b["masks"], rtol=1e-5, atol=1e-6)


def test_a_predictor_the_branch_cannot_read_keeps_torchvisions_forward():
    """A predictor whose last layer is not a plain 1x1 convolution is not taken; one swapped in after the speed-up
    (fine-tuning code replacing the head) is run by torchvision's forward."""
    heads = example_heads()
    heads.mask_predictor.mask_fcn_logits = nn.Conv2d(8, 6, 3, padding=1)
    assert not isinstance(use_matched_class_masks(heads), MatchedClassMasksMixin)

    torch.manual_seed(0)
    plain = example_heads()
    fast = use_matched_class_masks(copy.deepcopy(plain))
    for heads in (plain, fast):
        heads.mask_predictor = nn.Sequential(nn.ConvTranspose2d(8, 8, 2, 2), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1))
    fast.mask_predictor.load_state_dict(plain.mask_predictor.state_dict())
    batch = example_batch(torch.Generator().manual_seed(4))
    assert_same(*(losses_and_gradients(heads, batch, 2) for heads in (fast, plain)))


def test_a_changed_torchvision_mask_loss_is_found_by_the_self_check(monkeypatch):
    """Were torchvision's mask loss to change, the branch computed apart would no longer be its: the speed-up stays
    off."""
    original = torchvision_roi_heads.maskrcnn_loss
    monkeypatch.setattr(torchvision_roi_heads, "maskrcnn_loss", lambda *args: 2 * original(*args))
    assert matched_class_masks.self_check() == ("the matched-class mask branch gives other losses than "
                                                "torchvision's RoIHeads")


def test_under_autocast_the_losses_are_torchvisions_to_bfloat16_rounding():
    torch.manual_seed(0)
    plain = example_heads(30)
    fast = use_matched_class_masks(copy.deepcopy(plain))
    batch = example_batch(torch.Generator().manual_seed(6), (7, 3), 30)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (got, _), (want, _) = (losses_and_gradients(heads, batch, 2) for heads in (fast, plain))
    torch.testing.assert_close(got["loss_mask"], want["loss_mask"], rtol=2e-2, atol=1e-3)


def test_a_mask_rcnn_takes_it_and_other_models_do_not():
    names = {model: speedups.applied(speedups.for_training(build_model(model, 5, None, None, None),
                                                           torch.device("cpu"), speedups.SpeedupConfig()))
             for model in ("maskrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn")}
    taken = {model for model, applied in names.items() if "mask logits of each region's class only" in applied}
    assert taken == {"maskrcnn_resnet50_fpn"}


def test_with_shape_buckets_padding_the_regions_the_losses_and_gradients_are_torchvisions():
    """Shape buckets pad the mask head's regions with empty ones and cut the predictor's output, which the branch
    does not call: it cuts them itself."""
    torch.manual_seed(0)
    plain = example_heads(20)
    fast = use_matched_class_masks(copy.deepcopy(plain))
    for heads in (plain, fast):
        shape_buckets.pad_head_regions(heads)
    batch = example_batch(torch.Generator().manual_seed(7), (6, 3), 20)
    got, want = (losses_and_gradients(heads, batch, 2) for heads in (fast, plain))
    assert_same(got, want)
    assert got[0]["loss_mask"] > 0


def test_gradients_come_back_in_the_parameters_own_strides_in_the_channels_last_layout():
    """DDP's buckets take each gradient in its parameter's strides; another layout is copied, with a warning."""
    torch.manual_seed(0)
    heads = use_matched_class_masks(example_heads(12).to(memory_format=torch.channels_last))
    last = heads.mask_predictor.mask_fcn_logits.weight
    assert last.stride() != torch.empty(last.shape).stride(), "the example's weight is channels-last"
    losses_and_gradients(heads, example_batch(torch.Generator().manual_seed(8), (5, 2), 12), 2)
    assert [name for name, p in heads.named_parameters() if p.grad.stride() != p.stride()] == []


def _backward_nodes(tensor: torch.Tensor) -> set[str]:
    """The names of the autograd nodes tensor was computed through."""
    seen, names, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack += [next_node for next_node, _ in node.next_functions]
    return names


def test_the_features_are_cut_only_where_regions_were_padded():
    """A slice's backward fills and copies the features' whole gradient, in the contiguous layout."""
    torch.manual_seed(0)
    predictor = example_heads(9).mask_predictor
    features = torch.randn(5, 8, 14, 14, requires_grad=True)
    classes = torch.tensor([1, 2, 3, 4, 5])
    assert "SliceBackward0" not in _backward_nodes(matched_class_masks.matched_class_logits(predictor, features,
                                                                                            classes))
    padded = torch.cat([features, torch.zeros(3, 8, 14, 14)])
    logits = matched_class_masks.matched_class_logits(predictor, padded, classes)
    assert logits.shape == (5, 28, 28) and "SliceBackward0" in _backward_nodes(logits)

"""Batch norms folded into convolutions: baked for evaluation, applied through the weights in training."""

import copy

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from conftest import with_speedups
from models import MODELS, build_model
from speedups.norm_folding import (
    FoldedFrozenBatchNorm2d,
    FrozenNormConv2d,
    fold_batch_norms,
    fold_frozen_norms,
    unfold_frozen_norms,
)


def norms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]


def with_random_statistics(model: nn.Module) -> nn.Module:
    """Batch norms that are far from the identity, so a wrong fold cannot pass unseen (and initialised
    convolutions: the pretrained layout leaves them as read, here unread)."""
    generator = torch.Generator().manual_seed(0)
    for conv in model.modules():
        if isinstance(conv, nn.Conv2d):
            conv.reset_parameters()
    for norm in norms(model):
        for name, low, high in (("weight", 0.5, 1.5), ("bias", -0.5, 0.5), ("running_mean", -0.5, 0.5),
                                ("running_var", 0.3, 2.0)):
            tensor = getattr(norm, name)
            with torch.no_grad():
                tensor.copy_(torch.empty(tensor.shape).uniform_(low, high, generator=generator))
    return model.eval()


def assert_close(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        scale = a[key].abs().max().clamp(min=1)
        torch.testing.assert_close(a[key] / scale, b[key] / scale, rtol=0, atol=1e-4)


# Each layout of batch norm the detection builders make from scratch: ResNet blocks, MobileNet's
# conv-norm-activation blocks and the v2 FPN (the pretrained layout's frozen norms: further down).
@pytest.mark.parametrize("name", ["maskrcnn_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_fpn",
                                  "maskrcnn_resnet50_fpn_v2"])
def test_folded_backbone_gives_the_same_features(name):
    torch.manual_seed(0)
    model = with_random_statistics(build_model(name, 5, None, None, None))
    image = torch.rand(1, 3, 96, 128)
    found = len(norms(model.backbone))
    with torch.no_grad():
        expected = model.backbone(image)
        assert fold_batch_norms(model.backbone) == found > 0
        got = model.backbone(image)
    assert not norms(model.backbone)
    assert_close(expected, got)


def test_folded_heads_give_the_same_outputs():
    torch.manual_seed(0)
    model = with_random_statistics(build_model("maskrcnn_resnet50_fpn_v2", 5, None, None, None))
    heads = model.roi_heads
    pooled_boxes, pooled_masks = torch.rand(8, 256, 7, 7), torch.rand(8, 256, 14, 14)
    with torch.no_grad():
        expected = {"box": heads.box_head(pooled_boxes), "mask": heads.mask_head(pooled_masks)}
        assert fold_batch_norms(heads) == 8  # four convolutions in each head
        got = {"box": heads.box_head(pooled_boxes), "mask": heads.mask_head(pooled_masks)}
    assert not norms(heads)
    assert_close(expected, got)


def test_norms_not_right_after_a_convolution_stay():
    block = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
    assert fold_batch_norms(block) == 0
    assert len(norms(block)) == 2




def pretrained_layout_pair(name: str) -> tuple[nn.Module, nn.Module]:
    """A pretrained-layout model as built (frozen norms folded for training) with random statistics, and a
    copy with the plain convolution-then-norm modules of torchvision, both in training mode."""
    torch.manual_seed(0)
    folded = with_random_statistics(with_speedups(build_model(name, 5, None, None, None, pretrained_layout=True)))
    folded.train()
    return folded, unfold_frozen_norms(copy.deepcopy(folded))


def features_and_gradients(model: nn.Module, image: torch.Tensor) -> tuple[dict, dict]:
    features = model.backbone(image)
    sum(f.square().mean() for f in features.values()).backward()
    return ({k: v.detach() for k, v in features.items()},
            {n: p.grad for n, p in model.backbone.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("name, pairs", [("maskrcnn_resnet50_fpn", 53), ("fasterrcnn_mobilenet_v3_large_fpn", 46)])
def test_training_fold_gives_the_same_features_and_gradients(name, pairs):
    folded, plain = pretrained_layout_pair(name)
    assert sum(isinstance(m, FrozenNormConv2d) for m in folded.modules()) == pairs
    assert not any(type(m) is FrozenBatchNorm2d for m in folded.modules())  # every frozen norm is folded
    assert not any(isinstance(m, (FrozenNormConv2d, FoldedFrozenBatchNorm2d)) for m in plain.modules())
    image = torch.rand(2, 3, 96, 128)
    expected_features, expected_grads = features_and_gradients(plain, image)
    features, grads = features_and_gradients(folded, image)
    assert_close(expected_features, features)
    assert len(grads) > 0
    assert_close(expected_grads, grads)


def test_training_fold_keeps_parameters_buffers_and_state_dict_keys():
    torch.manual_seed(0)
    model = with_speedups(build_model("maskrcnn_resnet50_fpn", 5, None, None, None, pretrained_layout=True))
    parameters = list(model.parameters())
    state = model.state_dict()
    unfold_frozen_norms(model)
    assert list(model.parameters()) == parameters
    assert list(model.state_dict()) == list(state)
    assert fold_frozen_norms(model) is model
    assert list(model.state_dict()) == list(state)
    assert model.backbone.body.conv1.frozen_norm is model.backbone.body.bn1
    assert fold_frozen_norms(model) is model  # a second call changes nothing
    assert sum(isinstance(m, FrozenNormConv2d) for m in model.modules()) == 53


def test_training_fold_follows_statistics_loaded_later_and_copies():
    folded, plain = pretrained_layout_pair("maskrcnn_resnet50_fpn")
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert_close(plain.backbone(image), folded.backbone(image))  # the norms' scales are now cached
        for norm in norms(plain):
            norm.running_var.mul_(3)
            norm.bias.add_(0.5)
        assert not torch.allclose(plain.backbone(image)["0"], folded.backbone(image)["0"])
        folded.load_state_dict(plain.state_dict())
        assert_close(plain.backbone(image), folded.backbone(image))
        twin = copy.deepcopy(folded)
        assert twin.backbone.body.conv1.frozen_norm is twin.backbone.body.bn1
        twin.backbone.body.bn1.running_var.mul_(4)
        assert not torch.allclose(twin.backbone(image)["0"], folded.backbone(image)["0"])
        assert_close(plain.backbone(image), folded.backbone(image))


def test_training_fold_keeps_the_backbone_in_autocast_precision():
    """torchvision's frozen norm multiplies a half-precision convolution output by float32 statistics, so
    every backbone activation is promoted to float32 under autocast; folded, they stay in bfloat16."""
    folded, plain = pretrained_layout_pair("maskrcnn_resnet50_fpn")
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert {f.dtype for f in plain.backbone.body(image).values()} == {torch.float32}
        assert {f.dtype for f in folded.backbone.body(image).values()} == {torch.bfloat16}


def test_evaluation_fold_of_a_training_folded_model():
    folded, plain = pretrained_layout_pair("maskrcnn_resnet50_fpn")
    folded.eval()
    plain.eval()
    image = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        expected = plain.backbone(image)
        assert fold_batch_norms(folded.backbone) == 53
        got = folded.backbone(image)
    assert not norms(folded.backbone)
    assert not any(isinstance(m, FrozenNormConv2d) for m in folded.modules())
    assert_close(expected, got)


def test_every_frozen_norm_of_every_builder_is_folded():
    folded = {}
    for name in MODELS:
        model = with_speedups(build_model(name, 5, None, None, None, pretrained_layout=True))
        assert not any(type(m) is FrozenBatchNorm2d for m in model.modules()), name
        folded[name] = sum(isinstance(m, FoldedFrozenBatchNorm2d) for m in model.modules())
    assert folded["maskrcnn_resnet50_fpn"] == folded["retinanet_resnet50_fpn"] == folded["fcos_resnet50_fpn"] == 53
    assert folded["fasterrcnn_mobilenet_v3_large_fpn"] == 46

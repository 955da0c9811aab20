"""Model building and offline weight loading from the torch hub cache or a path."""

import pytest
import torch
import torchvision

from models import build_model, hub_cache_path, load_model_weights, resolve_weights
from utils import UserError

SMALL = {"min_size": 64, "max_size": 64}


def test_backbone_weights_come_from_the_hub_cache(torch_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    path = resolve_weights("ResNet50_Weights.IMAGENET1K_V1", "--weights-backbone")
    assert path == torch_home / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    model = build_model("maskrcnn_resnet50_fpn", 5, None, "ResNet50_Weights.IMAGENET1K_V1", None, **SMALL)
    expected = torch.load(path, weights_only=True)["layer4.2.conv3.weight"]
    assert torch.equal(model.backbone.body.layer4[2].conv3.weight, expected)
    assert isinstance(model.backbone.body.bn1, torchvision.ops.FrozenBatchNorm2d)
    trainable = {n.split(".")[0] for n, p in model.backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}


def test_missing_hub_file_names_path_address_and_ways_out(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError) as err:
        build_model("maskrcnn_resnet50_fpn", 5, None, "ResNet50_Weights.IMAGENET1K_V1", None, **SMALL)
    message = str(err.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth") in message
    assert "https://download.pytorch.org/models/resnet50-0676ba61.pth" in message
    assert "--weights-backbone none" in message and "\n" not in message


def test_missing_coco_weights_same_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match="maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth is missing"):
        build_model("maskrcnn_resnet50_fpn", 91, "MaskRCNN_ResNet50_FPN_Weights.COCO_V1", None, None)
    assert hub_cache_path("https://x/y/z.pth") == tmp_path / "hub" / "checkpoints" / "z.pth"


def test_unknown_weights_name_and_missing_path():
    with pytest.raises(UserError, match="neither a file nor a torchvision weights name"):
        resolve_weights("NoSuchWeights.V9", "--weights")
    with pytest.raises(UserError, match="no such file"):
        resolve_weights("/nowhere/model.pth", "--weights")


def test_whole_model_weights_from_path_with_fresh_class_heads(tmp_path):
    torch.manual_seed(0)
    source = build_model("maskrcnn_resnet50_fpn", 91, None, None, None, **SMALL)
    torch.save(source.state_dict(), tmp_path / "coco.pth")
    model = build_model("maskrcnn_resnet50_fpn", 5, str(tmp_path / "coco.pth"), None, None, **SMALL)
    assert torch.equal(model.rpn.head.conv[0][0].weight, source.rpn.head.conv[0][0].weight)
    assert model.roi_heads.box_predictor.cls_score.out_features == 5


def test_mismatch_names_first_key():
    model = build_model("maskrcnn_resnet50_fpn", 5, None, None, None, **SMALL)
    state = model.state_dict()
    state["rpn.head.cls_logits.weight"] = torch.zeros(1, 256, 1, 1)
    with pytest.raises(UserError, match="rpn.head.cls_logits.weight has shape"):
        load_model_weights(model, state, "--resume x")
    del state["rpn.head.cls_logits.weight"]
    with pytest.raises(UserError, match="no tensor rpn.head.cls_logits.weight"):
        load_model_weights(model, state, "--resume x")


def test_unknown_model():
    with pytest.raises(UserError, match="--model nope"):
        build_model("nope", 5, None, None, None)

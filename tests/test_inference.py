"""The model copy that evaluation and prediction run."""

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from inference import inference_copy
from models import build_model
from norm_folding import FrozenNormConv2d


def norms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]


def test_copy_for_inference_leaves_the_training_model_alone():
    torch.manual_seed(0)
    model = build_model("maskrcnn_resnet50_fpn", 5, None, None, None).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p.requires_grad for p in model.parameters()]

    copy = inference_copy(model, channels_last=True)

    assert model.training and len(norms(model)) == 53
    assert [p.requires_grad for p in model.parameters()] == trainable
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not copy.training and not norms(copy.backbone)
    assert not any(p.requires_grad for p in copy.parameters())
    assert copy.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_copy_for_inference_keeps_the_training_models_folded_frozen_norms():
    model = build_model("maskrcnn_resnet50_fpn", 5, None, None, None, pretrained_layout=True)
    copy = inference_copy(model, channels_last=False)
    assert sum(isinstance(m, FrozenNormConv2d) for m in model.modules()) == 53
    assert model.backbone.body.conv1.frozen_norm is model.backbone.body.bn1
    assert not norms(copy.backbone)
    assert not any(isinstance(m, FrozenNormConv2d) for m in copy.modules())

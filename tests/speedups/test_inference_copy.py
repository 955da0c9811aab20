"""The model copy that evaluation and prediction run."""

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import speedups
from conftest import with_speedups
from models import build_model
from speedups.norm_folding import FrozenNormConv2d

CPU = torch.device("cpu")


def norms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]


def test_copy_for_inference_leaves_the_training_model_alone():
    torch.manual_seed(0)
    model = build_model("maskrcnn_resnet50_fpn", 5, None, None, None).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p.requires_grad for p in model.parameters()]

    copy = speedups.for_inference(model, CPU, speedups.SpeedupConfig(channels_last=True))

    assert model.training and len(norms(model)) == 53
    assert [p.requires_grad for p in model.parameters()] == trainable
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not copy.training and not norms(copy.backbone)
    assert not any(p.requires_grad for p in copy.parameters())
    assert copy.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not speedups.applied(model) and "batch norms folded for inference" in speedups.applied(copy)


def test_copy_for_inference_keeps_the_training_models_folded_frozen_norms():
    model = with_speedups(build_model("maskrcnn_resnet50_fpn", 5, None, None, None, pretrained_layout=True))
    copy = speedups.for_inference(model, CPU, speedups.SpeedupConfig(channels_last=False))
    assert sum(isinstance(m, FrozenNormConv2d) for m in model.modules()) == 53
    assert model.backbone.body.conv1.frozen_norm is model.backbone.body.bn1
    assert not norms(copy.backbone)
    assert not any(isinstance(m, FrozenNormConv2d) for m in copy.modules())
    # The other speed-ups' mixins stay on the unfolded convolutions, as speedups.applied(copy) says.
    trained, inferring = model.backbone.body.layer3[1].conv2, copy.backbone.body.layer3[1].conv2
    mixins = [c for c in type(trained).__mro__ if not issubclass(c, nn.Module)]
    assert mixins and [c for c in type(inferring).__mro__ if not issubclass(c, nn.Module)] == mixins
    assert type(inferring).__name__ == type(trained).__name__.removeprefix("FrozenNorm")


def test_without_speedups_the_model_itself_runs():
    model = build_model("maskrcnn_resnet50_fpn", 5, None, None, None).train()
    assert speedups.for_inference(model, CPU, speedups.PLAIN) is model and not model.training
    assert speedups.for_training(model, CPU, speedups.PLAIN) is model and not speedups.applied(model)

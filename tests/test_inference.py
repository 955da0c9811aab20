import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from inference import fold_batch_norms, inference_copy
from models import build_model


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


# Each layout of batch norm the detection builders make: ResNet blocks with batch norm (from scratch) and
# with frozen batch norm (pretrained layout), MobileNet's conv-norm-activation blocks, and the v2 FPN.
@pytest.mark.parametrize("name, pretrained_layout", [
    ("maskrcnn_resnet50_fpn", False),
    ("maskrcnn_resnet50_fpn", True),
    ("fasterrcnn_mobilenet_v3_large_fpn", False),
    ("maskrcnn_resnet50_fpn_v2", False),
])
def test_folded_backbone_gives_the_same_features(name, pretrained_layout):
    torch.manual_seed(0)
    model = with_random_statistics(build_model(name, 5, None, None, None, pretrained_layout=pretrained_layout))
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

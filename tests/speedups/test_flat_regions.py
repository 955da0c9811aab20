"""The inference copy's box head reads channels-last regions in place and gives torchvision's TwoMLPHead's output
to float rounding; anything else runs torchvision's forward."""

import copy

import pytest
import torch
from torchvision.models.detection.faster_rcnn import TwoMLPHead

import speedups
from models import build_model
from speedups import flat_regions
from speedups.flat_regions import FlatRegionsMixin, read_regions_in_place

CPU = torch.device("cpu")
KEPT = "_kept_fc6_weight"


class Detector(torch.nn.Module):
    """Just enough of an R-CNN for read_regions_in_place: a box head under roi_heads."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.roi_heads = torch.nn.Module()
        self.roi_heads.box_head = head


def heads(channels: int = 16, size: int = 7) -> tuple[TwoMLPHead, TwoMLPHead]:
    torch.manual_seed(0)
    plain = TwoMLPHead(channels * size * size, 32).requires_grad_(False)
    fast = read_regions_in_place(Detector(copy.deepcopy(plain))).roi_heads.box_head
    return plain, fast


def regions(count: int = 40, channels: int = 16, size: int = 7) -> torch.Tensor:
    return torch.randn((count, size, size, channels), generator=torch.Generator().manual_seed(1)).permute(0, 3, 1, 2)


def test_channels_last_regions_go_in_as_a_view_with_torchvisions_output():
    plain, fast = heads()
    x = regions()
    assert isinstance(fast, FlatRegionsMixin) and not x.is_contiguous()
    expected = plain(x)
    torch.testing.assert_close(fast(x), expected, rtol=0, atol=1e-6 * expected.abs().max().item())
    assert vars(fast)[KEPT][(16, 7, 7)][2].shape == plain.fc6.weight.shape


@pytest.mark.parametrize("case", ["standard layout", "weights take gradients"])
def test_anything_else_runs_torchvisions_forward(case):
    plain, fast = heads()
    x = regions()
    if case == "standard layout":
        x = x.contiguous()
    else:
        plain.requires_grad_(True)
        fast.requires_grad_(True)
    assert torch.equal(fast(x), plain(x))
    assert KEPT not in vars(fast)


def test_the_kept_weight_follows_a_load():
    plain, fast = heads()
    x = regions()
    fast(x)
    kept = vars(fast)[KEPT][(16, 7, 7)][2]
    with torch.no_grad():
        plain.fc6.weight.mul_(-2)
    fast.load_state_dict(plain.state_dict())
    expected = plain(x)
    torch.testing.assert_close(fast(x), expected, rtol=0, atol=1e-6 * expected.abs().max().item())
    assert vars(fast)[KEPT][(16, 7, 7)][2] is not kept


def test_the_inference_copy_of_an_rcnn_reads_regions_in_place_and_detects_as_torchvision():
    torch.manual_seed(0)
    model = build_model("maskrcnn_resnet50_fpn", 5, None, None, None, min_size=128, max_size=160).eval()
    fast = speedups.for_inference(model, CPU, speedups.SpeedupConfig())
    assert "box head reads channels-last regions in place" in speedups.applied(fast)
    images = [torch.rand((3, 128, 150), generator=torch.Generator().manual_seed(2))]
    with torch.no_grad():
        expected, got = model(images)[0], fast(images)[0]
    assert KEPT in vars(fast.roi_heads.box_head) and len(expected["boxes"]) > 0
    torch.testing.assert_close(got["scores"], expected["scores"], rtol=0, atol=1e-4)
    torch.testing.assert_close(got["boxes"], expected["boxes"], rtol=0, atol=1e-2)


@pytest.mark.parametrize("name", ["fasterrcnn_resnet50_fpn_v2", "retinanet_resnet50_fpn"])
def test_models_without_torchvisions_two_layer_head_do_not_claim_it(name):
    model = build_model(name, 5, None, None, None, min_size=128, max_size=160)
    fast = speedups.for_inference(model, CPU, speedups.SpeedupConfig())
    assert "box head reads channels-last regions in place" not in speedups.applied(fast)


def test_without_the_sparse_pooler_the_head_is_left_alone(monkeypatch):
    # As when the sparse pooler's self-check fails: torchvision's pooler gives regions in the standard layout.
    monkeypatch.setattr(speedups, "_problem", lambda speedup: "off" if speedup is speedups.SPARSE_ROI_ALIGN else None)
    model = build_model("fasterrcnn_resnet50_fpn", 5, None, None, None, min_size=128, max_size=160)
    fast = speedups.for_inference(model, CPU, speedups.SpeedupConfig())
    assert "sparse RoIAlign on the CPU" not in speedups.applied(fast)
    assert not isinstance(fast.roi_heads.box_head, FlatRegionsMixin)


def test_self_check_passes_on_this_torchvision():
    assert flat_regions.self_check() is None

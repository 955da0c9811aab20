"""The box coder without blocking copies to the device: torchvision's encoded and decoded boxes exactly, its
weights made once, and no tensor made from host numbers when decoding."""

import sys

import pytest
import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder

from conftest import ROOT, with_speedups
from models import build_model
from speedups import coder_constants
from speedups.coder_constants import KeptConstantsCoderMixin, coded_both_ways, example_codes, keep_coder_constants

sys.path.insert(0, str(ROOT / "bench"))
from bench_train import MADE_ON_DEVICE, OperatorCounter  # noqa: E402


def kept(weights=(10.0, 10.0, 5.0, 5.0)) -> BoxCoder:
    holder = torch.nn.Module()
    holder.box_coder = BoxCoder(weights)
    return keep_coder_constants(holder).box_coder


def assert_same(got, want):
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (3.0, 7.0, 1.5, 0.3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_the_same_boxes_as_torchvision(seed, weights, dtype):
    assert_same(*coded_both_ways(kept(weights), *example_codes(torch.Generator().manual_seed(seed), dtype)))


def test_the_example_reaches_the_cap_and_no_boxes_decode_to_none():
    reference, proposals, codes = example_codes(torch.Generator().manual_seed(0))
    coder = kept()
    assert (codes[:, 2::4] / 5.0 > coder.bbox_xform_clip).any()
    assert_same(*coded_both_ways(coder, reference[:0], proposals[:0], codes[:0]))


def test_no_tensors_made_on_the_device_after_the_first_encoding():
    reference, proposals, codes = example_codes(torch.Generator().manual_seed(0))
    counts = []
    for coder in (BoxCoder((10.0, 10.0, 5.0, 5.0)), kept()):
        for _ in range(2):
            with OperatorCounter() as counter:
                counter.active = True
                coder.encode_single(reference, proposals)
                coder.decode_single(codes, proposals)
            counts.append(counter.counts[MADE_ON_DEVICE])
    assert counts == [3, 3, 1, 0]


def test_weights_made_in_inference_mode_are_not_reused_in_training():
    reference, proposals, _ = example_codes(torch.Generator().manual_seed(0))
    coder = kept()
    with torch.inference_mode():
        coder.encode_single(reference, proposals)
    proposals.requires_grad_()
    coder.encode_single(reference, proposals).sum().backward()  # would raise with an inference tensor saved
    assert len(coder.kept_weights) == 2


def test_an_exported_graph_keeps_torchvisions_code(monkeypatch):
    reference, proposals, codes = example_codes(torch.Generator().manual_seed(1))
    monkeypatch.setattr(torchvision, "_is_tracing", lambda: True)
    monkeypatch.setattr(coder_constants, "encode_boxes", None)  # would fail if called
    coder = kept()
    assert_same(*coded_both_ways(coder, reference, proposals, codes))
    assert "kept_weights" not in coder.__dict__


def test_self_check_finds_a_different_formula(monkeypatch):
    assert coder_constants.self_check() is None
    monkeypatch.setattr(KeptConstantsCoderMixin, "decode_single",
                        lambda self, codes, boxes: BoxCoder.decode_single(self, codes, boxes).roll(1, dims=1))
    assert "other boxes" in coder_constants.self_check()


def test_a_coder_with_its_own_decoding_keeps_it():
    own = type("OwnCoder", (BoxCoder,), {"decode_single": lambda self, codes, boxes: boxes})
    holder = torch.nn.Module()
    holder.box_coder = own((1.0, 1.0, 1.0, 1.0))
    assert type(keep_coder_constants(holder).box_coder) is own


@pytest.mark.parametrize("name", ["maskrcnn_resnet50_fpn", "retinanet_resnet50_fpn"])
def test_models_get_it_and_without_speedups_not(name):
    model = with_speedups(build_model(name, 3, None, None, None))
    coders = [m.box_coder for m in model.modules() if isinstance(getattr(m, "box_coder", None), BoxCoder)]
    assert coders and all(isinstance(c, KeptConstantsCoderMixin) for c in coders)
    plain = build_model(name, 3, None, None, None)
    assert all(type(m.box_coder) is BoxCoder for m in plain.modules() if hasattr(m, "box_coder"))

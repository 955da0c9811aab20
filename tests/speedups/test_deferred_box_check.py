"""The training forward's box check read after the RPN: torchvision's losses and errors, with no wait for the
device before the backbone."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from conftest import with_speedups
from models import build_model
from speedups import deferred_box_check
from speedups.deferred_box_check import DeferredBoxCheckMixin, defer_box_check, example_batch, example_model, outcome


@pytest.mark.parametrize("degenerate", [False, True])
def test_torchvisions_losses_and_error(degenerate):
    got, want = outcome(defer_box_check(example_model()), degenerate), outcome(example_model(), degenerate)
    if degenerate:
        assert got == want and "Found invalid box" in got and "index 1" in got
    else:
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


class SyncsBeforeBackbone(TorchDispatchMode):
    """Counts the operators that read a result on the host, before and after the model's backbone starts."""

    def __init__(self, model):
        super().__init__()
        self.before, self.after, self.reached = 0, 0, False
        model.backbone.register_forward_pre_hook(lambda module, args: setattr(self, "reached", True))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).split(".")[1] in ("_local_scalar_dense", "is_nonzero", "nonzero"):
            if self.reached:
                self.after += 1
            else:
                self.before += 1
        return func(*args, **(kwargs or {}))


def test_no_wait_before_the_backbone_and_one_after(monkeypatch):
    # The transform draws its size from a CPU tensor, read on the host without waiting for any device.
    monkeypatch.setattr(GeneralizedRCNNTransform, "torch_choice", lambda self, sizes: sizes[0])
    counts = []
    for model in (example_model(), defer_box_check(example_model())):
        with SyncsBeforeBackbone(model) as counter:
            model(*example_batch())
        counts.append((counter.before, counter.after))
    assert counts == [(2, 0), (0, 1)]  # torchvision's: one an image


def test_evaluation_and_refused_targets_take_torchvisions_forward(monkeypatch):
    model = defer_box_check(example_model())
    monkeypatch.setattr(deferred_box_check, "any_degenerate", None)  # would fail if called
    model.eval()(*example_batch())
    model.train()
    with pytest.raises(AssertionError, match="targets should not be none"):
        model(example_batch()[0])
    images, targets = example_batch()
    targets[0]["boxes"] = targets[0]["boxes"].flatten()
    with pytest.raises(AssertionError, match=r"Expected target boxes to be a tensor of shape \[N, 4\]"):
        model(images, targets)


def test_self_check_finds_a_check_that_misses_boxes(monkeypatch):
    assert deferred_box_check.self_check() is None
    monkeypatch.setattr(deferred_box_check, "any_degenerate", lambda targets: torch.tensor(False))
    assert "other losses or errors" in deferred_box_check.self_check()


def test_a_model_with_its_own_forward_keeps_it():
    own = type("OwnForward", (GeneralizedRCNN,), {"forward": lambda self, images, targets=None: {}})
    model = own(*[torch.nn.Identity()] * 4)
    assert type(defer_box_check(model)) is own


def test_r_cnns_get_it_and_other_models_or_no_speedups_not():
    assert isinstance(with_speedups(build_model("maskrcnn_resnet50_fpn", 3, None, None, None)),
                      DeferredBoxCheckMixin)
    assert not isinstance(with_speedups(build_model("retinanet_resnet50_fpn", 3, None, None, None)),
                          DeferredBoxCheckMixin)
    assert type(build_model("maskrcnn_resnet50_fpn", 3, None, None, None)).forward is GeneralizedRCNN.forward

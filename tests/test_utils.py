import pytest
import torch

import utils
from errors import UserError
from models import build_model


def test_only_the_frozen_norms_buffers_never_change_in_training():
    pretrained_layout = build_model("maskrcnn_resnet50_fpn", 5, None, None, None, pretrained_layout=True)
    assert not utils.buffers_change_in_training(pretrained_layout)
    assert utils.buffers_change_in_training(build_model("maskrcnn_resnet50_fpn", 5, None, None, None))
    pretrained_layout.roi_heads.register_buffer("count", torch.zeros(1))
    assert utils.buffers_change_in_training(pretrained_layout)


def test_versions_older_than_the_floor_are_one_clear_error(monkeypatch):
    utils.check_versions()  # the installed ones pass
    monkeypatch.setattr(torch, "__version__", "2.10.0+cu128")
    with pytest.raises(UserError, match=r"torch 2\.10\.0\+cu128 is older than 2\.11.*constraints\.txt"):
        utils.check_versions()

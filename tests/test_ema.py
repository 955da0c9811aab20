"""The weights' moving average: the update rule, its ramp, buffers copied, and its place in a checkpoint."""

import argparse
import math

import pytest
import torch
from torch import nn

from checkpoint import TrainingState, load_file, save_atomic
from coco_utils import CategoryMap
from ema import RAMP_UPDATES, ModelEma


def small_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def test_each_update_moves_the_average_by_one_minus_the_ramped_decay_and_copies_buffers():
    model = small_model(0)
    ema = ModelEma(model, decay=0.9)
    start = ema.module[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(3.0)
    ema.update(model)
    decay = 0.9 * (1 - math.exp(-1 / RAMP_UPDATES))
    torch.testing.assert_close(ema.module[0].weight, decay * start + (1 - decay) * model[0].weight)
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean), "buffers are copied"
    assert ema.updates == 1 and ema.current_decay() == pytest.approx(decay)
    ema.updates = 10 * RAMP_UPDATES
    assert ema.current_decay() == pytest.approx(0.9, rel=1e-4), "the ramp reaches the decay"
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())


def state_with_average(seed: int) -> TrainingState:
    model = small_model(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return TrainingState(model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1), None,
                         argparse.Namespace(model="tiny"), CategoryMap.from_categories([{"id": 1, "name": "a"}], "x"),
                         2, ModelEma(model, 0.99))


def test_the_average_travels_with_the_checkpoint_and_model_best(tmp_path):
    state = state_with_average(0)
    with torch.no_grad():
        state.model[0].weight.mul_(2)
    for _ in range(3):
        state.ema.update(state.model)
    save_atomic(state.state_dict(), tmp_path / "checkpoint.pth")
    save_atomic(state.weights_dict(), tmp_path / "model_best.pth")
    for name in ("checkpoint.pth", "model_best.pth"):
        restored = state_with_average(1)
        restored.load_state_dict(load_file(tmp_path / name, "--resume"), name, weights_only=True)
        assert restored.ema.updates == 3
        assert torch.equal(restored.ema.module[0].weight, state.ema.module[0].weight)
        assert torch.equal(restored.model[0].weight, state.model[0].weight)
    best = torch.load(tmp_path / "model_best.pth", weights_only=True)
    assert "optimizer" not in best and {"model", "model_ema", "categories", "args", "num_classes"} <= set(best)


def test_an_average_begun_on_a_checkpoint_without_one_starts_from_its_weights(tmp_path):
    """--model-ema added on resume: the average starts from the weights read, not the model as built."""
    trained = state_with_average(0)
    trained.ema = None
    with torch.no_grad():
        trained.model[0].weight.mul_(3)
    save_atomic(trained.state_dict(), tmp_path / "checkpoint.pth")
    resumed = state_with_average(1)
    resumed.load_state_dict(load_file(tmp_path / "checkpoint.pth", "--resume"), "checkpoint.pth")
    assert torch.equal(resumed.ema.module[0].weight, trained.model[0].weight) and resumed.ema.updates == 0

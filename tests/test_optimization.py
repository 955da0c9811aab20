"""The effective batch, the learning rate's scaling to it, and the parameter order of both checkpoint writers."""

import argparse

import pytest
import torch
from torch import nn

import optimization


def args(**values) -> argparse.Namespace:
    base = {"batch_size": 4, "grad_accum_steps": 1, "lr": 0.02, "auto_scale_lr": None, "test_only": False,
            "weight_decay": 1e-4, "norm_weight_decay": None, "opt": "sgd", "momentum": 0.9}
    return argparse.Namespace(**{**base, **values})


def test_auto_scale_lr_scales_by_the_effective_batch(capsys):
    given = args(batch_size=2, grad_accum_steps=4, lr=0.02, auto_scale_lr=16)
    optimization.scale_learning_rate(given)
    assert given.lr == pytest.approx(0.02 * 8 / 16)
    printed = capsys.readouterr().out
    assert "Effective batch: 2 images x 1 processes x 4 accumulation steps = 8 per optimizer step" in printed
    assert "--auto-scale-lr 16: --lr 0.02 x 8 / 16 = 0.01" in printed


def test_without_it_a_batch_other_than_the_recipes_gets_a_note(capsys):
    given = args(batch_size=4, lr=0.001)
    optimization.scale_learning_rate(given)
    assert given.lr == 0.001
    assert "for this batch of 4 that is --lr 0.005 (--auto-scale-lr 16 scales --lr 0.001 to 0.00025)" in (
        capsys.readouterr().out)
    optimization.scale_learning_rate(args(batch_size=8, grad_accum_steps=2))
    assert "note:" not in capsys.readouterr().out, "16 is the recipe's batch"


def test_parameter_order_follows_the_checkpoints_writer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1))
    conv1, norm, conv2 = model
    ours = optimization.parameter_groups(model, args())[0]["params"]
    assert ours == [conv1.weight, conv1.bias, conv2.weight, conv2.bias, norm.weight, norm.bias]
    reference = optimization.parameter_groups(model, args(), reference_order=True)[0]["params"]
    assert reference == list(model.parameters())
    split = optimization.parameter_groups(model, args(norm_weight_decay=0.0), reference_order=True)
    assert split[0]["params"] == [norm.weight, norm.bias] and split[0]["weight_decay"] == 0.0
    assert isinstance(optimization.make_optimizer(model, args()), torch.optim.SGD)


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_the_fused_kernel_steps_as_torchs_default(opt):
    """Fused kernels exist for the CPU too: the same steps to float rounding. (No bias right before a batch norm:
    its gradient is rounding noise, which Adam's step scales up to the learning rate.)"""
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        optimizer = optimization.make_optimizer(model, args(opt=opt, norm_weight_decay=0.0), fused=fused)
        assert optimizer.defaults["fused"] is (True if fused else None)
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.rand(2, 3, 8, 8)).square().mean().backward()
            optimizer.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for plain, fused in zip(*results):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("writer_fused", [False, True])
def test_a_loaded_state_keeps_this_runs_kernel(writer_fused):
    model = nn.Linear(3, 2)
    writer = optimization.make_optimizer(model, args(), fused=writer_fused)
    model(torch.rand(4, 3)).sum().backward()
    writer.step()
    reader = optimization.make_optimizer(model, args(), fused=not writer_fused)
    reader.load_state_dict(writer.state_dict())
    assert reader.param_groups[0]["fused"] == (True if writer_fused else None)  # torch's load takes the writer's
    optimization.keep_implementation(reader)
    assert reader.param_groups[0]["fused"] == (None if writer_fused else True)
    assert reader.state_dict()["state"][0]["momentum_buffer"].equal(writer.state_dict()["state"][0]["momentum_buffer"])

"""The effective batch, the learning rate's scaling to it, and the parameter order of both checkpoint writers."""

import argparse
import math

import pytest
import torch
import torchvision
from torch import nn

import optimization
from train import get_args_parser


def args(**values) -> argparse.Namespace:
    base = {"batch_size": 4, "grad_accum_steps": 1, "lr": 0.02, "auto_scale_lr": None, "test_only": False,
            "weight_decay": 1e-4, "norm_weight_decay": None, "opt": "sgd", "momentum": 0.9,
            "model": "maskrcnn_resnet50_fpn", "start_epoch": 0}
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
    assert ("recipe for maskrcnn_resnet50_fpn has --lr 0.02 for a batch of 16, which for this batch of 4 is --lr "
            "0.005 (--auto-scale-lr 16 scales whatever --lr is given by the batch / 16)") in capsys.readouterr().out
    optimization.scale_learning_rate(args(batch_size=8, grad_accum_steps=2))
    assert "note:" not in capsys.readouterr().out, "16 is the recipe's batch"
    optimization.scale_learning_rate(args(batch_size=2, lr=0.0025))
    assert "note:" not in capsys.readouterr().out, "--lr is already the recipe's for a batch of 2"
    optimization.scale_learning_rate(args(batch_size=4, lr=0.001, opt="adamw"))
    assert "note:" not in capsys.readouterr().out, "the recipe's rate is SGD's"
    for model, advice in [("retinanet_resnet50_fpn", "0.01 for a batch of 16, which for this batch of 2 is --lr "
                                                     "0.00125"),
                          ("ssd300_vgg16", "0.002 for a batch of 32, which for this batch of 2 is --lr 0.000125"),
                          ("ssdlite320_mobilenet_v3_large", "0.15 for a batch of 192, which for this batch of 2 is "
                                                            "--lr 0.0015625 (--auto-scale-lr 192")]:
        optimization.scale_learning_rate(args(batch_size=2, lr=0.01, model=model))
        assert f"recipe for {model} has --lr {advice}" in capsys.readouterr().out
    optimization.scale_learning_rate(args(batch_size=2, lr=0.01, model="maskrcnn_resnet50_fpn_v2"))
    assert "has --lr 0.1 for a batch of 64, which for this batch of 2 is --lr 0.003125" in capsys.readouterr().out
    optimization.scale_learning_rate(args(batch_size=2, lr=0.01, model="retinanet_resnet50_fpn_v2"))
    assert "note:" not in capsys.readouterr().out, "RetinaNet v2's recipe is AdamW's"


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
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))
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


def trained_state(**values) -> tuple[torch.optim.Optimizer, object]:
    """An optimizer and schedule (as train.py makes them from the flags) after 2 epochs of SGD on a tiny model."""
    recipe = args(**{"lr_scheduler": "cosineannealinglr", "epochs": 4, "lr_steps": None, "lr_step_size": None,
                     "lr_gamma": 0.1, **values})
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    optimizer = optimization.make_optimizer(model, recipe)
    scheduler = optimization.make_lr_scheduler(optimizer, recipe)
    for _ in range(2):
        model(torch.randn(5, 3)).square().sum().backward()
        optimizer.step()
        scheduler.step()
    return optimizer, scheduler


def resumed(saved: tuple, **values) -> tuple[torch.optim.Optimizer, object, list[str]]:
    optimizer, scheduler = trained_state(**values)  # a fresh run's own, from its flags
    own = optimization.settings_of(optimizer, scheduler)
    optimizer.load_state_dict(saved[0].state_dict())
    changed = optimization.keep_this_runs_settings(optimizer, scheduler, own, saved[1].state_dict())
    return optimizer, scheduler, changed


def test_a_resume_with_the_same_flags_continues_the_saved_state_exactly():
    saved = trained_state()
    optimizer, scheduler, changed = resumed(saved)
    assert changed == [] and scheduler.state_dict() == saved[1].state_dict()
    assert optimizer.param_groups[0]["lr"] == saved[0].param_groups[0]["lr"]


def test_flags_changed_on_resume_apply_from_the_saved_epoch():
    """A longer cosine schedule (--epochs 8, not 4), another --lr and --wd: not the saved ones, silently."""
    saved = trained_state()
    optimizer, scheduler, changed = resumed(saved, epochs=8, lr=0.04, weight_decay=1e-3)
    assert changed == ["--lr", "--wd or --norm-weight-decay", "--epochs"]
    assert scheduler.T_max == 8 and scheduler.last_epoch == 2
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.04 * (1 + math.cos(math.pi * 2 / 8)) / 2)
    assert optimizer.param_groups[0]["weight_decay"] == 1e-3
    assert optimizer.state_dict()["state"] == saved[0].state_dict()["state"], "the momentum carries on"
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.04 * (1 + math.cos(math.pi * 3 / 8)) / 2)


def test_another_schedule_kind_on_resume_takes_its_rate_at_the_saved_epoch():
    saved = trained_state()
    optimizer, scheduler, changed = resumed(saved, lr_scheduler="multisteplr", lr_steps=[1, 3])
    assert changed == ["--lr-scheduler"] and optimizer.param_groups[0]["lr"] == pytest.approx(0.02 * 0.1)


@pytest.mark.parametrize("values, message", [
    ({"norm_weight_decay": 0.0}, "has 1 parameter groups, this run's optimizer 2: resume with --norm-weight-decay"),
    ({"opt": "adamw"}, "holds another optimizer's state than --opt adamw's: resume with the --opt it was trained"),
])
def test_an_optimizer_state_that_cannot_continue_is_one_clear_error(values, message):
    saved = trained_state()
    optimizer, _ = trained_state(**values)
    with pytest.raises(optimization.UserError, match=message):
        optimization.check_state_fits(optimizer, saved[0].state_dict(), "--resume checkpoint.pth")


def test_a_group_without_parameters_is_left_out_as_the_reference_leaves_it_out():
    """Frozen norms (a pretrained backbone's) have no parameters: --norm-weight-decay then makes one group, in
    either writer's order, so a reference checkpoint's optimizer state fits."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), torchvision.ops.FrozenBatchNorm2d(4), nn.Conv2d(4, 4, 1))
    for reference_order in (False, True):
        groups = optimization.parameter_groups(model, args(norm_weight_decay=0.0), reference_order)
        assert [len(g["params"]) for g in groups] == [4] and groups[0]["weight_decay"] == 1e-4


def test_an_older_checkpoints_empty_group_is_dropped_with_its_places_in_the_schedule():
    model = nn.Linear(3, 2)
    recipe = args(norm_weight_decay=0.0, lr_scheduler="cosineannealinglr", epochs=4)
    old = torch.optim.SGD([{"params": list(model.parameters()), "weight_decay": 1e-4},
                           {"params": [], "weight_decay": 0.0}], lr=0.02, momentum=0.9)
    old_schedule = optimization.make_lr_scheduler(old, recipe)
    model(torch.rand(4, 3)).sum().backward()
    old.step()
    old_schedule.step()
    checkpoint = {"optimizer": old.state_dict(), "lr_scheduler": old_schedule.state_dict()}
    optimization.drop_empty_groups(checkpoint)
    optimizer = optimization.make_optimizer(model, recipe)
    scheduler = optimization.make_lr_scheduler(optimizer, recipe)
    optimization.check_state_fits(optimizer, checkpoint["optimizer"], "--resume checkpoint.pth")
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["lr_scheduler"])
    assert len(scheduler.base_lrs) == len(scheduler.get_last_lr()) == 1
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.02 * (1 + math.cos(math.pi * 2 / 4)) / 2)
    assert optimizer.state_dict()["state"][0]["momentum_buffer"].equal(old.state_dict()["state"][0]["momentum_buffer"])


def test_optimizer_and_schedule_names_are_read_in_any_case_as_the_reference_reads_them():
    parsed = get_args_parser().parse_args(["--opt", "SGD_Nesterov", "--lr-scheduler", "CosineAnnealingLR"])
    assert (parsed.opt, parsed.lr_scheduler) == ("sgd_nesterov", "cosineannealinglr")
    optimizer = optimization.make_optimizer(nn.Linear(3, 2), args(opt=parsed.opt))
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["nesterov"] is True
    assert optimization.make_optimizer(nn.Linear(3, 2), args()).defaults["nesterov"] is False
    assert get_args_parser().parse_args(["--opt", "AdamW"]).opt == "adamw"


@pytest.mark.parametrize("scheduler", ["multisteplr", "cosineannealinglr"])
def test_a_run_from_start_epoch_takes_the_schedule_where_that_epoch_stands(scheduler, recwarn):
    recipe = {"lr_scheduler": scheduler, "epochs": 6, "lr_steps": [2, 4], "lr_step_size": None, "lr_gamma": 0.1}
    whole = optimization.make_lr_scheduler(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.02), args(**recipe))
    rates = []
    for _ in range(6):
        rates.append(whole.get_last_lr()[0])
        whole.optimizer.step()
        whole.step()
    optimizer = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.02)
    later = optimization.make_lr_scheduler(optimizer, args(**recipe, start_epoch=3))
    for epoch in range(3, 6):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(rates[epoch]), epoch
        optimizer.step()
        later.step()
    assert not [w for w in recwarn if "lr_scheduler.step" in str(w.message)]

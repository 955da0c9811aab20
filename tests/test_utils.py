import argparse
import os
import subprocess
import sys

import pytest
import torch

import utils
from conftest import ROOT, in_two_processes
from errors import UserError
from models import build_model


def test_only_the_frozen_norms_buffers_never_change_in_training():
    pretrained_layout = build_model("maskrcnn_resnet50_fpn", 5, None, None, None, pretrained_layout=True)
    assert not utils.buffers_change_in_training(pretrained_layout)
    assert utils.buffers_change_in_training(build_model("maskrcnn_resnet50_fpn", 5, None, None, None))
    pretrained_layout.roi_heads.register_buffer("count", torch.zeros(1))
    assert utils.buffers_change_in_training(pretrained_layout)


def test_every_rank_takes_rank_0s_changing_buffers_and_frozen_ones_stay(tmp_path):
    from torchvision.ops.misc import FrozenBatchNorm2d

    def work(rank: int) -> tuple[list, list]:
        trained, frozen = torch.nn.BatchNorm2d(2), FrozenBatchNorm2d(2)
        for module in (trained, frozen):
            module.running_mean.fill_(rank)
        utils.share_rank0_buffers(trained, frozen)
        return trained.running_mean.tolist(), frozen.running_mean.tolist()

    assert in_two_processes(tmp_path, work) == {0: ([0.0, 0.0], [0.0, 0.0]), 1: ([0.0, 0.0], [1.0, 1.0])}


def test_logged_losses_are_the_mean_over_ranks(tmp_path):
    def work(rank: int) -> dict:
        values = {"loss": torch.tensor(1.0 + 2 * rank), "loss_mask": torch.tensor(float(rank))}
        return {name: value.item() for name, value in utils.reduce_dict(values).items()}

    assert in_two_processes(tmp_path, work) == {rank: {"loss": 2.0, "loss_mask": 0.5} for rank in (0, 1)}


def test_versions_older_than_the_floor_are_one_clear_error(monkeypatch):
    utils.check_versions()  # the installed ones pass
    monkeypatch.setattr(torch, "__version__", "2.10.0+cu128")
    with pytest.raises(UserError, match=r"torch 2\.10\.0\+cu128 is older than 2\.11.*constraints\.txt"):
        utils.check_versions()


def test_a_run_leaves_its_process_group_and_a_run_without_one_is_untouched(tmp_path, monkeypatch):
    utils.leave_process_group()  # not distributed: nothing to leave
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", world_size=1, rank=0)
    try:
        assert utils.is_dist_avail_and_initialized()
        utils.leave_process_group()
        assert not utils.is_dist_avail_and_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.parametrize("device, backend, gpu_set", [(torch.device("cuda"), "nccl", [3]),
                                                       (torch.device("cpu"), "gloo", [])])
def test_a_launched_rank_takes_its_gpu_and_nccl_on_gpus_gloo_on_the_cpu(monkeypatch, device, backend, gpu_set):
    """The device comes as a torch.device (start_run resolves it first), which never equals the string 'cuda'."""
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "3")):
        monkeypatch.setenv(name, value)
    joined, chosen = [], []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(utils.dist, "init_process_group", lambda **kwargs: joined.append(kwargs))
    monkeypatch.setattr(utils.dist, "barrier", lambda: None)
    args = argparse.Namespace(device=device, local_rank=None, dist_backend=None, dist_url="env://", dist_timeout=60)
    utils.init_distributed_mode(args)
    assert args.distributed and (args.rank, args.world_size, args.gpu) == (1, 2, 3)
    assert joined[0]["backend"] == backend and chosen == gpu_set


@pytest.mark.parametrize("environment, launched", [
    ({}, None),
    ({"RANK": "1", "WORLD_SIZE": "2"}, (1, 2)),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, (1, 2)),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, None),  # srun's one task: a run on its own
])
def test_a_launchers_processes_are_known_by_their_environment(monkeypatch, environment, launched):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert utils.launched_as() == launched
    assert utils.is_main_process() is (launched is None or launched[0] == 0), "said once, before the group exists"


def test_generators_for_the_same_parts_agree_across_processes_whatever_their_string_hashing():
    code = "import utils; print(utils.generator_for(3, 0, ('img1000', 'img7')).initial_seed())"
    seeds = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                            env={**os.environ, "PYTHONHASHSEED": str(h)}).stdout for h in (1, 2)}
    assert len(seeds) == 1
    assert utils.generator_for(3, 0, ("img1000", "img7")).initial_seed() != utils.generator_for(3, 1, (
        "img1000", "img7")).initial_seed()


def test_the_first_rank_that_differs_from_rank_0_is_named_with_both_values(monkeypatch):
    assert utils.first_other_rank({"lr": 0.01}) is None  # one process agrees with itself
    ranks = [{"lr": 0.01}, {"lr": 0.01}, {"lr": 0.02}, {"lr": 0.03}]
    monkeypatch.setattr(utils, "all_gather_object", lambda obj: ranks)
    assert utils.first_other_rank(ranks[0]) == (2, {"lr": 0.02}, {"lr": 0.01})
    ranks[2:] = [{"lr": 0.01}] * 2
    assert utils.first_other_rank(ranks[0]) is None


def test_a_share_written_in_decimals_allows_its_count():
    assert not utils.over_share(29, 0.29, 100), "0.29 * 100 is 28.999999999999996 in floats"
    assert utils.over_share(30, 0.29, 100) and utils.over_share(1, 0.0, 8)
    assert not utils.over_share(0, 0.0, 8) and not utils.over_share(2, 2 / 12, 12)

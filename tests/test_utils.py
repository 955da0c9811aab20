import argparse
import os
import re
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
        mean = {name: value.item() for name, value in utils.reduce_dict(dict(values)).items()}
        return mean, {name: value.item() for name, value in utils.reduce_dict(values, average=False).items()}

    assert in_two_processes(tmp_path, work) == {rank: ({"loss": 2.0, "loss_mask": 0.5}, {"loss": 4.0, "loss_mask": 1.0})
                                                for rank in (0, 1)}, "the mean, or (as the reference allows) the sum"


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


# ------------------------------------------------------------------ the names of torchvision's reference utils

def test_a_smoothed_value_keeps_its_window_apart_from_the_whole_series():
    meter = utils.SmoothedValue(window_size=4)
    for value in [100, 1, 2, 3, 4]:  # 100 has left the window
        meter.update(value)
    assert list(meter.window) == [1, 2, 3, 4] and meter.deque is meter.window, "the reference's name too"
    assert meter.median == 2.5 and meter.avg == 2.5 and meter.max == 4 and meter.value == 4, "over the window"
    assert meter.global_avg == 22.0, "over all five"


def test_a_values_weight_counts_in_the_global_average_only():
    meter = utils.SmoothedValue()
    meter.update(1.0, n=3)
    meter.update(5.0)
    assert (meter.count, meter.total, meter.global_avg) == (4, 8.0, 2.0)
    assert meter.avg == 3.0, "the window holds each value once"


def test_a_smoothed_value_prints_with_its_format_and_the_median_and_mean_by_default():
    meter = utils.SmoothedValue(window_size=2)
    for value in (9.0, 1.0, 2.0):
        meter.update(value)
    assert str(meter) == "1.5000 (4.0000)"
    meter.fmt = "{value:.1f} {avg:.2f} {max:.0f} {global_avg:.3f} {median}"
    assert str(meter) == "2.0 1.50 2 4.000 1.5"
    assert str(utils.SmoothedValue(fmt="{value} {max} {global_avg}")) == "0.0 0.0 0.0", "no value yet: no error"


def test_synchronizing_a_smoothed_value_alone_changes_nothing():
    meter = utils.SmoothedValue()
    meter.update(2.0, n=2)
    meter.synchronize_between_processes()
    assert (meter.count, meter.total) == (2, 4.0)


def test_smoothed_values_sum_their_counts_and_totals_over_the_ranks(tmp_path):
    def work(rank: int) -> tuple:
        meter = utils.SmoothedValue()
        for value, n in [[(1.0, 1), (3.0, 1)], [(10.0, 2)]][rank]:
            meter.update(value, n)
        meter.synchronize_between_processes()
        return meter.count, meter.total, meter.global_avg, meter.value

    assert in_two_processes(tmp_path, work) == {0: (4, 24.0, 6.0, 3.0), 1: (4, 24.0, 6.0, 10.0)}


def test_a_metric_logger_takes_tensors_and_numbers_and_shows_its_meters_by_attribute():
    logger = utils.MetricLogger(delimiter=" | ")
    logger.update(loss=torch.tensor(0.5), lr=0.1)
    logger.update(loss=torch.tensor([1.5]))
    assert isinstance(logger.loss, utils.SmoothedValue) and logger.loss is logger.meters["loss"]
    assert logger.loss.global_avg == 1.0 and logger.lr.value == 0.1
    assert str(logger) == "loss: 1.0000 (1.0000) | lr: 0.1000 (0.1000)"
    with pytest.raises(AttributeError, match="'loss_mask'"):
        logger.loss_mask  # noqa: B018 - the access is the test
    with pytest.raises(TypeError, match="lr must be a number"):
        logger.update(lr="0.1")
    logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.3f}"))
    logger.update(lr=0.02)
    assert str(logger).endswith("lr: 0.020")


def test_log_every_yields_every_item_and_prints_at_its_frequency_and_the_last(capsys):
    logger = utils.MetricLogger()
    seen = []
    for item in logger.log_every(list("abcdef"), 2, header="Epoch: [3]"):
        seen.append(item)
        logger.update(loss=float(len(seen)))
    assert seen == list("abcdef")
    lines = capsys.readouterr().out.splitlines()
    progress, last = lines[:-1], lines[-1]
    assert [line.split("\t")[:2] for line in progress] == [["Epoch: [3]", f"[{i}/6]"] for i in (0, 2, 4, 5)]
    # the window's median and the mean of all so far
    assert [line.split("\t")[3] for line in progress] == [f"loss: {median:.4f} ({mean:.4f})" for median, mean in
                                                         [(1, 1), (2, 2), (3, 3), (3.5, 3.5)]]
    assert all(re.fullmatch(r"eta: 0:00:00", line.split("\t")[2]) for line in progress)
    assert all(re.search(r"\ttime: \d+\.\d{4}\tdata: \d+\.\d{4}", line) for line in progress)
    assert re.fullmatch(r"Epoch: \[3\] Total time: 0:00:00 \(\d+\.\d{4} s / it\)", last)


def test_log_every_prints_nothing_but_on_the_main_process(capsys, monkeypatch):
    monkeypatch.setattr(utils, "is_main_process", lambda: False)
    assert list(utils.MetricLogger().log_every(range(3), 1)) == [0, 1, 2]
    assert capsys.readouterr().out == ""


def test_log_every_over_a_generator_says_it_needs_a_length_where_it_is_called():
    with pytest.raises(TypeError, match="needs an iterable with a len.*not a generator"):
        utils.MetricLogger().log_every((i for i in range(3)), 1)
    with pytest.raises(ValueError, match="print_freq must be 1 or more"):
        utils.MetricLogger().log_every([1], 0)


def test_save_on_master_writes_a_loadable_file_and_no_temporary_one(tmp_path):
    utils.save_on_master({"epoch": 3, "weights": torch.ones(2)}, tmp_path / "model_3.pth")
    assert [p.name for p in tmp_path.iterdir()] == ["model_3.pth"]
    loaded = torch.load(tmp_path / "model_3.pth", weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(loaded["weights"], torch.ones(2))


def test_save_on_master_leaves_the_old_file_whole_when_a_write_fails(tmp_path):
    path = tmp_path / "checkpoint.pth"
    utils.save_on_master({"epoch": 1}, path)

    class Unsaveable:
        def __reduce__(self):
            raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match="could not write"):
        utils.save_on_master({"epoch": 2, "broken": Unsaveable()}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temporary file left"


def test_save_on_master_writes_nothing_on_the_other_ranks(tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "is_main_process", lambda: False)
    utils.save_on_master({"epoch": 3}, tmp_path / "model_3.pth")
    assert list(tmp_path.iterdir()) == []


def test_mkdir_makes_the_parents_and_takes_a_folder_that_exists(tmp_path):
    utils.mkdir(tmp_path / "a" / "b")
    utils.mkdir(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").touch()
    with pytest.raises(FileExistsError):
        utils.mkdir(tmp_path / "file")


def test_all_gather_is_all_gather_object_under_the_references_name():
    assert utils.all_gather is utils.all_gather_object
    assert utils.all_gather({"ids": [1, 2]}) == [{"ids": [1, 2]}]


def test_a_reference_scripts_args_take_the_distributed_defaults_of_the_flags_it_lacks(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    args = argparse.Namespace(device="cpu", dist_url="env://", world_size=1)  # the reference's parser's
    utils.init_distributed_mode(args)
    assert (args.local_rank, args.dist_backend, args.dist_timeout) == (None, None, utils.DIST_TIMEOUT)
    assert (args.rank, args.distributed) == (0, False)

"""Several processes on the CPU with gloo, launched as the README says: sharded data, one writer, evaluation
merged over ranks exactly, two launchers as two nodes, and the failure modes: a failing, a killed and a stopped
rank each end the whole job."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import ROOT, SMALL, TINY, cli_env, run_cli
from tools.make_coco_dataset import DatasetSpec, generate_dataset

FLAGS = [*SMALL, "--epochs", "1", "-b", "2", "--lr", "0.01", "--clip-grad-norm", "10", "--dist-timeout", "60"]
# From scratch on the 64 px images (batch norms that train, and buffers that DDP broadcasts): 2 steps a rank.
SHORT = [*TINY, "--epochs", "1", "--vis-images", "0", "--no-tensorboard"]


def launch(script, *args, nproc=2, use_env=True, env=None, timeout=420, torch_home=None):
    """python3 -m torch.distributed.launch --nproc_per_node=N [--use_env] script args (the README's form)."""
    command = [sys.executable, "-m", "torch.distributed.launch", f"--nproc_per_node={nproc}",
               *(["--use_env"] if use_env else []), str(ROOT / script), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=cli_env(torch_home, env))


def coco_table(stdout):
    return re.findall(r"Average (?:Precision|Recall) .* = (-?\d\.\d+)", stdout)


@pytest.fixture(scope="module")
def ddp_run(dataset, torch_home, tmp_path_factory):
    """The seed's form with ImageNet weights from the hub cache: frozen batch norms, no buffers broadcast."""
    out = tmp_path_factory.mktemp("ddp")
    result = launch("train.py", "--data-path", str(dataset), "--output-dir", str(out), *FLAGS, torch_home=torch_home)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def test_seed_command_form_trains_and_rank0_writes(ddp_run):
    out, result = ddp_run
    assert (out / "checkpoint.pth").is_file() and (out / "model_0.pth").is_file()
    assert result.stdout.count("Start training") == 1, "rank 0 alone prints"
    assert len(coco_table(result.stdout)) == 24


def test_ranks_train_on_different_images(tiny_dataset, tmp_path):
    result = launch("tests/ddp_probe.py", "--data-path", str(tiny_dataset), "--output-dir", str(tmp_path / "out"),
                    *SHORT, "--dist-timeout", "60", "--seed", "3", "--sync-bn", use_env=False,
                    env={"PROBE_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "--sync-bn: torch synchronises batch norm on GPUs only" in result.stdout
    seen = [{i for line in (tmp_path / f"rank{r}.jsonl").read_text().splitlines() for i in json.loads(line)}
            for r in (0, 1)]
    assert seen[0] and seen[1]
    assert len(seen[0] & seen[1]) <= 1, "shards overlap only where the sampler pads an odd count"


def test_two_process_evaluation_equals_one_process(ddp_run, dataset, tmp_path):
    out, _ = ddp_run
    args = ["--data-path", str(dataset), "--test-only", "--resume", str(out / "checkpoint.pth"), *SMALL]
    # One thread, as the launcher gives each process, so that both compute bit for bit alike.
    single = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--output-dir", str(tmp_path / "one")],
                            capture_output=True, text=True, cwd=ROOT, env=cli_env(env={"OMP_NUM_THREADS": "1"}),
                            timeout=300)
    assert single.returncode == 0, single.stderr
    double = launch("train.py", *args, "--output-dir", str(tmp_path / "two"))
    assert double.returncode == 0, double.stderr[-3000:]
    assert coco_table(double.stdout) == coco_table(single.stdout) and len(coco_table(single.stdout)) == 24
    for iou_type in ("bbox", "segm"):
        one = json.loads((tmp_path / "one" / f"predictions_{iou_type}.json").read_text())
        two = json.loads((tmp_path / "two" / f"predictions_{iou_type}.json").read_text())
        assert one == two


def test_a_failing_rank_ends_the_job(tiny_dataset, tmp_path):
    result = launch("tests/ddp_probe.py", "--data-path", str(tiny_dataset), "--output-dir", str(tmp_path / "out"),
                    *SHORT, "--dist-timeout", "60", env={"PROBE_DIR": str(tmp_path), "PROBE_FAIL_RANK": "1"},
                    timeout=240)
    assert result.returncode != 0
    assert "rank 1 fails on purpose" in result.stdout + result.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}


def two_nodes(node_flags: tuple[list[str], list[str]]) -> tuple[list[int], list[str]]:
    """torchrun --nnodes 2 on one machine, c10d rendezvous on the loopback (the stand-in for two machines), each
    launcher running train.py with its flags: their exit codes and outputs."""
    port = free_port()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes",
                "--local-addr=127.0.0.1", str(ROOT / "train.py")]
    launchers = [subprocess.Popen([*launcher, *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  cwd=ROOT, env=cli_env(env=LOOPBACK)) for flags in node_flags]
    outputs = [launcher.communicate(timeout=420)[0] for launcher in launchers]
    return [launcher.returncode for launcher in launchers], outputs


def test_two_launchers_train_together_as_two_nodes(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    flags = ["--data-path", str(tiny_dataset), "--output-dir", str(out), *SHORT, "--dist-timeout", "120"]
    codes, outputs = two_nodes((flags, flags))
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "".join(outputs).count("Start training") == 1, "rank 0 alone prints"
    assert sorted(p.name for p in out.glob("*.pth")) == ["checkpoint.pth", "model_0.pth", "model_best.pth"]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 0


def test_nodes_started_with_other_flags_or_data_stop_at_the_start(tiny_dataset, tmp_path):
    """One node's other --lr would train its share otherwise; other data, another split into steps. Each is one
    line at the start (which launcher is rank 0 is the rendezvous' choice)."""
    flags = ["--data-path", str(tiny_dataset), "--output-dir", str(tmp_path / "out"), *SHORT, "--dist-timeout", "60"]
    codes, outputs = two_nodes((flags, [*flags, "--lr", "0.02"]))
    said = "".join(outputs)
    assert codes[0] != 0 and codes[1] != 0 and "Start training" not in said
    assert re.search(r"error: rank 1 was started with other flags than rank 0: --lr 0\.0[12] \(rank 0: 0\.0[12]\); "
                     r"every process of a job takes the same ones", said), said[-3000:]
    other = tmp_path / "other"
    generate_dataset(other, DatasetSpec(train_images=6, val_images=2, min_size=64, max_size=64, instances=2, seed=3,
                                        crowd_share=0.0, empty_share=0.0, gray_share=0.0, degenerate_share=0.0))
    codes, outputs = two_nodes((flags, [*flags[:1], str(other), *flags[2:]]))
    said = "".join(outputs)
    assert codes[0] != 0 and codes[1] != 0 and "Start training" not in said
    assert re.search(r"error: rank 1 read other training images, [a-z ,]+ than rank 0 \([68] training images against "
                     r"[68]; .*; its --data-path ", said), said[-3000:]


def test_a_process_that_cannot_join_its_job_says_so_in_one_line(tiny_dataset, tmp_path):
    """Rank 1 of 2 whose rank 0 never comes (a node that did not start, or an address it cannot reach)."""
    env = {**LOOPBACK, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_PORT": str(free_port())}
    result = run_cli("train.py", "--data-path", str(tiny_dataset), "--output-dir", str(tmp_path / "out"), *SHORT,
                     "--dist-timeout", "3", env=env, timeout=120)
    assert result.returncode == 2
    assert re.search(r"^error: rank 1 could not join the 1 other process of the job within --dist-timeout 3 s \(.+"
                     r"\): every node runs the same command", result.stderr, re.MULTILINE), result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_a_killed_worker_ends_the_job_without_waiting_for_the_timeout(tiny_dataset, tmp_path):
    """--dist-timeout is an hour, the launch gets five minutes: the job ends because the kill is noticed."""
    result = launch("tests/ddp_probe.py", "--data-path", str(tiny_dataset), "--output-dir", str(tmp_path / "out"),
                    *SHORT, "--dist-timeout", "3600", env={"PROBE_DIR": str(tmp_path), "PROBE_KILL_RANK": "1"},
                    timeout=300)
    assert (tmp_path / "rank1.gone").is_file(), "rank 1 was killed"
    assert result.returncode != 0


def test_too_many_unreadable_samples_on_one_rank_stop_every_rank_with_a_reason(tiny_dataset, tmp_path):
    result = launch("tests/ddp_probe.py", "--data-path", str(tiny_dataset), "--output-dir", str(tmp_path / "out"),
                    *SHORT, "--dist-timeout", "120", env={"PROBE_DIR": str(tmp_path), "PROBE_FAULT_RANK": "1"},
                    timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "error: 2 of this process's 4 samples could not be read this epoch" in output, output[-3000:]
    assert "error: another process found more unreadable samples this epoch than --max-bad-samples" in output


def test_a_stop_signal_to_one_rank_stops_every_rank_alike(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    result = launch("tests/ddp_probe.py", "--data-path", str(tiny_dataset), "--output-dir", str(out), *SHORT,
                    "--epochs", "2", "--dist-timeout", "120",
                    env={"PROBE_DIR": str(tmp_path), "PROBE_SIGNAL_RANK": "1"}, timeout=300)
    assert result.returncode != 0
    assert "Stopped by SIGTERM after epoch 0; --resume auto continues." in result.stdout, result.stdout[-3000:]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 0
    assert "exitcode  : 143" in result.stderr, "rank 0 exits as the signalled rank does"


def test_a_stop_signal_to_one_rank_during_evaluation_stops_every_rank_alike(tmp_path):
    """The ranks agree on StopAgreement's schedule during evaluation too: twelve batches a rank here."""
    spec = DatasetSpec(train_images=4, val_images=24, min_size=32, max_size=32, instances=1, seed=5,
                       crowd_share=0.0, empty_share=0.0, gray_share=0.0, degenerate_share=0.0)
    data = generate_dataset(tmp_path / "data", spec)
    out = tmp_path / "out"
    result = launch("tests/ddp_probe.py", "--data-path", str(data), "--output-dir", str(out), *SHORT,
                    "--dist-timeout", "120", env={"PROBE_DIR": str(tmp_path), "PROBE_EVAL_SIGNAL_RANK": "1"},
                    timeout=300)
    assert result.returncode != 0
    assert "Stopped by SIGTERM during epoch 0's evaluation" in result.stdout, result.stdout[-3000:]
    assert "Test:  [12/12]" not in result.stdout
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 0
    assert "exitcode  : 143" in result.stderr, "rank 0 exits as the signalled rank does"


def test_a_stopped_worker_is_named_once_the_timeout_passes(tiny_dataset, tmp_path):
    """A worker that hangs (SIGSTOP): the other gives up after --dist-timeout and says which rank went silent."""
    command = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2", "--use_env",
               str(ROOT / "tests" / "ddp_probe.py"), "--data-path", str(tiny_dataset), "--output-dir",
               str(tmp_path / "out"), *SHORT, "--dist-timeout", "20"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                               env=cli_env(env={"PROBE_DIR": str(tmp_path), "PROBE_STOP_RANK": "1"}),
                               start_new_session=True)
    lines: list[str] = []

    def read() -> None:
        for line in process.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.time() + 300
        while time.time() < deadline and reader.is_alive() and not any("stopped answering" in x for x in lines):
            time.sleep(0.2)
    finally:
        # The launcher's workers live in sessions of their own: the stopped one is ended by its process id
        # rather than after the launcher's 30 s of grace.
        gone = tmp_path / "rank1.gone"
        if gone.exists():
            os.kill(int(gone.read_text().split()[1]), signal.SIGKILL)
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
    (line,) = [line for line in lines if "stopped answering" in line]
    assert line.startswith("error: rank 0: rank 1 stopped answering (no reply within --dist-timeout 20 s"), line

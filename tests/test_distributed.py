"""Several processes on the CPU with gloo, launched as the README says: sharded data, one writer, evaluation
merged over ranks exactly, and a failing rank that ends the whole job."""

import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT, SMALL, cli_env

FLAGS = [*SMALL, "--epochs", "1", "-b", "2", "--lr", "0.01", "--clip-grad-norm", "10", "--dist-timeout", "60"]
FROM_SCRATCH = ["--weights-backbone", "none"]  # batch norms that train, and buffers that DDP broadcasts


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


def test_ranks_train_on_different_images(dataset, tmp_path):
    result = launch("tests/ddp_probe.py", "--data-path", str(dataset), "--output-dir", str(tmp_path / "out"),
                    *FLAGS, *FROM_SCRATCH, "--seed", "3", "--sync-bn", use_env=False, env={"PROBE_DIR": str(tmp_path)})
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


def test_a_failing_rank_ends_the_job(dataset, tmp_path):
    result = launch("tests/ddp_probe.py", "--data-path", str(dataset), "--output-dir", str(tmp_path / "out"),
                    *FLAGS, *FROM_SCRATCH, env={"PROBE_DIR": str(tmp_path), "PROBE_FAIL_RANK": "1"}, timeout=240)
    assert result.returncode != 0
    assert "rank 1 fails on purpose" in result.stdout + result.stderr

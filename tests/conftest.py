"""Shared fixtures: generated datasets, a torch hub cache with ResNet-50 weights, and a CLI runner."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Two pytest-xdist workers share the cores, and each may run a CLI in a subprocess: one thread per process,
# else the thread pools of two processes contend for the same cores and both slow down.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from tools.make_coco_dataset import DatasetSpec, generate_dataset  # noqa: E402
from warm_interpreter import WarmInterpreter, WarmProcess  # noqa: E402

# Small enough that a CPU training step takes about a second.
SMALL = ["--min-size", "96", "--max-size", "96", "--device", "cpu", "-j", "0", "--print-freq", "1"]


@pytest.fixture(autouse=True)
def drop_checkpoints_after_test(request):
    """A one-epoch CLI run leaves about 1 GB of checkpoints in the test's tmp_path, which pytest keeps for
    its last runs; nothing reads them once the test is over, so they go (the rest of the folder stays)."""
    yield
    folder = request.node.funcargs.get("tmp_path")
    if folder is not None:
        for path in Path(folder).rglob("*.pth"):
            path.unlink()


@pytest.fixture(scope="session", autouse=True)
def drop_shared_checkpoints_after_the_session(tmp_path_factory):
    """Module and session fixtures (a trained run, a hub cache, an export) keep their checkpoints and models for
    the tests that share them, several GB in all; they go when the session ends, as drop_checkpoints_after_test
    takes a test's own."""
    yield
    for pattern in ("*.pth", "*.onnx"):
        for path in tmp_path_factory.getbasetemp().rglob(pattern):
            path.unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def nothing_written_into_the_repository():
    """A CLI run without --output-dir writes into output/ of its working folder, which run_cli makes the
    repository: every test gives its own folder instead."""
    default_output = ROOT / "output"

    def contents():
        return sorted((p.name, p.stat().st_mtime_ns) for p in default_output.iterdir()) if default_output.exists() \
            else None

    before = contents()
    yield
    assert contents() == before, "a train.py run of this test (or of one running beside it) wrote into the " \
        "repository's output/: give it --output-dir"


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """A generated COCO-layout dataset with every oddity the generator makes, at 96 px."""
    spec = DatasetSpec(train_images=24, val_images=7, min_size=80, max_size=112, instances=3, seed=1,
                       crowd_share=0.3, empty_share=0.1, gray_share=0.2, degenerate_share=0.3)
    return generate_dataset(tmp_path_factory.mktemp("shapes"), spec)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Eight training images at 64 px: for runs that are started, stopped and resumed many times."""
    spec = DatasetSpec(train_images=8, val_images=2, min_size=64, max_size=64, instances=2, seed=2,
                       crowd_share=0.0, empty_share=0.0, gray_share=0.0, degenerate_share=0.0)
    return generate_dataset(tmp_path_factory.mktemp("tiny"), spec)


@pytest.fixture(scope="session")
def micro_dataset(tmp_path_factory) -> Path:
    """Two training images and one validation image of 32 px: one step an epoch, for slow modes."""
    spec = DatasetSpec(train_images=2, val_images=1, min_size=32, max_size=32, instances=1, seed=6,
                       radius=(0.2, 0.3), crowd_share=0.0, empty_share=0.0, gray_share=0.0, degenerate_share=0.0)
    return generate_dataset(tmp_path_factory.mktemp("micro"), spec)


@pytest.fixture(scope="session")
def keypoint_dataset(tmp_path_factory) -> Path:
    """Stick figures with COCO's 17 person keypoints (and crowds, occluded and unlabelled joints), at 96 px."""
    spec = DatasetSpec(train_images=8, val_images=2, min_size=80, max_size=112, instances=3, seed=5,
                       radius=(0.25, 0.4), crowd_share=0.3, empty_share=0.0, gray_share=0.2, degenerate_share=0.0,
                       keypoints=True)
    return generate_dataset(tmp_path_factory.mktemp("figures"), spec)


def with_speedups(model: torch.nn.Module, channels_last: bool = False, shape_buckets: bool = False):
    """model with the training speed-ups, as train.py applies them on the CPU (layout and buckets as asked)."""
    import speedups

    config = speedups.SpeedupConfig(True, channels_last, shape_buckets)
    return speedups.for_training(model, torch.device("cpu"), config)


# One epoch of the 96 px dataset at batch 4 from the ImageNet backbone: the CLI tests' usual run. Its images hold
# a few objects each: 64 sampled proposals an image train the heads (the mask head's cost grows with them).
TRAIN_FLAGS = ["--epochs", "1", "-b", "4", "--lr", "0.01", "--clip-grad-norm", "10", "--rois-per-image", "64", *SMALL]

# A short from-scratch run on tiny_dataset: 4 steps an epoch. Its images hold two objects each, so a few sampled
# proposals train the heads (the mask head's cost grows with them).
TINY = ["--min-size", "64", "--max-size", "64", "--device", "cpu", "-j", "0", "--print-freq", "1", "-b", "2",
        "--weights-backbone", "none", "--lr", "0.01", "--clip-grad-norm", "10", "--rois-per-image", "32"]


def _winograd_everywhere(monkeypatch, min_pixels: int, function: str, path: str):
    from speedups import winograd_convs

    monkeypatch.setattr(winograd_convs, "MIN_CHANNELS", 1)
    monkeypatch.setattr(winograd_convs, "MIN_PIXELS", min_pixels)
    monkeypatch.setattr(winograd_convs, "LARGE_MAPS_BY_NNPACK", True)  # whatever this CPU's vector width
    calls = []
    original = getattr(winograd_convs, function)
    monkeypatch.setattr(winograd_convs, function, lambda *args: calls.append(1) or original(*args))
    yield calls
    assert calls, f"no convolution went through {path}"


@pytest.fixture
def winograd_everywhere(monkeypatch):
    """NNPACK for every 3x3 convolution it can run, however small, as it would on full-size maps. Yields the
    list its calls are appended to (a test clears it after any self-check) and checks that it is not empty."""
    yield from _winograd_everywhere(monkeypatch, 1, "nnpack_conv2d", "NNPACK")


@pytest.fixture
def tiles_everywhere(monkeypatch):
    """Winograd's tiles for every channels-last 3x3 convolution, however few its channels or large its map;
    calls listed and checked as winograd_everywhere's."""
    yield from _winograd_everywhere(monkeypatch, 10**12, "tiled_winograd_conv2d", "Winograd's tiles")


class _DiskFillsUp:
    """A file object whose writes fail with 'No space left on device' (or another error) after a few
    kilobytes, as a full filesystem does under torch.save's zip writer."""

    def __init__(self, raw, limit: int, error: BaseException | None = None) -> None:
        self.raw, self.left = raw, limit
        self.error = error or OSError(errno.ENOSPC, "No space left on device")

    def write(self, data) -> int:
        if len(data) > self.left:
            raise self.error
        self.left -= len(data)
        return self.raw.write(data)

    def __getattr__(self, name):
        return getattr(self.raw, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.raw.close()


@pytest.fixture
def full_disk(monkeypatch):
    """full_disk(n): from then on, every file checkpoint.write_atomic writes (checkpoints, metrics, predictions,
    pictures, curves) fails after n bytes, as on a full disk (or with the error given)."""
    import checkpoint

    real_fdopen = os.fdopen

    def fill_after(limit: int, error: BaseException | None = None) -> None:
        monkeypatch.setattr(checkpoint.os, "fdopen",
                            lambda fd, mode: _DiskFillsUp(real_fdopen(fd, mode), limit, error))

    return fill_after


def read_metrics(output_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.fixture(scope="session")
def torch_home(tmp_path_factory) -> Path:
    """A TORCH_HOME whose hub cache holds a ResNet-50 weights file under torchvision's file name."""
    home = tmp_path_factory.mktemp("torch_home")
    target = home / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    target.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50().state_dict(), target)
    return home


def reference_checkout(holding: str = "train.py") -> Path | None:
    """torchvision's references/detection folder ($TORCHVISION_REFERENCE, else /work/ref/references/detection)
    where it is checked out and holds the file named, else None."""
    folder = Path(os.environ.get("TORCHVISION_REFERENCE", "/work/ref/references/detection"))
    return folder if (folder / holding).is_file() else None


def load_file_module(path: Path, name: str) -> ModuleType:
    """A module imported from its file (bench/ and the reference's folder are no packages)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_env(torch_home: Path | None = None, env: dict | None = None) -> dict:
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    if torch_home is not None:
        full_env["TORCH_HOME"] = str(torch_home)
    return full_env


WARM = WarmInterpreter(cli_env())  # CLI runs fork from it: torch and torchvision imported once a test worker


def run_cli(script: str, *args: str, torch_home: Path | None = None, timeout: int = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a script of the repo in a subprocess, as a user would, and capture what it prints."""
    process = _start(script, args, cli_env(torch_home, env), merge_stderr=False, take_sigint=False)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def start_cli(script: str, *args: str, env: dict | None = None) -> subprocess.Popen | WarmProcess:
    """Start a script of the repo in the background; its output goes to a pipe. It takes a Ctrl-C (SIGINT) as a
    terminal's foreground process does, also where the tests were started in the background without job control,
    which sets SIGINT to be ignored, and Python then keeps ignoring it."""
    return _start(script, args, cli_env(None, env), merge_stderr=True, take_sigint=True)


def _start(script: str, args: tuple[str, ...], env: dict, merge_stderr: bool,
           take_sigint: bool) -> subprocess.Popen | WarmProcess:
    """A run in a child of the warm interpreter (torch and torchvision imported), or else in a fresh one. It
    ignores SIGINT where the tests do (Python keeps an inherited SIG_IGN), unless take_sigint."""
    argv = [str(ROOT / script), *args]
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN and not take_sigint
    process = WARM.start(argv, env, ROOT, merge_stderr, sigint=not ignored)
    if process is not None:
        return process
    restore = (lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if take_sigint else None
    return subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, preexec_fn=restore)


def in_two_processes(tmp_path: Path, work) -> dict:
    """work(rank) run in two forked processes joined in a gloo group; what each returned (or the repr of what it
    raised), by rank."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    tmp_path.mkdir(parents=True, exist_ok=True)
    context = mp.get_context("fork")
    results = context.SimpleQueue()

    def run(rank: int) -> None:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", world_size=2, rank=rank)
        try:
            results.put((rank, work(rank)))
        except Exception as e:  # noqa: BLE001 - the test reads what each rank raised
            results.put((rank, repr(e)))
        finally:
            dist.destroy_process_group()

    mp.start_processes(run, nprocs=2, start_method="fork")
    return dict(results.get() for _ in range(2))

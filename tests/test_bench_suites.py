"""bench/gpu_suite.sh and bench/cpu_suite.sh: every Python command they would run is recorded instead of run,
and its flags are read by the parser of the script it names, so a renamed or dropped flag fails here rather
than in a GPU lease that runs the suite once (the commands themselves are covered by their own tests)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

# Writes its arguments, separated by the unit separator, as one line of $SUITE_RECORD, in one write (the suites
# start some commands in the background).
RECORDER = """#!/usr/bin/env bash
line=$(printf '%s\\x1f' "$@")
printf '%s\\n' "$line" >>"$SUITE_RECORD"
"""
# The scripts the suites run, by the path they name them with, and the module each is imported as.
SCRIPTS = {"train.py": "train", "tools/make_coco_dataset.py": "tools.make_coco_dataset",
           "bench/bench_train.py": "bench_train", "bench/bench_eval.py": "bench_eval",
           "bench/eval_parity.py": "eval_parity", "bench/bench_mask_predictor.py": "bench_mask_predictor",
           "bench/bench_mask_targets.py": "bench_mask_targets"}


def recorded_commands(tmp_path: Path, suite: str, *suite_args: str) -> list[list[str]]:
    """The argument lists of the Python commands the suite would run, in the order it would run them."""
    recorder = tmp_path / "python"
    recorder.write_text(RECORDER)
    recorder.chmod(0o755)
    record = tmp_path / "commands.txt"
    env = dict(os.environ, PYTHON=str(recorder), SUITE_RECORD=str(record), TORCH_HOME=str(tmp_path / "hub"),
               DATA=str(tmp_path / "data"), MODEL_DIR=str(tmp_path / "model"))
    done = subprocess.run(["bash", str(ROOT / "bench" / suite), str(tmp_path / "out"), *suite_args], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert '"rc": "skipped"' not in done.stdout, done.stdout
    return [line.split("\x1f")[:-1] for line in record.read_text().splitlines()]


def parsers() -> dict[str, object]:
    """Each script's argument parser, by the path the suites name it with."""
    return {path: importlib.import_module(module).get_args_parser() for path, module in SCRIPTS.items()}


def check_flags(command: list[str], parsers: dict[str, object]) -> str | None:
    """The script a command runs, after its flags were read by that script's parser (None for `-c` and `-m`)."""
    if command[0] in ("-c", "-m"):
        return None
    assert command[0] in parsers, f"the suite runs {command[0]}, which this test does not know: add it to SCRIPTS"
    try:
        args = parsers[command[0]].parse_args(command[1:])
        if command[0] == "bench/bench_eval.py":  # what follows `--` goes to our train.py
            parsers["train.py"].parse_args(args.extra)
    except SystemExit:
        pytest.fail(f"a suite's command has flags its script does not take: {' '.join(command)}")
    return command[0]


@pytest.mark.parametrize("part", ["train", "eval", "table", "all"])
def test_every_gpu_suite_command_takes_its_flags(tmp_path, part):
    commands = recorded_commands(tmp_path, "gpu_suite.sh", "/nonexistent/references/detection", part)
    scripts = parsers()
    ran = [check_flags(command, scripts) for command in commands]
    expected = {"train": {"bench/bench_train.py"}, "table": {"bench/bench_train.py"},
                "eval": {"train.py", "bench/bench_eval.py", "bench/eval_parity.py"},
                "all": {"train.py", "bench/bench_train.py", "bench/bench_eval.py", "bench/eval_parity.py"}}[part]
    assert expected | {"tools/make_coco_dataset.py"} <= set(ran)


def test_every_cpu_suite_command_takes_its_flags(tmp_path):
    commands = recorded_commands(tmp_path, "cpu_suite.sh", "/nonexistent/references/detection")
    scripts = parsers()
    ran = [check_flags(command, scripts) for command in commands]
    assert set(SCRIPTS) <= set(ran)


def test_a_flag_the_script_does_not_take_fails_the_check():
    with pytest.raises(pytest.fail.Exception, match="--no-such-flag"):
        check_flags(["bench/bench_train.py", "--data-path", "d", "--no-such-flag"], parsers())
    with pytest.raises(pytest.fail.Exception, match="--no-such-flag"):
        check_flags(["bench/bench_eval.py", "--data-path", "d", "--checkpoint", "c", "--", "--no-such-flag"],
                    parsers())


def test_gpu_suite_names_the_parts_it_has_when_given_another(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), str(tmp_path / "out"), "", "trian"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == "gpu_suite.sh: no part 'trian': give all, train, eval or table"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("present", [False, True])
def test_the_suites_write_a_stand_in_for_the_imagenet_weights_only_where_there_are_none(tmp_path, present):
    weights = tmp_path / "hub" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    if present:
        weights.parent.mkdir(parents=True)
        weights.write_bytes(b"the user's own weights")
    commands = recorded_commands(tmp_path, "cpu_suite.sh", "/nonexistent/references/detection")
    saved = [c for c in commands if c[0] == "-c" and "resnet50()" in c[1]]
    assert saved == ([] if present else [["-c", saved[0][1], f"{weights}.part"]])
    assert not present or weights.read_bytes() == b"the user's own weights"

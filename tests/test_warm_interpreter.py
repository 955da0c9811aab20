"""The warm interpreter that CLI runs of the tests fork from: a run there is the run a fresh interpreter makes."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, WARM, cli_env
from warm_interpreter import WarmInterpreter, WarmProcess

PROBE = """
import os, signal, sys, time
import torch
print(sys.argv, os.getcwd(), os.environ.get("TORCH_HOME"), __name__, __file__, sys.path[0] == os.path.dirname(__file__))
print(signal.getsignal(signal.SIGINT), torch.get_num_threads(), flush=True)
print("to stderr", file=sys.stderr)
if sys.argv[1] == "wait":
    time.sleep(60)
if sys.argv[1] == "raise":
    raise ValueError("uncaught")
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize(("args", "returncode"), [(["3"], 3), (["0"], 0), (["raise"], 1)])
def test_a_run_prints_and_exits_as_in_a_fresh_interpreter(tmp_path, args, returncode):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = cli_env(env={"TORCH_HOME": str(tmp_path)})
    runs = [WARM.start([str(script), *args], env, ROOT, merge_stderr=False, sigint=True),
            subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env, cwd=ROOT, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                                           signal.SIG_DFL))]
    assert isinstance(runs[0], WarmProcess), "the tests' environment is one the warm interpreter serves"
    (warm_out, warm_err), (fresh_out, fresh_err) = (run.communicate(timeout=120) for run in runs)
    assert [run.returncode for run in runs] == [returncode, returncode]
    assert warm_out == fresh_out and str(tmp_path) in warm_out and " __main__ " in warm_out
    assert "default_int_handler" in warm_out, "a SIGINT raises KeyboardInterrupt, as in a terminal"
    if args == ["raise"]:
        assert warm_err.startswith("to stderr\nTraceback") and fresh_err.startswith("to stderr\nTraceback")
        assert warm_err.endswith('ValueError("uncaught")\nValueError: uncaught\n') and fresh_err.endswith(
            'ValueError("uncaught")\nValueError: uncaught\n')
    else:
        assert warm_err == fresh_err == "to stderr\n"


@pytest.mark.parametrize(("sig", "returncode"), [(signal.SIGKILL, -9), (signal.SIGTERM, -15), (signal.SIGINT, -2)])
def test_a_signal_reaches_the_run_and_ends_it_as_it_would_a_fresh_one(tmp_path, sig, returncode):
    """The pid is the run's own: SIGKILL too ends the run, not a stand-in; an uncaught KeyboardInterrupt ends
    it as killed by SIGINT, as Python does."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    process = WARM.start([str(script), "wait"], cli_env(), ROOT, merge_stderr=True, sigint=True)
    first_line = process.stdout.readline()
    assert "wait" in first_line
    process.stdout.readline()
    process.send_signal(sig)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == returncode and process.poll() == returncode
    assert ("KeyboardInterrupt" in output) == (sig == signal.SIGINT)


def test_a_run_let_go_of_before_it_ends_leaves_the_server_serving(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    process = WARM.start([str(script), "wait"], cli_env(), ROOT, merge_stderr=True, sigint=True)
    process.stdout.readline()
    process.connection.close()  # the test's side gone, as when a test ends without waiting for its run
    os.kill(process.pid, signal.SIGKILL)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as idle:  # a client that asks nothing
        idle.connect(WARM.socket_path)
    again = WARM.start([str(script), "5"], cli_env(), ROOT, merge_stderr=True, sigint=True)
    assert again is not None and again.wait(timeout=60) == 5 and not WARM.failed


def test_a_run_in_another_environment_takes_a_fresh_interpreter(tmp_path):
    """OMP_NUM_THREADS and the like are read when torch is imported: the warm one's would be wrong."""
    assert WARM.start([str(tmp_path / "x.py")], cli_env(env={"OMP_NUM_THREADS": "2"}), ROOT, False, False) is None
    assert WARM.start([str(tmp_path / "x.py")], cli_env(env={"TORCH_HOME": "elsewhere"}), ROOT, False,
                      False) is not None


def test_no_warm_interpreter_where_asked_or_where_imports_start_threads(monkeypatch):
    monkeypatch.setenv("TESTS_FRESH_INTERPRETERS", "1")
    assert WarmInterpreter(dict(os.environ)).start(["x.py"], dict(os.environ), ROOT, False, False) is None
    monkeypatch.delenv("TESTS_FRESH_INTERPRETERS")
    threaded_env = {**os.environ, "OMP_NUM_THREADS": "2"}
    threaded = WarmInterpreter(threaded_env)
    assert threaded.start(["x.py"], threaded_env, ROOT, False, False) is None
    assert threaded.failed and threaded.server.wait(timeout=60) != 0, "torch's thread pool: the server refused"

"""A Python process that imports torch and torchvision once and then forks a child for each CLI run of the
tests (conftest's run_cli and start_cli), so that a run skips the seconds those imports take. The child runs the
script as `python script.py` would: its arguments, environment, folder, standard streams, SIGINT disposition and
__main__, and an interpreter's own exit. What a fork cannot give it: its own string hash seed and the random
state libraries seed on import, numpy's global generator among them (every run has the warm interpreter's;
test_utils checks, in fresh ones, that seeding does not depend on the hash seed); its traceback of an uncaught
exception starts with this module's and runpy's frames; sys.orig_argv, the parent pid and rlimits are the warm
interpreter's. Runs whose environment differs in more than LAZY_ENV, and every run where
TESTS_FRESH_INTERPRETERS=1, start a fresh interpreter instead."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import runpy
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, NoReturn

# Third-party modules only: the repository's own modules are imported by each run, as a fresh interpreter would.
PRELOADED = ("torch", "torchvision")
# Variables read when used (or never) rather than when torch or torchvision are imported: a run may set them
# otherwise (pytest sets PYTEST_CURRENT_TEST anew for each test).
LAZY_ENV = {"TORCH_HOME", "PYTEST_CURRENT_TEST"}
STATUS = struct.Struct("i")


def serve(socket_path: str) -> None:
    """The server: import PRELOADED, then fork a child per request until the tests close its stdin."""
    for name in PRELOADED:
        __import__(name)
    if len(os.listdir("/proc/self/task")) != 1:  # a fork copies one thread: another's locks would stay held
        sys.exit(f"{PRELOADED} started threads on import: no forking after them")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(socket_path)
    listener.listen(64)  # runs a test may start at once, with room to spare
    os.close(os.pidfd_open(os.getpid()))  # where pidfds are not allowed, fail now, before any run is forked
    print("ready", flush=True)
    # pidfd: (pid, the connection its status goes to); a pidfd is readable once its child has ended, so one
    # select waits for requests and exits alike, with no SIGCHLD handler
    running: dict[int, tuple[int, socket.socket]] = {}
    while True:
        ready, _, _ = select.select([0, listener.fileno(), *running], [], [])
        if 0 in ready and not os.read(0, 1):
            return  # the tests are over
        if listener.fileno() in ready:
            fork_a_run(listener, running)
        for pidfd in set(ready) & set(running):
            pid, connection = running.pop(pidfd)
            os.close(pidfd)
            tell(connection, os.waitpid(pid, 0)[1])
            connection.close()


def fork_a_run(listener: socket.socket, running: dict[int, tuple[int, socket.socket]]) -> None:
    """Take a request (its JSON, and its stdin, stdout and stderr), fork its run, and answer with its pid."""
    connection, _ = listener.accept()
    message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
    if len(fds) != 3:  # a client that let go before asking
        for fd in fds:
            os.close(fd)
        connection.close()
        return
    pid = os.fork()
    if pid == 0:
        for sock in [listener, connection, *(c for _, c in running.values())]:
            sock.close()
        for pidfd in running:
            os.close(pidfd)
        run_script(json.loads(message), fds)  # never returns: the child exits as its interpreter would
    for fd in fds:
        os.close(fd)
    tell(connection, pid)
    running[os.pidfd_open(pid)] = (pid, connection)


def tell(connection: socket.socket, number: int) -> None:
    """Send a pid or exit status; a test may have let go of its run already, which is no fault of the server's."""
    with contextlib.suppress(OSError):
        connection.send(STATUS.pack(number))


def run_script(request: dict, fds: list[int]) -> NoReturn:
    """In the forked child: become `python script args...` with the request's streams, folder and environment,
    run it, and leave by SystemExit (or the script's own exception) so that the interpreter shuts down as usual."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds) - {0, 1, 2}:
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    signal.signal(signal.SIGINT, signal.default_int_handler if request["sigint"] else signal.SIG_IGN)
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    runpy.run_path(sys.argv[0], run_name="__main__")
    sys.exit(0)


class WarmProcess:
    """The client's view of a forked run: what tests use of subprocess.Popen (poll, wait, send_signal, kill,
    communicate, stdout, returncode)."""

    def __init__(self, args: list[str], connection: socket.socket, stdout: IO[str], stderr: IO[str] | None,
                 server_log: Path) -> None:
        self.args, self.connection, self.stdout, self.stderr = args, connection, stdout, stderr
        self.server_log = server_log
        connection.settimeout(60)  # a server that is alive but stuck: the run falls back to a fresh interpreter
        self.pid = STATUS.unpack(connection.recv(STATUS.size))[0]
        self.returncode: int | None = None
        self._readers: dict[str, tuple[threading.Thread, list]] = {}

    def poll(self) -> int | None:
        return self._take_status(timeout=0) if self.returncode is None else self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None and self._take_status(timeout) is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def _take_status(self, timeout: float | None) -> int | None:
        """The exit status, if the server sends it within timeout (0: only if sent already)."""
        self.connection.settimeout(timeout)
        try:
            status = self.connection.recv(STATUS.size)
        except (TimeoutError, BlockingIOError):
            return None
        if len(status) != STATUS.size:
            log = self.server_log.read_text()[-2000:] if self.server_log.exists() else ""
            raise RuntimeError(f"the warm interpreter ended during run {self.pid}; its log's end:\n{log}")
        self.returncode = os.waitstatus_to_exitcode(STATUS.unpack(status)[0])
        self.connection.close()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            # the server may have reaped the run just now, before its status reached us (Popen ignores it too)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str | None, str | None]:
        """Read both pipes to their end (in threads, so that neither fills while the other is read), then wait;
        all within one timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for name in ("stdout", "stderr"):
            stream = getattr(self, name)
            if stream is not None and name not in self._readers:
                read: list = []
                reader = threading.Thread(target=_read_into, args=(stream, read), daemon=True)
                reader.start()
                self._readers[name] = (reader, read)
        for reader, _ in self._readers.values():
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return tuple(self._finished(name) for name in ("stdout", "stderr"))

    def _finished(self, name: str) -> str | None:
        if name not in self._readers:
            return None
        getattr(self, name).close()
        (outcome,) = self._readers[name][1]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def _read_into(stream: IO[str], read: list) -> None:
    """A reader thread's work: the stream's text to its end, or what reading it raised."""
    try:
        read.append(stream.read())
    except Exception as e:  # noqa: BLE001 - raised again in the test's thread, by communicate
        read.append(e)


class WarmInterpreter:
    """The tests' side: starts the server on first use, in the tests' environment (env), and asks it for runs;
    start() gives None where a run needs a fresh interpreter (another environment, a server that could not start,
    or TESTS_FRESH_INTERPRETERS=1)."""

    def __init__(self, env: dict) -> None:
        self.env = dict(env)
        self.server: subprocess.Popen | None = None
        self.failed = os.environ.get("TESTS_FRESH_INTERPRETERS") == "1"
        self.folder = Path(tempfile.mkdtemp(prefix="warm-interpreter-"))
        atexit.register(shutil.rmtree, self.folder, ignore_errors=True)
        self.socket_path, self.log = str(self.folder / "socket"), self.folder / "server.log"

    def start(self, argv: list[str], env: dict, cwd: Path, merge_stderr: bool, sigint: bool) -> WarmProcess | None:
        if self.failed or self._differs(env) or (self.server is None and not self._start_server()):
            return None
        read_out, write_out = os.pipe()
        read_err, write_err = (read_out, write_out) if merge_stderr else os.pipe()
        # the run's pipes, as Popen(text=True) reads them; closed by communicate
        out, err = open(read_out), None if merge_stderr else open(read_err)  # noqa: SIM115
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # one message a send: no framing
        try:
            connection.connect(self.socket_path)
            request = {"argv": argv, "env": env, "cwd": str(cwd), "sigint": sigint}
            socket.send_fds(connection, [json.dumps(request).encode()], [0, write_out, write_err])
            return WarmProcess([sys.executable, *argv], connection, out, err, self.log)
        except (OSError, struct.error):  # the server ended or is stuck: every later run takes a fresh interpreter
            self.failed = True
            for stream in (connection, out, err):
                if stream is not None:
                    stream.close()
            return None
        finally:
            for fd in {write_out, write_err}:
                os.close(fd)

    def _differs(self, env: dict) -> bool:
        """Whether env differs from the server's in a variable that torch or torchvision may read on import."""
        return any(env.get(k) != self.env.get(k) for k in (env.keys() | self.env.keys()) - LAZY_ENV)

    def _start_server(self) -> bool:
        """Start the server and wait until it is ready; False (and every run fresh) if it could not start, or if
        its imports printed anything, which each fresh run would print and a forked one would not."""
        try:
            with open(self.log, "w") as stderr:
                self.server = subprocess.Popen([sys.executable, __file__, self.socket_path], stdin=subprocess.PIPE,
                                               stdout=subprocess.PIPE, stderr=stderr, env=self.env, cwd=self.folder)
        except OSError:
            self.failed = True
            return False
        atexit.register(self.server.stdin.close)  # the server's signal to end
        ready = select.select([self.server.stdout], [], [], 120)[0] and self.server.stdout.readline() == b"ready\n"
        self.failed = not ready or self.log.stat().st_size > 0
        if self.failed:
            self.server.kill()
        return not self.failed

if __name__ == "__main__":
    serve(sys.argv[1])

"""Turn SIGTERM and SIGINT into a request to stop after the current training step, so a checkpoint can be
written, or after the current batch of an evaluation, whose epoch is saved already; a second SIGINT stops at
once."""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import signal

import utils


class StopRequest:
    """Installs the handlers; `signal_name` is set once a stop was asked for."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def install(self) -> StopRequest:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signal_name is not None:  # a launcher passing on the terminal's Ctrl-C as SIGTERM: one stop
            return
        self.signal_name = signal.Signals(signum).name
        print(f"{self.signal_name} received: stopping after this step or evaluation batch (with several "
              f"processes, the one they next agree on), with a checkpoint to resume from", flush=True)

    def requested(self) -> bool:
        """Whether this process was asked to stop (the loops' stop_requested)."""
        return self.signal_name is not None

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (one all-reduce, which every rank must call); each rank then takes
        the signal (the highest-numbered, should ranks get different ones), so that all say and exit alike."""
        signum = utils.max_over_ranks([signal.Signals[self.signal_name].value if self.signal_name else 0])[0]
        if signum:
            self.signal_name = signal.Signals(signum).name
        return signum > 0

    @property
    def exit_code(self) -> int:
        """What a shell reports for a process ended by that signal (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + signal.Signals[self.signal_name].value if self.signal_name else 0


@functools.cache
def end_workers_at_exit() -> None:
    """Once per process: at exit, data loader workers still running (an error ended their loader's loop) are
    killed. They ignore SIGTERM, which is all multiprocessing's own exit sends them before it waits for them.
    Registered after multiprocessing's exit function, so it runs before it."""
    atexit.register(_kill_daemonic_children)


def _kill_daemonic_children() -> None:
    # torch's handler of SIGCHLD raises for a worker ended by a signal: these are ended on purpose.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        if child.daemon:  # a loader's worker: multiprocessing would end it at exit anyway
            child.kill()
            child.join(timeout=10)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """worker_init_fn for data loader workers: the main process decides when to stop, and the workers must
    keep serving it until then (a terminal's Ctrl-C reaches every process of the group)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

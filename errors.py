"""The one kind of error a user is meant to see: a problem with their input or environment, said in one line;
and how every command line turns it, or a Ctrl-C or SIGTERM that stops it at once, into one line and an exit
status."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable

INTERRUPTED_STATUS = 128 + signal.SIGINT.value  # what a shell reports for a process ended by Ctrl-C
TERMINATED_STATUS = 128 + signal.SIGTERM.value  # ... and by SIGTERM


class UserError(Exception):
    """A problem with the user's input: the command prints its message as one line and exits non-zero."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or launcher's stop), raised as Ctrl-C's KeyboardInterrupt is, so that it ends a
    command line at once through the same clean-ups (a file being written is removed, not left cut short)."""


def message_of(error: UserError) -> str:
    """The error's message. A data loader's worker hands its error over as text, the worker's traceback before
    it: the message follows the traceback's last naming of the error."""
    text = str(error)
    if "\nOriginal Traceback" not in text:
        return text
    return text.rsplit("UserError: ", 1)[-1].strip()


def _raise_terminated(signum: int, frame) -> None:
    raise Terminated


def exit_status(command: Callable[[], int | None], interrupted: str, debug: bool = False,
                keep_default_sigterm: bool = False) -> int:
    """Run a command line's work and return its exit status: a UserError is one line on stderr and 2, a Ctrl-C
    or a SIGTERM, where the command has not taken them over as training does, one line saying what it left
    (interrupted) and 130 or 143; with debug they keep their traceback. keep_default_sigterm leaves SIGTERM
    ending the process at once, for a launcher's processes: a Python handler runs only between C calls, and one
    waiting for the others would wait on."""
    takes_sigterm = threading.current_thread() is threading.main_thread() and not keep_default_sigterm
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if takes_sigterm else None
    try:
        return command() or 0
    except UserError as e:
        if debug:
            raise
        print(f"error: {message_of(e)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt as e:
        if debug:
            raise
        terminated = isinstance(e, Terminated)
        print(f"interrupted by {'SIGTERM' if terminated else 'Ctrl-C'}: {interrupted}", file=sys.stderr, flush=True)
        return TERMINATED_STATUS if terminated else INTERRUPTED_STATUS
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

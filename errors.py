"""The one kind of error a user is meant to see: a problem with their input or environment, said in one line;
and how every command line turns it, or a Ctrl-C, into one line and an exit status."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

INTERRUPTED_STATUS = 128 + signal.SIGINT.value  # what a shell reports for a process ended by Ctrl-C


class UserError(Exception):
    """A problem with the user's input: the command prints its message as one line and exits non-zero."""


def exit_status(command: Callable[[], int | None], interrupted: str, debug: bool = False) -> int:
    """Run a command line's work and return its exit status: a UserError is one line on stderr and 2, a Ctrl-C
    (KeyboardInterrupt) one line saying what it left (interrupted) and 130; with debug both keep their
    traceback."""
    try:
        return command() or 0
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"interrupted by Ctrl-C: {interrupted}", file=sys.stderr, flush=True)
        return INTERRUPTED_STATUS

"""Every command line's ending: bad input, a Ctrl-C and a SIGTERM as one line and an exit status, not a
traceback."""

import os
import signal
import time

import pytest
import torch

from errors import INTERRUPTED_STATUS, TERMINATED_STATUS, UserError, exit_status, message_of


def _raise(error: BaseException):
    def command():
        raise error
    return command


def test_a_command_that_ends_gives_its_own_status():
    assert exit_status(lambda: None, "unused") == 0
    assert exit_status(lambda: 1, "unused") == 1


def test_bad_input_is_one_line_and_status_2(capsys):
    assert exit_status(_raise(UserError("--lr -1 must be positive")), "unused") == 2
    assert capsys.readouterr().err == "error: --lr -1 must be positive\n"


def test_a_ctrl_c_says_what_it_left_and_exits_as_a_shell_reports_sigint(capsys):
    assert exit_status(_raise(KeyboardInterrupt()), "nothing was written") == INTERRUPTED_STATUS == 130
    assert capsys.readouterr().err == "interrupted by Ctrl-C: nothing was written\n"


def test_a_sigterm_says_what_it_left_and_exits_as_a_shell_reports_it(capsys):
    """Python's default would end the process at once without a word (a scheduler's stop, a launcher's)."""
    before = signal.getsignal(signal.SIGTERM)

    def command():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        return 0

    assert exit_status(command, "nothing was written") == TERMINATED_STATUS == 143
    assert capsys.readouterr().err == "interrupted by SIGTERM: nothing was written\n"
    assert signal.getsignal(signal.SIGTERM) is before, "the handler is the command's only"


def test_a_launchers_process_can_keep_the_default_sigterm():
    """A handler would run only once a wait for the other processes in C ends: the default ends it at once."""
    assert exit_status(lambda: int(signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL), "unused",
                       keep_default_sigterm=True) == 0


@pytest.mark.parametrize("error", [UserError("bad"), KeyboardInterrupt()])
def test_debug_keeps_the_traceback(error):
    with pytest.raises(type(error)):
        exit_status(_raise(error), "unused", debug=True)


def test_other_errors_pass_through():
    with pytest.raises(ValueError):
        exit_status(_raise(ValueError("a bug")), "unused")


def test_a_data_loader_workers_error_is_its_own_line_without_the_workers_traceback(capsys):
    def read():
        loader = torch.utils.data.DataLoader(Unreadable(), num_workers=1)
        next(iter(loader))

    assert exit_status(read, "") == 2
    assert capsys.readouterr().err == "error: a.jpg: image unreadable; fix it\n"
    assert message_of(UserError("plain")) == "plain"


class Unreadable(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        raise UserError("a.jpg: image unreadable; fix it")

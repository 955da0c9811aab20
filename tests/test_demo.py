"""tools/demo.py: a stop signal to the demo's process group lets train.py save before the demo ends."""

import signal
import sys

from errors import TERMINATED_STATUS, exit_status
from tools import demo

# Stands in for train.py: on SIGTERM it finishes its "step", saves, and exits as train.py does.
TRAINING = """
import os, signal, sys, time
stop = []
signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
os.kill(os.getppid(), signal.SIGTERM)  # the signal reaches the whole group: the demo and train.py
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.5)
open(sys.argv[1], "w").write("saved")
sys.exit(128 + stop[0])
"""


def test_a_sigterm_to_the_group_waits_for_training_to_save(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    status = exit_status(lambda: demo.run_training([sys.executable, "-c", TRAINING, str(tmp_path / "saved")]),
                         "unused")
    assert status == TERMINATED_STATUS and (tmp_path / "saved").read_text() == "saved"
    assert signal.getsignal(signal.SIGTERM) is before

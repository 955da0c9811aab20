import torch

from utils import use_channels_last


def test_channels_last_by_default_on_the_cpu_only_and_as_asked_otherwise():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert use_channels_last(None, cpu) and not use_channels_last(None, cuda)
    assert use_channels_last(True, cuda) and not use_channels_last(False, cpu)

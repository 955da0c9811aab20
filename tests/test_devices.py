import pytest
import torch

from devices import amp_dtype, grad_scaler, pick_device
from errors import UserError


def test_amp_type_is_float16_on_gpus_and_bfloat16_on_the_cpu_unless_named():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert amp_dtype(None, cuda) == torch.float16 and amp_dtype(None, cpu) == torch.bfloat16
    assert amp_dtype("bfloat16", cuda) == torch.bfloat16 and amp_dtype("float16", cpu) == torch.float16


def test_a_scaler_for_float16_only():
    cpu = torch.device("cpu")
    assert isinstance(grad_scaler(cpu, torch.float16), torch.amp.GradScaler)
    assert grad_scaler(cpu, torch.bfloat16) is None and grad_scaler(cpu, None) is None


def test_cuda_falls_back_to_the_cpu_when_there_is_none(capsys):
    if torch.cuda.is_available():
        assert pick_device("cuda").type == "cuda"
    else:
        assert pick_device("cuda") == torch.device("cpu")
        assert "CUDA is not available" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["foo", "", "mps", "cuda0"])
def test_a_device_other_than_cuda_or_cpu_is_one_clear_error(name):
    with pytest.raises(UserError, match=f"--device {name}: give cuda, cuda:N or cpu"):
        pick_device(name)

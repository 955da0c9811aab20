import torch

from models import build_model
from utils import amp_dtype, buffers_change_in_training, use_channels_last, use_shape_buckets


def test_channels_last_by_default_on_the_cpu_only_and_as_asked_otherwise():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert use_channels_last(None, cpu) and not use_channels_last(None, cuda)
    assert use_channels_last(True, cuda) and not use_channels_last(False, cpu)


def test_shape_buckets_by_default_on_gpus_only_and_as_asked_otherwise():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert use_shape_buckets(None, cuda) and not use_shape_buckets(None, cpu)
    assert use_shape_buckets(True, cpu) and not use_shape_buckets(False, cuda)


def test_only_the_frozen_norms_buffers_never_change_in_training():
    pretrained_layout = build_model("maskrcnn_resnet50_fpn", 5, None, None, None, pretrained_layout=True)
    assert not buffers_change_in_training(pretrained_layout)
    assert buffers_change_in_training(build_model("maskrcnn_resnet50_fpn", 5, None, None, None))
    pretrained_layout.roi_heads.register_buffer("count", torch.zeros(1))
    assert buffers_change_in_training(pretrained_layout)


def test_amp_type_is_float16_on_gpus_and_bfloat16_on_the_cpu_unless_named():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert amp_dtype(None, cuda) == torch.float16 and amp_dtype(None, cpu) == torch.bfloat16
    assert amp_dtype("bfloat16", cuda) == torch.bfloat16 and amp_dtype("float16", cpu) == torch.float16

"""bench/common.py: the device the benchmarks run on."""

from __future__ import annotations

import sys

import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402


def test_cuda_falls_back_to_the_cpu_where_there_is_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.available_device("cuda") == torch.device("cpu")
    assert common.available_device("cpu") == torch.device("cpu")


def test_cuda_is_kept_where_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert common.available_device("cuda:1") == torch.device("cuda:1")

"""freed_memory: the heap's free pages go back to the operating system, and collated batches do that; a process
that reuses freed memory writes a large block again without faulting it in, until glibc's defaults are back."""

from __future__ import annotations

import platform
import resource
import subprocess
import sys

import pytest

import freed_memory
from conftest import ROOT
from freed_memory import ReleasingCollate, release_freed_memory

PAGE = resource.getpagesize()


def _resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def test_release_gives_back_freed_pages_that_malloc_keeps():
    # 64 KB blocks (under malloc's mmap threshold) between small live ones: once freed they cannot merge into
    # the heap's top, so malloc keeps their pages until told to give them back.
    big, small = [], []
    for _ in range(400):
        big.append(bytearray(64 * 1024))
        small.append(bytearray(1024))
    for block in big:
        block[::PAGE] = b"\x01" * len(block[::PAGE])  # resident for sure
    del big
    kept = _resident_mb()
    released = release_freed_memory()
    if platform.libc_ver()[0] != "glibc":
        assert released is False
        return
    assert released is True
    assert kept - _resident_mb() > 12  # of the 25 MB freed
    assert len(small) == 400


def test_collate_builds_the_batch_then_releases(monkeypatch):
    calls = []
    monkeypatch.setattr(freed_memory, "_TRIM", lambda pad: calls.append(pad))
    collate = ReleasingCollate(lambda batch: (calls.append("collated"), tuple(zip(*batch)))[1])
    assert collate([(1, "a"), (2, "b")]) == ((1, 2), ("a", "b"))
    assert calls == ["collated", 0]


def test_nothing_is_released_where_the_c_library_cannot(monkeypatch):
    monkeypatch.setattr(freed_memory, "_TRIM", None)
    assert release_freed_memory() is False
    assert ReleasingCollate(list)([3, 4]) == [3, 4]


GLIBC = platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_reusing_freed_memory_stops_refaulting_large_blocks_until_the_defaults_are_back():
    # In a fresh interpreter: the settings are the whole process's, and pytest's must stay glibc's own.
    probe = ("import freed_memory as m; print(m.refaults_freed_blocks(), m.reuse_freed_memory(), "
             "m.refaults_freed_blocks(), m.restore_malloc_defaults(), m.refaults_freed_blocks())")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "True", "False", "True", "True"]


def test_nothing_is_reused_where_the_c_library_cannot(monkeypatch):
    monkeypatch.setattr(freed_memory, "_MALLOPT", None)
    assert freed_memory.reuse_freed_memory() is False
    assert freed_memory.restore_malloc_defaults() is False


@pytest.mark.parametrize("took_effect, refaults", [(False, False), (True, True)])
def test_checked_reuse_puts_the_defaults_back_where_it_did_not_take(monkeypatch, took_effect, refaults):
    calls = []
    monkeypatch.setattr(freed_memory, "reuse_freed_memory", lambda: calls.append("reuse") or took_effect)
    monkeypatch.setattr(freed_memory, "refaults_freed_blocks", lambda: calls.append("check") or refaults)
    monkeypatch.setattr(freed_memory, "restore_malloc_defaults", lambda: calls.append("restore"))
    assert freed_memory.reuse_freed_memory_checked() is False
    assert calls[-1] == "restore"


def test_checked_reuse_keeps_the_settings_where_it_took(monkeypatch):
    calls = []
    monkeypatch.setattr(freed_memory, "reuse_freed_memory", lambda: calls.append("reuse") or True)
    monkeypatch.setattr(freed_memory, "refaults_freed_blocks", lambda: calls.append("check") or False)
    monkeypatch.setattr(freed_memory, "restore_malloc_defaults", lambda: calls.append("restore"))
    assert freed_memory.reuse_freed_memory_checked() is True
    assert calls == ["reuse", "check"]


@pytest.mark.parametrize("asked, device_type, expected",
                         [(None, "cpu", True), (None, "cuda", False), (True, "cuda", True), (False, "cpu", False)])
def test_reuse_is_wanted_on_the_cpu_unless_told(asked, device_type, expected):
    assert freed_memory.reuse_wanted(asked, device_type) is expected

"""What glibc's malloc does with freed memory: loader workers hand it back, the main process keeps it for reuse.

A loader worker forks from a main process whose heap is large and fragmented after parsing the annotation files.
glibc's malloc places each sample's buffers in free gaps all over that heap and keeps the pages once they are
freed, so a worker's private memory creeps up by several times what one sample needs. malloc_trim returns the
free pages; doing it after each batch keeps a worker at about one batch's worth, at the price of faulting that
batch's pages in again.

The main process running a model on the CPU wants the opposite. glibc gives every block above its mmap threshold
(at most 32 MB) a mapping of its own and unmaps it when freed, so each large activation of each forward pass is
faulted in page by page afresh. reuse_freed_memory serves every block from the heap and never trims its top, so a
pass reuses the pages the previous one freed, for a larger resident size. Where the C library is not glibc,
nothing is done.
"""

from __future__ import annotations

import ctypes
import resource
from collections.abc import Callable

# mallopt's parameters and glibc's defaults for them (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_NEVER_TRIM = 2**31 - 1  # the largest value mallopt takes: trim only a free top of 2 GB and more


def _libc_function(name: str, argtypes: list) -> Callable[..., int] | None:
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (AttributeError, OSError):
        return None
    function.argtypes, function.restype = argtypes, ctypes.c_int
    return function


_TRIM = _libc_function("malloc_trim", [ctypes.c_size_t])
_MALLOPT = _libc_function("mallopt", [ctypes.c_int, ctypes.c_int])


def release_freed_memory() -> bool:
    """Give the heap's free pages back to the operating system; False where the C library cannot."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


class ReleasingCollate:
    """A collate function that releases the freed memory after building each batch."""

    def __init__(self, collate: Callable) -> None:
        self.collate = collate

    def __call__(self, batch: list):
        collated = self.collate(batch)
        release_freed_memory()
        return collated


def _set_malloc(mmap_max: int, trim_threshold: int) -> bool:
    if _MALLOPT is None:
        return False
    return bool(_MALLOPT(_M_MMAP_MAX, mmap_max)) and bool(_MALLOPT(_M_TRIM_THRESHOLD, trim_threshold))


def reuse_freed_memory() -> bool:
    """From now on this process's malloc serves large blocks from its heap and keeps freed pages for reuse;
    False where the C library cannot."""
    return _set_malloc(0, _NEVER_TRIM)


def restore_malloc_defaults() -> bool:
    """glibc's default mmap and trim values again (in a loader worker forked after reuse_freed_memory), fixed:
    any mallopt call turns off for good the rise of the mmap threshold that glibc starts with, so blocks over
    128 KiB keep being mapped and given back when freed, which holds a worker's memory down."""
    return _set_malloc(_DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD)


def refaults_freed_blocks(size: int = 48 * 2**20) -> bool:
    """Whether a freed block of `size` bytes is faulted in afresh when the next one of that size is written:
    True under glibc's defaults, False once reuse_freed_memory took effect."""
    pages = size // resource.getpagesize()
    first = bytearray(size)  # written through by bytearray's zero-fill
    del first
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = bytearray(size)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    del second
    return faults > pages // 2


# What an entry point prints when reuse_freed_memory_checked finds that malloc did not keep freed memory.
NOT_KEPT_WARNING = ("warning: malloc did not keep freed memory for reuse (--reuse-freed-memory needs glibc's "
                    "malloc); running without it")


def reuse_wanted(asked: bool | None, device_type: str) -> bool:
    """Whether to reuse freed memory: as --reuse-freed-memory says, by default when the model runs on the CPU."""
    return device_type == "cpu" if asked is None else asked


def reuse_freed_memory_checked() -> bool:
    """reuse_freed_memory, then a freed block written again to see that it took effect; where it did not,
    glibc's settings come back and the answer is False."""
    if reuse_freed_memory() and not refaults_freed_blocks():
        return True
    restore_malloc_defaults()
    return False

"""Batches that hand the memory freed while building them back to the operating system.

A loader worker forks from a main process whose heap is large and fragmented after parsing the annotation files.
glibc's malloc places each sample's buffers in free gaps all over that heap and keeps the pages once they are
freed, so a worker's private memory creeps up by several times what one sample needs. malloc_trim returns the
free pages; doing it after each batch keeps a worker at about one batch's worth, at the price of faulting that
batch's pages in again. Where the C library has no malloc_trim (not glibc), nothing is done.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_TRIM = _malloc_trim()


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

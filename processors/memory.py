"""How the process keeps memory it frees, for a loop that allocates the same arrays every batch."""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["retain_freed_memory"]

# mallopt(3) parameter numbers, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest value glibc accepts for the mmap threshold on 64-bit systems.
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_TRIM_THRESHOLD = 1 << 30


def retain_freed_memory() -> bool:
    """Ask glibc to serve blocks up to 32 MiB from its heap and to keep freed heap memory.

    By default glibc maps each block above 128 KiB afresh and unmaps it on free. A processor's
    batch arrays (a column, a detector's scores) are just above that, so every batch paid a page
    fault for each 4 KiB it touched, hundreds per batch (figures:
    docs/bench/design-measurements.md). The memory kept is bounded by the
    largest batch's working set. Returns False where glibc is not the C library (nothing
    changes there)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))

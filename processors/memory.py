"""How the process keeps memory it frees, for a loop that allocates the same arrays every batch."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Mapping

__all__ = ["huge_pages_environment", "retain_freed_memory"]

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
    fault for each 4 KiB it touched: about 300 per batch of 100,000 readings, 5% of the
    detection stage's time (``citytel bench detectors``). The memory kept is bounded by the
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


# glibc's tunable (2.35 and later; other C libraries ignore it) that makes malloc advise the
# kernel to back its heap with transparent huge pages (2 MiB) where the kernel allows it.
_HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def huge_pages_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to start a detection process with so that its heap uses huge pages, or
    None if ``environ`` already asks for them.

    The detectors' state (about 18 MB for 100,000 series) and each batch's columns are read
    all over: with 4 KiB pages that is thousands of pages, more than the TLB holds, so many
    reads also walk the page tables. With the tunable the detection stage ran about 5% faster
    (``citytel bench detectors``: 18.2-18.5M against 17.1-18.2M readings/s). Tunables are read
    when a process starts, so the process must be started (or re-executed) with it."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if _HUGE_PAGES_TUNABLE in tunables.split(":"):
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, _HUGE_PAGES_TUNABLE]))}

"""Keep freed memory in the process for reuse (glibc ``mallopt``), so that the large per-frame maps of
a deployed model do not page-fault every frame.

By default glibc serves blocks above a threshold (128 KiB, adjusted up to 32 MiB as blocks are
freed) with fresh ``mmap`` pages and gives the top of the heap back to the kernel when more than
twice that threshold is free.  A deployed BiMatting frame at 512x288 allocates and frees tens of
maps of 1-20 MB, so every frame pays for page faults and zero-filling of the same memory; measured
on the development machine that was 20-30% of a deployed frame.  ``keep_freed_memory()`` raises
both thresholds once for the process: the resident size stays at the largest frame's working
set instead of going up and down (it still does not grow with the number of frames).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
# the largest mmap threshold glibc accepts on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 512 * 2**20
TOP_PAD = 16 * 2**20

_state = {"done": None}


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); True if they were set.

    A no-op returning False on other C libraries and operating systems.
    """
    if _state["done"] is not None:
        return _state["done"]
    done = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            done = all(mallopt(param, value) == 1 for param, value in (
                (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))
        except (OSError, AttributeError):
            done = False
    _state["done"] = done
    return done

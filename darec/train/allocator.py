"""Keep freed memory in the process during CPU training (glibc's malloc).

A CPU training step allocates (B, L, d) tensors of tens of MB and frees them again. glibc hands blocks
that large straight back to the kernel (mmap/munmap), so every step page-faults all of them in anew:
10-30 % of a DARE step on a 2-core machine. Raising the mmap threshold to its maximum (32 MiB on 64-bit)
and not trimming the heap keeps those blocks in the heap for reuse. Elsewhere (no glibc) this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # mallopt parameters, <malloc.h>
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024          # glibc's upper limit on 64-bit systems


@functools.cache
def keep_freed_memory() -> bool:
    """Sets the thresholds once per process; True when glibc took them."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))

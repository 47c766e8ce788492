"""Keep glibc from returning medium-sized buffers to the kernel after every call.

By default glibc serves allocations over ~128 KiB-32 MiB with fresh mmap()s and
unmaps them on free, so every 16 MB message or row block a process builds
is page-faulted in anew: on this kind of machine that makes a first touch
cost 20-30x a copy into memory already mapped. `tune()` raises the mmap
threshold to 64 MiB (larger arrays, like the tables themselves, still get
their own mappings and go back to the system when freed) and the trim
threshold to 256 MiB, so those buffers are reused. Linux/glibc only; a no-op
elsewhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Set glibc's mmap and trim thresholds; True when it took effect."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))

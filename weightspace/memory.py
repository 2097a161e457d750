"""Process-wide memory settings for a long streaming run (the `wsmerge` process calls this once).

    release_freed_buffers()     # glibc: freed tensors of 1 MiB and more go back to the OS

glibc's malloc serves a large request from its own mapping only while the request is above a
threshold that it raises to the size of every large block freed (up to 32 MiB). After the
first few tensors of a merge, nearly every tensor is served from the heap, and the freed ones
stay resident as holes that the next, differently sized tensors do not fit: measured peak RSS
of a linear merge of three 1B fp32 checkpoints 846 MB, against 559 MB with the threshold fixed
at 1 MiB (536 MB for three 134M ones), so peak memory stops growing with the model's size.
A threshold set by the user (MALLOC_MMAP_THRESHOLD_) is left alone; other C libraries are too.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 20


def release_freed_buffers() -> bool:
    """Fix glibc's mmap threshold at 1 MiB (see the module docstring); True if it was set."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1


__all__ = ["release_freed_buffers"]

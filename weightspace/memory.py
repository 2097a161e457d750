"""Process-wide memory settings for a long streaming run (the `wsmerge` process calls this once).

    release_freed_buffers()     # glibc: freed tensors of 8 MiB and more go back to the OS,
                                # up to 32 MiB of free heap stays for the next small buffers

glibc's malloc serves a large request from its own mapping only while the request is above a
threshold that it raises to the size of every large block freed (up to 32 MiB). After the
first few tensors of a merge, nearly every tensor is served from the heap, and the freed ones
stay resident as holes that the next, differently sized tensors do not fit: measured peak RSS
of a linear merge of three 1B fp32 checkpoints 846 MB, against 561 MB with the threshold fixed
at 8 MiB (506-557 MB for three 134M ones), so peak memory stops growing with the model's size.
At 1 MiB the peaks were the same but every mid-sized tensor paid fresh page faults (0.7 s more
system time of a 3-4 s 134M merge); tensors below 8 MiB are reused from the heap as before.
Fixing the mmap threshold also fixes glibc's trim threshold, at 128 KiB: every time the top of
a heap held more than that free, it was given back and faulted in again at the next block (a
TIES merge's scratch buffers of 1 MiB, per tensor: 340,000 page faults in a 134M fp32 merge,
54,000 with the trim threshold at 32 MiB; peak RSS the same). So it is set to 32 MiB too,
unless MALLOC_TRIM_THRESHOLD_ is set. A threshold set by the user (MALLOC_MMAP_THRESHOLD_) is
left alone; other C libraries are too.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 8 << 20
TRIM_THRESHOLD = 32 << 20


def release_freed_buffers() -> bool:
    """Fix glibc's mmap threshold at 8 MiB and its trim threshold at 32 MiB (see the module
    docstring); True if the mmap threshold was set."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    if ok and "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return ok


__all__ = ["release_freed_buffers"]

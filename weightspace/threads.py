"""How torch's OpenMP workers wait, set once for the `wsmerge` process before torch loads.

    prefer_passive_waits()     # OMP_WAIT_POLICY=PASSIVE unless the user chose a policy

Between two parallel operations torch's OpenMP workers (libgomp) spin on a core for a while
before they sleep. On an idle machine that saves a wake-up; on a busy one a spinning worker
holds a core that another process wants, the operation's other half waits for it to be
scheduled, and every cache-sized operation of a merge pays that. Measured on the 2-core VM at a
1-minute load of 4.6 (other processes on both cores), a TIES merge of three 134M bf16
checkpoints took 58.3 s (35.4 s of CPU) with the default policy, 5.3 s with PASSIVE and 6.1 s
with one thread. libgomp reads the variable when it starts, so it is set before torch is
imported; a policy in the environment (OMP_WAIT_POLICY, or GOMP_SPINCOUNT) is left alone, and
child processes inherit it.
"""

from __future__ import annotations

import os
import sys


def prefer_passive_waits() -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE for this process and its children; True if it was set."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return False
    if "torch" in sys.modules:  # too late for this process: its OpenMP runtime has started
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


__all__ = ["prefer_passive_waits"]

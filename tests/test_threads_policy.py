"""weightspace.threads: the wsmerge process makes torch's OpenMP workers wait passively, set
before torch loads, unless the user chose a policy."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = r"""
import atexit, os, sys
sys.argv = ["wsmerge", "--help"]
from weightspace.cli.main import entry
atexit.register(lambda: print("POLICY", os.environ.get("OMP_WAIT_POLICY"), "torch" in sys.modules))
entry()
"""


def _policy(env_extra: dict[str, str]) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         timeout=120).stdout
    return out.strip().splitlines()[-1].split()


def test_the_wsmerge_process_sets_a_passive_policy_before_torch_loads():
    assert _policy({}) == ["POLICY", "PASSIVE", "False"]


def test_a_policy_the_user_chose_is_left_alone():
    assert _policy({"OMP_WAIT_POLICY": "ACTIVE"})[:2] == ["POLICY", "ACTIVE"]
    assert _policy({"GOMP_SPINCOUNT": "1000"})[:2] == ["POLICY", "None"]


def test_too_late_once_torch_is_imported(monkeypatch):
    import torch  # noqa: F401

    from weightspace.threads import prefer_passive_waits

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert prefer_passive_waits() is False and "OMP_WAIT_POLICY" not in os.environ

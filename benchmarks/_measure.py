"""Measurement for the merge benchmark: run a child process, time it, read its peak memory.

    tool = Tool("wsmerge", find_wsmerge(None)[0])
    prepare("warm", inputs, [out], settle=5.0)      # same page-cache state before every run
    run = run_child(tool.command(spec, out, args), log_path, timeout=None)
    run["wall_s"], run["maxrss_kib"], run["sampled_peak_kib"]["RssAnon"]

Every timed command is its own child process: wall clock from `time.perf_counter`,
peak RSS (`ru_maxrss`) from `os.wait4`, and a sampled split of that peak into
anonymous and file-backed memory from /proc/PID/status. Children run with the
Hub and transformers offline, so no tool waits on the network. Nothing here
imports torch (a child's ru_maxrss includes the parent's resident size at fork).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# --------------------------------------------------------------------------- tools


@dataclass
class Tool:
    name: str
    exe: str
    extra: list[str] = field(default_factory=list)

    def command(self, spec: Path, out: Path, args: argparse.Namespace) -> list[str]:
        if self.name == "wsmerge":
            cmd = [self.exe, "run", str(spec), str(out), "--overwrite"]
            if args.device:
                cmd += ["--device", args.device]
            if args.out_shard_size:
                cmd += ["--shard-size", args.out_shard_size]
        else:  # mergekit-yaml
            cmd = [self.exe, str(spec), str(out), "--no-copy-tokenizer"]
            if args.device:
                cmd += ["--device", args.device]
            if args.out_shard_size:
                cmd += ["--out-shard-size", args.out_shard_size]
        return cmd + self.extra


def probe(cmd: list[str], timeout: float = 300) -> str | None:
    """Run ``cmd`` (a --help call); return None if it works, else a reason."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env())
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`{shlex.join(cmd)}` could not run: {e}"
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        return f"`{shlex.join(cmd)}` exited {r.returncode}: {' | '.join(tail)}"
    return None


def find_wsmerge(explicit: str | None) -> tuple[str | None, str]:
    if explicit:
        exe = explicit
    else:
        beside = Path(sys.executable).parent / "wsmerge"
        exe = str(beside) if beside.exists() else shutil.which("wsmerge")
    if not exe:
        return None, (
            "wsmerge not found (neither next to this Python nor on PATH); "
            "install the project with `pip install -e .`"
        )
    why = probe([exe, "run", "--help"])
    if why:
        return None, f"wsmerge at {exe} is not usable: {why}"
    return exe, f"wsmerge: {exe}"


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Local paths only: never let either tool wait on the network.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    return env


# --------------------------------------------------------------------------- runs


class RssSampler(threading.Thread):
    """Poll /proc/PID/status for the peak anonymous and file-backed resident memory.

    ``ru_maxrss`` (exact, from the kernel) is the number reported; the sampled
    split says whether a peak is the process's own allocations (RssAnon) or
    pages of memory-mapped input files (RssFile), which also count as resident.
    Sampling can miss short spikes.
    """

    KEYS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")

    def __init__(self, pid: int, interval: float = 0.02):
        super().__init__(daemon=True)
        self.path = f"/proc/{pid}/status"
        self.interval = interval
        self.peak_kib = dict.fromkeys(self.KEYS, 0)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with open(self.path) as f:
                    text = f.read()
            except OSError:
                return
            for line in text.splitlines():
                key, _, value = line.partition(":")
                if key in self.peak_kib:
                    self.peak_kib[key] = max(self.peak_kib[key], int(value.split()[0]))
            self.stop.wait(self.interval)


def run_child(cmd: list[str], log_path: Path, timeout: float | None) -> dict:
    """Run one child; wall clock and its own peak RSS (ru_maxrss, KiB on Linux)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    with open(log_path, "wb") as log:
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        log.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env())
        sampler = RssSampler(proc.pid)
        sampler.start()
        timer = threading.Timer(timeout, proc.kill) if timeout else None
        if timer:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        sampler.stop.set()
        if timer:
            timer.cancel()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "cmd": cmd,
        "rc": proc.returncode,
        "wall_s": wall,
        "maxrss_kib": usage.ru_maxrss,
        "sampled_peak_kib": sampler.peak_kib,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "log": str(log_path),
    }


# --------------------------------------------------------------------------- page cache


def safetensors_files(model_dirs: list[Path]) -> list[Path]:
    return [p for d in model_dirs for p in sorted(d.glob("*.safetensors"))]


def read_all(paths: list[Path], chunk: int = 1 << 20) -> None:
    buf = memoryview(bytearray(chunk))
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def try_drop_caches() -> str | None:
    """Drop the page cache; return None on success or the reason it was refused."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


def prepare(cache: str, inputs: list[Path], stale: list[Path], settle: float) -> None:
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    os.sync()
    if cache == "cold":
        why = try_drop_caches()
        if why:
            raise RuntimeError(f"drop_caches failed mid-run: {why}")
    else:
        read_all(inputs)
    if settle > 0:
        time.sleep(settle)

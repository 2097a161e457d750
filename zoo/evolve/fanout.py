"""Evaluate a search's candidates in parallel: Ray tasks, local processes, or this process.

    with Fanout(workers=2) as pool:                          # Ray on this machine when installed
        for key, result in pool.map(evaluate_candidate, [(0, unit0), (1, unit1)]):
            ...                                              # as each finishes, in any order

    Fanout(workers=8, address="ray://head:10001")            # the same on a Ray cluster
    Fanout(workers=2, executor="local")                      # processes (concurrent.futures)

One pool serves the whole search (Ray is started, or worker processes spawned, once, not per
generation). `executor="auto"` is Ray when it is installed, else local processes; one
worker without an address runs the candidates in this process, one after another.

Threads: each candidate computes with one torch thread (OMP_NUM_THREADS=1 in its worker),
and `workers` of them run at once: a small merge and evaluation gain little from more
threads, and N workers with a thread each use N cores without oversubscribing them (what
weightspace.zoo.executors does for zoo builds, whose patterns this module follows: spawned
workers that ignore Ctrl-C, the parent stopping them on an interrupt). A local Ray instance
gets `workers` CPUs; on a cluster each task asks for one CPU, and `workers` caps how many
run at once.

A worker that dies (killed, out of memory) fails its candidate, which is recorded with the
error like any other failed candidate; the pool is rebuilt for the rest.

Ray on a cluster: the tasks read the models and data by the paths the spec gives, so every
node must see them at those paths (a shared filesystem, or Hub ids).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from weightspace.errors import SpecError, WeightspaceError
from weightspace.extras import require

EXECUTORS = ("auto", "ray", "local")


def ray_installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):
        return False


def resolve_executor(executor: str, address: str | None) -> str:
    """auto -> ray when installed (or when an address is given), else local."""
    if executor not in EXECUTORS:
        raise SpecError(f"--executor: unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if executor == "local" and address:
        raise SpecError("--address is a Ray cluster's; it cannot be used with --executor local")
    if executor == "auto":
        executor = "ray" if (address or ray_installed()) else "local"
    if executor == "ray":
        require("ray", "ray", "--executor ray (or --address) needs Ray")
    return executor


def _one_thread() -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _one_thread()


def _call_with_one_thread(fn: Callable[[Any], Any], unit: Any) -> Any:
    _one_thread()
    return fn(unit)


def _died(e: BaseException) -> dict[str, Any]:
    return {"value": None, "metrics": {}, "merge_s": None, "eval_s": None, "total_s": None,
            "worker": None, "error": f"the worker stopped: {type(e).__name__}: {e}"}


class Fanout:
    def __init__(self, workers: int = 1, *, executor: str = "auto", address: str | None = None):
        if workers < 1:
            raise SpecError(f"--workers: must be at least 1, got {workers}")
        self.workers = workers
        self.address = address
        self.executor = resolve_executor(executor, address)
        self.inline = self.executor == "local" and workers == 1
        self._pool = None
        self._ray = None
        self._started_ray = False

    # ------------------------------------------------------------------ lifetime

    def __enter__(self) -> Fanout:
        if self.executor == "ray":
            self._start_ray()
        return self

    def __exit__(self, *exc) -> None:
        self.close(wait=exc[0] is None)

    def close(self, wait: bool = True) -> None:
        if self._pool is not None:
            if not wait:  # interrupted: stop the running candidates instead of waiting for them
                for p in list((getattr(self._pool, "_processes", None) or {}).values()):
                    p.terminate()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._started_ray:
            self._ray.shutdown()
            self._started_ray = False

    def _start_ray(self) -> None:
        ray = self._ray = require("ray", "ray", "--executor ray needs Ray")
        if ray.is_initialized():
            return
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False}
        if self.address:
            kwargs["address"] = self.address
        else:
            kwargs["num_cpus"] = self.workers
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise WeightspaceError(f"--address {self.address or '(local)'}: cannot start or reach Ray: "
                                   f"{e}") from None
        self._started_ray = True

    def _local_pool(self):
        from concurrent.futures import ProcessPoolExecutor

        if self._pool is None:
            # spawn, not fork: forking a process that has started OpenMP threads can hang
            self._pool = ProcessPoolExecutor(max_workers=self.workers, initializer=_init_worker,
                                             mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    # ------------------------------------------------------------------ work

    def map(self, fn: Callable[[Any], Any], items: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
        """Yield (key, fn(unit)) for every (key, unit), as each finishes. A candidate whose worker
        died yields a result with its error (fn itself returns its own failures)."""
        items = list(items)
        if not items:
            return
        if self.inline:
            import torch

            before = torch.get_num_threads()
            try:
                for key, unit in items:
                    torch.set_num_threads(1)
                    yield key, fn(unit)
            finally:
                torch.set_num_threads(before)
        elif self.executor == "ray":
            yield from self._map_ray(fn, items)
        else:
            yield from self._map_local(fn, items)

    def _map_local(self, fn, items):
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        pool = self._local_pool()
        pending = {pool.submit(fn, unit): key for key, unit in items}
        broken = False
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                key = pending.pop(f)
                try:
                    yield key, f.result()
                except BrokenProcessPool as e:
                    broken = True
                    yield key, _died(e)
        if broken:  # every later candidate needs live workers
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _map_ray(self, fn, items):
        ray = self._ray
        remote = ray.remote(num_cpus=1, max_retries=0)(_call_with_one_thread)
        todo = iter(items)
        refs: dict[Any, Any] = {}
        limit = self.workers if not self.address else max(self.workers, 1)

        def submit() -> bool:
            item = next(todo, None)
            if item is None:
                return False
            refs[remote.remote(fn, item[1])] = item[0]
            return True

        while len(refs) < limit and submit():
            pass
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            key = refs.pop(done[0])
            submit()
            try:
                result = ray.get(done[0])
            except Exception as e:  # noqa: BLE001 - a dead worker or a task error: recorded
                result = _died(e)
            yield key, result


__all__ = ["EXECUTORS", "Fanout", "ray_installed", "resolve_executor"]

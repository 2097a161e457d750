"""Run independent units of work on local processes (default) or on a Ray cluster.

    for result in map_units(train_unit, units, executor="local", workers=2):
        ...                                  # results arrive as units finish, in any order
    map_units(fn, units, on_report=show)     # fn(unit, report): report(msg) reaches show(msg) now

Units and results are plain Python data (dicts, lists, bytes), so the parent
never unpickles tensors and the same zoo comes out of either executor. The
parent process alone writes to the zoo, so results (trained weights) travel
as safetensors bytes. Inputs follow one rule: a unit names its files by path,
and a local worker (a process of this machine) reads them itself; a Ray worker
may be on a machine without this filesystem, so `ship(unit)`, given by the
caller, turns a unit's paths into bytes just before it is submitted to Ray,
with a few units in flight per worker (bytes never pile up in the parent).

Threads: every unit runs with `threads_per_worker(workers, units)` torch
threads, the cores this process may use divided by the units that run at once
(at least 1, at most the caller's own torch threads), set in the worker before
the unit starts and put back after it, so an in-process unit leaves the
caller's setting as it was. Torch's default
(one thread per core in every worker) oversubscribes the cores as soon as two
workers run, and small models then train many times slower. A unit on a Ray
cluster (`address`) gets one thread, its one CPU of the cluster.

Reports are small messages a unit sends while it runs (progress): local
workers send them through a queue the parent drains while it waits; on Ray a
unit's reports are not forwarded (only its result).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from weightspace.errors import SpecError, WeightspaceError
from weightspace.extras import require

EXECUTORS = ("local", "ray")


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask, which a container or taskset narrows)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:          # not on Linux
        return max(1, os.cpu_count() or 1)


def default_workers() -> int:
    return available_cores()


def threads_per_worker(workers: int, units: int | None = None) -> int:
    """Torch threads for each unit: the cores divided by the units running at once, at least 1,
    and never more than the caller's own torch threads (OMP_NUM_THREADS=1, or a caller's
    torch.set_num_threads(1), holds for its workers too)."""
    import torch

    running = max(1, min(workers, units) if units is not None else workers)
    return max(1, min(torch.get_num_threads(), available_cores() // running))


def run_with_threads(threads: int, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` with `threads` torch threads; the previous count is put back afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)


_reports: Any = None  # in a local worker: the queue its units' reports go to


def _init_worker(reports: Any = None) -> None:
    global _reports
    _reports = reports
    # Ctrl-C reaches the whole process group; the parent alone handles it (and stops the workers)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _report(msg: Any) -> None:
    """A local worker's `report`: hand `msg` to the parent."""
    if _reports is not None:
        _reports.put(msg)


def _ignore(msg: Any) -> None:
    pass


def _with_report(fn: Callable[..., Any], report: Callable[[Any], None]) -> Callable[[Any], Any]:
    import functools

    return functools.partial(_call_with_report, fn, report)


def _call_with_report(fn: Callable[..., Any], report: Callable[[Any], None], unit: Any) -> Any:
    return fn(unit, report)


def check_executor(executor: str) -> None:
    """SpecError for an unknown executor, and the missing-extra error for Ray without Ray,
    before any work starts (or anything is written)."""
    if executor not in EXECUTORS:
        raise SpecError(f"--executor: unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if executor == "ray":
        require("ray", "ray", "--executor ray needs Ray")


def map_units(fn: Callable[..., Any], units: Sequence[Any], *, executor: str = "local",
              workers: int | None = None, address: str | None = None,
              on_report: Callable[[Any], None] | None = None,
              ship: Callable[[Any], Any] | None = None) -> Iterator[Any]:
    """Yield `fn(unit)` for every unit, as each finishes.

    With `on_report`, `fn` is called as `fn(unit, report)`, and every `report(msg)` it makes
    reaches `on_report(msg)` in this process while the unit is still running (local executor).
    `ship(unit)`: the unit as a Ray worker gets it (its input files' bytes in place of their
    paths); local workers get units as given.
    """
    check_executor(executor)
    if not units:
        return
    workers = workers or default_workers()
    if workers < 1:
        raise SpecError(f"--workers: must be at least 1, got {workers}")
    if executor == "ray":
        yield from _map_ray(fn, units, workers, address, with_report=on_report is not None, ship=ship)
    elif workers == 1 or len(units) == 1:
        call = fn if on_report is None else _with_report(fn, on_report)
        threads = threads_per_worker(1)
        for u in units:
            yield run_with_threads(threads, call, u)
    else:
        yield from _map_local(fn, units, workers, on_report)


def _map_local(fn: Callable[..., Any], units: Sequence[Any], workers: int,
               on_report: Callable[[Any], None] | None) -> Iterator[Any]:
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    workers = min(workers, len(units))
    threads = threads_per_worker(workers)
    # spawn, not fork: forking a process that has started OpenMP threads can hang
    ctx = multiprocessing.get_context("spawn")
    reports = ctx.Queue() if on_report is not None else None
    call = fn if on_report is None else _with_report(fn, _report)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(reports,))

    def drain() -> None:
        while reports is not None:
            try:
                msg = reports.get_nowait()
            except queue.Empty:
                return
            on_report(msg)  # type: ignore[misc]

    finished = False
    try:
        pending = {pool.submit(run_with_threads, threads, call, u) for u in units}
        while pending:
            done, pending = wait(pending, timeout=None if reports is None else 0.2,
                                 return_when=FIRST_COMPLETED)
            drain()
            for f in done:
                yield f.result()
        finished = True
    finally:
        if not finished:  # interrupted or failed: stop the running units instead of waiting for them
            for p in list((getattr(pool, "_processes", None) or {}).values()):
                p.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        if reports is not None:
            reports.close()
            reports.cancel_join_thread()


def _map_ray(fn: Callable[..., Any], units: Sequence[Any], workers: int, address: str | None,
             with_report: bool = False, ship: Callable[[Any], Any] | None = None) -> Iterator[Any]:
    ray = require("ray", "ray", "--executor ray needs Ray")
    # local Ray: `workers` units at once, each with its share of this machine's cores (its Ray
    # CPUs); on a cluster: one CPU and one thread per unit, as many at once as the cluster has CPUs
    threads = 1 if address else threads_per_worker(workers, len(units))
    started = not ray.is_initialized()
    if started:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False}
        if address:
            kwargs["address"] = address
        else:
            kwargs["num_cpus"] = min(workers, len(units)) * threads
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise WeightspaceError(f"--address {address or '(local)'}: cannot start or reach Ray: {e}") from None
    try:
        cpus = int(ray.cluster_resources().get("CPU", workers)) if address else workers
        in_flight = 2 * max(1, cpus)             # enough to keep every CPU busy between results
        remote = ray.remote(num_cpus=threads)(run_with_threads)
        todo = iter(units)

        def submit() -> bool:
            u = next(todo, None)
            if u is None:
                return False
            u = ship(u) if ship is not None else u
            args = (_call_with_report, fn, _ignore, u) if with_report else (fn, u)
            refs.append(remote.remote(threads, *args))
            return True

        refs: list[Any] = []
        while len(refs) < in_flight and submit():
            pass
        while refs:
            done, refs = ray.wait(refs, num_returns=1)
            submit()
            yield ray.get(done[0])
    finally:
        if started:
            ray.shutdown()

"""Run independent units of work on local processes (default) or on a Ray cluster.

    for result in map_units(train_unit, units, executor="local", workers=2):
        ...                                  # results arrive as units finish, in any order
    map_units(fn, units, on_report=show)     # fn(unit, report): report(msg) reaches show(msg) now

Units and results are plain Python data (dicts, lists, bytes): weights travel
as safetensors bytes, so the parent never unpickles tensors, and the same zoo
comes out of either executor. The parent process alone writes to the zoo.
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


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


_reports: Any = None  # in a local worker: the queue its units' reports go to


def _init_worker(threads: int, reports: Any = None) -> None:
    import torch

    global _reports
    _reports = reports
    # Ctrl-C reaches the whole process group; the parent alone handles it (and stops the workers)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)


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
              on_report: Callable[[Any], None] | None = None) -> Iterator[Any]:
    """Yield `fn(unit)` for every unit, as each finishes.

    With `on_report`, `fn` is called as `fn(unit, report)`, and every `report(msg)` it makes
    reaches `on_report(msg)` in this process while the unit is still running (local executor).
    """
    check_executor(executor)
    if not units:
        return
    workers = workers or default_workers()
    if workers < 1:
        raise SpecError(f"--workers: must be at least 1, got {workers}")
    if executor == "ray":
        yield from _map_ray(fn, units, workers, address, with_report=on_report is not None)
    elif workers == 1 or len(units) == 1:
        call = fn if on_report is None else _with_report(fn, on_report)
        for u in units:
            yield call(u)
    else:
        yield from _map_local(fn, units, workers, on_report)


def _map_local(fn: Callable[..., Any], units: Sequence[Any], workers: int,
               on_report: Callable[[Any], None] | None) -> Iterator[Any]:
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    workers = min(workers, len(units))
    threads = max(1, (os.cpu_count() or 1) // workers)
    # spawn, not fork: forking a process that has started OpenMP threads can hang
    ctx = multiprocessing.get_context("spawn")
    reports = ctx.Queue() if on_report is not None else None
    call = fn if on_report is None else _with_report(fn, _report)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(threads, reports))

    def drain() -> None:
        while reports is not None:
            try:
                msg = reports.get_nowait()
            except queue.Empty:
                return
            on_report(msg)  # type: ignore[misc]

    finished = False
    try:
        pending = {pool.submit(call, u) for u in units}
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
             with_report: bool = False) -> Iterator[Any]:
    ray = require("ray", "ray", "--executor ray needs Ray")
    started = not ray.is_initialized()
    if started:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False}
        if address:
            kwargs["address"] = address
        else:
            kwargs["num_cpus"] = workers
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise WeightspaceError(f"--address {address or '(local)'}: cannot start or reach Ray: {e}") from None
    try:
        if with_report:       # reports are not forwarded from Ray workers: whole units only
            remote = ray.remote(num_cpus=1)(_call_with_report)
            refs = [remote.remote(fn, _ignore, u) for u in units]
        else:
            remote = ray.remote(num_cpus=1)(fn)
            refs = [remote.remote(u) for u in units]
        while refs:
            done, refs = ray.wait(refs, num_returns=1)
            yield ray.get(done[0])
    finally:
        if started:
            ray.shutdown()

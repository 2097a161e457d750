"""The streaming executor: a plan of per-tensor steps, run with bounded memory.

    steps = [Step(name, shape, out_dtype, inputs=[ref_a, ref_b], compute=fn), ...]
    execute(steps, sink, device="auto")

A reader thread loads the next steps' inputs (at most `prefetch` steps and
`prefetch_bytes` of inputs ahead, counting the step being computed), the
calling thread runs `compute` on the device, and a writer thread appends
results to the sink. Peak memory is bounded by the byte budget and the largest
step, never by the model. Inputs are read into, and methods' outputs drawn from
(`weightspace.buffers.empty_like`), one pool of buffers that are reused once no
tensor holds them, so a merge does not fault in fresh pages for every byte it
reads and writes.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from weightspace.buffers import BufferPool, buffer_pool
from weightspace.errors import NonFiniteError, WeightspaceError
from weightspace.safetensors_io import nbytes_of

if TYPE_CHECKING:  # the executor runs any object with .load/.numel/.leaves; the IR's refs are those
    from weightspace.ir import TensorRef

_DONE = object()
DEFAULT_PREFETCH_BYTES = 256 * 2**20
DEFAULT_PREFETCH = 4


class _ByteBudget:
    """Blocks the reader while loaded-but-unfinished inputs would exceed `cap`
    (one step is always allowed, however large, so nothing deadlocks)."""

    def __init__(self, cap: int, stop: threading.Event):
        self.cap = cap
        self.used = 0
        self.stop = stop
        self.cond = threading.Condition()

    def acquire(self, n: int) -> bool:
        with self.cond:
            while self.used > 0 and self.used + n > self.cap:
                if self.stop.is_set():
                    return False
                self.cond.wait(timeout=0.1)
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


@dataclass
class Step:
    """One output tensor: what it reads and how it is computed."""

    name: str
    shape: tuple[int, ...] | None  # None: a statistics step that writes nothing
    dtype: torch.dtype  # output dtype
    inputs: list[TensorRef]
    compute: Callable[[list[torch.Tensor]], torch.Tensor]
    cast_inputs: bool = True  # False for integer buffers copied as they are
    info: dict = field(default_factory=dict)

    @property
    def read_bytes(self) -> int:
        own = sum(leaf.nbytes for r in self.inputs for leaf in r.leaves())
        return own + self.info.get("extra_read_bytes", 0)

    @property
    def out_bytes(self) -> int:
        return 0 if self.shape is None else nbytes_of(self.shape, self.dtype)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' -> cuda if available else cpu; checks that a named CUDA device exists."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise WeightspaceError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise WeightspaceError(f"device {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise WeightspaceError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "mps"):
        raise WeightspaceError(f"unsupported device {device!r}")
    return dev


def _loaded_bytes(s: Step, compute_dtype: torch.dtype | None) -> int:
    el = torch.empty((), dtype=compute_dtype).element_size() if compute_dtype and s.cast_inputs else None
    return sum(r.numel * (el or r.dtype.itemsize) for r in s.inputs)


def estimate_peak_bytes(steps: Sequence[Step], compute_dtype: torch.dtype | None,
                        prefetch_bytes: int = DEFAULT_PREFETCH_BYTES, prefetch: int = DEFAULT_PREFETCH) -> int:
    """Tensor memory `execute` may hold at once for this plan: the largest, over the steps j,
    of what is alive while step j is computed.

    - Inputs of j and of the steps after it that the reader has loaded: at most `prefetch`
      queued plus one in the reader's hands, and together within the `prefetch_bytes` budget
      (a step larger than the budget is let through alone). A small plan thus reports its own
      size; the budget only caps a large one.
    - The method's working copies for j in the compute dtype: about one per input (task
      vectors, masks) plus the result before its cast. A statistics step reads one row block
      per input at a time and keeps about as much again in working copies.
    - The results of the two steps before j, one being written and one queued for the writer.
    """
    if not steps:
        return 0
    el = torch.empty((), dtype=compute_dtype).element_size() if compute_dtype else 4
    loaded = [_loaded_bytes(s, compute_dtype) for s in steps]
    outs = [s.out_bytes for s in steps]
    window = prefetch + 2
    run = sum(loaded[:window])          # inputs of steps j .. j + window - 1
    peak = 0
    for j, s in enumerate(steps):
        inputs = loaded[j] if loaded[j] > prefetch_bytes else min(run, prefetch_bytes)
        if s.shape is None:
            work = 2 * loaded[j + 1] if j + 1 < len(steps) else 0
        else:
            work = (len(s.inputs) + 1) * (s.out_bytes // s.dtype.itemsize) * el
        waiting = sum(outs[max(0, j - 2):j])
        peak = max(peak, inputs + work + waiting)
        run -= loaded[j]
        if j + window < len(steps):
            run += loaded[j + window]
    return peak


def stream_threads() -> int | None:
    """Torch threads for an elementwise (or thread-count-invariant, as TIES) merge on CPU: 1, or
    torch's own count (None) where the environment sets OMP_NUM_THREADS (as `wsmerge run -j N`
    does).

    One thread, because such a merge is a stream of cache-sized operations beside a reader and
    a writer thread: three 134M fp32 merges on the 2-core VM, median of 3, linear 2.96 s against
    3.31 s and task_arithmetic 2.92 s against 3.26 s (one thread against torch's two); with two
    other processes busy on the cores, TIES took 9.0-9.4 s with one thread against 21-38 s,
    where two OpenMP workers wait on each other at every operation. An elementwise result does
    not depend on the thread count (no entry is a sum over others); a reduction's last bits do,
    so methods with one (model_stock's and slerp's dot products) keep torch's count, which is
    also mergekit's, and give its bits. TIES, whose thresholds are integer histograms, took
    4.65-4.72 s (fp32) and 3.34 s (bf16) with one thread against 4.2-7.6 s and 3.0-4.9 s with
    two, depending on how the OpenMP workers wait (after the buffer pool of weightspace.buffers;
    three 134M checkpoints, load about 1)."""
    return None if os.environ.get("OMP_NUM_THREADS") else 1


def execute(
    steps: Sequence[Step],
    sink,
    *,
    device: str | torch.device | None = "auto",
    compute_dtype: torch.dtype | None = torch.float32,
    prefetch: int = DEFAULT_PREFETCH,
    prefetch_bytes: int = DEFAULT_PREFETCH_BYTES,
    progress: bool = True,
    allow_nonfinite: bool = False,
    desc: str = "merging",
    threads: int | None = None,
) -> dict:
    """Run `steps` in order, writing each result to `sink`; aborts the sink on failure. On CPU
    `threads` (None: torch's count) is the torch thread count for the run, put back after it.

    Returns timing stats: {"steps", "read_bytes", "written_bytes", "seconds"}.
    """
    return _Run(steps, sink, resolve_device(device), compute_dtype, prefetch, prefetch_bytes,
                allow_nonfinite, threads).run(progress, desc)


class _Run:
    """One `execute`: a reader thread (read), this thread (compute, check), a writer thread
    (write), joined by two bounded queues and a byte budget."""

    def __init__(self, steps: Sequence[Step], sink, dev: torch.device, compute_dtype: torch.dtype | None,
                 prefetch: int, prefetch_bytes: int, allow_nonfinite: bool, threads: int | None = None):
        self.steps, self.sink, self.dev, self.threads = steps, sink, dev, threads
        self.compute_dtype, self.allow_nonfinite = compute_dtype, allow_nonfinite
        self.on_cpu = dev.type == "cpu"
        self.in_q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self.out_q: queue.Queue = queue.Queue(maxsize=1)
        self.stop = threading.Event()
        self.budget = _ByteBudget(prefetch_bytes, self.stop)
        # read and output buffers, reused (weightspace.buffers): as many bytes as the budget lets
        # the reader hold, or the largest step's inputs and output, which are in memory anyway
        largest = max((s.read_bytes + s.out_bytes for s in steps), default=0)
        self.pool = BufferPool(max(prefetch_bytes, largest))
        self.errors: list[BaseException] = []
        self.bar = None
        self.lock = threading.Lock()

    def run(self, progress: bool, desc: str) -> dict:
        total_out = sum(s.out_bytes for s in self.steps)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_out, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                            leave=False, dynamic_ncols=True)
        t0 = time.perf_counter()
        threads = self.threads if self.on_cpu else None
        before = torch.get_num_threads()
        if threads is not None and threads != before:
            torch.set_num_threads(threads)
        try:
            return self._run(t0, total_out)
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)

    def _run(self, t0: float, total_out: int) -> dict:
        rt = threading.Thread(target=self._thread(self.read), name="wsmerge-reader", daemon=True)
        wt = threading.Thread(target=self.write, name="wsmerge-writer", daemon=True)
        rt.start()
        wt.start()
        failed = False
        try:
            with buffer_pool(self.pool):  # outputs of methods that draw from it (empty_like)
                self._compute_all()
        except BaseException:
            failed = True
            self.stop.set()
            raise
        finally:
            self.shut_down(rt, wt)
            self.pool.clear()
            if failed or self.errors:
                self.sink.abort()
        if self.errors:
            raise self.errors[0]
        return {"steps": len(self.steps), "read_bytes": sum(s.read_bytes for s in self.steps),
                "written_bytes": total_out, "seconds": time.perf_counter() - t0}

    def _compute_all(self) -> None:
        while (item := self.next_loaded()) is not None:
            s, ts, nbytes = item
            del item  # the tuple would keep the inputs alive after `del ts`
            out = self.compute(s, ts)
            del ts
            self.budget.release(nbytes)
            if out is not None:  # None: a statistics step
                _put(self.out_q, (s.name, self.checked(s, out)), self.stop)
            del out

    def _thread(self, body: Callable[[], None]) -> Callable[[], None]:
        """A thread body whose failure stops the run and reaches the main thread."""

        def target() -> None:
            try:
                body()
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self.fail(e)

        return target

    def fail(self, e: BaseException) -> None:
        self.errors.append(e)
        self.stop.set()

    def read(self) -> None:
        """Load each step's inputs on the CPU (in the compute dtype there), within the budget,
        into buffers reused once no tensor holds them (weightspace.buffers)."""
        with buffer_pool(self.pool):
            self._read_all()

    def _read_all(self) -> None:
        try:
            for s in self.steps:
                if self.stop.is_set():
                    return
                dt = self.compute_dtype if (s.cast_inputs and self.on_cpu) else None
                nbytes = _loaded_bytes(s, dt)
                if not self.budget.acquire(nbytes):
                    return
                try:
                    ts = [r.load("cpu", dt) for r in s.inputs]
                except WeightspaceError:
                    raise
                except Exception as e:
                    raise WeightspaceError(f"reading inputs of tensor {s.name!r}: {e}") from e
                _put(self.in_q, (s, ts, nbytes), self.stop)
                del ts  # else this frame keeps them alive while it waits for the next budget
        finally:
            _put(self.in_q, _DONE, self.stop, force=True)

    def next_loaded(self) -> tuple[Step, list[torch.Tensor], int] | None:
        item = self.in_q.get()
        return None if item is _DONE or self.stop.is_set() else item

    def compute(self, s: Step, ts: list[torch.Tensor]) -> torch.Tensor | None:
        """The step's result on the device (None for a statistics step). `ts` is replaced in
        place by the device copies, so the CPU inputs are freed as the move happens."""
        if not self.on_cpu:
            ts[:] = [t.to(self.dev, non_blocking=True) for t in ts]
            if s.cast_inputs and self.compute_dtype is not None:
                ts[:] = [t.to(self.compute_dtype) for t in ts]
        try:
            out = s.compute(ts)
        except WeightspaceError:
            raise
        except Exception as e:
            raise WeightspaceError(f"computing tensor {s.name!r}: {type(e).__name__}: {e}") from e
        return None if s.shape is None else out

    def checked(self, s: Step, out: torch.Tensor) -> torch.Tensor:
        """The result in its output dtype on the CPU, after the shape and NaN/Inf checks."""
        if tuple(out.shape) != tuple(s.shape):
            raise WeightspaceError(f"tensor {s.name!r}: result has shape {list(out.shape)}, "
                                   f"expected {list(s.shape)}")
        # checked after the cast: a finite float32 result can overflow to Inf in float16
        wide = out
        out = out.to(dtype=s.dtype)
        if not self.allow_nonfinite and out.is_floating_point() and not _all_finite(out):
            bad = int((~torch.isfinite(out)).sum())
            overflow = bool(torch.isfinite(wide).all())
            why = (f"values beyond the range of {str(s.dtype).replace('torch.', '')} became Inf; "
                   "choose a wider output dtype") if overflow else "check the inputs and parameters"
            raise NonFiniteError(f"tensor {s.name!r}: the merge produced {bad} NaN/Inf value(s); "
                                 f"{why}, or pass --allow-nonfinite to keep them")
        del wide
        return out if self.on_cpu else out.to("cpu")

    def write(self) -> None:
        """Append each result to the sink, naming the tensor and the output on failure."""
        try:
            while (item := self.out_q.get()) is not _DONE:
                name, t = item
                if self.stop.is_set():
                    continue
                try:
                    self.sink.write(name, t)
                except WeightspaceError:
                    raise
                except Exception as e:  # disk full, I/O error: say which output
                    dest = getattr(self.sink, "out", None)
                    to = f" to {dest}" if dest is not None else ""
                    raise WeightspaceError(f"writing tensor {name!r}{to}: {type(e).__name__}: {e}") from e
                if self.bar is not None:
                    with self.lock:
                        self.bar.update(t.numel() * t.element_size())
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.fail(e)                # stop first: the main thread computes no more steps
            while self.out_q.get() is not _DONE:  # drain so the producer never blocks
                pass

    def shut_down(self, rt: threading.Thread, wt: threading.Thread) -> None:
        _put(self.out_q, _DONE, self.stop, force=True)
        wt.join()
        while rt.is_alive():  # unblock a reader waiting on a full queue
            self.stop.set()
            try:
                self.in_q.get(timeout=0.05)
            except queue.Empty:
                pass
        rt.join()
        if self.bar is not None:
            self.bar.close()


def _all_finite(t: torch.Tensor) -> bool:
    """True when no entry of `t` is NaN or Inf, in one reduction that allocates nothing: min
    and max propagate NaN and are infinite when an entry is, so both finite settles it; a
    non-finite one is confirmed entry by entry. 0.002 s for 8.4M entries in float32, bfloat16 or
    float16 (one thread), where `isfinite(t).all()` takes 0.04 s and a float32-accumulated sum
    of a bfloat16 tensor 0.016 s plus a float32 copy of it (page faults included); this runs on
    every output."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    if math.isfinite(float(lo)) and math.isfinite(float(hi)):
        return True
    return bool(torch.isfinite(t).all())


def _put(q: queue.Queue, item, stop: threading.Event, force: bool = False) -> None:
    while True:
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            if stop.is_set() and not force:
                return

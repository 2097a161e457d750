"""The streaming executor: a plan of per-tensor steps, run with bounded memory.

    steps = [Step(name, shape, out_dtype, inputs=[ref_a, ref_b], compute=fn), ...]
    execute(steps, sink, device="auto")

A reader thread loads the next steps' inputs (at most `prefetch` steps ahead),
the calling thread runs `compute` on the device, and a writer thread appends
results to the sink. Peak memory is a few steps' tensors, never a model.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from weightspace.errors import NonFiniteError, WeightspaceError
from weightspace.ir import TensorRef
from weightspace.safetensors_io import nbytes_of

_DONE = object()


@dataclass
class Step:
    """One output tensor: what it reads and how it is computed."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # output dtype
    inputs: list[TensorRef]
    compute: Callable[[list[torch.Tensor]], torch.Tensor]
    cast_inputs: bool = True  # False for integer buffers copied as they are
    info: dict = field(default_factory=dict)

    @property
    def read_bytes(self) -> int:
        return sum(leaf.nbytes for r in self.inputs for leaf in r.leaves())

    @property
    def out_bytes(self) -> int:
        return nbytes_of(self.shape, self.dtype)


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


def estimate_peak_bytes(steps: Sequence[Step], compute_dtype: torch.dtype | None, prefetch: int) -> int:
    """Tensor memory the executor may hold at once: `prefetch` steps queued,
    one computing with a working copy of each input, one waiting to be written."""
    if not steps:
        return 0
    el = torch.empty((), dtype=compute_dtype).element_size() if compute_dtype else None

    def footprint(s: Step) -> int:
        loaded = sum(r.numel * (el or r.dtype.itemsize) for r in s.inputs)
        return loaded + s.out_bytes

    biggest = max(footprint(s) for s in steps)
    # queued inputs + compute (inputs, ~2x workspace, result) + writer queue
    return biggest * (prefetch + 3)


def execute(
    steps: Sequence[Step],
    sink,
    *,
    device: str | torch.device | None = "auto",
    compute_dtype: torch.dtype | None = torch.float32,
    prefetch: int = 2,
    progress: bool = True,
    allow_nonfinite: bool = False,
    desc: str = "merging",
) -> dict:
    """Run `steps` in order, writing each result to `sink`; aborts the sink on failure.

    Returns timing stats: {"tensors", "read_bytes", "written_bytes", "seconds"}.
    """
    dev = resolve_device(device)
    in_q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    out_q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    errors: list[BaseException] = []
    on_cpu = dev.type == "cpu"

    def reader() -> None:
        try:
            for s in steps:
                if stop.is_set():
                    return
                dt = compute_dtype if (s.cast_inputs and on_cpu) else None
                try:
                    ts = [r.load("cpu", dt) for r in s.inputs]
                except WeightspaceError:
                    raise
                except Exception as e:
                    raise WeightspaceError(f"reading inputs of tensor {s.name!r}: {e}") from e
                _put(in_q, (s, ts), stop)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)
            stop.set()
        finally:
            _put(in_q, _DONE, stop, force=True)

    def writer() -> None:
        try:
            while True:
                item = out_q.get()
                if item is _DONE:
                    return
                name, t = item
                if not stop.is_set():
                    sink.write(name, t)
                    bar_update(t.numel() * t.element_size())
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            stop.set()
            while out_q.get() is not _DONE:  # drain so the producer never blocks
                pass

    total_out = sum(s.out_bytes for s in steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_out, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                   leave=False, dynamic_ncols=True)
    lock = threading.Lock()

    def bar_update(n: int) -> None:
        if bar is not None:
            with lock:
                bar.update(n)

    t0 = time.perf_counter()
    rt = threading.Thread(target=reader, name="wsmerge-reader", daemon=True)
    wt = threading.Thread(target=writer, name="wsmerge-writer", daemon=True)
    rt.start()
    wt.start()
    failed = False
    try:
        while True:
            item = in_q.get()
            if item is _DONE or stop.is_set():
                break
            s, ts = item
            if not on_cpu:
                ts = [t.to(dev, non_blocking=True) for t in ts]
                if s.cast_inputs and compute_dtype is not None:
                    ts = [t.to(compute_dtype) for t in ts]
            try:
                out = s.compute(ts)
            except WeightspaceError:
                raise
            except Exception as e:
                raise WeightspaceError(f"computing tensor {s.name!r}: {type(e).__name__}: {e}") from e
            del ts
            if tuple(out.shape) != tuple(s.shape):
                raise WeightspaceError(
                    f"tensor {s.name!r}: result has shape {list(out.shape)}, expected {list(s.shape)}"
                )
            if not allow_nonfinite and out.is_floating_point() and not bool(torch.isfinite(out).all()):
                bad = int((~torch.isfinite(out)).sum())
                raise NonFiniteError(
                    f"tensor {s.name!r}: the merge produced {bad} NaN/Inf value(s); "
                    "check the inputs and parameters, or pass --allow-nonfinite to keep them"
                )
            out = out.to(dtype=s.dtype)
            if not on_cpu:
                out = out.to("cpu")
            _put(out_q, (s.name, out), stop)
            del out
    except BaseException:
        failed = True
        stop.set()
        raise
    finally:
        _put(out_q, _DONE, stop, force=True)
        wt.join()
        while rt.is_alive():  # unblock a reader waiting on a full queue
            stop.set()
            try:
                in_q.get(timeout=0.05)
            except queue.Empty:
                pass
        rt.join()
        if bar is not None:
            bar.close()
        if failed or errors:
            sink.abort()
    if errors:
        raise errors[0]
    return {
        "tensors": len(steps),
        "read_bytes": sum(s.read_bytes for s in steps),
        "written_bytes": total_out,
        "seconds": time.perf_counter() - t0,
    }


def _put(q: queue.Queue, item, stop: threading.Event, force: bool = False) -> None:
    while True:
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            if stop.is_set() and not force:
                return

"""Reusing buffers inside one streaming run, so tensors are read (and results written) into
memory already mapped.

A streaming merge reads every input byte once into a fresh buffer. A fresh buffer larger than
glibc's mmap threshold (fixed at 8 MiB in the `wsmerge` process, see weightspace.memory) is a new
mapping, and the kernel zero-fills each of its 4 KiB pages on first touch: 200,000 page faults
and about 0.3-0.6 s of system time for the 0.8 GB a 134M bf16 three-model merge reads, more than
its compute. The I/O floor pays none of it (it reads into one reused buffer).

    with buffer_pool(256 << 20):       # in the executor's reader thread
        t = read_tensor(path, entry)   # its bytes may land in a buffer an earlier tensor used

A `BufferPool` keeps the storages it handed out (up to `cap` bytes) and hands one out again once
no tensor uses it any more: the pool's own reference is then the storage's only one
(`use_count() == 1`), and nothing outside the pool can take a new reference to it. So a tensor
that a method keeps is never overwritten, and nothing has to give buffers back. Buffers under
`min_bytes` are left to malloc, whose heap already reuses them. A fresh allocation first gives
back every free buffer, so free buffers never sit beside a new one at a peak. A pool is active
only in the threads that entered `buffer_pool` with it (the executor shares one between its
reader and compute threads) and only for the `with` block; it holds at most `cap` bytes, which
the executor sets to its prefetch budget or the largest step's inputs and output, whichever is
more: bytes that are in memory at some point anyway.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_active = threading.local()


_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)  # without it, nothing is pooled


def _use_count(storage: torch.UntypedStorage) -> int:
    return _USE_COUNT(storage._cdata)


class BufferPool:
    """Byte buffers for tensors read from disk and for methods' outputs, reused once no tensor
    refers to them."""

    def __init__(self, cap: int, min_bytes: int = 1 << 20):
        self.cap, self.min_bytes = cap, min_bytes
        self.lock = threading.Lock()  # one pool serves the reader and the compute thread
        self.held: list[torch.UntypedStorage] = []
        self.held_bytes = 0
        self.reused = self.fresh = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 CPU tensor of `nbytes` bytes (contents undefined)."""
        if nbytes < self.min_bytes or _USE_COUNT is None:  # no use count: nothing can be reused
            return torch.empty(nbytes, dtype=torch.uint8)
        with self.lock:
            return self._take(nbytes)

    def _take(self, nbytes: int) -> torch.Tensor:
        free = [i for i, s in enumerate(self.held) if _use_count(s) == 1]
        fits = [i for i in free if nbytes <= self.held[i].nbytes() <= 4 * nbytes]
        if fits:  # the smallest free buffer that holds it: no new pages to fault in
            i = min(fits, key=lambda j: self.held[j].nbytes())
            self.reused += 1
            return _tensor_on(self.held[i], nbytes)
        # a fresh buffer grows memory: first give back every free one, so that the pool never
        # adds free buffers to the peak (they are faulted in again once, after a large tensor)
        for i in reversed(free):
            self.held_bytes -= self.held.pop(i).nbytes()
        t = torch.empty(nbytes, dtype=torch.uint8)
        self.fresh += 1
        if self.held_bytes + nbytes <= self.cap:
            self.held.append(t.untyped_storage())
            self.held_bytes += nbytes
        return t

    def clear(self) -> None:
        self.held.clear()
        self.held_bytes = 0


def _tensor_on(storage: torch.UntypedStorage, nbytes: int) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,))


@contextmanager
def buffer_pool(cap: int | BufferPool, min_bytes: int = 1 << 20) -> Iterator[BufferPool]:
    """Make a BufferPool (a new one of `cap` bytes, or the one given, to share it between
    threads) the buffer source of `read_buffer` and `empty_like` in this thread for the block."""
    pool = cap if isinstance(cap, BufferPool) else BufferPool(cap, min_bytes)
    before = getattr(_active, "pool", None)
    _active.pool = pool
    try:
        yield pool
    finally:
        _active.pool = before
        if not isinstance(cap, BufferPool):
            pool.clear()


def read_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 buffer for one tensor's bytes: from this thread's active pool, else fresh."""
    pool = getattr(_active, "pool", None)
    if pool is None:
        return torch.empty(nbytes, dtype=torch.uint8)
    return pool.take(nbytes)


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`torch.empty_like(t, dtype=dtype)` (contiguous), drawn from this thread's active pool for
    CPU tensors: a method's output buffer, reused once the writer has dropped the last one."""
    dtype = dtype or t.dtype
    pool = getattr(_active, "pool", None)
    if pool is None or t.device.type != "cpu":
        return torch.empty(t.shape, dtype=dtype, device=t.device)
    nbytes = t.numel() * torch.empty((), dtype=dtype).element_size()
    return pool.take(nbytes).view(dtype).view(t.shape)

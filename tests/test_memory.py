"""weightspace.memory: freed tensors of 8 MiB and more go back to the OS (glibc), so a long
merge's peak RSS does not keep the holes of every tensor it has freed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Allocate 12 tensors of 16 MiB (touching every page), free every other one: with the mmap
# threshold fixed each freed tensor is unmapped, so RSS falls by about 96 MiB. (With glibc's
# default the threshold rises to 16 MiB at the first free, the rest come from the heap, and the
# freed ones stay resident as holes between the kept ones.)
PROBE = r"""
import sys, torch
from weightspace.memory import release_freed_buffers
set_ = release_freed_buffers() if sys.argv[1] == "set" else None
page = __import__("os").sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page / 2**20
probe = torch.ones(1 << 22); del probe           # one large free first, as in any real run
ts = [torch.ones(1 << 22) for _ in range(12)]     # 16 MiB of float32 each
before = rss()
del ts[::2]
print(set_, round(before - rss()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_large_tensors_leave_the_process_once_set():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, "set"], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert out[0] == "True"
    assert int(out[1]) >= 80, out  # MiB returned of the 96 MiB freed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_threshold_the_user_set_is_left_alone():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", PROBE, "set"], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert out[0] == "False"


# ---------------------------------------------------------------- reused buffers (weightspace.buffers)


def test_a_buffer_is_handed_out_again_only_once_no_tensor_uses_it():
    import torch

    from weightspace.buffers import BufferPool

    pool = BufferPool(cap=64 << 20)
    a = pool.take(6 << 20)
    a.fill_(7)
    ptr = a.data_ptr()
    kept = a.view(torch.float32)[:10]        # a view keeps the storage in use
    del a
    b = pool.take(6 << 20)
    assert b.data_ptr() != ptr and bool((kept.view(torch.uint8) == 7).all())
    del kept
    c = pool.take(5 << 20)                   # a smaller request fits the freed buffer
    assert c.data_ptr() == ptr and c.numel() == 5 << 20
    assert (pool.reused, pool.fresh) == (1, 2)
    del b, c
    # a request more than 4x smaller does not take a large buffer; a fresh one gives back every
    # free buffer first, so free buffers never add to the peak
    small = pool.take(1 << 20)
    assert small.numel() == 1 << 20 and pool.fresh == 3 and pool.held_bytes == 1 << 20
    # below min_bytes: malloc's, not pooled; past the cap: fresh and not held
    assert pool.take(1000).numel() == 1000 and pool.held_bytes == 1 << 20
    big = pool.take(100 << 20)
    assert big.numel() == 100 << 20 and pool.held_bytes == 1 << 20


def test_reading_into_pooled_buffers_gives_the_same_tensors(tmp_path):
    import torch

    from weightspace.buffers import buffer_pool, empty_like
    from weightspace.ir import WeightSpace
    from weightspace.safetensors_io import read_header, read_tensor
    from weightspace.sink import save_space

    g = torch.Generator().manual_seed(0)
    ts = {f"t{i}": torch.randn(300 + i, 1024, generator=g) for i in range(4)}
    save_space(WeightSpace.from_tensors(ts), tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    entries, _ = read_header(path)
    with buffer_pool(16 << 20) as pool:
        got = {}
        for _ in range(3):                    # later rounds read into buffers freed by earlier ones
            got = {n: read_tensor(path, entries[n]) for n in ts}
            for n in ts:
                assert torch.equal(got[n], ts[n]), n
            out = empty_like(got["t0"])       # an output buffer from the same pool
            assert out.shape == ts["t0"].shape and out.is_contiguous()
            del got, out
        assert pool.reused > 0
    assert pool.held_bytes == 0              # released at the end of the block
    assert empty_like(ts["t0"]).shape == ts["t0"].shape   # no pool active: plain torch.empty


def test_a_merge_reads_into_reused_buffers_and_writes_the_same_bits(tmp_path, run_cli):
    """Three float32 models merged linearly and with TIES through the executor, whose reader and
    compute threads share one pool: outputs equal those computed without the pool (the reused
    buffers change no bit), and buffers were reused."""
    import safetensors.torch as st
    import torch
    import yaml

    import weightspace.buffers as buffers
    from weightspace.ir import WeightSpace

    g = torch.Generator().manual_seed(1)
    base = {f"layer{i}.weight": torch.randn(512 + 64 * (i % 2), 600, generator=g) for i in range(8)}
    models = [base] + [{n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in base.items()}
                       for _ in range(2)]
    for i, m in enumerate(models):
        WeightSpace.from_tensors(m).save(tmp_path / f"m{i}")
    specs = {
        "linear": {"merge_method": "linear", "models": [
            {"model": str(tmp_path / f"m{i}"), "parameters": {"weight": w}} for i, w in enumerate([1.0, 2.0, 3.0])]},
        "ties": {"merge_method": "ties", "base_model": str(tmp_path / "m0"), "models": [
            {"model": str(tmp_path / f"m{i}"), "parameters": {"weight": 1.0, "density": 0.3}} for i in (1, 2)]},
    }
    stats = []
    orig = buffers.BufferPool.clear

    def clear(self):
        stats.append((self.reused, self.fresh))
        orig(self)

    for method, spec in specs.items():
        (tmp_path / f"{method}.yaml").write_text(yaml.safe_dump(spec))
        buffers.BufferPool.clear = clear
        try:
            code, _, err = run_cli("run", str(tmp_path / f"{method}.yaml"), str(tmp_path / f"{method}-pooled"))
        finally:
            buffers.BufferPool.clear = orig
        assert code == 0, err
        assert stats and stats[-1][0] > 0, stats      # buffers were reused
        take = buffers.BufferPool._take                  # the same merge with every buffer fresh
        buffers.BufferPool._take = lambda self, n: torch.empty(n, dtype=torch.uint8)
        try:
            code, _, err = run_cli("run", str(tmp_path / f"{method}.yaml"), str(tmp_path / f"{method}-fresh"))
        finally:
            buffers.BufferPool._take = take
        assert code == 0, err
        a = st.load_file(tmp_path / f"{method}-pooled" / "model.safetensors")
        b = st.load_file(tmp_path / f"{method}-fresh" / "model.safetensors")
        assert a.keys() == b.keys() == base.keys()
        for n in a:
            assert torch.equal(a[n], b[n]), (method, n)
    lin = st.load_file(tmp_path / "linear-pooled" / "model.safetensors")
    for n in base:
        want = (models[0][n] + 2 * models[1][n] + 3 * models[2][n]) / 6
        torch.testing.assert_close(lin[n], want, rtol=0, atol=1e-6)


def test_without_a_storage_use_count_the_pool_holds_nothing(monkeypatch):
    """A torch without the private use count cannot tell a free buffer: every buffer is fresh and
    none is held (held ones could never be freed)."""
    import weightspace.buffers as buffers

    monkeypatch.setattr(buffers, "_USE_COUNT", None)
    pool = buffers.BufferPool(cap=64 << 20)
    assert pool.take(4 << 20).numel() == 4 << 20
    assert pool.held_bytes == 0 and pool.held == []

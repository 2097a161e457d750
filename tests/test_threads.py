"""Threads: an elementwise merge on CPU computes with one torch thread (executor.stream_threads)
unless OMP_NUM_THREADS is set, as `wsmerge run -j N` sets it; a method with reductions keeps
torch's count (its last bits depend on it, as mergekit's do); the count is put back after."""

from __future__ import annotations

import pytest
import torch

from weightspace.executor import Step, execute
from weightspace.ir import MemoryRef


class _ListSink:
    def __init__(self):
        self.got = {}

    def write(self, name, tensor):
        self.got[name] = tensor

    def abort(self):
        pass


def _threads_seen(threads) -> list[int]:
    seen: list[int] = []

    def compute(ts):
        seen.append(torch.get_num_threads())
        return ts[0] * 2

    sink = _ListSink()
    steps = [Step(f"t{i}", (3,), torch.float32, [MemoryRef(f"t{i}", torch.ones(3))], compute) for i in range(3)]
    execute(steps, sink, device="cpu", progress=False, threads=threads)
    assert torch.equal(sink.got["t1"], torch.full((3,), 2.0))
    return seen


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_execute_runs_with_the_threads_asked_for_and_puts_the_count_back(two_threads):
    assert _threads_seen(1) == [1, 1, 1]
    assert torch.get_num_threads() == 2
    assert _threads_seen(None) == [2, 2, 2]


def _spec(tmp_path, tiny_models, method):
    spec = tmp_path / f"{method}.yaml"
    base = f"base_model: {tiny_models.base}\n" if method != "linear" else ""
    params = "" if method == "model_stock" else "\n    parameters: {weight: 0.5}"
    spec.write_text(f"merge_method: {method}\n{base}models:\n"
                    f"  - model: {tiny_models.ft_a}{params}\n  - model: {tiny_models.ft_b}{params}\n")
    return spec


@pytest.mark.parametrize("method, args, expect", [
    ("linear", (), 1),                  # elementwise: one thread
    ("task_arithmetic", (), 1),
    ("ties", (), 1),                    # thread-invariant: integer-histogram thresholds
    ("dare_ties", (), 2),               # random masks: torch's count
    ("model_stock", (), 2),             # cosines over whole tensors: torch's count
    ("linear", ("-j", "2"), 2),         # -j sets OMP_NUM_THREADS: the count asked for
])
def test_wsmerge_run_threads_by_method(tiny_models, run_cli, monkeypatch, tmp_path, two_threads,
                                       method, args, expect):
    import weightspace.executor as ex

    monkeypatch.setenv("OMP_NUM_THREADS", "")  # unset for the policy; -j's write is undone after
    seen = []
    orig = ex._Run.compute

    def compute(self, s, ts):
        seen.append(torch.get_num_threads())
        return orig(self, s, ts)

    monkeypatch.setattr(ex._Run, "compute", compute)
    code, _, err = run_cli("run", str(_spec(tmp_path, tiny_models, method)), str(tmp_path / "out"),
                           "--no-progress", *args)
    assert code == 0, err
    assert seen and set(seen) == {expect}
    assert torch.get_num_threads() == 2


def test_ties_gives_the_same_bits_with_one_thread_and_two(tiny_models, run_cli, monkeypatch, tmp_path,
                                                          two_threads):
    """TIES computes with one thread because its result does not depend on the count: the same
    merge with -j 2 (two threads) is bit for bit the same, at densities that trim."""
    import safetensors.torch as st

    monkeypatch.setenv("OMP_NUM_THREADS", "")
    spec = tmp_path / "ties.yaml"
    spec.write_text(f"merge_method: ties\nbase_model: {tiny_models.base}\nmodels:\n"
                    f"  - model: {tiny_models.ft_a}\n    parameters: {{weight: 0.7, density: 0.3}}\n"
                    f"  - model: {tiny_models.ft_b}\n    parameters: {{weight: 0.5, density: 0.6}}\n")
    outs = []
    for i, args in enumerate([(), ("-j", "2")]):
        code, _, err = run_cli("run", str(spec), str(tmp_path / f"o{i}"), "--no-progress", *args)
        assert code == 0, err
        outs.append(st.load_file(tmp_path / f"o{i}" / "model.safetensors"))
    assert outs[0].keys() == outs[1].keys()
    for n in outs[0]:
        assert torch.equal(outs[0][n], outs[1][n]), n

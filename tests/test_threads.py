"""The streaming executor computes with one torch thread on CPU (weightspace.executor.stream_threads),
unless OMP_NUM_THREADS is set, as `wsmerge run -j N` sets it; the caller's count is put back."""

from __future__ import annotations

import os

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


def _threads_seen_by_compute() -> tuple[list[int], dict]:
    seen: list[int] = []

    def compute(ts):
        seen.append(torch.get_num_threads())
        return ts[0] * 2

    sink = _ListSink()
    steps = [Step(f"t{i}", (3,), torch.float32, [MemoryRef(f"t{i}", torch.ones(3))], compute) for i in range(3)]
    execute(steps, sink, device="cpu", progress=False)
    return seen, sink.got


def test_cpu_compute_runs_on_one_thread_and_the_count_is_put_back(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen, got = _threads_seen_by_compute()
        assert seen == [1, 1, 1]
        assert torch.get_num_threads() == 2
        assert torch.equal(got["t1"], torch.full((3,), 2.0))
    finally:
        torch.set_num_threads(before)


def test_omp_num_threads_in_the_environment_is_left_to_torch(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert _threads_seen_by_compute()[0] == [2, 2, 2]
    finally:
        torch.set_num_threads(before)


def test_run_j_sets_the_thread_count_the_merge_computes_with(tiny_models, run_cli, monkeypatch, tmp_path):
    # -j writes OMP_NUM_THREADS into this process's environment: monkeypatch puts it back
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    before = torch.get_num_threads()
    seen = []
    import weightspace.executor as ex

    orig = ex._Run.compute

    def compute(self, s, ts):
        seen.append(torch.get_num_threads())
        return orig(self, s, ts)

    monkeypatch.setattr(ex._Run, "compute", compute)
    spec = tmp_path / "linear.yaml"
    spec.write_text(f"merge_method: linear\nmodels:\n  - model: {tiny_models.ft_a}\n    parameters: {{weight: 0.5}}\n"
                    f"  - model: {tiny_models.ft_b}\n    parameters: {{weight: 0.5}}\n")
    try:
        code, _, err = run_cli("run", str(spec), str(tmp_path / "out"), "-j", "2", "--no-progress")
        assert code == 0, err
        assert seen and set(seen) == {2}
        assert os.environ["OMP_NUM_THREADS"] == "2"
    finally:
        torch.set_num_threads(before)

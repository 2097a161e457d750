"""The wsmerge commands behave alike: interrupts, -v, --device, error style, -o, the demo, help
examples that run, zoo build progress and the dry-run's memory figure."""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from cli.main import wsmerge

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
PACKAGES = {"cli", "merges", "tests", "weightspace", "zoo", "benchmarks", "docs"}


# a zoo of 4 MLPs in two batches (one per width), trained in seconds
ZOO_SPEC = """
name: tiny
dataset: digits
arch: {arch: mlp, depth: 1}
train: {epochs: 1, batch_size: 128}
grid:
  width: [4, 8]
  seed: [0, 1]
metrics: {max_examples: 64, hessian_iters: 2, trace_samples: 2, bezier_steps: 2}
"""


def _walk(cmd: click.Command, path: tuple[str, ...] = ("wsmerge",)):
    """(path, command) for every command of the tree, in the order they are defined."""
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _walk(sub, (*path, name))


COMMANDS = list(_walk(wsmerge))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# 9. zoo build reports progress while batches train, not only when they finish


def test_zoo_build_reports_progress_as_models_finish(tmp_path):
    from zoo.build import build_zoo
    from zoo.spec import parse_zoo_spec

    spec = parse_zoo_spec(ZOO_SPEC.replace("epochs: 1", "epochs: 3").replace("[4, 8]", "[4, 8, 6]"))
    events = []
    saved = []
    report = build_zoo(spec, tmp_path / "z", workers=1, progress=False, on_progress=events.append,
                       on_model=lambda row: saved.append(len(events)))
    assert report.trained == 6
    # 3 batches of 2 models x 3 epochs: every epoch of every batch, then each saved model
    assert [(e.models_done, e.epochs_done) for e in events] == [
        (0, 2), (0, 4), (0, 6), (1, 6), (2, 6), (2, 8), (2, 10), (2, 12), (3, 12), (4, 12),
        (4, 14), (4, 16), (4, 18), (5, 18), (6, 18)]
    assert all(e.models_total == 6 and e.epochs_total == 18 for e in events)
    assert saved[0] < len(events) / 2                    # the first models are saved early
    assert [e.seconds for e in events] == sorted(e.seconds for e in events)


def test_zoo_build_progress_comes_from_worker_processes_while_they_train(tmp_path):
    from zoo.build import build_zoo
    from zoo.spec import parse_zoo_spec

    spec = parse_zoo_spec(ZOO_SPEC.replace("epochs: 1", "epochs: 30"))
    events = []
    build_zoo(spec, tmp_path / "z", workers=2, progress=False, on_progress=events.append)
    before_first_save = [e for e in events if e.models_done == 0]
    assert before_first_save and before_first_save[-1].epochs_done >= 1    # epochs arrived from a worker
    assert events[-1].models_done == 4 and events[-1].epochs_done == 120
    assert [e.epochs_done for e in events] == sorted(e.epochs_done for e in events)


# ---------------------------------------------------------------------------------------------
# 10. the dry run's peak memory is the plan's own, capped by the prefetch budget


def test_dry_run_peak_memory_is_the_plans_own(tmp_path, run_cli, monkeypatch):
    import weightspace.executor as ex
    from weightspace.merge import plan_merge
    from weightspace.spec import load_spec

    code, out, err = run_cli("run", EXAMPLES / "ties.yaml", "--dry-run", "--json")
    assert code == 0, err
    plan = json.loads(out)
    peak = plan["estimated_peak_tensor_bytes"]
    biggest = max(s["read_bytes"] for s in plan["steps"])
    # 161 KiB written from 645 KiB read: the figure is of that order, not the 256 MiB budget
    assert biggest < peak <= plan["read_bytes"] + plan["write_bytes"]
    assert peak < ex.DEFAULT_PREFETCH_BYTES / 100
    code, out, _ = run_cli("run", EXAMPLES / "ties.yaml", "--dry-run")
    assert f"peak memory    about {peak / 1024:.2f} KiB of tensors" in out

    # what the reader really holds at once never exceeds the estimate
    held = []
    real_acquire = ex._ByteBudget.acquire

    def acquire(self, n):
        ok = real_acquire(self, n)
        held.append(self.used)
        return ok

    monkeypatch.setattr(ex._ByteBudget, "acquire", acquire)
    code, _, err = run_cli("run", EXAMPLES / "ties.yaml", tmp_path / "out", "--no-progress")
    assert code == 0, err
    assert 0 < max(held) <= peak

    # a plan bigger than the budget: the inputs are capped by it, the estimate stays bounded
    steps = plan_merge(load_spec(EXAMPLES / "ties.yaml"), spec_dir=EXAMPLES).steps
    loaded = [ex._loaded_bytes(s, torch.float32) for s in steps]
    budget = 3 * max(loaded)
    capped = ex.estimate_peak_bytes(steps, torch.float32, prefetch_bytes=budget)
    assert capped < ex.estimate_peak_bytes(steps, torch.float32)
    assert budget < capped <= budget + 6 * max(s.out_bytes for s in steps) + 2 * max(loaded)
    # a step larger than the budget is let through alone: never reported below its own inputs
    assert ex.estimate_peak_bytes(steps, torch.float32, prefetch_bytes=1) >= max(loaded)

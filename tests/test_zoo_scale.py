"""Zoos at scale: catalog writes linear in the zoo's size (the catalog log and its compaction),
the same rows for every reader, recovery from kills at any step, work units that carry paths
locally and bytes on Ray, and the torch threads every worker gets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from weightspace.errors import InputError
from weightspace.zoo import executors
from weightspace.zoo.executors import map_units
from weightspace.zoo.store import CATALOG, LOG, Zoo, is_zoo, read_catalog, write_catalog


def payload(i: int, epochs: tuple[int, ...] = (0, 1)) -> dict:
    """A model as build_zoo hands it to the zoo (weights: a few bytes; the catalog is what counts)."""
    mid = f"m{i:05d}"
    rows = [{"model_id": mid, "epoch": e, "final": e == epochs[-1], "dataset": "digits", "arch": "mlp",
             "width": 4 + i % 3, "seed": i, "train_loss": 1.0 / (i + 1), "hist_val_acc": [0.5] * e}
            for e in epochs]
    files = {e: {"model.safetensors": b"x" * 8, "config.json": "{}"} for e in epochs}
    return {"model_id": mid, "rows": rows, "files": files}


def catalog_bytes_written(root: Path, step) -> int:
    """Bytes `step()` adds to the catalog: growth of the log, plus catalog.parquet whenever it is
    replaced (a new inode: atomic_file writes a new file and renames it over the old)."""
    def state():
        c, log = root / CATALOG, root / LOG
        return ((c.stat().st_ino, c.stat().st_size) if c.exists() else (None, 0),
                log.stat().st_size if log.exists() else 0)

    (ino0, _), log0 = state()
    step()
    (ino1, size1), log1 = state()
    return max(0, log1 - log0) + (size1 if ino1 != ino0 else 0)


# ---------------------------------------------------------------------------------------------
# catalog writes are linear in the zoo's size

def test_catalog_bytes_written_grow_linearly_with_the_models(tmp_path):
    """300 models saved one at a time write about the same catalog bytes each, the 300th as the
    first (rewriting the catalog after every model wrote ~N^2/2 rows), and the zoo ends as one
    catalog.parquet holding every row."""
    root = tmp_path / "z"
    zoo = Zoo(root, create=True)
    per_model = [catalog_bytes_written(root, lambda i=i: zoo.add_model(payload(i))) for i in range(300)]
    final = catalog_bytes_written(root, zoo.compact)
    assert not (root / LOG).exists()
    rows = read_catalog(root / CATALOG)
    assert len(rows) == 600 and final == (root / CATALOG).stat().st_size
    first, last = sum(per_model[:50]), sum(per_model[-50:])
    assert last <= 1.1 * first, (first, last)              # constant per model, not growing
    total = sum(per_model) + final
    assert total <= 3 * ((root / CATALOG).stat().st_size + sum(per_model)), total
    # the old scheme's bill for the same zoo: every prefix of the catalog written once
    assert total < 0.05 * sum(len(json.dumps(rows[: 2 * k])) for k in range(1, 301))


def test_metrics_updates_append_too(tmp_path):
    root = tmp_path / "z"
    zoo = Zoo(root, create=True)
    zoo.add_models([payload(i) for i in range(200)])
    zoo.compact()
    sizes = [catalog_bytes_written(root, lambda i=i: zoo.update_rows({(f"m{i:05d}", 1): {"cka": 0.5 + i}}))
             for i in range(200)]
    assert max(sizes) < 200 and sum(sizes) < 200 * 200      # a line each; no catalog rewrite
    zoo.compact()
    by_key = {(r["model_id"], r["epoch"]): r for r in read_catalog(root / CATALOG)}
    assert by_key[("m00007", 1)]["cka"] == 7.5 and by_key[("m00007", 0)]["cka"] is None


# ---------------------------------------------------------------------------------------------
# every reader sees the rows a compacted catalog holds

def build_with_log(root: Path) -> Zoo:
    """A zoo with a compacted part and a log: puts, an update, a model written again, a drop."""
    zoo = Zoo(root, create=True)
    zoo.add_models([payload(i) for i in range(6)])
    zoo.compact()
    zoo.add_models([payload(i) for i in range(6, 9)])
    zoo.update_rows({("m00001", 1): {"cka": 0.25}, ("m00007", 0): {"cka": 0.5, "mc_linear": -1.0}})
    zoo.add_model(payload(2))                                   # written again: replaces its rows
    zoo.drop_models(["m00004"])
    return zoo


def test_a_log_reads_as_its_compacted_catalog(tmp_path):
    root = tmp_path / "z"
    build_with_log(root)
    before = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
    assert LOG in before
    seen = Zoo(root).rows                                       # read-only: the log applied in memory
    assert {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()} == before
    assert len(seen) == 8 * 2 and "m00004" not in {r["model_id"] for r in seen}
    Zoo(root, write=True)                                       # a writing open compacts
    assert not (root / LOG).exists()
    assert read_catalog(root / CATALOG) == seen                 # the same rows, order and types
    assert Zoo(root).rows == seen


def test_a_zoo_killed_during_its_first_build_is_a_zoo(tmp_path):
    root = tmp_path / "z"
    zoo = Zoo(root, create=True)
    zoo.add_models([payload(0), payload(1)])                    # killed here: a log, no catalog yet
    assert not (root / CATALOG).exists() and is_zoo(root)
    assert Zoo(root).model_ids == {"m00000", "m00001"}


def test_kills_at_every_step_of_writing_the_catalog(tmp_path):
    root = tmp_path / "z"
    build_with_log(root)
    want = Zoo(root).rows
    log = (root / LOG).read_bytes()
    # a kill in the middle of appending a line: the torn line is left out, its model adopted
    torn = tmp_path / "copy"
    shutil.copytree(root, torn)
    zoo = Zoo(torn, write=True)
    zoo.add_model(payload(20))
    line = json.dumps({"put": [{**r, "path": f"models/m00021/epoch-{r['epoch']:04d}"}
                               for r in payload(21)["rows"]]})
    with open(torn / LOG, "a") as f:
        f.write(line[:-7])                                      # cut short: no newline
    (torn / "models" / "m00021").mkdir()                        # its folder, renamed into place
    (torn / "models" / "m00021" / "rows.json").write_text(json.dumps(
        [{**r, "path": f"models/m00021/epoch-{r['epoch']:04d}"} for r in payload(21)["rows"]]))
    for e in (0, 1):
        d = torn / "models" / "m00021" / f"epoch-{e:04d}"
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
    z = Zoo(torn)
    assert z.adopted == ["m00021"] and len(z.rows) == len(want) + 4   # m00020 from the log
    Zoo(torn, write=True)                                       # folds both in, drops the torn line
    assert len(read_catalog(torn / CATALOG)) == len(want) + 4 and not (torn / LOG).exists()
    # a kill during compaction, after the new catalog replaced the old but before the log went:
    # replaying the log over the catalog that already holds it changes nothing
    write_catalog(root / CATALOG, want)
    assert (root / LOG).read_bytes() == log
    assert Zoo(root).rows == want
    Zoo(root, write=True)
    assert read_catalog(root / CATALOG) == want and not (root / LOG).exists()


def test_a_reader_racing_a_compaction_sees_every_row(tmp_path, monkeypatch):
    """A writer compacts between a reader's read of catalog.parquet and of the log: the reader
    notices (the log is gone, the catalog is a new file) and reads again, instead of showing the
    old catalog without the rows the log held."""
    from weightspace.zoo import store

    root = tmp_path / "z"
    writer = build_with_log(root)
    want = Zoo(root).rows
    real, calls = store.read_log, []

    def compact_first(path, root_):
        calls.append(path)
        if len(calls) == 1:
            writer.compact()                                    # the catalog replaced, the log removed
        return real(path, root_)

    monkeypatch.setattr(store, "read_log", compact_first)
    assert Zoo(root).rows == want and len(calls) == 1 and not (root / LOG).exists()


def test_a_damaged_log_line_is_refused_naming_the_file_and_line(tmp_path):
    root = tmp_path / "z"
    build_with_log(root)
    lines = (root / LOG).read_bytes().split(b"\n")
    (root / LOG).write_bytes(b"\n".join([lines[0], b"{not json", *lines[1:]]))
    with pytest.raises(InputError, match=rf"{LOG} line 2: not valid JSON"):
        Zoo(root)
    bad = {"put": [{"model_id": "m1", "epoch": 0, "path": "../../etc"}]}
    (root / LOG).write_bytes(b"\n".join([lines[0], json.dumps(bad).encode(), b""]))
    with pytest.raises(InputError, match=rf"{LOG} line 2: row 0 .*'../../etc', which leaves the zoo"):
        Zoo(root)
    (root / LOG).write_bytes(json.dumps({"update": [["m00001", 1, {"path": "/etc"}]]}).encode() + b"\n")
    with pytest.raises(InputError, match="line 1: an update is a list of"):
        Zoo(root)


def test_an_old_zoo_opens_unchanged(tmp_path):
    """A zoo of the format before the log (a catalog.parquet alone) reads, and a writing open that
    has nothing to fold in leaves it byte for byte."""
    root = tmp_path / "z"
    zoo = Zoo(root, create=True)
    zoo.add_models([payload(i) for i in range(3)])
    zoo.compact()
    before = (root / CATALOG).read_bytes()
    assert len(Zoo(root).rows) == 6
    Zoo(root, write=True).compact()
    assert (root / CATALOG).read_bytes() == before and not (root / LOG).exists()


# ---------------------------------------------------------------------------------------------
# work units: paths locally, bytes only on Ray

def test_metrics_units_carry_paths_and_ray_gets_bytes(tmp_path, monkeypatch):
    from weightspace.zoo import survey
    from weightspace.zoo.build import build_zoo
    from weightspace.zoo.spec import parse_zoo_spec

    root = tmp_path / "z"
    build_zoo(parse_zoo_spec("arch: {arch: mlp, depth: 1, width: 4}\ntrain: {epochs: 1}\n"
                             "grid: {seed: [0, 1, 2]}\nmetrics: {max_examples: 64, hessian_iters: 2, "
                             "trace_samples: 2, bezier_steps: 2}\n"), root, workers=1, progress=False)
    seen = []
    real = survey.map_units

    def spy(fn, units, **kw):
        seen.extend(units)
        assert kw["ship"] is survey.ship_unit
        return real(fn, units, **kw)

    monkeypatch.setattr(survey, "map_units", spy)
    assert survey.compute_metrics(root, workers=1) == 3
    assert len(seen) == 3
    for u in seen:
        assert not any(isinstance(v, bytes) for v in u.values()), u.keys()
        assert Path(u["path"]).is_dir() and Path(u["partner"]).is_dir()
        shipped = survey.ship_unit(u)
        assert shipped["weights"] == (Path(u["path"]) / "model.safetensors").read_bytes()
        assert shipped["partner_weights"] == (Path(u["partner"]) / "model.safetensors").read_bytes()
        # a shipped unit computes the same metrics as the unit that reads its files
        assert survey.metrics_unit(shipped) == survey.metrics_unit(u)
    assert not (root / LOG).exists()                            # compacted at the end


# ---------------------------------------------------------------------------------------------
# threads: cores // units running at once, at least 1, in every worker

def threads_of_worker(unit: int) -> int:
    return torch.get_num_threads()


@pytest.fixture
def caller_threads():
    """Set this process's torch threads for a test (the suite runs with 1), put back after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("cores, caller, workers, units, want", [
    (8, 8, 2, 4, 4), (8, 8, 3, 6, 2), (2, 2, 4, 4, 1), (8, 8, 4, 2, 4), (1, 1, 1, 3, 1),
    (8, 1, 2, 4, 1), (8, 3, 1, 1, 3)])              # the caller's own count caps it
def test_threads_per_worker_rule(monkeypatch, caller_threads, cores, caller, workers, units, want):
    monkeypatch.setattr(executors, "available_cores", lambda: cores)
    caller_threads(caller)
    assert executors.threads_per_worker(workers, units) == want


def test_every_local_worker_gets_the_rule_and_the_caller_keeps_its_own(monkeypatch, caller_threads):
    monkeypatch.setattr(executors, "available_cores", lambda: 6)
    caller_threads(5)
    # in this process (one worker): all 6 cores, capped by the caller's 5, while a unit runs;
    # the caller's count after
    assert list(map_units(threads_of_worker, [0, 1], workers=1)) == [5, 5]
    assert torch.get_num_threads() == 5
    # two worker processes: 6 // 2 each
    assert sorted(map_units(threads_of_worker, [0, 1, 2, 3], workers=2)) == [3, 3, 3, 3]
    # three workers for two units: two run at once
    assert sorted(map_units(threads_of_worker, [0, 1], workers=3)) == [3, 3]
    caller_threads(1)                               # OMP_NUM_THREADS=1 or set_num_threads(1) holds
    assert sorted(map_units(threads_of_worker, [0, 1], workers=2)) == [1, 1]


@pytest.mark.requires("ray")
def test_every_ray_task_gets_the_rule(monkeypatch, caller_threads):
    monkeypatch.setattr(executors, "available_cores", lambda: 6)
    caller_threads(6)
    got = list(map_units(lambda u: (u, torch.get_num_threads()), list(range(5)), executor="ray", workers=2))
    assert sorted(got) == [(u, 3) for u in range(5)]


def test_readme_zoo_scale_table_is_the_committed_results():
    """The README's table is `benchmarks/zoo_scale.py --table` of the committed JSONs, so it cannot
    drift from what was measured."""
    import importlib.util

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("zoo_scale", repo / "benchmarks" / "zoo_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.committed_table() in (repo / "README.md").read_text()

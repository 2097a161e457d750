"""Zoo training, specs, storage, resumable builds, executors and the zoo CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from weightspace.binding import call, load_into, space_of
from weightspace.errors import InputError, SpecError
from weightspace.sources import load_space
from weightspace.zoo.arch import build_model, model_from_config
from weightspace.zoo.build import build_zoo
from weightspace.zoo.data import load_task
from weightspace.zoo.phases import PhaseRules, classify, phase_grid
from weightspace.zoo.spec import parse_zoo_spec
from weightspace.zoo.store import LOG, Zoo, is_zoo, read_catalog
from weightspace.zoo.train import ModelRun, TrainConfig, group_runs, lr_factor, train, train_batch


@pytest.fixture(scope="module")
def task():
    return load_task("digits")


SMALL_SPEC = """
name: small
dataset: digits
arch: {arch: mlp, depth: 1}
train: {epochs: 2, checkpoints: [0, 1], batch_size: 64}
grid:
  width: [4, 8]
  seed: [0, 1]
metrics: {max_examples: 128, hessian_iters: 5, trace_samples: 4, bezier_steps: 10}
"""


# ---------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_optimizer_matches_torch_optim(task, optimizer):
    cfg = TrainConfig(optimizer=optimizer, lr=0.01, momentum=0.8, weight_decay=0.05, epochs=2,
                      batch_size=100, schedule="constant")
    run = ModelRun(arch={"arch": "mlp", "width": 12, "depth": 1}, train=cfg, seed=5)
    ours = train(run, task=task).checkpoints[-1].tensors

    # the reference: torch.optim on one module, same init, same data order
    torch.manual_seed(5)
    model = build_model(run.arch, task.input_shape, task.num_classes)
    params = list(model.parameters())
    opt = {"sgd": lambda: torch.optim.SGD(params, lr=0.01, momentum=0.8, weight_decay=0.05),
           "adam": lambda: torch.optim.Adam(params, lr=0.01, weight_decay=0.05),
           "adamw": lambda: torch.optim.AdamW(params, lr=0.01, weight_decay=0.05)}[optimizer]()
    gen = torch.Generator().manual_seed(5)
    n = len(task.train)
    for _ in range(2):
        order = torch.randperm(n, generator=gen)
        for b in range(0, n, 100):
            idx = order[b:b + 100]
            opt.zero_grad()
            F.cross_entropy(model(task.train.x[idx]), task.train.y[idx]).backward()
            opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.detach(), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("arch", [{"arch": "mlp", "width": 16}, {"arch": "resmlp", "width": 8},
                                  {"arch": "cnn", "width": 4}, {"arch": "vit", "width": 8, "heads": 2,
                                                                "depth": 1, "patch": 4}])
def test_batched_training_matches_one_at_a_time(task, arch):
    cfg = TrainConfig(epochs=1, batch_size=128, checkpoints=(0,))
    runs = [ModelRun(arch=arch, train=cfg.model_copy(update={"lr": lr}), seed=s)
            for s, lr in [(0, 0.05), (1, 0.02), (2, 0.1)]]
    batched = train_batch(runs, task=task)
    alone = train(runs[1], task=task)
    for name, t in alone.checkpoints[-1].tensors.items():
        torch.testing.assert_close(batched[1].checkpoints[-1].tensors[name], t, rtol=1e-4, atol=1e-5)
    # epoch-0 checkpoint is the seeded init, the same as building the model by hand
    torch.manual_seed(2)
    init = build_model(arch, task.input_shape, task.num_classes).state_dict()
    for name, t in init.items():
        assert torch.equal(batched[2].checkpoints[0].tensors[name], t)


def test_training_is_deterministic_and_learns(task):
    cfg = TrainConfig(epochs=3, batch_size=32, checkpoints=(1,))
    runs = [ModelRun(arch={"arch": "mlp", "width": 32}, train=cfg, seed=s) for s in (0, 1)]
    a, b = train_batch(runs, task=task), train_batch(runs, task=task)
    for ra, rb in zip(a, b):
        for ck_a, ck_b in zip(ra.checkpoints, rb.checkpoints):
            assert ck_a.epoch == ck_b.epoch
            for n in ck_a.tensors:
                assert torch.equal(ck_a.tensors[n], ck_b.tensors[n])
    r = a[0]
    assert [c.epoch for c in r.checkpoints] == [1, 3]
    assert len(r.history["val_acc"]) == 3
    assert r.checkpoints[-1].metrics["test_acc"] > 0.7          # chance is 0.1
    # the stored metrics are what the weights give
    model = build_model(runs[0].arch, task.input_shape, task.num_classes)
    logits = call(model, r.checkpoints[-1].tensors, task.test.x)
    acc = (logits.argmax(-1) == task.test.y).float().mean().item()
    assert acc == pytest.approx(r.checkpoints[-1].metrics["test_acc"], abs=1e-6)
    # different seeds give different models
    assert not torch.equal(a[0].checkpoints[-1].tensors["head.weight"], a[1].checkpoints[-1].tensors["head.weight"])


def test_lr_schedules_formulas():
    assert lr_factor("constant", 7, 10, 0) == 1.0
    assert lr_factor("cosine", 0, 10, 0) == 1.0
    assert lr_factor("cosine", 5, 10, 0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor("linear", 4, 10, 0) == pytest.approx(0.6)
    assert lr_factor("step", 6, 10, 0) == pytest.approx(0.1)
    assert lr_factor("step", 8, 10, 0) == pytest.approx(0.01)
    # warmup: linear ramp over the first steps, then the schedule over the rest
    assert lr_factor("cosine", 0, 10, 4) == pytest.approx(0.25)
    assert lr_factor("cosine", 7, 10, 4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_data_fraction_uses_a_seeded_subset(task):
    cfg = TrainConfig(epochs=1, batch_size=1000, data_fraction=0.25)
    runs = [ModelRun(arch={"arch": "mlp", "width": 4}, train=cfg, seed=s) for s in (0, 1)]
    res = train_batch(runs, task=task)
    # one step per epoch over 25% of 1078 examples: history's running loss is that batch's loss
    assert len(res[0].history["train_loss"]) == 1
    from weightspace.zoo.train import _train_indices

    i0, i1 = _train_indices(runs[0], 1078), _train_indices(runs[1], 1078)
    assert len(i0) == round(0.25 * 1078) and len(set(i0.tolist())) == len(i0)
    assert not torch.equal(i0, i1)


def test_group_runs_batches_what_can_share_a_vmap():
    runs = [ModelRun(arch={"arch": "mlp", "width": w}, train=TrainConfig(batch_size=b, lr=lr), seed=s)
            for w in (4, 8) for b in (16, 32) for lr in (0.1, 0.01) for s in (0, 1, 2)]
    groups = group_runs(runs, max_batch=4)
    # width and batch size split groups; lr and seed do not; max_batch caps a group
    assert sorted(len(g) for g in groups) == [2, 2, 2, 2, 4, 4, 4, 4]
    for g in groups:
        assert len({(r.arch["width"], r.train.batch_size) for r in g}) == 1


def test_binding_round_trip(task):
    torch.manual_seed(0)
    m = build_model({"arch": "resmlp"}, task.input_shape, 10)
    ws = space_of(m, config={"x": 1})
    m2 = build_model({"arch": "resmlp"}, task.input_shape, 10)
    load_into(m2, ws)
    x = task.test.x[:7]
    torch.testing.assert_close(m2(x), m(x))
    torch.testing.assert_close(call(m2, ws, x), m(x))
    with pytest.raises(InputError, match=r"tensor 'stem.weight' in ResMLP has shape \[32, 64\], but ResMLP expects \[16, 64\]"):
        load_into(build_model({"arch": "resmlp", "width": 16}, task.input_shape, 10), ws)
    with pytest.raises(InputError, match="has no tensor 'head.bias'"):
        load_into(m2, {k: v.load() for k, v in ws.items() if k != "head.bias"})


# ---------------------------------------------------------------------------------------------
# specs


def test_spec_grid_expands_to_runs():
    s = parse_zoo_spec(SMALL_SPEC)
    runs = s.runs()
    assert len(runs) == s.count() == 4
    assert {(r.arch["width"], r.seed) for r in runs} == {(4, 0), (4, 1), (8, 0), (8, 1)}
    assert all(r.arch["depth"] == 1 and r.train.epochs == 2 for r in runs)
    assert len({r.model_id for r in runs}) == 4
    # the id is a content hash: same config, same id
    assert parse_zoo_spec(SMALL_SPEC).runs()[0].model_id == runs[0].model_id


@pytest.mark.parametrize("text, match", [
    ("grid: {widht: [1, 2]}", r"grid.widht: unknown axis. Did you mean 'width'"),
    ("grid: {width: []}", r"grid \(line 1\): axis 'width' is empty"),
    ("arch: {arch: mpl}", r"unknown architecture 'mpl'. Did you mean 'mlp'"),
    ("dataset: digitz", r"unknown dataset 'digitz'"),
    ("grid: {lr: [0.1, -1]}", r"train.lr: Input should be greater than 0 \(grid point lr=-1\)"),
    ("train: {epochs: 3, checkpoints: [5]}", r"checkpoint epoch 5 is outside 0..epochs \(3\)"),
    ("trian: {}", r"unknown key 'trian'; did you mean 'train'"),
    ("arch: {arch: mlp, heads: 2}", r"mlp has no knob 'heads'"),
    ("- 1", r"must be a YAML mapping"),
])
def test_spec_errors_name_the_field(text, match):
    with pytest.raises(SpecError, match=match):
        parse_zoo_spec(text, source="z.yaml")


def test_large_zoo_needs_yes(tmp_path):
    s = parse_zoo_spec("grid: {seed: [" + ",".join(map(str, range(1001))) + "]}")
    with pytest.raises(SpecError, match="1001 models .*--yes"):
        build_zoo(s, tmp_path / "z", progress=False)
    assert not (tmp_path / "z").exists()


# ---------------------------------------------------------------------------------------------
# building and storage


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo") / "z"
    report = build_zoo(parse_zoo_spec(SMALL_SPEC), root, workers=1, progress=False)
    assert report.trained == 4
    return root


def test_zoo_find_names_models_by_their_columns(small_zoo, run_cli):
    import pyarrow.parquet as pq

    rows = pq.read_table(small_zoo / "catalog.parquet").to_pylist()
    want = sorted(small_zoo / r["path"] for r in rows if r["final"] and r["width"] == 8)
    code, out, err = run_cli("zoo", "find", small_zoo, "width=8")
    assert code == 0, err
    assert [Path(p) for p in out.split()] == [p.resolve() for p in want] and len(want) == 2
    seed = next(r["seed"] for r in rows if r["width"] == 8)
    code, out, _ = run_cli("zoo", "find", small_zoo, "width=8", f"seed={seed}", "--epoch", "1", "--one")
    assert code == 0 and out.strip().endswith("epoch-0001")
    code, _, err = run_cli("zoo", "find", small_zoo, "width=8", "--one")
    assert code == 1 and "2 models match width=8" in err
    code, _, err = run_cli("zoo", "find", small_zoo, "width=3")
    assert code == 1 and "no checkpoint matches width=3" in err
    code, _, err = run_cli("zoo", "find", small_zoo, "widht=8")
    assert code == 2 and "'widht' is not a column" in err and "Did you mean 'width'?" in err
    code, _, err = run_cli("zoo", "find", small_zoo, "width")
    assert code == 2 and "give COLUMN=VALUE" in err


def test_catalog_rows_and_checkpoints_reload(small_zoo, task):
    import pyarrow.parquet as pq

    rows = pq.read_table(small_zoo / "catalog.parquet").to_pylist()
    assert len(rows) == 4 * 3                               # epochs 0, 1 and the last (2)
    assert sorted({r["epoch"] for r in rows}) == [0, 1, 2]
    for col in ("model_id", "width", "batch_size", "lr", "seed", "train_loss", "test_acc", "hist_val_acc"):
        assert col in rows[0]
    final = [r for r in rows if r["final"]]
    assert len(final) == 4 and all(r["epoch"] == 2 for r in final)
    for r in final:
        assert len(r["hist_val_acc"]) == 2
        ws = load_space(small_zoo / r["path"])
        cfg = ws.meta["config"]
        assert cfg["model_id"] == r["model_id"] and cfg["epoch"] == 2 and cfg["arch"]["width"] == r["width"]
        model = model_from_config(cfg)
        logits = call(model, ws, task.test.x)
        acc = (logits.argmax(-1) == task.test.y).float().mean().item()
        assert acc == pytest.approx(r["test_acc"], abs=1e-6)
        # the structure rules read zoo names
        assert ws.structure().stacks == {"layers": 1}


def test_resume_trains_only_what_is_missing(small_zoo, tmp_path):
    root = tmp_path / "z"
    shutil.copytree(small_zoo, root)
    report = build_zoo(parse_zoo_spec(SMALL_SPEC), root, workers=1, progress=False)
    assert (report.trained, report.skipped) == (0, 4)
    bigger = SMALL_SPEC.replace("width: [4, 8]", "width: [4, 8, 6]")
    report = build_zoo(parse_zoo_spec(bigger), root, workers=1, progress=False)
    assert (report.trained, report.skipped) == (2, 4)
    assert len(read_catalog(root / "catalog.parquet")) == 6 * 3


def test_interrupted_build_is_recovered(small_zoo, tmp_path):
    root = tmp_path / "z"
    shutil.copytree(small_zoo, root)
    rows = read_catalog(root / "catalog.parquet")
    victim = rows[0]["model_id"]
    # a kill between renaming the model into place and replacing the catalog ...
    from weightspace.zoo.store import write_catalog

    write_catalog(root / "catalog.parquet", [r for r in rows if r["model_id"] != victim])
    # ... and a kill while a model was being written
    (root / "models" / ".tmp-deadbeef-x").mkdir()
    assert Zoo(root).adopted == [victim]            # read-only: seen, nothing changed
    assert (root / "models" / ".tmp-deadbeef-x").exists()
    assert len(read_catalog(root / "catalog.parquet")) == len(rows) - 3
    z = Zoo(root, write=True)
    assert z.adopted == [victim]
    assert not (root / "models" / ".tmp-deadbeef-x").exists()
    assert len(read_catalog(root / "catalog.parquet")) == len(rows)
    report = build_zoo(parse_zoo_spec(SMALL_SPEC), root, workers=1, progress=False)
    assert report.trained == 0


def test_missing_weights_clear_error_and_rebuild(small_zoo, tmp_path, run_cli):
    root = tmp_path / "z"
    shutil.copytree(small_zoo, root)
    row = next(r for r in read_catalog(root / "catalog.parquet") if r["final"])
    (root / row["path"] / "model.safetensors").unlink()
    code, out, err = run_cli("zoo", "show", str(root))
    assert code == 1
    assert f"model_id={row['model_id']}" in err and "model.safetensors, which does not exist" in err
    report = build_zoo(parse_zoo_spec(SMALL_SPEC), root, workers=1, progress=False)
    assert (report.retrained_missing, report.trained) == (1, 1)
    assert Zoo(root).missing_weights() == []


def test_not_a_zoo(tmp_path, run_cli):
    code, out, err = run_cli("zoo", "show", str(tmp_path))
    assert code == 1 and "not a zoo (has no catalog.parquet)" in err


def test_killed_build_leaves_consistent_zoo(tmp_path):
    """SIGKILL a real build mid-way: every catalog row has its weights, and a rerun finishes the zoo."""
    spec = tmp_path / "s.yaml"
    spec.write_text(SMALL_SPEC.replace("seed: [0, 1]", "seed: [0, 1, 2, 3, 4, 5]")
                    .replace("epochs: 2", "epochs: 6"))
    root = tmp_path / "z"
    cmd = [sys.executable, "-m", "weightspace.cli.main", "zoo", "build", str(spec), "-o", str(root),
           "--workers", "1", "--max-batch", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[1])
    deadline = time.time() + 60
    while time.time() < deadline:
        if is_zoo(root) and len(Zoo(root).rows) >= 3:      # the catalog log, read while it grows
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (root / LOG).is_file()                  # killed before compacting its log
    z = Zoo(root)
    assert z.missing_weights() == []
    listed = z.model_ids
    on_disk = {d.name for d in (root / "models").iterdir()}
    assert on_disk == listed                       # no weights without their row
    report = build_zoo(parse_zoo_spec(spec.read_text()), root, workers=1, progress=False)
    assert report.trained + report.skipped == 12 and report.skipped == len(listed)


def test_local_process_pool_gives_the_same_zoo(small_zoo, tmp_path):
    root = tmp_path / "z"
    build_zoo(parse_zoo_spec(SMALL_SPEC), root, workers=2, progress=False)
    a = {(r["model_id"], r["epoch"]): r for r in read_catalog(small_zoo / "catalog.parquet")}
    b = {(r["model_id"], r["epoch"]): r for r in read_catalog(root / "catalog.parquet")}
    assert a.keys() == b.keys()
    for k in a:
        assert b[k]["test_acc"] == pytest.approx(a[k]["test_acc"], abs=1e-6)
        wa, wb = load_space(small_zoo / a[k]["path"]), load_space(root / b[k]["path"])
        for n in wa:
            torch.testing.assert_close(wa[n].load(), wb[n].load())


@pytest.mark.requires("ray")
def test_ray_executor_builds_the_same_zoo(small_zoo, tmp_path):
    root = tmp_path / "z"
    report = build_zoo(parse_zoo_spec(SMALL_SPEC), root, executor="ray", workers=2, progress=False)
    assert report.trained == 4
    a = {(r["model_id"], r["epoch"]): r for r in read_catalog(small_zoo / "catalog.parquet")}
    b = {(r["model_id"], r["epoch"]): r for r in read_catalog(root / "catalog.parquet")}
    assert a.keys() == b.keys()
    for k in a:
        assert b[k]["test_acc"] == pytest.approx(a[k]["test_acc"], abs=1e-6)


def test_unknown_executor_and_missing_ray_message():
    from weightspace.zoo.executors import map_units

    with pytest.raises(SpecError, match="unknown executor 'dask'"):
        list(map_units(abs, [1], executor="dask"))


# ---------------------------------------------------------------------------------------------
# metrics, phases, CLI


def test_zoo_metrics_fill_the_catalog_and_resume(small_zoo, tmp_path):
    from weightspace.zoo.survey import compute_metrics

    root = tmp_path / "z"
    shutil.copytree(small_zoo, root)
    assert compute_metrics(root, workers=1) == 4
    final = [r for r in read_catalog(root / "catalog.parquet") if r["final"]]
    by_id = {r["model_id"]: r for r in final}
    for r in final:
        for col in ("hessian_top_eig", "hessian_trace", "gap", "mc_linear", "mc_bezier", "cka"):
            assert r[col] is not None and math.isfinite(r[col]), col
        # seeds pair up: same width, other seed, symmetric values
        p = by_id[r["pair_model_id"]]
        assert p["width"] == r["width"] and p["seed"] != r["seed"]
        assert p["pair_model_id"] == r["model_id"] and p["mc_bezier"] == r["mc_bezier"]
    assert compute_metrics(root, workers=1) == 0


def test_phase_taxonomy():
    rules = PhaseRules(fit_loss=0.05, mc_eps=0.05, cka_threshold=0.9)
    assert classify({"train_loss": 1.0, "mc_bezier": -0.5}, rules) == "I"
    assert classify({"train_loss": 1.0, "mc_bezier": 0.3}, rules) == "II"
    assert classify({"train_loss": 0.01, "mc_bezier": -0.2}, rules) == "III"
    assert classify({"train_loss": 0.01, "mc_bezier": 0.0, "cka": 0.5}, rules) == "IV-A"
    assert classify({"train_loss": 0.01, "mc_bezier": 0.01, "cka": 0.95}, rules) == "IV-B"
    assert classify({"train_loss": 0.01}, rules) is None
    rows = [{"width": w, "batch_size": b, "train_loss": 0.01 * w, "mc_bezier": -1.0 if b > 8 else 0.0,
             "cka": 0.5} for w in (1, 10) for b in (8, 64) for _ in range(2)]
    grid = phase_grid(rows, rules=rules)
    assert grid["xs"] == [8, 64] and grid["ys"] == [1, 10]
    assert grid["cells"][(1, 8)]["phase"] == "IV-A" and grid["cells"][(10, 64)]["phase"] == "I"
    assert grid["cells"][(1, 64)]["n"] == 2
    with pytest.raises(InputError, match="axis 'lr' is not a column"):
        phase_grid(rows, x="lr")


@pytest.mark.requires("plot")
def test_cli_build_show_plot(tmp_path, run_cli):
    spec = tmp_path / "s.yaml"
    spec.write_text(SMALL_SPEC.replace("width: [4, 8]", "width: [4, 8]\n  batch_size: [32, 64]"))
    root = tmp_path / "z"
    code, out, err = run_cli("zoo", "build", str(spec), "-o", str(root), "--dry-run")
    assert code == 0 and "8 models" in out and "8 to train" in out
    code, out, err = run_cli("zoo", "build", str(spec), "-o", str(root), "--workers", "1", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["trained"] == 8 and info["models_per_minute"] > 0
    code, out, err = run_cli("zoo", "show", str(root))
    assert code == 0
    header = out.splitlines()[0].split()
    assert header[:5] == ["model_id", "epoch", "width", "batch_size", "seed"]
    assert "8 checkpoint(s) of 8 model(s)" in out
    code, out, err = run_cli("zoo", "show", str(root), "--plot", str(tmp_path / "p.png"), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert len(data["rows"]) == 8 and len(data["phases"]) == 4
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, err = run_cli("zoo", "build", str(tmp_path / "nope.yaml"), "-o", str(root))
    assert code == 2 and "nope.yaml: cannot read zoo spec" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: {width: []}\n")
    code, out, err = run_cli("zoo", "build", str(bad), "-o", str(tmp_path / "z2"))
    assert code == 2 and "bad.yaml" in err and "axis 'width' is empty" in err
    assert not (tmp_path / "z2").exists()


def test_example_spec_parses():
    root = Path(__file__).resolve().parents[1]
    s = parse_zoo_spec((root / "examples/zoo/digits-phases.yaml").read_text())
    assert s.count() == 48 and set(s.grid) == {"width", "batch_size", "seed"}

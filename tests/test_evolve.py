"""wsmerge evolve: search specs, the optimisers, the search loop, its log, resuming, Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _cli_helpers import EXAMPLES

from weightspace.errors import InputError, SpecError
from weightspace.zoo.evolve import parse_search_spec, run_search
from weightspace.zoo.evolve.log import SearchLog
from weightspace.zoo.evolve.optimizer import make_optimizer

pytestmark = pytest.mark.requires("evolve")  # CMA-ES (cma), the default optimizer of these specs

DIGITS = EXAMPLES / "digits"


def spec_text(models: str | None = None, method: str = "task_arithmetic", params: str = "{lambda: 1.0}",
              search: str = "{optimizer: cma, popsize: 4, seed: 0}",
              evaluation: str = "{data: digits, split: val, test_split: test}") -> str:
    models = models or "\n".join(f"  - model: ft{i}\n    parameters: {{weight: {{search: [0, 1.5]}}}}"
                                 for i in range(3))
    return (f"merge_method: {method}\nbase_model: base\nmodels:\n{models}\nparameters: {params}\n"
            f"dtype: float32\nsearch: {search}\nevaluation: {evaluation}\n")


def parse(text: str):
    return parse_search_spec(text, "s.yaml", spec_dir=DIGITS)


# ---------------------------------------------------------------------------------------------
# the search spec: what is searched, and errors that name the field


def test_search_ranges_are_found_and_mapped_onto_the_spec():
    s = parse(spec_text(models="  - model: ft0\n    parameters: {weight: [{search: [0, 2]}, 0.5]}\n"
                               "  - model: ft1\n    parameters:\n      weight:\n"
                               "        - {filter: mlp, value: {search: [-1, 1], init: 0.5}}\n"
                               "        - {value: 1.0}"))
    assert [d.name for d in s.dims] == ["models[0].parameters.weight[0]",
                                        "models[1].parameters.weight[0].value"]
    assert s.initial() == [0.5, 0.75]                     # the middle, and init's coordinate
    data = s.candidate([0.25, 1.0])
    assert data["models"][0]["parameters"]["weight"] == [0.5, 0.5]          # 0 + 2 * 0.25
    assert data["models"][1]["parameters"]["weight"][0] == {"filter": "mlp", "value": 1.0}
    assert "search" not in data and "evaluation" not in data


def test_a_method_choice_keeps_only_the_parameters_each_method_takes():
    models = "\n".join(f"  - model: ft{i}\n    parameters: {{weight: 1.0, density: {{search: [0.1, 0.9]}}}}"
                       for i in range(3))
    s = parse(spec_text(models=models, method="{choice: [ties, task_arithmetic]}",
                        search="{optimizer: random, popsize: 4}"))
    assert s.dims[0].name == "merge_method" and s.dims[0].choices == ("ties", "task_arithmetic")
    ties = s.candidate([0.1, 0.5, 0.5, 0.5])
    ta = s.candidate([0.9, 0.5, 0.5, 0.5])
    assert ties["merge_method"] == "ties" and ties["models"][0]["parameters"]["density"] == 0.5
    assert ta["merge_method"] == "task_arithmetic" and "density" not in ta["models"][0]["parameters"]


@pytest.mark.parametrize("change, message", [
    (dict(evaluation=None), "missing the `evaluation:` block"),
    (dict(models="  - model: ft0\n    parameters: {weight: {search: [1, 0]}}\n"
                 "  - model: ft1\n    parameters: {weight: {search: [0, 1]}}"),
     "models[0].parameters.weight.search (line 5): expected lo < hi, got [1, 0]"),
    (dict(models="  - model: ft0\n    parameters: {weight: {search: [0, .nan]}}\n"
                 "  - model: ft1\n    parameters: {weight: {search: [0, 1]}}"),
     "models[0].parameters.weight.search (line 5): the range must be finite"),
    (dict(models="  - model: ft0\n    parameters: {weight: {search: 1}}\n"
                 "  - model: ft1\n    parameters: {weight: {search: [0, 1]}}"),
     "models[0].parameters.weight.search (line 5): expected [lo, hi], two numbers, got 1"),
    (dict(models="  - model: ft0\n    parameters: {weight: {search: [0, 1], step: 2}}\n"
                 "  - model: ft1\n    parameters: {weight: {search: [0, 1]}}"),
     "unknown key 'step' beside search"),
    (dict(method="ties", models="\n".join(f"  - model: ft{i}\n    parameters: {{weight: 1, density: "
                                          f"{{search: [0.2, 1.5]}}}}" for i in range(2))),
     "every searched value at its upper end"),
    (dict(search="{optimizer: cma, popsise: 4}"), "search.popsise (line 12): unknown key 'popsise'; "
                                                  "did you mean 'popsize'?"),
    (dict(search="{optimizer: nevergrad}"), "search.optimizer"),
    (dict(search="{sigma: 2}"), "search.sigma (line 12): must be in (0, 1]"),
    (dict(models="  - model: ft0\n    parameters: {weight: {search: [0, 1]}}\n  - model: ft1"),
     "CMA-ES needs at least two searched values (here: models[0].parameters.weight)"),
    (dict(evaluation="{data: digits, split: val, test_split: val}"), "evaluation.test_split"),
    (dict(evaluation="{data: digts}"), "unknown dataset 'digts'"),
    (dict(evaluation="{data: missing.jsonl}"), "evaluation.data (line 13): no such file missing.jsonl"),
    (dict(evaluation="{data: digits, metrc: accuracy}"), "unknown key 'metrc'; did you mean 'metric'?"),
    (dict(models="  - model: ft0\n    parameters: {weight: 1}\n  - model: ft1\n    parameters: {weight: 1}",
          params="{lambda: 1.0}"), "nothing to search"),
    (dict(models="  - model: nope\n    parameters: {weight: {search: [0, 1]}}\n"
                 "  - model: ft1\n    parameters: {weight: {search: [0, 1]}}"), "nope"),
])
def test_bad_search_specs_get_errors_naming_the_field(change, message):
    kwargs = {k: v for k, v in change.items() if v is not None}
    text = spec_text(**kwargs)
    if "evaluation" in change and change["evaluation"] is None:
        text = text.split("evaluation:")[0]
    with pytest.raises((SpecError, InputError)) as e:
        parse(text)
    assert message in str(e.value) and str(e.value).startswith("s.yaml")


def test_a_parameter_no_chosen_method_takes_is_an_error():
    models = "\n".join(f"  - model: ft{i}\n    parameters: {{weight: {{search: [0, 1]}}, densty: 0.5}}"
                       for i in range(2))
    with pytest.raises(SpecError, match="densty"):
        parse(spec_text(models=models, method="{choice: [ties, task_arithmetic]}"))


# ---------------------------------------------------------------------------------------------
# the optimisers


def test_cma_is_seeded_and_keeps_its_own_random_state():
    import numpy as np

    def gens(seed):
        opt = make_optimizer("cma", 3, popsize=4, sigma=0.3, seed=seed, x0=[0.5] * 3)
        out = []
        for _ in range(3):
            xs = opt.ask()
            np.random.random(5)           # someone else drawing from numpy's global state
            opt.tell(xs, [sum((v - 0.2) ** 2 for v in x) for x in xs])
            out.append(xs)
        return out, opt.state()

    (a, sa), (b, sb), (c, _) = gens(0), gens(0), gens(1)
    assert a == b and a != c
    assert sa["generation"] == 3 and sa["mean"] == sb["mean"]
    assert all(0.0 <= v <= 1.0 for g in a for x in g for v in x)     # bounded to [0, 1]


def test_random_search_draws_each_point_from_its_own_stream():
    import numpy as np

    opt = make_optimizer("random", 2, popsize=3, sigma=0.3, seed=7, x0=[0.5, 0.5])
    first = opt.ask()
    assert first[1] == np.random.default_rng([7, 0, 1]).random(2).tolist()
    opt.tell(first, [0, 0, 0])
    assert opt.ask() != first


# ---------------------------------------------------------------------------------------------
# the search: the log, best.yaml, the winner runs, failures are recorded


def _write(tmp_path: Path, text: str) -> Path:
    import shutil

    shutil.copytree(DIGITS, tmp_path / "m", ignore=shutil.ignore_patterns("*.fisher.*", "*.gram.*"))
    p = tmp_path / "m" / "search.yaml"
    p.write_text(text)
    return p


def test_a_search_logs_every_candidate_and_its_winner_is_an_ordinary_spec(tmp_path, run_cli):
    from weightspace.zoo.evolve import load_search_spec
    from weightspace.zoo.search import accuracy

    spec = _write(tmp_path, spec_text())
    out = tmp_path / "runs" / "ev"
    result = run_search(load_search_spec(spec), out, budget=10, executor="local", workers=1)
    rows = SearchLog(out).rows()
    assert [r["index"] for r in rows] == list(range(10))
    assert [(r["generation"], r["member"]) for r in rows[:5]] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    assert all(r["status"] == "ok" and 0 <= r["value"] <= 1 and r["merge_s"] > 0 for r in rows)
    best = max(rows, key=lambda r: (r["value"], -r["index"]))
    assert result["best"]["index"] == best["index"] and result["candidates"] == 10
    assert json.loads((out / "optimizer.json").read_text())["generation"] == 2   # 2 full generations told
    assert not (out / "candidates.log").read_bytes()                            # folded into the Parquet
    # best.yaml: the winner's values, paths relative to it, and `wsmerge run` merges it
    code, _, err = run_cli("run", out / "best.yaml", tmp_path / "merged", "--no-progress")
    assert code == 0, err
    assert accuracy(tmp_path / "merged", "digits", "val") == pytest.approx(best["value"], abs=1e-9)
    assert result["test"]["value"] == pytest.approx(accuracy(tmp_path / "merged", "digits", "test"), abs=1e-9)
    w = best["models[0].parameters.weight"]
    assert w == pytest.approx(1.5 * best["x"][0])
    # show, and a second run into the same directory without --resume is refused
    code, text, err = run_cli("evolve", "show", out)
    assert code == 0 and f"best: candidate {best['index']}, accuracy {best['value']:.4f}" in text
    code, _, err = run_cli("evolve", spec, "-o", out, "--budget", "4", "--executor", "local", "--workers", "1")
    assert code == 2 and "already holds a search; pass --resume" in err


def test_the_example_runs(tmp_path, run_cli):
    out = tmp_path / "ev"
    code, text, err = run_cli("evolve", EXAMPLES / "evolve_digits.yaml", "-o", out, "--budget", "8",
                              "--executor", "local", "--workers", "1", "--json")
    assert code == 0, err
    result = json.loads(text)
    assert result["candidates"] == 8 and result["best"] and result["test"]["split"] == "test"
    assert len(result["best"]["params"]) == 6


def test_failed_candidates_are_recorded_not_fatal(tmp_path, monkeypatch):
    from weightspace.zoo.evolve import candidate, load_search_spec

    real = candidate.score

    def flaky(model_dir, evaluation, split, **kw):
        value, metrics = real(model_dir, evaluation, split, **kw)
        if value < 0.3:
            raise RuntimeError(f"refusing {value:.3f}")
        return value, metrics

    monkeypatch.setattr(candidate, "score", flaky)
    out = tmp_path / "ev"
    result = run_search(load_search_spec(_write(tmp_path, spec_text())), out, budget=8, executor="local")
    rows = SearchLog(out).rows()
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed and len(rows) == 8 and result["failed"] == len(failed)
    assert all(r["error"].startswith("RuntimeError: refusing 0.") and r["value"] is None for r in failed)
    assert result["best"]["value"] >= 0.3


@pytest.mark.requires("plot")
def test_show_plots_the_history(tmp_path, run_cli):
    from weightspace.zoo.evolve import load_search_spec

    out = tmp_path / "ev"
    run_search(load_search_spec(_write(tmp_path, spec_text())), out, budget=4, executor="local")
    code, text, err = run_cli("evolve", "show", out, "--plot", out / "history.png", "--json")
    assert code == 0, err
    assert (out / "history.png").read_bytes()[:4] == b"\x89PNG" and json.loads(text)["candidates"] == 4


def test_a_torn_last_log_line_is_left_out(tmp_path):
    log = SearchLog(tmp_path)
    log.append({"index": 0, "status": "ok", "value": 0.5})
    with open(tmp_path / "candidates.log", "ab") as f:
        f.write(b'{"index": 1, "sta')
    assert [r["index"] for r in log.rows()] == [0]


# ---------------------------------------------------------------------------------------------
# a killed search resumes: nothing evaluated twice, the same result as an uninterrupted one


def test_a_search_cut_by_its_budget_and_extended_equals_one_run(tmp_path):
    from weightspace.zoo.evolve import load_search_spec

    s = load_search_spec(_write(tmp_path, spec_text(search="{optimizer: cma, popsize: 4, seed: 3}")))
    run_search(s, tmp_path / "ref", budget=12, executor="local")
    run_search(s, tmp_path / "ev", budget=6, executor="local")       # stops inside generation 1
    run_search(s, tmp_path / "ev", budget=12, executor="local", resume=True)
    a, b = SearchLog(tmp_path / "ev").rows(), SearchLog(tmp_path / "ref").rows()
    assert [(r["index"], r["x"], r["value"]) for r in a] == [(r["index"], r["x"], r["value"]) for r in b]
    assert json.loads((tmp_path / "ev" / "optimizer.json").read_text()) == \
        json.loads((tmp_path / "ref" / "optimizer.json").read_text())


@pytest.mark.slow
def test_a_killed_search_resumes_where_it_stopped(tmp_path):
    from weightspace.zoo.evolve import load_search_spec

    spec = _write(tmp_path, spec_text(search="{optimizer: cma, popsize: 4, seed: 3}"))
    budget = 24
    ref = tmp_path / "ref"
    run_search(load_search_spec(spec), ref, budget=budget, executor="local")
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "weightspace.cli.main", "evolve", str(spec), "-o", str(out),
           "--budget", str(budget), "--executor", "local", "--workers", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = out / "candidates.log"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and p.poll() is None:
        if log.exists() and log.read_bytes().count(b"\n") + _parquet_rows(out) >= 6:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the search finished before it could be killed"
    before = SearchLog(out).rows()
    assert 6 <= len(before) < budget and not (out / "result.json").exists()
    # resume: only the missing candidates are evaluated, by the new process
    r = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    after = SearchLog(out).rows()
    assert [x["index"] for x in after] == list(range(budget))
    old = {x["worker"] for x in before}
    assert len(old) == 1 and [x for x in after[:len(before)]] == before
    assert all(x["worker"] not in old for x in after[len(before):])      # none evaluated twice
    want = SearchLog(ref).rows()
    assert [(x["x"], x["value"]) for x in after] == [(x["x"], x["value"]) for x in want]
    body = [line for line in (out / "best.yaml").read_text().splitlines() if not line.startswith("#")]
    assert body == [line for line in (ref / "best.yaml").read_text().splitlines() if not line.startswith("#")]
    a, b = json.loads((out / "result.json").read_text()), json.loads((ref / "result.json").read_text())
    timing = ("merge_s", "eval_s")
    assert {k: v for k, v in a["best"].items() if k not in timing} == \
        {k: v for k, v in b["best"].items() if k not in timing} and a["test"] == b["test"]
    assert json.loads((out / "optimizer.json").read_text()) == json.loads((ref / "optimizer.json").read_text())


def _parquet_rows(out: Path) -> int:
    if not (out / "candidates.parquet").exists():
        return 0
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(out / "candidates.parquet").num_rows
    except Exception:  # noqa: BLE001 - being replaced this instant
        return 0


def test_resume_refuses_another_spec(tmp_path):
    from weightspace.zoo.evolve import load_search_spec

    spec = _write(tmp_path, spec_text())
    run_search(load_search_spec(spec), tmp_path / "ev", budget=4, executor="local")
    spec.write_text(spec_text(search="{optimizer: cma, popsize: 4, seed: 0, sigma: 0.5}"))
    with pytest.raises(SpecError, match="another the spec's text"):
        run_search(load_search_spec(spec), tmp_path / "ev", budget=8, executor="local", resume=True)


# ---------------------------------------------------------------------------------------------
# fan-out: processes, Ray, and the language-model evaluator


@pytest.mark.slow
def test_two_local_processes_give_the_candidates_one_process_gives(tmp_path):
    from weightspace.zoo.evolve import load_search_spec

    s = load_search_spec(_write(tmp_path, spec_text(search="{optimizer: random, popsize: 4, seed: 5}")))
    run_search(s, tmp_path / "one", budget=4, executor="local", workers=1)
    run_search(s, tmp_path / "two", budget=4, executor="local", workers=2)
    one, two = SearchLog(tmp_path / "one").rows(), SearchLog(tmp_path / "two").rows()
    assert [(r["x"], r["value"]) for r in one] == [(r["x"], r["value"]) for r in two]
    assert len({r["worker"] for r in two}) >= 1 and all(r["worker"] != one[0]["worker"] for r in two)


@pytest.mark.requires("ray")
def test_a_search_on_a_local_ray_instance(tmp_path):
    import ray

    from weightspace.zoo.evolve import load_search_spec

    s = load_search_spec(_write(tmp_path, spec_text(search="{optimizer: cma, popsize: 4, seed: 2}")))
    run_search(s, tmp_path / "inline", budget=8, executor="local", workers=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        result = run_search(s, tmp_path / "ray", budget=8, executor="ray", workers=2)
    finally:
        ray.shutdown()
    assert result["executor"] == "ray" and result["candidates"] == 8
    a, b = SearchLog(tmp_path / "inline").rows(), SearchLog(tmp_path / "ray").rows()
    assert [(r["x"], r["value"]) for r in a] == [(r["x"], r["value"]) for r in b]


def test_without_ray_auto_runs_local_processes_and_ray_is_a_clear_error(monkeypatch):
    from weightspace.zoo.evolve.fanout import resolve_executor

    monkeypatch.setitem(sys.modules, "ray", None)
    assert resolve_executor("auto", None) == "local"
    with pytest.raises(Exception, match=r"needs Ray: pip install 'weightspace\[ray\]'"):
        resolve_executor("ray", None)
    with pytest.raises(SpecError, match="--address is a Ray cluster's"):
        resolve_executor("local", "ray://h:10001")


@pytest.mark.requires("hf")
@pytest.mark.requires("hf")
def test_tiny_llamas_with_a_jsonl_evaluation_through_the_lm_evaluator(tmp_path, run_cli):
    """The language-model path with the real evaluator (weightspace.evaluate): each candidate is
    merged with the example tokenizer and scored by multiple-choice accuracy on JSONL; the logged
    score of the winner equals the evaluator's accuracy on best.yaml's merge."""
    import shutil

    import yaml

    from weightspace.evaluate import evaluate
    from weightspace.zoo.evolve import load_search_spec

    ev = EXAMPLES / "eval"
    shutil.copy(ev / "mc.jsonl", tmp_path / "val.jsonl")
    shutil.copy(ev / "mc.jsonl", tmp_path / "test.jsonl")
    models = EXAMPLES / "models"
    text = (f"merge_method: linear\nmodels:\n  - model: {models / 'ft_a'}\n    parameters: {{weight: "
            f"{{search: [0.1, 1]}}}}\n  - model: {models / 'ft_b'}\n    parameters: {{weight: {{search: [0.1, 1]}}}}\n"
            f"tokenizer_source: {ev / 'tokenizer'}\ndtype: float32\n"
            f"search: {{optimizer: random, popsize: 3}}\nevaluation: {{data: val.jsonl, test_data: test.jsonl}}\n")
    (tmp_path / "s.yaml").write_text(text)
    s = load_search_spec(tmp_path / "s.yaml")
    assert s.evaluation.kind == "lm" and s.evaluation.metric_name == "accuracy"
    result = run_search(s, tmp_path / "ev", budget=3, executor="local")
    assert result["failed"] == 0
    rows = SearchLog(tmp_path / "ev").rows()
    assert len(rows) == 3 and all(r["status"] == "ok" and 0 <= r["value"] <= 1 for r in rows)
    best = yaml.safe_load((tmp_path / "ev" / "best.yaml").read_text())
    assert "search" not in best and "evaluation" not in best
    code, _, err = run_cli("run", tmp_path / "ev" / "best.yaml", tmp_path / "merged", "--no-progress")
    assert code == 0, err
    want = evaluate(tmp_path / "merged", tmp_path / "val.jsonl")["metrics"]["acc"]
    assert result["best"]["value"] == pytest.approx(want, abs=1e-12)
def test_without_the_lm_evaluator_candidates_fail_saying_why(tmp_path, monkeypatch):
    from weightspace.zoo.evolve.candidate import lm_metric

    monkeypatch.setitem(sys.modules, "weightspace.evaluate", None)
    with pytest.raises(Exception, match="needs weightspace.evaluate"):
        lm_metric(tmp_path, tmp_path / "x.txt", "perplexity", batch_size=1, max_length=8, device="cpu")


def test_wsmerge_run_on_a_search_spec_points_to_evolve(tmp_path, run_cli):
    spec = _write(tmp_path, spec_text())
    code, _, err = run_cli("run", spec, tmp_path / "out")
    assert code == 2 and "this is a search spec" in err and "wsmerge evolve" in err
    assert not (tmp_path / "out").exists()


def test_a_small_zoo_merge_is_scored_in_memory_with_the_directory_path_s_score(tmp_path, monkeypatch):
    """A zoo candidate under IN_MEMORY_BYTES is merged into memory (no temporary directory) and
    scores exactly what the same merge written to a directory scores."""
    from weightspace.zoo.evolve import candidate

    spec = {"merge_method": "task_arithmetic", "base_model": str(DIGITS / "base"),
            "models": [{"model": str(DIGITS / f"ft{i}"), "parameters": {"weight": w}}
                       for i, w in enumerate([0.4, 0.7, 0.5])],
            "parameters": {"lambda": 1.0}}
    unit = {"spec": spec, "evaluation": {"data": "digits"}, "split": "val"}
    made = []
    real_mkdtemp = candidate.tempfile.mkdtemp
    monkeypatch.setattr(candidate.tempfile, "mkdtemp", lambda **k: made.append(1) or real_mkdtemp(**k))
    mem = candidate.evaluate_candidate(unit)
    assert mem["error"] is None and mem.get("in_memory") is True and not made
    monkeypatch.setattr(candidate, "IN_MEMORY_BYTES", 0)
    disk = candidate.evaluate_candidate(unit)
    assert disk["error"] is None and "in_memory" not in disk and made
    assert mem["value"] == disk["value"] and mem["metrics"] == disk["metrics"]


def test_open_model_takes_an_in_memory_zoo_model_only():
    import torch

    from weightspace.ir import WeightSpace
    from weightspace.zoo.bind import open_model

    space = WeightSpace.from_tensors({"w": torch.zeros(2)}, {"config": {"model_type": "llama"}})
    with pytest.raises(SpecError, match="must be a zoo model"):
        open_model(space)

"""The search loop of `wsmerge evolve`: ask the optimiser, fan the candidates out, log, repeat.

    s = load_search_spec("examples/evolve_digits.yaml")
    result = run_search(s, "runs/evolve", budget=64, workers=2)
    result["best"]["value"], result["test"]        # validation score, test score of the winner

Candidates go out a generation at a time (CMA-ES's population, or random search's batch of
the same size); each result is logged as it arrives, best.yaml is rewritten when the best
improves, and the optimiser is told a generation once all of it is in. The budget counts
evaluated candidates, failed ones included; the last generation may be cut short by it.
With `resume`, a search continues in its directory: the logged candidates are replayed into
a fresh optimiser (same spec, same seed: the same generations) and only what is missing is
evaluated, so a killed search ends with the candidates, best.yaml and winner an uninterrupted
one would have (the candidates were scored deterministically: zoo accuracy and the streaming
merge are). A larger --budget on resume extends a finished search.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from weightspace.errors import InputError, SpecError
from weightspace.zoo.evolve.candidate import evaluate_candidate
from weightspace.zoo.evolve.fanout import Fanout
from weightspace.zoo.evolve.log import (
    BEST,
    OPTIMIZER,
    RESULT,
    STATE,
    SearchLog,
    best_of,
    read_json,
    rebase_paths,
    write_best,
    write_json,
)
from weightspace.zoo.evolve.optimizer import FAILED_LOSS, make_optimizer
from weightspace.zoo.evolve.spec import SearchSpec

MAX_BUDGET = 100_000


def check_search_output(s: SearchSpec, out: Path, *, resume: bool, seed: int) -> dict[str, Any]:
    """Before any candidate: OUT is no input, and is new (or, with resume, this search's own);
    returns what search.json records."""
    from weightspace.files import check_disjoint
    from weightspace.plan import model_refs
    from weightspace.sources import locate
    from weightspace.spec import validate_spec

    first = validate_spec(s.candidate(s.initial()), source=s.source)
    inputs = [s.source, *(str(p) for r in model_refs(first) if (p := locate(r, s.spec_dir).path))]
    check_disjoint(out, inputs)
    state = {"format": 1, "spec": s.source, "fingerprint": s.fingerprint, "seed": seed,
             "optimizer": s.settings.optimizer, "popsize": s.settings.popsize, "sigma": s.settings.sigma,
             "dims": [d.name for d in s.dims]}
    if out.exists() and not out.is_dir():
        raise SpecError(f"output {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not resume:
            raise SpecError(f"output {out} already holds a search; pass --resume to continue it, or "
                            f"name a new -o directory")
        if not (out / STATE).is_file():
            raise SpecError(f"--resume: {out} is not a search directory (no {STATE}); name the "
                            f"directory `wsmerge evolve` wrote")
        had = read_json(out / STATE)
        for key in ("fingerprint", "seed", "optimizer", "popsize", "sigma", "dims"):
            if not isinstance(had, dict) or had.get(key) != state[key]:
                what = "the spec's text" if key == "fingerprint" else key
                raise SpecError(f"--resume: {out} holds a search with another {what} "
                                f"({had.get(key) if isinstance(had, dict) else '?'} there, {state[key]} "
                                f"now); resume with the same spec and seed, or name a new -o directory")
    return state


def run_search(s: SearchSpec, out: str | Path, *, budget: int | None = None, workers: int = 1,
               executor: str = "auto", address: str | None = None, seed: int | None = None,
               resume: bool = False, progress: bool = False,
               echo: Callable[[str], None] | None = None, device: str = "cpu") -> dict[str, Any]:
    """Run (or resume) the search of `s` into OUT; returns result.json's content."""
    out = Path(out)
    seed = s.settings.seed if seed is None else seed
    budget = budget if budget is not None else s.settings.budget
    if budget is None:
        raise SpecError("--budget: give the number of candidates to evaluate (or search.budget in the spec)")
    if not 1 <= budget <= MAX_BUDGET:
        raise SpecError(f"--budget: must be between 1 and {MAX_BUDGET:,}, got {budget}")
    state = check_search_output(s, out, resume=resume, seed=seed)
    pool = Fanout(workers, executor=executor, address=address)    # refuses a bad executor up front
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / STATE, state)
    log = SearchLog(out)
    rows = log.rows()
    if len(rows) > budget and echo:
        echo(f"note: {out} already holds {len(rows)} candidates, more than --budget {budget}")
    opt = make_optimizer(s.settings.optimizer, len(s.dims), popsize=s.settings.popsize,
                         sigma=s.settings.sigma, seed=seed, x0=s.initial())
    logged = {(r["generation"], r["member"]): r for r in rows}
    best = best_of(rows)
    ev = s.evaluation
    spec_dir = str(Path(os.path.abspath(s.spec_dir))) if s.spec_dir else None
    t0 = time.perf_counter()

    def unit(x: list[float], index: int, test: bool = False) -> dict[str, Any]:
        return {"spec": s.candidate(x), "spec_dir": spec_dir, "evaluation": ev.model_dump(),
                "split": ev.split, "test": test, "device": device,
                "source": f"{s.source} candidate {index}"}

    from tqdm.auto import tqdm

    bar = tqdm(total=budget, initial=min(len(rows), budget), disable=not progress, desc="evolve",
               unit="candidate", dynamic_ncols=True)
    try:
        with pool:
            while len(logged) < budget:
                g = opt.generation
                xs = opt.ask()
                for m, x in enumerate(xs):
                    r = logged.get((g, m))
                    if r is not None and not np.allclose(r["x"], x, rtol=0, atol=1e-12):
                        raise InputError(f"{out}: candidate {r['index']} (generation {g}, member {m}) is "
                                         f"not what the optimiser proposes for this spec and seed; was "
                                         f"the log edited, or the cma package changed?")
                todo = [(m, x) for m, x in enumerate(xs) if (g, m) not in logged]
                todo = todo[:budget - len(logged)]
                first = len(logged)
                items = [((m, first + k), unit(x, first + k)) for k, (m, x) in enumerate(todo)]
                for (m, index), res in pool.map(evaluate_candidate, items):
                    row = _row(s, index, g, m, xs[m], res, ev.maximize, time.perf_counter() - t0)
                    log.append(row)
                    logged[(g, m)] = row
                    bar.update(1)
                    if row["status"] == "ok" and (best is None or row["objective"] > best["objective"]
                                                  or (row["objective"] == best["objective"]
                                                      and row["index"] < best["index"])):
                        best = row
                        _write_best(s, out, row, len(logged))
                    if echo and row["status"] != "ok":
                        echo(f"candidate {index} failed: {row['error'].splitlines()[0]}")
                    bar.set_postfix_str(f"best {ev.metric_name} {best['value']:.4f}" if best else "")
                if all((g, m) in logged for m in range(len(xs))):
                    losses = [FAILED_LOSS if logged[(g, m)]["status"] != "ok" else -logged[(g, m)]["objective"]
                              for m in range(len(xs))]
                    opt.tell(xs, losses)
                    write_json(out / OPTIMIZER, opt.state())
                else:
                    break      # the budget ends inside this generation
                log.compact()
    finally:
        bar.close()
        log.compact()
    rows = log.rows()
    best = best_of(rows)
    if best is not None and not (out / BEST).exists():
        _write_best(s, out, best, len(rows))
    result: dict[str, Any] = {
        "spec": s.source, "out": str(out), "seed": seed, "optimizer": s.settings.optimizer,
        "budget": budget, "candidates": len(rows), "failed": sum(r["status"] != "ok" for r in rows),
        "metric": ev.metric_name, "maximize": ev.maximize,
        "search_seconds": round(time.perf_counter() - t0, 3), "workers": workers,
        "executor": pool.executor, "best": None, "test": None}
    if best is not None:
        result["best"] = {k: best.get(k) for k in ("index", "generation", "value", "merge_s", "eval_s")}
        result["best"]["params"] = s.values(best["x"])
        if ev.test_datasets() and (ev.kind == "lm" or ev.test_split):
            res = evaluate_candidate(unit(best["x"], best["index"], test=True))
            if res["error"]:
                raise InputError(f"the best candidate ({best['index']}) failed on the test data: {res['error']}")
            result["test"] = {"value": res["value"], "metrics": res["metrics"],
                              "split": ev.test_split if ev.kind == "zoo" else None}
    write_json(out / RESULT, result)
    return result


def _row(s: SearchSpec, index: int, g: int, m: int, x: list[float], res: dict[str, Any], maximize: bool,
         elapsed: float) -> dict[str, Any]:
    ok = res.get("error") is None and res.get("value") is not None and np.isfinite(res["value"])
    value = float(res["value"]) if ok else None
    row = {"index": index, "generation": g, "member": m, "status": "ok" if ok else "failed",
           "value": value, "objective": None if value is None else (value if maximize else -value),
           "merge_s": res.get("merge_s"), "eval_s": res.get("eval_s"), "total_s": res.get("total_s"),
           "worker": res.get("worker"), "error": None if ok else (res.get("error") or "no score"),
           "x": [float(v) for v in x], "elapsed_s": round(elapsed, 4)}
    for name, v in s.values(x).items():
        row[name] = v
    return row


def _write_best(s: SearchSpec, out: Path, row: dict[str, Any], seen: int) -> None:
    from weightspace.spec import validate_spec

    data = rebase_paths(s.candidate(row["x"]), s.spec_dir, out)
    spec = validate_spec(data, source=str(out / BEST))
    head = (f"# The best of {seen} candidates so far of `wsmerge evolve {s.source}`: candidate "
            f"{row['index']}, {s.evaluation.metric_name} {row['value']:.6g} on "
            f"{', '.join(s.evaluation.datasets())}"
            + (f" ({s.evaluation.split})" if s.evaluation.kind == "zoo" else "") + ".\n"
            f"# Paths are relative to this file. Run it: wsmerge run {out / BEST} OUT\n")
    write_best(out, head + spec.to_yaml())


__all__ = ["MAX_BUDGET", "check_search_output", "run_search"]

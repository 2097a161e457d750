"""What a search directory holds, for `wsmerge evolve show DIR [--plot PNG]`.

    info = summarize("runs/evolve")      # candidates, failures, best, history, result
    print(format_summary(info))
    plot_history(info, "runs/evolve.png")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from weightspace.errors import SpecError
from weightspace.zoo.evolve.log import BEST, RESULT, STATE, SearchLog, best_of, read_json


def summarize(root: str | Path, top: int = 5) -> dict[str, Any]:
    root = Path(root)
    if not (root / STATE).is_file():
        raise SpecError(f"{root}: not a search directory (no {STATE}); give the -o directory of "
                        f"`wsmerge evolve`")
    state = read_json(root / STATE)
    rows = SearchLog(root).rows()
    result = read_json(root / RESULT) if (root / RESULT).is_file() else None
    dims = state.get("dims", []) if isinstance(state, dict) else []
    ok = [r for r in rows if r.get("status") == "ok"]
    history, best = [], None
    for r in rows:   # the best so far after each candidate, by index
        if r.get("status") == "ok" and (best is None or r["objective"] > best["objective"]):
            best = r
        history.append(None if best is None else best["value"])
    ranked = sorted(ok, key=lambda r: (-r["objective"], r["index"]))[:top]
    b = best_of(rows)
    return {"dir": str(root), "spec": state.get("spec"), "optimizer": state.get("optimizer"),
            "seed": state.get("seed"), "dims": dims, "candidates": len(rows),
            "failed": [{"index": r["index"], "error": r.get("error")} for r in rows if r.get("status") != "ok"],
            "best": None if b is None else {"index": b["index"], "value": b["value"],
                                            "params": {d: b.get(d) for d in dims}},
            "top": [{"index": r["index"], "value": r["value"], "params": {d: r.get(d) for d in dims}}
                    for r in ranked],
            "values": [r.get("value") for r in rows], "history": history,
            "merge_s": _mean([r.get("merge_s") for r in ok]), "eval_s": _mean([r.get("eval_s") for r in ok]),
            "result": result, "best_yaml": (root / BEST).read_text() if (root / BEST).is_file() else None}


def _mean(v: list[float | None]) -> float | None:
    v = [x for x in v if x is not None]
    return sum(v) / len(v) if v else None


def format_summary(info: dict[str, Any]) -> str:
    lines = [f"{info['dir']}: {info['candidates']} candidates of {info['spec']} "
             f"({info['optimizer']}, seed {info['seed']}), {len(info['failed'])} failed"]
    if info["merge_s"] is not None:
        lines.append(f"per candidate: merge {info['merge_s']:.3f} s, evaluation {info['eval_s']:.3f} s (means)")
    res = info.get("result") or {}
    metric = res.get("metric", "score")
    if info["best"] is not None:
        test = res.get("test")
        t = f", test {test['value']:.4f}" if test and res.get("best", {}).get("index") == info["best"]["index"] \
            else ""
        lines.append(f"best: candidate {info['best']['index']}, {metric} {info['best']['value']:.4f}{t}")
        lines.append("top candidates:")
        for r in info["top"]:
            vals = ", ".join(f"{k}={_fmt(v)}" for k, v in r["params"].items())
            lines.append(f"  {r['index']:>5}  {r['value']:.4f}  {vals}")
    hist = info["history"]
    if hist:
        marks = sorted({min(len(hist), n) for n in (1, 10, 25, 50, 100, 200, 500, len(hist))})
        lines.append("best so far: " + ", ".join(f"{n}: {hist[n - 1]:.4f}" for n in marks
                                                  if hist[n - 1] is not None))
    for f in info["failed"][:5]:
        lines.append(f"failed: candidate {f['index']}: {(f['error'] or '').splitlines()[0]}")
    if len(info["failed"]) > 5:
        lines.append(f"... and {len(info['failed']) - 5} more failed")
    if info["best_yaml"]:
        lines.append(f"the winning spec ({Path(info['dir']) / BEST}):")
        lines += ["  " + line for line in info["best_yaml"].rstrip().splitlines() if not line.startswith("#")]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def plot_history(info: dict[str, Any], path: str | Path) -> None:
    from weightspace.extras import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    xs = list(range(len(info["values"])))
    ax.plot([x for x, v in zip(xs, info["values"]) if v is not None],
            [v for v in info["values"] if v is not None], "k.", ms=4, alpha=0.6, label="candidate")
    ax.step(xs, [v if v is not None else float("nan") for v in info["history"]], where="post",
            color="#cc6677", label="best so far")
    metric = (info.get("result") or {}).get("metric", "score")
    ax.set_xlabel("candidate")
    ax.set_ylabel(metric)
    ax.set_title(f"{info['spec']} ({info['optimizer']}, seed {info['seed']})", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["format_summary", "plot_history", "summarize"]

"""The output directory of a search: its log of candidates, its state and the best spec so far.

    runs/evolve/
      search.json           what the search is: the spec's fingerprint, seed, optimiser, dims
      candidates.parquet    one row per evaluated candidate (pandas, duckdb, pyarrow read it)
      candidates.log        candidates since candidates.parquet was last written, a JSON line each
      optimizer.json        the optimiser's state after the last full generation (mean, sigma, ...)
      best.yaml             the best candidate's merge spec: `wsmerge run runs/evolve/best.yaml OUT`
      result.json           at the end: the best candidate, its validation and test scores

    import pandas as pd;  pd.read_parquet("runs/evolve/candidates.parquet")

Writes follow weightspace.zoo.store: each candidate is appended to candidates.log as one
line, written whole and fsynced, the moment its result arrives, and the log is folded into
candidates.parquet (a temporary file, fsync, os.replace, then the log is truncated) after
every generation and at the end. Readers take candidates.parquet plus the complete lines of
the log (a torn last line is a kill during a write, and is left out; a row in both, from a
kill between the rename and the truncation, is read once). best.yaml, optimizer.json,
search.json and result.json are each replaced atomically. Nothing is pickled: the optimiser
is resumed by replaying the log (weightspace.zoo.evolve.optimizer).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from weightspace.errors import InputError
from weightspace.files import append_line, atomic_file

PARQUET = "candidates.parquet"
LOG = "candidates.log"
STATE = "search.json"
OPTIMIZER = "optimizer.json"
BEST = "best.yaml"
RESULT = "result.json"
LEAD = ("index", "generation", "member", "status", "value", "objective", "merge_s", "eval_s", "total_s",
        "worker", "error", "x")


def write_json(path: Path, data: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    from weightspace.inputs import parse_json, read_input_bytes

    return parse_json(read_input_bytes(path), str(path))


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


class SearchLog:
    """Candidates of one search directory: `append(row)` per candidate, `compact()` to fold the
    log into the Parquet file, `rows()` for everything so far (by index)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.parquet = self.root / PARQUET
        self.log = self.root / LOG

    def append(self, row: dict[str, Any]) -> None:
        line = (json.dumps({k: _finite(v) for k, v in row.items()}, separators=(",", ":"),
                           allow_nan=False) + "\n").encode()
        append_line(self.log, line)

    def rows(self) -> list[dict[str, Any]]:
        by_index: dict[int, dict[str, Any]] = {}
        if self.parquet.exists():
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(self.parquet)
            except Exception as e:  # noqa: BLE001 - pyarrow's many error types: one message
                raise InputError(f"{self.parquet}: cannot read the candidate log: {e}") from None
            for r in table.to_pylist():
                by_index[int(r["index"])] = r
        if self.log.exists():
            from weightspace.inputs import parse_json, read_input_bytes

            lines = read_input_bytes(self.log).split(b"\n")
            for no, line in enumerate(lines[:-1], 1):   # the last piece is empty, or a torn write
                r = parse_json(line, f"{self.log} line {no}")
                if not isinstance(r, dict) or not isinstance(r.get("index"), int):
                    raise InputError(f"{self.log} line {no}: expected a candidate with an integer index")
                by_index[r["index"]] = r
        return [by_index[i] for i in sorted(by_index)]

    def compact(self) -> None:
        """Write every row to candidates.parquet (atomically), then empty the log."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = self.rows()
        if not rows:
            return
        cols = dict.fromkeys(c for c in LEAD if any(c in r for r in rows))
        for r in rows:
            cols.update(dict.fromkeys(r))
        table = pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in rows])
        with atomic_file(self.parquet) as tmp:
            pq.write_table(table, tmp)
        if self.log.exists():
            with open(self.log, "r+b") as f:
                f.truncate(0)
                os.fsync(f.fileno())


def best_of(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row with the highest objective (ties: the earliest index); None when all failed."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("objective") is not None]
    return max(ok, key=lambda r: (r["objective"], -r["index"])) if ok else None


def rebase_paths(data: dict, spec_dir: Path | None, out: Path) -> dict:
    """The merge spec's local paths (models, the tokenizer source, companion and other path
    parameters) rewritten relative to `out`, where best.yaml is written, so that `wsmerge run
    out/best.yaml` reads the same files; Hub ids are left as they are."""
    import copy

    from weightspace.methods import get_method
    from weightspace.sources import locate

    data = copy.deepcopy(data)
    out = Path(os.path.abspath(out))

    def local(ref: Any) -> Any:
        if not isinstance(ref, str):
            return ref
        found = locate(ref, spec_dir)
        if found.path is None:
            return ref
        return os.path.relpath(os.path.abspath(found.path), out)

    for key in ("base_model", "tokenizer_source"):
        if key in data:
            data[key] = local(data[key])
    for m in data.get("models") or []:
        m["model"] = local(m.get("model"))
    for sl in data.get("slices") or []:
        if "base_model" in sl:
            sl["base_model"] = local(sl["base_model"])
        for src in sl.get("sources") or []:
            src["model"] = local(src.get("model"))
    try:
        method = get_method(data["merge_method"])
    except Exception:  # noqa: BLE001 - validated before; nothing to rebase otherwise
        return data
    paths = {p.name for p in method.all_global_params() if p.path} | \
        {p.name for p in method.model_params if p.path} | set(method.companions)

    def file(v: Any) -> Any:
        if not isinstance(v, str) or spec_dir is None:
            return v
        p = Path(v) if Path(v).is_absolute() else spec_dir / v
        return os.path.relpath(os.path.abspath(p), out) if p.exists() else v

    for holder in [data, *(data.get("models") or [])]:
        params = holder.get("parameters") or {}
        for k in list(params):
            if k in paths:
                params[k] = file(params[k])
    return data


def write_best(root: Path, spec_yaml: str) -> None:
    with atomic_file(root / BEST) as tmp:
        tmp.write_text(spec_yaml)


__all__ = ["BEST", "LOG", "OPTIMIZER", "PARQUET", "RESULT", "STATE", "SearchLog", "best_of", "read_json",
           "rebase_paths", "write_best", "write_json"]

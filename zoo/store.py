"""The on-disk zoo: one directory per model, one Parquet catalog for all checkpoints.

    zoo/
      zoo.yaml                          the spec of the last build
      catalog.parquet                   one row per checkpoint (pandas, duckdb, pyarrow read it)
      catalog.log                       while a build runs (or after one was killed): its changes since
                                        catalog.parquet was written, one JSON object per line
      models/<model_id>/rows.json       the model's catalog rows (for recovery)
      models/<model_id>/epoch-0030/     model.safetensors + config.json (a checkpoint like any other)

    import pandas as pd;  pd.read_parquet("zoo/catalog.parquet")
    duckdb -c "select width, batch_size, avg(test_acc) from 'zoo/catalog.parquet' group by all"

Writes cost what they add: a writing command appends its changes to
`catalog.log` (a batch of new models, a checkpoint's metrics, models dropped:
one line each, written whole and fsynced) and folds the log into
catalog.parquet once, when it finishes (`Zoo.compact`: a temporary file,
`os.replace`, then the log is removed). A build of N models writes O(N) catalog
bytes in total, where rewriting the catalog after every model wrote O(N^2).
Readers apply the log to catalog.parquet in memory, so they see the same rows
a finished catalog holds; a finished zoo is a catalog.parquet alone, the
format older versions wrote and read (an old zoo opens unchanged).

Writes are ordered so that an interrupted build never leaves a catalog row
without its weights: a model's directory is written under a temporary name and
renamed into place, and only then is its log line appended. A kill between the
two leaves a finished model that the catalog does not list yet; the next open
adopts it from its `rows.json` instead of training it again, so no weights stay
without their row. A kill while a line is appended leaves a last line without
its newline, which readers ignore (its models are adopted); a kill during
compaction leaves a log that is already in catalog.parquet, and replaying it
changes nothing (each line replaces rows, merges columns or drops models).

A zoo opens read-only unless asked (`Zoo(root, write=True)`, or `create=True`):
reading commands (show, find, generator training and evaluation) never change a
file in it; they see an unlisted finished model, and the log, in memory only. A
writing open finishes an interrupted build first: it removes temporary model
directories and compacts the log and the adopted models into catalog.parquet.
Every row, from the catalog, the log or a rows.json, is checked when read: the
columns every row needs (`REQUIRED_COLUMNS`), and a checkpoint path that stays
inside the zoo (a rows.json only under its own model directory).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from weightspace.errors import InputError, SpecError, WeightspaceError
from weightspace.files import append_line, atomic_file, clean_stale_in, temp_sibling
from weightspace.methods import suggest

CATALOG = "catalog.parquet"
LOG = "catalog.log"
MODELS = "models"
SPEC = "zoo.yaml"

# columns shown first; the rest follow in first-seen order
LEAD_COLUMNS = ("model_id", "epoch", "final", "path", "dataset", "arch")
# what every row of a catalog or a rows.json must have
REQUIRED_COLUMNS = ("model_id", "epoch", "path")


def checkpoint_dirname(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def _normalize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row with every column (None where absent), lead columns first."""
    cols: dict[str, None] = dict.fromkeys(c for c in LEAD_COLUMNS if any(c in r for r in rows))
    for r in rows:
        cols.update(dict.fromkeys(r))
    return [{c: r.get(c) for c in cols} for r in rows]


def _catalog_table(rows: list[dict[str, Any]]):
    """The catalog's table of `rows`: every column in every row, sorted by (model_id, epoch)."""
    import pyarrow as pa

    rows = sorted(_normalize(rows), key=lambda r: (r.get("model_id") or "", r.get("epoch") or 0))
    return pa.Table.from_pylist(rows) if rows else pa.table({c: [] for c in LEAD_COLUMNS})


def write_catalog(path: Path, rows: list[dict[str, Any]]):
    """Replace the catalog atomically (temporary file, fsync, os.replace); returns its table."""
    import pyarrow.parquet as pq

    table = _catalog_table(rows)
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)
    return table


def check_rows(rows: Any, source: Path, root: Path, *, model_dir: str | None = None) -> list[dict[str, Any]]:
    """Catalog rows read from `source` (the catalog, or a model's rows.json with `model_dir` its
    directory name), checked once: a list of objects, each with the REQUIRED_COLUMNS (model_id
    and path strings, epoch a whole number >= 0) and a relative path that stays inside the zoo
    at `root` (inside models/<model_dir>/ for a rows.json). InputError naming the file, the row
    and the column."""
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise InputError(f"{source}: not a list of catalog rows")
    zoo = root.resolve()
    inside = (zoo / MODELS / model_dir) if model_dir is not None else zoo
    for i, r in enumerate(rows):
        for col in REQUIRED_COLUMNS:
            if r.get(col) is None:
                raise InputError(f"{source}: row {i} has no {col!r} (every row needs "
                                 f"{', '.join(REQUIRED_COLUMNS)})")
        if not isinstance(r["model_id"], str) or not isinstance(r["path"], str):
            raise InputError(f"{source}: row {i}: model_id and path must be strings")
        if isinstance(r["epoch"], bool) or not isinstance(r["epoch"], int) or r["epoch"] < 0:
            raise InputError(f"{source}: row {i}: epoch must be a whole number >= 0, got {r['epoch']!r}")
        if model_dir is not None and r["model_id"] != model_dir:
            raise InputError(f"{source}: row {i} is model {r['model_id']!r}, not {model_dir!r}, the "
                             f"directory it is in")
        p = Path(r["path"])
        if p.is_absolute() or not (zoo / p).resolve().is_relative_to(inside):
            where = "the zoo directory" if model_dir is None else f"its model directory {MODELS}/{model_dir}"
            raise InputError(f"{source}: row {i} (model_id={r['model_id']}) has path {r['path']!r}, which "
                             f"leaves {where}; refused")
    return rows


def read_catalog(path: Path, root: Path | None = None) -> list[dict[str, Any]]:
    """The catalog's rows, checked (`check_rows`; `root`: the zoo, default the catalog's folder)."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read the zoo catalog: {e}") from None
    if table.num_rows or table.num_columns:
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise InputError(f"{path}: the zoo catalog has no {missing[0]!r} column (a catalog needs "
                             f"{', '.join(REQUIRED_COLUMNS)})")
    return check_rows(table.to_pylist(), path, Path(path).parent if root is None else root)


def is_zoo(root: str | Path) -> bool:
    """Whether `root` holds a zoo: a catalog, or the log of a first build that has not finished."""
    root = Path(root)
    return (root / CATALOG).is_file() or (root / LOG).is_file()


def read_log(path: Path, root: Path) -> list[dict[str, Any]]:
    """The complete entries of a catalog log, checked: `{"put": rows}`, `{"update": [[model_id,
    epoch, columns], ...]}` or `{"drop": [model_id, ...]}` per line. A last line without its
    newline is a write that a kill cut short, and is left out. InputError naming the file and line."""
    from weightspace.inputs import parse_json, read_input_bytes

    lines = read_input_bytes(path).split(b"\n")
    entries = []
    for no, line in enumerate(lines[:-1], 1):   # the last piece is empty, or a torn write
        where = f"{path} line {no}"
        e = parse_json(line, where)
        if not isinstance(e, dict) or len(e) != 1 or next(iter(e)) not in ("put", "update", "drop"):
            raise InputError(f"{where}: expected one of put, update or drop")
        if "put" in e:
            check_rows(e["put"], Path(where), root)
        elif "update" in e:
            u = e["update"]
            if not isinstance(u, list) or not all(
                    isinstance(x, list) and len(x) == 3 and isinstance(x[0], str) and isinstance(x[1], int)
                    and isinstance(x[2], dict) and not set(x[2]) & set(REQUIRED_COLUMNS) for x in u):
                raise InputError(f"{where}: an update is a list of [model_id, epoch, columns] that leave "
                                 f"{', '.join(REQUIRED_COLUMNS)} alone")
        elif not isinstance(e["drop"], list) or not all(isinstance(x, str) for x in e["drop"]):
            raise InputError(f"{where}: drop takes a list of model ids")
        entries.append(e)
    return entries


class Zoo:
    """A zoo directory: its catalog rows and its checkpoints.

    Read-only unless `write` (or `create`, which makes the directory): then opening also
    finishes an interrupted build (removes temporary model directories, compacts the log and
    the adopted models into catalog.parquet). Writers append to the log; `compact()` when done."""

    def __init__(self, root: str | Path, *, create: bool = False, write: bool = False):
        self.root = Path(root)
        self.catalog_path = self.root / CATALOG
        self.log_path = self.root / LOG
        self.models_dir = self.root / MODELS
        self.writable = create or write
        if create:
            self.models_dir.mkdir(parents=True, exist_ok=True)
        elif not is_zoo(self.root):
            what = "directory does not exist" if not self.root.exists() else f"has no {CATALOG}"
            raise InputError(f"{self.root}: not a zoo ({what}); build one with `wsmerge zoo build SPEC -o {self.root}`")
        entries = self._read()
        logged = entries is not None
        for entry in entries or ():
            self._apply(entry)
        if logged:
            self.rows = _catalog_table(self.rows).to_pylist()
            self._index()
        self.adopted = self._recover()
        self._dirty = logged or bool(self.adopted)   # rows that catalog.parquet does not hold yet
        if self.writable and self._dirty:
            self.compact()

    def _read(self) -> list[dict[str, Any]] | None:
        """Read the catalog into `self.rows`; returns the log's entries (None without a log). A
        writer that compacts meanwhile (a new catalog.parquet, the log removed) makes it read
        both again, so a reader never sees the old catalog without the log that completes it."""
        def stamp() -> tuple[int, int] | None:
            try:
                st = self.catalog_path.stat()
            except FileNotFoundError:
                return None
            return st.st_ino, st.st_mtime_ns

        for _ in range(10):
            before = stamp()
            self.rows = read_catalog(self.catalog_path, self.root) if before is not None else []
            self._index()
            try:
                entries = read_log(self.log_path, self.root) if self.log_path.is_file() else None
            except InputError:
                if self.log_path.exists():
                    raise
                entries = None               # removed while read: compacted, read again
                before = (-1, -1)
            if stamp() == before:
                return entries
        raise InputError(f"{self.root}: the catalog kept changing while it was read; try again")

    def _index(self) -> None:
        self._by_key = {(r["model_id"], int(r["epoch"])): r for r in self.rows}
        self._ids = {r["model_id"] for r in self.rows}

    def _apply(self, entry: Mapping[str, Any]) -> None:
        """One log entry, applied to the rows in memory as `add_models`, `update_rows` or
        `drop_models` changed them before logging it (O(rows in the entry), but for a model
        written again or dropped)."""
        if "put" in entry:
            self._put(entry["put"])
        elif "update" in entry:
            for mid, epoch, cols in entry["update"]:
                r = self._by_key.get((mid, epoch))
                if r is not None:
                    r.update(cols)
        else:
            ids = set(entry["drop"])
            self.rows = [r for r in self.rows if r["model_id"] not in ids]
            self._index()

    def _put(self, rows: list[dict[str, Any]]) -> None:
        ids = {r["model_id"] for r in rows}
        if ids & self._ids:                       # a model written again replaces its rows
            self.rows = [r for r in self.rows if r["model_id"] not in ids]
            self._index()
        self.rows.extend(rows)
        self._by_key.update(((r["model_id"], int(r["epoch"])), r) for r in rows)
        self._ids |= ids

    def _log(self, entry: Mapping[str, Any]) -> None:
        """Append one entry to the catalog log, whole and fsynced (a line is its unit)."""
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        append_line(self.log_path, line)
        self._dirty = True

    def compact(self) -> None:
        """Write every row to catalog.parquet (atomically) and remove the log it now holds."""
        self._check_writable()
        if not self._dirty:
            return
        table = write_catalog(self.catalog_path, self.rows)
        self.log_path.unlink(missing_ok=True)
        self._dirty = False
        self.rows = table.to_pylist()         # as a reader of the catalog sees them
        self._index()

    def _check_writable(self) -> None:
        if not self.writable:
            raise WeightspaceError(f"{self.root}: the zoo was opened read-only (Zoo(..., write=True) to change it)")

    # recovery after an interrupted build
    def _recover(self) -> list[str]:
        """Adopt finished models that the catalog does not list (from their rows.json, checked);
        when writable, also remove temporary model dirs and write the adopted rows to the catalog."""
        if not self.models_dir.is_dir():
            return []
        listed = {r["model_id"] for r in self.rows}
        adopted = []
        if self.writable:  # what killed builds left (a live build's own are kept)
            clean_stale_in(self.models_dir)
        for d in sorted(self.models_dir.iterdir()):
            if d.name.startswith(".tmp-"):  # an older version's temporary model folder
                if self.writable:
                    shutil.rmtree(d, ignore_errors=True)
                continue
            if d.name.startswith("."):
                continue
            if d.name in listed or not d.is_dir() or d.is_symlink() or not (d / "rows.json").is_file():
                continue
            try:
                rows = json.loads((d / "rows.json").read_text())
            except (OSError, ValueError):
                continue            # never finished: a model is renamed into place with its rows.json
            rows = check_rows(rows, d / "rows.json", self.root, model_dir=d.name)
            if rows and all((self.root / r["path"] / "model.safetensors").is_file() for r in rows):
                self.rows.extend(rows)
                self._by_key.update(((r["model_id"], int(r["epoch"])), r) for r in rows)
                self._ids.add(d.name)
                adopted.append(d.name)
        return adopted

    def require_columns(self, *columns: str) -> None:
        """InputError naming the catalog, the row and the column unless every row has `columns`."""
        for i, r in enumerate(self.rows):
            for c in columns:
                if r.get(c) is None:
                    raise InputError(f"{self.catalog_path}: row {i} (model_id={r['model_id']}) has no {c!r}; "
                                     f"this needs {', '.join(map(repr, columns))} in every row")

    @property
    def model_ids(self) -> set[str]:
        return set(self._ids)

    def missing_weights(self) -> list[dict[str, Any]]:
        """Catalog rows whose checkpoint file is gone."""
        return [r for r in self.rows if not (self.root / r["path"] / "model.safetensors").is_file()]

    def check_weights(self) -> None:
        missing = self.missing_weights()
        if missing:
            r = missing[0]
            more = f" (and {len(missing) - 1} more rows)" if len(missing) > 1 else ""
            raise InputError(
                f"{self.catalog_path}: row model_id={r['model_id']} epoch={r['epoch']} points at "
                f"{self.root / r['path'] / 'model.safetensors'}, which does not exist{more}; "
                f"run `wsmerge zoo build` again with the zoo's spec to retrain missing models"
            )

    def drop_models(self, ids: Iterable[str]) -> None:
        self._check_writable()
        ids = sorted(set(ids))
        self.rows = [r for r in self.rows if r["model_id"] not in ids]
        self._index()
        for i in ids:
            shutil.rmtree(self.models_dir / i, ignore_errors=True)
        self._log({"drop": ids})

    # writing
    def add_model(self, payload: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Write one trained model (all its checkpoints) and add its rows to the catalog.

        `payload`: {"model_id", "rows": [row per checkpoint, with "epoch"],
        "files": {epoch: {"model.safetensors": bytes, "config.json": str}}}."""
        return self.add_models([payload])[0]

    def add_models(self, payloads: Iterable[Mapping[str, Any]]) -> list[list[dict[str, Any]]]:
        """Write trained models (see `add_model`), each renamed into place, then their rows as one
        line of the catalog log; returns each model's rows."""
        self._check_writable()
        written = [self._write_model(p) for p in payloads]
        if not written:
            return []
        new = [r for rows in written for r in rows]
        self._put(new)
        self._log({"put": new})
        return written

    def _write_model(self, payload: Mapping[str, Any]) -> list[dict[str, Any]]:
        mid = payload["model_id"]
        final = self.models_dir / mid
        tmp = temp_sibling(final)  # names its owner, so a later build removes it if this one is killed
        tmp.mkdir()
        try:
            rows = []
            for row in payload["rows"]:
                epoch = int(row["epoch"])
                rel = f"{MODELS}/{mid}/{checkpoint_dirname(epoch)}"
                d = tmp / checkpoint_dirname(epoch)
                d.mkdir()
                files = payload["files"][epoch]
                (d / "model.safetensors").write_bytes(files["model.safetensors"])
                (d / "config.json").write_text(files["config.json"])
                rows.append({**row, "path": rel})
            (tmp / "rows.json").write_text(json.dumps(rows, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return rows

    def update_rows(self, updates: Mapping[tuple[str, int], Mapping[str, Any]]) -> None:
        """Merge new columns (landscape metrics) into rows keyed by (model_id, epoch)."""
        self._check_writable()
        found = []
        for (mid, epoch), u in updates.items():
            r = self._by_key.get((mid, int(epoch)))
            if r is not None and u:
                r.update(u)
                found.append([mid, int(epoch), dict(u)])
        if found:
            self._log({"update": found})

    def write_spec(self, text: str) -> None:
        self._check_writable()
        tmp = self.root / f".{SPEC}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.root / SPEC)

    # reading
    def checkpoint_dir(self, row: Mapping[str, Any]) -> Path:
        p = (self.root / row["path"]).resolve()
        if not p.is_relative_to(self.root.resolve()):
            raise InputError(f"{self.catalog_path}: row path {row['path']!r} leaves the zoo directory")
        return p

    def final_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("final")]

    def find(self, where: Mapping[str, Any], epoch: int | None = None) -> list[dict[str, Any]]:
        """Rows whose catalog columns equal `where` ({"width": 64, "seed": 0}), each model's
        final checkpoint unless `epoch` is given; in model id order.

            Zoo("runs/zoo").find({"width": 64, "batch_size": 8, "seed": 0})
        """
        columns = sorted({k for r in self.rows for k in r})
        for k in where:
            if k not in columns:
                raise SpecError(f"{k!r} is not a column of {self.catalog_path}.{suggest(k, columns)} "
                                f"Columns: {', '.join(columns)}")

        def same(have: Any, want: Any) -> bool:
            return have == want or str(have) == str(want)

        rows = self.final_rows() if epoch is None else [r for r in self.rows if r["epoch"] == epoch]
        hits = [r for r in rows if all(same(r.get(k), v) for k, v in where.items())]
        return sorted(hits, key=lambda r: (r["model_id"], r["epoch"]))

    def load(self, row: Mapping[str, Any]):
        """The checkpoint of a row as a WeightSpace (config in meta)."""
        from weightspace.sources import load_space

        return load_space(self.checkpoint_dir(row))

"""The gene and its directory on disk: `Gene`, `save_gene`, `load_gene`, gene.json.

    save_gene(gene, "minilm.gene")
    gene = load_gene("minilm.gene")          # tensors stay on disk until used
    gene.space["gene.B.output.dense.weight"].load()

A gene directory is a checkpoint directory:

    model.safetensors     gene.A.<suffix>, gene.B.<suffix>         (TLEG)
                          gene.stage<s>.<suffix>, s = 0 .. S-1      (SWS)
                          every non-layer tensor under its own name
    gene.json             mode, prefix, suffixes, source_depth, denominator, stages,
                          non_layer, dtypes, depth_key, provenance, report, history
    source_config.json    the source's config.json (rewritten on expansion), if it had one
    tokenizer files       carried from the source, copied into every expansion
"""

from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightspace.bounds import MAX_DEPTH
from weightspace.errors import InputError, SpecError
from weightspace.files import read_json_object
from weightspace.ir import WeightSpace
from weightspace.merges.learngene.layout import DENOMINATORS, MODES
from weightspace.merges.learngene.stack import _Stack
from weightspace.paths import expand_user

FORMAT = "weightspace-learngene"
FORMAT_VERSION = 1
GENE_FILE = "gene.json"
SOURCE_CONFIG_FILE = "source_config.json"
METADATA_KEY = "weightspace.learngene"  # safetensors __metadata__ of genes and expansions


@dataclass
class Gene:
    """Gene tensors plus what is needed to expand them.

        gene = load_gene("minilm.gene")
        gene.mode, gene.source_depth, gene.suffixes[:2]     # 'tleg', 6, ['attention.self.query.weight', ...]
        gene.space["gene.B.output.dense.weight"].load()

    `space` holds the tensors (names in the module docstring; `space.meta["files"]`
    the tokenizer files to carry). `meta`: format, version, mode ("tleg" | "sws"),
    prefix (the layer container: "blocks", "encoder.layer", "model.layers", "h"),
    suffixes (per-layer tensor suffixes), dtypes (suffix -> dtype of the source
    layers, the dtype expansions are written in), source_depth, denominator
    ("L" | "L-1"; TLEG), stages (SWS: the stage list at source_depth; its length is
    the stage count), non_layer (names copied as they are), config (the source
    config.json or None), depth_key (where config stores the depth, or None),
    provenance, report (fit residuals or training summary), history (training loss
    per step).
    """

    space: WeightSpace
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return str(self.meta["mode"])

    @property
    def prefix(self) -> str:
        return str(self.meta["prefix"])

    @property
    def suffixes(self) -> list[str]:
        return list(self.meta["suffixes"])

    @property
    def source_depth(self) -> int:
        return int(self.meta["source_depth"])

    @property
    def num_stages(self) -> int | None:
        st = self.meta.get("stages")
        return len(st) if st else None

    def tensor_names(self, suffix: str) -> list[str]:
        """The gene tensors of one per-layer suffix: [A, B] (TLEG) or the S stage tensors (SWS)."""
        if self.mode == "tleg":
            return [gene_name("A", suffix), gene_name("B", suffix)]
        return [gene_name(s, suffix) for s in range(self.num_stages or 0)]

    def __repr__(self) -> str:
        how = (f"denominator {self.meta.get('denominator')}" if self.mode == "tleg"
               else f"stages {','.join(map(str, self.meta.get('stages') or []))}")
        return (f"Gene({self.mode}, {self.prefix}.*, {len(self.suffixes)} suffixes, source depth "
                f"{self.source_depth}, {how}, {self.space.num_params:,} params)")


def gene_name(part: str | int, suffix: str) -> str:
    """`gene.A.<suffix>` / `gene.B.<suffix>` for part "A"/"B"; `gene.stage<s>.<suffix>` for stage s."""
    head = f"gene.stage{part}" if isinstance(part, int) else f"gene.{part}"
    return f"{head}.{suffix}" if suffix else head


def _gene_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gene tensors are float32 (float64 for float64 models): B is a small difference."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_of(name: str, where: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise InputError(f"{where}: unknown dtype {name!r}")
    return dt


def _gene_meta(*, mode: str, stack: _Stack, denominator: str | None, stages: list[int] | None,
               config: Any, depth_key: str | None, provenance: dict, report: dict,
               history: list | None = None) -> dict[str, Any]:
    return {
        "format": FORMAT, "version": FORMAT_VERSION, "mode": mode, "prefix": stack.prefix,
        "suffixes": list(stack.suffixes), "dtypes": {s: _dt(d) for s, d in stack.dtypes.items()},
        "source_depth": stack.depth, "denominator": denominator,
        "stages": list(stages) if stages is not None else None,
        "non_layer": list(stack.non_layer), "config": copy.deepcopy(config) if config is not None else None,
        "depth_key": depth_key, "provenance": provenance, "report": report, "history": history or [],
    }


def _check_gene(gene: Gene, where: str = "gene") -> None:
    """The meta is complete and every tensor it names is there, with matching shapes."""
    if not isinstance(gene, Gene):
        raise SpecError(f"expected a Gene, got {type(gene).__name__}")
    m = gene.meta
    if m.get("mode") not in MODES:
        raise InputError(f"{where}: unknown mode {m.get('mode')!r} (tleg or sws)")
    for key, kind in (("prefix", str), ("suffixes", list), ("source_depth", int), ("non_layer", list),
                      ("dtypes", dict)):
        if not isinstance(m.get(key), kind) or isinstance(m.get(key), bool):
            raise InputError(f"{where}: {key!r} is missing or not a {kind.__name__}")
    if not 1 <= m["source_depth"] <= MAX_DEPTH:
        raise InputError(f"{where}: source_depth must be in 1..{MAX_DEPTH:,}, got {m['source_depth']:,}")
    if m["mode"] == "tleg" and m.get("denominator") not in DENOMINATORS:
        raise InputError(f"{where}: a tleg gene needs denominator 'L' or 'L-1', got {m.get('denominator')!r}")
    if m["mode"] == "sws":
        st = m.get("stages")
        if not (isinstance(st, list) and st and all(isinstance(n, int) and n >= 0 for n in st)
                and sum(st) == m["source_depth"]):
            raise InputError(f"{where}: a sws gene needs 'stages', a list of layer counts adding up to "
                             f"source_depth ({m['source_depth']}), got {st!r}")
    expected: set[str] = set()
    for suffix in m["suffixes"]:
        if suffix not in m["dtypes"]:
            raise InputError(f"{where}: no dtype for suffix {suffix!r}")
        names = gene.tensor_names(suffix)
        for n in names:
            if n not in gene.space:
                raise InputError(f"{where}: tensor {n!r} is missing")
        shapes = {tuple(gene.space[n].shape) for n in names}
        if len(shapes) > 1:
            raise InputError(f"{where}: the gene tensors of {suffix!r} differ in shape "
                             f"({', '.join(str(list(s)) for s in shapes)})")
        expected.update(names)
    for n in m["non_layer"]:
        if n not in gene.space:
            raise InputError(f"{where}: non-layer tensor {n!r} is missing")
        expected.add(n)
    extra = [n for n in gene.space if n not in expected]
    if extra:
        raise InputError(f"{where}: unexpected tensor {extra[0]!r} (neither a gene tensor nor a listed "
                         f"non-layer tensor)")


def save_gene(gene: Gene, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write a gene directory atomically (layout in the module docstring).

        save_gene(fit_gene(load_space("minilm")), "minilm.gene")
    """
    from weightspace.files import check_output
    from weightspace.sink import inputs_of, save_space

    _check_gene(gene)
    out = Path(out_dir)
    check_output(out, overwrite, inputs=inputs_of(gene.space))
    meta = {k: v for k, v in gene.meta.items() if k != "config"}
    try:
        text = json.dumps(meta, indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InputError(f"gene meta cannot be written as JSON: {e}") from None
    config = gene.meta.get("config")
    with tempfile.TemporaryDirectory(prefix=".wsmerge-gene-") as tmp:
        files = dict(gene.space.meta.get("files") or {})
        (Path(tmp) / GENE_FILE).write_text(text + "\n", encoding="utf-8")
        files[GENE_FILE] = Path(tmp) / GENE_FILE
        if config is not None:
            (Path(tmp) / SOURCE_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            files[SOURCE_CONFIG_FILE] = Path(tmp) / SOURCE_CONFIG_FILE
        space = WeightSpace({n: gene.space[n] for n in gene.space},
                            {"source": gene.space.source, "config": None, "files": files})
        marker = {"format": FORMAT, "version": FORMAT_VERSION, "mode": gene.mode}
        return save_space(space, out, overwrite=overwrite, metadata={METADATA_KEY: json.dumps(marker)},
                          inputs=inputs_of(gene.space))


def is_gene_dir(path: str | Path) -> bool:
    return (Path(path) / GENE_FILE).is_file()


def load_gene(path: str | Path) -> Gene:
    """Open a gene directory (tensors stay on disk until used); a malformed one raises
    InputError naming the file."""
    from weightspace.sources import load_local

    d = expand_user(path)
    if not d.exists():
        raise InputError(f"{d}: no such gene directory")
    gf = d / GENE_FILE
    if not gf.is_file():
        raise InputError(f"{d}: not a learngene directory (no {GENE_FILE}); write one with save_gene or "
                         f"`wsmerge learngene fit` / `wsmerge learngene train`")
    meta = read_json_object(gf)
    if meta.get("format") != FORMAT:
        raise InputError(f"{gf}: not a learngene file (format {FORMAT!r} expected)")
    if not isinstance(meta.get("version"), int) or meta["version"] > FORMAT_VERSION:
        raise InputError(f"{gf}: format version {meta.get('version')!r} is newer than this weightspace "
                         f"reads ({FORMAT_VERSION}); upgrade weightspace")
    cf = d / SOURCE_CONFIG_FILE
    config = None
    if cf.is_file():
        config = read_json_object(cf)
    meta["config"] = config
    space = load_local(d)
    space.meta["source"] = str(d)
    gene = Gene(space, meta)
    _check_gene(gene, str(gf))
    return gene

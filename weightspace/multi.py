"""Multi-stage merges: several merges in one YAML file, later ones reading earlier ones by name
(mergekit-multi's format), run in dependency order.

    # stages.yaml: documents separated by ---
    name: math-code                  # a stage, referred to by its name
    merge_method: ties
    base_model: ./base
    models: [...]
    ---
    merge_method: slerp              # the unnamed document (else the last one) is the output
    base_model: math-code            # an earlier stage's result
    models: [{model: math-code}, {model: ./chat}]
    parameters: {t: 0.5}

    stages = load_stages("stages.yaml")          # validated: names, cycles, every stage's spec
    run_stages(stages, "runs/final")             # intermediates stream to a temporary folder

Every stage is checked (method, parameters, files, the models that exist already) before the
first one runs. A reference equal to a stage's name is that stage's output, also where a
folder of that name exists. Intermediate results are written beside OUT in a hidden folder and
removed at the end, whatever happens; with `intermediate_dir` they are kept there, and with
`lazy` a stage whose output is already there is not merged again (as mergekit-multi).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightspace.errors import InputError, SpecError
from weightspace.spec import MergeSpec, parse_specs, read_yaml_file

# a stage directory counts as done when it holds these (mergekit-multi's test)
_DONE_FILES = ("model.safetensors", "model.safetensors.index.json")


@dataclass
class Stage:
    """One merge of a multi-stage file: its name (None for the output), its spec, the stages
    it reads, and where it is in the file."""

    name: str | None
    spec: MergeSpec
    needs: list[str] = field(default_factory=list)
    document: int = 1

    @property
    def label(self) -> str:
        return f"stage {self.name!r}" if self.name else "the output stage"


def is_multi_stage(path: str | Path) -> bool:
    """True when the YAML file holds more than one document."""
    from weightspace.spec import yaml_documents

    return len(yaml_documents(read_yaml_file(path), str(path))) > 1


def load_stages(path: str | Path, *, spec_dir: str | Path | None = None) -> list[Stage]:
    """Read a multi-stage file and return its stages in the order they run (each after the
    stages it reads; the output last). Checked before anything runs."""
    path = Path(path)
    return order_stages(parse_specs(read_yaml_file(path), source=str(path)),
                        spec_dir=spec_dir if spec_dir is not None else path.parent)


def order_stages(specs: list[MergeSpec], *, spec_dir: str | Path | None = None) -> list[Stage]:
    from weightspace.plan import check_spec, model_refs

    stages, names = [], {}
    for k, spec in enumerate(specs, start=1):
        st = Stage(spec.name, spec, document=k)
        if st.name is None and None in names:
            raise SpecError(f"{spec.source}: documents {names[None]} and {k} both have no name; only "
                            f"the output stage may be unnamed")
        if st.name in names:
            raise SpecError(f"{spec.source}: document {k}: the name {st.name!r} is already the name of "
                            f"document {names[st.name]}; give every stage its own name")
        names[st.name] = k
        stages.append(st)
    unnamed = [s for s in stages if s.name is None]
    named = {s.name for s in stages if s.name is not None}
    for st in stages:
        st.needs = [r for r in model_refs(st.spec) if r in named]
        if st.name in st.needs:
            raise SpecError(f"{st.spec.source}: document {st.document}: {st.label} reads its own output")
    ordered = _topological(stages)
    output = unnamed[0] if unnamed else stages[-1]
    if any(output.name in s.needs for s in stages if output.name is not None):
        reader = next(s for s in stages if output.name in s.needs)
        raise SpecError(f"{output.spec.source}: {output.label} (document {output.document}) is the "
                        f"output, but {reader.label} reads it; leave the output unnamed, or last")
    ordered.remove(output)
    ordered.append(output)
    for st in ordered:  # everything a spec can be checked for before its inputs exist
        try:
            check_spec(st.spec, spec_dir=spec_dir, later=frozenset(st.needs))
        except (SpecError, InputError) as e:
            raise type(e)(f"{st.label} (document {st.document}): {e}") from None
    return ordered


def _topological(stages: list[Stage]) -> list[Stage]:
    by_name = {s.name: s for s in stages}
    done: dict[str | None, bool] = {}  # False: on the current path (a cycle when met again)
    out: list[Stage] = []

    def visit(st: Stage, path: list[str | None]) -> None:
        if done.get(st.name) is True:
            return
        if done.get(st.name) is False:
            cycle = " -> ".join(repr(n) for n in [*path[path.index(st.name):], st.name])
            raise SpecError(f"{st.spec.source}: the stages read each other in a circle: {cycle}")
        done[st.name] = False
        for dep in st.needs:
            visit(by_name[dep], [*path, st.name])
        done[st.name] = True
        out.append(st)

    for st in stages:
        visit(st, [])
    return out


def run_stages(stages: list[Stage], out: str | Path, *, spec_dir: str | Path | None = None,
               intermediate_dir: str | Path | None = None, lazy: bool = True,
               overwrite: bool = False, progress: bool = False, echo=None, **run_kwargs: Any) -> dict:
    """Run the stages in order; the last one writes OUT. Returns the output stage's stats,
    with `stages` listing what each stage did ("merged" or "kept")."""
    from weightspace.files import check_disjoint, check_output, temp_sibling
    from weightspace.merge import run_plan
    from weightspace.plan import plan_merge

    out = Path(out)
    sources = [Path(s) for s in dict.fromkeys(st.spec.source for st in stages) if s and Path(s).exists()]
    check_output(out, overwrite, inputs=sources)
    keep = intermediate_dir is not None
    if keep:
        check_disjoint(Path(intermediate_dir), [*sources, out])
    work = Path(intermediate_dir) if keep else temp_sibling(out, kind="stages")
    work.mkdir(parents=True, exist_ok=True)
    done: list[dict] = []
    try:
        stats: dict = {}
        for st in stages:
            final = st is stages[-1]
            dest = out if final else work / str(st.name)
            if not final and keep and lazy and _finished(dest):
                done.append({"stage": st.name, "done": "kept", "out": str(dest)})
                continue
            spec = _with_stage_outputs(st.spec, {n: work / n for n in st.needs})
            try:
                plan = plan_merge(spec, spec_dir=spec_dir)
                check_disjoint(out, plan.inputs())  # what any stage reads, OUT may not replace
                stats = run_plan(plan, dest, overwrite=overwrite if final else True, progress=progress,
                                 **run_kwargs)
            except (SpecError, InputError) as e:
                raise type(e)(f"{st.label} (document {st.document}): {e}") from None
            done.append({"stage": st.name, "done": "merged", "out": str(dest)})
            if echo is not None:
                echo(f"{st.label}: merged into {dest}")
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return {**stats, "stages": done}


def _finished(d: Path) -> bool:
    return (d / "config.json").is_file() and any((d / f).is_file() for f in _DONE_FILES)


def _with_stage_outputs(spec: MergeSpec, outputs: dict[str, Path]) -> MergeSpec:
    """The spec with every reference to a stage replaced by that stage's output folder."""
    if not outputs:
        return spec
    data = spec.model_dump(exclude_none=True, by_alias=True)

    def swap(value: Any) -> Any:
        return str(outputs[value].resolve()) if isinstance(value, str) and value in outputs else value

    for key in ("base_model", "tokenizer_source"):
        if key in data:
            data[key] = swap(data[key])
    for m in data.get("models") or []:
        m["model"] = swap(m["model"])
    for sl in data.get("slices") or []:
        if "base_model" in sl:
            sl["base_model"] = swap(sl["base_model"])
        for src in sl["sources"]:
            src["model"] = swap(src["model"])
    return MergeSpec.model_validate(data).with_origin_of(spec)


__all__ = ["Stage", "is_multi_stage", "load_stages", "order_stages", "run_stages"]

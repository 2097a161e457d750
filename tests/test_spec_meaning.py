"""A spec means the same thing from any working directory, and says where it is wrong.

Relative paths (models, companions, coefficient files, tokenizer sources) are read against the
spec's own folder. A path found only in the working directory is used with a note; a path that
exists in both places as different files is refused, naming both. Every error that comes from a
spec value names the spec file, the field and its YAML line.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from weightspace import load_space
from weightspace.errors import InputError, SpecError
from weightspace.merge import plan_merge, run_plan
from weightspace.methods import all_methods
from weightspace.spec import load_spec, parse_spec
from weightspace.zoo.tiny import write_tiny_llama

FISHER_SPEC = """\
merge_method: fisher
models:
  - model: models/ft_a
    parameters: {weight: 0.7, fisher: ft_a.fisher.safetensors}
  - model: models/ft_b
    parameters: {weight: 0.3, fisher: ft_b.fisher.safetensors}
tokenizer_source: models/ft_b
"""


def _fisher_file(model: Path, out: Path, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ws = load_space(model)
    save_file({n: torch.rand(ws[n].shape, generator=g) + 0.1 for n in ws}, str(out))


def _write_tokenizer(d: Path, words: list[str]) -> None:
    """A WordLevel tokenizer.json: `tokenizer_source` reads the models' vocabularies."""
    tok = {"version": "1.0", "added_tokens": [], "normalizer": None,
           "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None, "decoder": None,
           "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(words)}, "unk_token": words[0]}}
    (d / "tokenizer.json").write_text(json.dumps(tok))
    (d / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A spec beside its models and Fisher files, as a user keeps them."""
    d = tmp_path / "project"
    write_tiny_llama(d / "models" / "ft_a", seed=0, delta_seed=1)
    write_tiny_llama(d / "models" / "ft_b", seed=0, delta_seed=2)
    for m in ("ft_a", "ft_b"):  # one vocabulary of 64 tokens; ft_b's files are told apart by a mark
        _write_tokenizer(d / "models" / m, [f"t{i}" for i in range(64)])
    (d / "models" / "ft_b" / "tokenizer_config.json").write_text('{"model_max_length": 7}')
    _fisher_file(d / "models" / "ft_a", d / "ft_a.fisher.safetensors", 1)
    _fisher_file(d / "models" / "ft_b", d / "ft_b.fisher.safetensors", 2)
    (d / "spec.yaml").write_text(FISHER_SPEC)
    return d


def _merge(spec: Path, out: Path, cwd: Path, monkeypatch) -> dict[str, torch.Tensor]:
    monkeypatch.chdir(cwd)
    plan = plan_merge(load_spec(spec), spec_dir=spec.parent)
    run_plan(plan, out, progress=False)
    return {n: r.load() for n, r in load_space(out).items()}


@pytest.mark.requires("hf")  # tokenizer_source reads the vocabularies with transformers
def test_same_result_from_any_folder_and_a_decoy_is_refused(project, tmp_path, monkeypatch):
    spec = project / "spec.yaml"
    here = _merge(spec, tmp_path / "out-here", project, monkeypatch)
    elsewhere_dir = tmp_path / "elsewhere"
    elsewhere_dir.mkdir()
    elsewhere = _merge(spec, tmp_path / "out-elsewhere", elsewhere_dir, monkeypatch)
    assert here.keys() == elsewhere.keys()
    assert all(torch.equal(here[n], elsewhere[n]) for n in here)
    assert (tmp_path / "out-elsewhere" / "tokenizer_config.json").read_text() == '{"model_max_length": 7}'

    # a folder holding a stray Fisher file of the same name (what `wsmerge fisher -o` run
    # there leaves behind): refused, naming both files, never silently picked up
    decoy_dir = tmp_path / "decoy"
    decoy_dir.mkdir()
    _fisher_file(project / "models" / "ft_a", decoy_dir / "ft_a.fisher.safetensors", 99)
    monkeypatch.chdir(decoy_dir)
    with pytest.raises(SpecError) as e:
        plan_merge(load_spec(spec), spec_dir=spec.parent)
    msg = str(e.value)
    assert str(project / "ft_a.fisher.safetensors") in msg and str(decoy_dir / "ft_a.fisher.safetensors") in msg
    assert re.search(r"models\[0\]\.parameters\.fisher \(line 4\)", msg), msg

    # the same for a model directory and for the tokenizer source
    (decoy_dir / "ft_a.fisher.safetensors").unlink()
    write_tiny_llama(decoy_dir / "models" / "ft_b", seed=5)
    with pytest.raises(SpecError, match=r"models\[1\]\.model \(line 5\): 'models/ft_b' names two "
                                        r"different things"):
        plan_merge(load_spec(spec), spec_dir=spec.parent)


@pytest.mark.requires("hf")
def test_a_path_found_only_in_the_working_directory_is_used_with_a_note(project, tmp_path,
                                                                        monkeypatch):
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    shutil.move(project / "spec.yaml", spec_dir / "spec.yaml")
    monkeypatch.chdir(project)  # mergekit's habit: paths relative to where you run it
    plan = plan_merge(load_spec(spec_dir / "spec.yaml"), spec_dir=spec_dir)
    # two models and two Fisher files, each said once (the tokenizer source is models/ft_b again)
    assert len(plan.notes) == 4
    note = next(n for n in plan.notes if n.startswith("models[0].model"))
    assert f"using {project / 'models' / 'ft_a'} from the working directory" in note
    assert "relative to the spec's folder" in note


def test_a_missing_relative_path_is_reported_with_where_it_looked_before_any_hub_lookup(
        tmp_path, monkeypatch):
    import weightspace.hub as hub

    monkeypatch.setattr(hub, "resolve_hub", lambda ref: pytest.fail(f"the Hub was asked for {ref}"))
    write_tiny_llama(tmp_path / "models" / "base", seed=0)
    spec = tmp_path / "spec.yaml"
    spec.write_text("merge_method: linear\nmodels:\n  - model: models/base\n    parameters: {weight: 1}\n"
                    "  - model: models/bsae\n    parameters: {weight: 1}\n")
    monkeypatch.chdir(tmp_path.parent)
    with pytest.raises(InputError) as e:
        plan_merge(load_spec(spec), spec_dir=tmp_path)
    assert str(e.value) == (f"{spec}: models[1].model (line 5): models/bsae: no such file or directory "
                            f"(looked for {tmp_path / 'models' / 'bsae'} or "
                            f"{tmp_path.parent / 'models' / 'bsae'})")


def test_a_name_that_exists_nowhere_is_looked_up_on_the_hub_and_says_where_it_looked(
        tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    spec = tmp_path / "spec.yaml"
    spec.write_text("merge_method: linear\nmodels:\n  - model: acme/llama\n    parameters: {weight: 1}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as e:
        plan_merge(load_spec(spec), spec_dir=tmp_path)
    assert "models[0].model (line 3): acme/llama: not a local path, and not in the Hub cache" in str(e.value)
    assert f"on disk, looked for {tmp_path / 'acme' / 'llama'}" in str(e.value)


@pytest.mark.parametrize("setting, field", [
    ("density: -0.5", r"models\[0\]\.parameters\.density \(line 5\): must be in \[0, 1\]; got -0\.5"),
    ("density: 1.5", r"models\[0\]\.parameters\.density \(line 5\): must be in \[0, 1\]; got 1\.5"),
    ("density: [0.2, 1.5]", r"models\[0\]\.parameters\.density\[1\] \(line 5\): must be in \[0, 1\]; got 1\.5"),
    ("density: [{filter: mlp, value: 2}]",
     r"models\[0\]\.parameters\.density\[0\]\.value \(line 5\): must be in \[0, 1\]; got 2"),
    ("weight: abc", r"models\[0\]\.parameters\.weight \(line 5\): expected float, got 'abc'"),
])
def test_out_of_range_parameters_are_spec_errors_naming_field_and_line(tmp_path, setting, field):
    spec = tmp_path / "ties.yaml"
    params = setting if setting.startswith("weight:") else f"weight: 1, {setting}"  # a key once
    spec.write_text(f"merge_method: ties\nbase_model: nowhere/base\nmodels:\n  - model: nowhere/a\n"
                    f"    parameters: {{{params}}}\n")
    with pytest.raises(SpecError, match=re.escape(str(spec)) + ": " + field):
        plan_merge(load_spec(spec), spec_dir=tmp_path)  # before any model is looked for


def _out_of_range(p) -> list:
    """Values just outside a parameter's declared range (the bound itself where it is open)."""
    step = 1 if p.kind is int else 0.5
    bad = [p.ge - step] if p.ge is not None else [p.gt] if p.gt is not None else []
    bad += [p.le + step] if p.le is not None else [p.lt] if p.lt is not None else []
    if p.choices:
        bad.append("no-such-choice")
    return bad


RANGED = [(m.name, p.name, scope, v) for m in all_methods().values()
          for scope, params in (("global", m.all_global_params()), ("model", m.model_params))
          for p in params for v in _out_of_range(p)]


def test_every_bounded_parameter_is_in_the_table():
    names = {(m, p) for m, p, _, _ in RANGED}
    for m, p in [("ties", "density"), ("dare_ties", "density"), ("breadcrumbs", "gamma"),
                 ("della", "epsilon"), ("slerp", "t"), ("regmean", "alpha"), ("fisher", "weight"),
                 ("fisher", "uncovered"), ("dare_linear", "seed")]:
        assert (m, p) in names, (m, p)


# a value as a scalar, inside a depth gradient, and as a filter's value: each
# is range-checked before any model is looked for (density -1 or 2 is never clamped)
FORMS = {"scalar": ("{v}", ""), "gradient": ("[{v}, {v}]", r"\[0\]"),
         "filter": ("[{{filter: mlp, value: {v}}}]", r"\[0\]\.value")}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("method, param, scope, bad", RANGED)
def test_every_method_refuses_values_outside_its_ranges(tmp_path, method, param, scope, bad, form):
    if form == "gradient" and isinstance(bad, str):
        pytest.skip("a gradient of strings is read as steps; its entries are the scalar case")
    template, suffix = FORMS[form]
    value = template.format(v=f"'{bad}'" if isinstance(bad, str) else repr(bad))
    base = "base_model: nowhere/base\n" if all_methods()[method].uses_base == "required" else ""
    if scope == "global":
        text = (f"merge_method: {method}\n{base}models:\n  - model: nowhere/a\n  - model: nowhere/b\n"
                f"parameters:\n  {param}: {value}\n")
        field = rf"parameters\.{param}{suffix} \(line \d+\)"
    else:
        text = (f"merge_method: {method}\n{base}models:\n  - model: nowhere/a\n"
                f"    parameters: {{{param}: {value}}}\n  - model: nowhere/b\n")
        field = rf"models\[0\]\.parameters\.{param}{suffix} \(line \d+\)"
    with pytest.raises(SpecError, match=field + ": must be "):
        plan_merge(parse_spec(text, source="<spec>"))


def test_della_density_and_epsilon_must_fit_together(tiny_models):
    spec = parse_spec(f"merge_method: della\nbase_model: {tiny_models.base}\nmodels:\n"
                      f"  - model: {tiny_models.ft_a}\n    parameters: {{weight: 1, density: 0.9, epsilon: 0.2}}\n")
    with pytest.raises(SpecError, match=r"models\[0\]\.parameters \(line 5\): density \+/- epsilon must "
                                        r"lie inside \(0, 1\), got density 0\.9 and epsilon 0\.2"):
        plan_merge(spec)


def test_weights_that_cannot_be_normalized_are_refused_while_planning(tiny_models):
    spec = parse_spec(f"merge_method: linear\nmodels:\n  - model: {tiny_models.ft_a}\n    parameters: {{weight: 1}}\n"
                      f"  - model: {tiny_models.ft_b}\n    parameters: {{weight: -1}}\n")
    with pytest.raises(SpecError, match="linear: the weights sum to 0"):
        plan_merge(spec)


def test_cli_errors_from_spec_values_name_file_field_and_line(tiny_models, run_cli, write_spec):
    spec = write_spec(f"""\
        merge_method: ties
        base_model: {tiny_models.base}
        models:
          - model: {tiny_models.ft_a}
            parameters: {{weight: 1, density: 0.5}}
          - model: {tiny_models.root / 'ft_d'}
            parameters: {{weight: 1, density: 0.5}}
        """)
    code, _, err = run_cli("run", spec, tiny_models.root / "out")
    assert code == 1
    assert err == (f"error: {spec}: models[1].model (line 6): {tiny_models.root / 'ft_d'}: "
                   f"no such file or directory\n")
    spec = write_spec(f"merge_method: slerp\nbase_model: {tiny_models.base}\nmodels:\n"
                      f"  - model: {tiny_models.ft_a}\nparameters: {{t: 2.5}}\n", name="slerp.yaml")
    code, _, err = run_cli("run", spec, tiny_models.root / "out")
    assert code == 2
    assert err == f"error: {spec}: parameters.t (line 5): must be in [0, 1]; got 2.5\n"
    assert not (tiny_models.root / "out").exists()


def test_a_zoo_spec_reads_its_init_checkpoint_beside_itself(tmp_path, monkeypatch):
    from weightspace.zoo.spec import load_zoo_spec

    d = tmp_path / "zoo-spec"
    write_tiny_llama(d / "init", seed=0)
    (d / "zoo.yaml").write_text("dataset: digits\ninit: init\ngrid: {seed: [0, 1]}\n")
    monkeypatch.chdir(tmp_path)
    spec = load_zoo_spec(d / "zoo.yaml")
    assert spec.init == str((d / "init").resolve()) and spec.notes == []
    assert {r.init for r in spec.runs()} == {str((d / "init").resolve())}
    (d / "zoo.yaml").write_text("dataset: digits\ninit: nowhere\n")
    with pytest.raises(SpecError, match=r"zoo\.yaml: init: nowhere: no such checkpoint \(looked for "):
        load_zoo_spec(d / "zoo.yaml")


@pytest.mark.requires("hf")
def test_cli_says_once_when_it_uses_the_working_directory(project, tmp_path, run_cli, monkeypatch):
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    (spec_dir / "spec.yaml").write_text(FISHER_SPEC)
    monkeypatch.chdir(project)
    code, out, err = run_cli("run", spec_dir / "spec.yaml", tmp_path / "out")
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 4 and len(set(notes)) == 4
    assert any(n.startswith("note: models[1].model (line 5): 'models/ft_b' is not beside the spec")
               for n in notes)

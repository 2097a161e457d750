"""Multi-stage merges (mergekit-multi's format): stages by name, in dependency order, the
intermediates in a temporary folder that is removed; cycles, duplicates and bad stages refused
before anything runs."""

from __future__ import annotations

import pytest
import torch

from weightspace import load_space
from weightspace.errors import InputError, SpecError
from weightspace.multi import load_stages, run_stages
from weightspace.zoo.tiny import write_tiny_llama

TWO_STAGES = """\
merge_method: slerp
base_model: avg
models:
  - model: avg
  - model: models/c
parameters: {t: 0.25}
---
name: avg
merge_method: linear
models:
  - {model: models/a, parameters: {weight: 0.5}}
  - {model: models/b, parameters: {weight: 0.5}}
"""


@pytest.fixture
def folder(tmp_path):
    for k, n in enumerate("abc", start=1):
        write_tiny_llama(tmp_path / "models" / n, seed=0, delta_seed=k)
    return tmp_path


def test_stages_run_in_dependency_order_and_the_intermediates_go(folder, tmp_path, monkeypatch):
    (folder / "stages.yaml").write_text(TWO_STAGES)
    stages = load_stages(folder / "stages.yaml")
    assert [s.name for s in stages] == ["avg", None]  # the unnamed document is the output, last
    monkeypatch.chdir(tmp_path.parent)  # paths are read against the file's folder
    stats = run_stages(stages, tmp_path / "out", spec_dir=folder)
    assert [s["done"] for s in stats["stages"]] == ["merged", "merged"]
    a, b, c = (load_space(folder / "models" / n) for n in "abc")
    got = load_space(tmp_path / "out")
    n = "model.layers.1.mlp.up_proj.weight"
    avg = 0.5 * a[n].load() + 0.5 * b[n].load()
    from weightspace.merges.slerp import slerp

    torch.testing.assert_close(got[n].load(), slerp(0.25, avg, c[n].load()))
    assert [p.name for p in tmp_path.iterdir() if "wsmerge" in p.name] == []  # intermediates removed


def test_kept_intermediates_are_reused_lazily(folder, tmp_path):
    (folder / "stages.yaml").write_text(TWO_STAGES)
    stages = load_stages(folder / "stages.yaml")
    keep = tmp_path / "stages"
    run_stages(stages, tmp_path / "out1", spec_dir=folder, intermediate_dir=keep)
    assert (keep / "avg" / "model.safetensors").is_file()
    again = run_stages(stages, tmp_path / "out2", spec_dir=folder, intermediate_dir=keep)
    assert [s["done"] for s in again["stages"]] == ["kept", "merged"]


@pytest.mark.parametrize("text, error, message", [
    ("name: x\nmerge_method: linear\nmodels: [{model: y}]\n---\nname: y\nmerge_method: linear\n"
     "models: [{model: x}]\n---\nmerge_method: linear\nmodels: [{model: x}]\n",
     SpecError, "the stages read each other in a circle: 'x' -> 'y' -> 'x'"),
    ("name: x\nmerge_method: linear\nmodels: [{model: models/a}]\n---\nname: x\nmerge_method: linear\n"
     "models: [{model: models/b}]\n", SpecError, "the name 'x' is already the name of document 1"),
    ("merge_method: linear\nmodels: [{model: models/a}]\n---\nmerge_method: linear\nmodels: [{model: models/b}]\n",
     SpecError, "documents 1 and 2 both have no name"),
    ("name: x\nmerge_method: ties\nbase_model: models/a\nmodels: [{model: models/b, parameters: {weight: 1, density: 2}}]\n"
     "---\nmerge_method: linear\nmodels: [{model: x}]\n",
     SpecError, "stage 'x' (document 1): "),
    ("name: x\nmerge_method: linear\nmodels: [{model: models/typo}]\n---\nmerge_method: linear\nmodels: [{model: x}]\n",
     InputError, "models/typo: no such file or directory"),
])
def test_bad_files_are_refused_before_any_stage_runs(folder, text, error, message):
    (folder / "bad.yaml").write_text(text)
    with pytest.raises(error) as e:
        load_stages(folder / "bad.yaml")
    assert message in str(e.value), str(e.value)
    assert not any(p.name.startswith(".") for p in folder.iterdir())


def test_a_failing_stage_leaves_no_output_and_no_intermediates(folder, tmp_path):
    (folder / "stages.yaml").write_text(TWO_STAGES.replace("models/c", "models/a"))
    stages = load_stages(folder / "stages.yaml")
    # after the checks, model a is replaced by one of another width: the first stage fails
    write_tiny_llama(folder / "models" / "a", seed=0, delta_seed=1, hidden=16)
    with pytest.raises(InputError, match=r"stage 'avg' \(document 2\): .*does not match"):
        run_stages(stages, tmp_path / "out", spec_dir=folder)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if "wsmerge" in p.name] == []


def test_wsmerge_run_takes_a_multi_stage_file(folder, tmp_path, run_cli):
    (folder / "stages.yaml").write_text(TWO_STAGES)
    code, out, err = run_cli("run", folder / "stages.yaml", "--dry-run")
    assert code == 0, err
    assert out.splitlines() == ["stage 'avg' (document 2)", "stage the output (document 1), reading 'avg'"]
    code, out, err = run_cli("run", folder / "stages.yaml", "--out-path", tmp_path / "o", "-I", tmp_path / "i")
    assert code == 0, err
    assert (tmp_path / "o" / "model.safetensors").is_file() and (tmp_path / "i" / "avg" / "config.json").is_file()
    code, _, err = run_cli("run", folder / "stages.yaml", tmp_path / "o2", "--search", "weight=0.5", "--data", "digits")
    assert code == 2 and "cannot be used on a multi-stage SPEC" in err
    (folder / "cycle.yaml").write_text("name: x\nmerge_method: linear\nmodels: [{model: y}]\n---\nname: y\n"
                                       "merge_method: linear\nmodels: [{model: x}]\n")
    code, _, err = run_cli("run", folder / "cycle.yaml", tmp_path / "o3")
    assert code == 2 and "read each other in a circle: 'x' -> 'y' -> 'x'" in err
    assert not (tmp_path / "o3").exists()

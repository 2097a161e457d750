"""LoRA inputs: `model: base+adapter` applies a peft adapter tensor by tensor.

Adapters are written here by hand in peft's format (adapter_config.json and
adapter_model.safetensors / .bin, peft's key names) with known A, B, r and alpha, and every
merged tensor is checked against W + scale * B @ A written out in the test. Then: specs that
use them (linear, task_arithmetic) from another working directory, the spec-relative path
rules for both parts, the Hub, and the errors (exit codes, the module / tensor / file named,
nothing written).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _error_helpers import assert_nothing_written, single_error_line
from safetensors.torch import load_file, save_file

import weightspace.ir as ir
import weightspace.tensor_steps as merge_mod  # the block sizes the planner reads
from weightspace import load_space
from weightspace.errors import InputError, SpecError
from weightspace.ir import WeightSpace, slice_rows
from weightspace.lora import LoraRef
from weightspace.merge import plan_merge, run_plan
from weightspace.spec import load_spec
from weightspace.zoo.tiny import write_tiny_llama

P = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"
UP0 = "model.layers.0.mlp.up_proj"
EMBED = "model.embed_tokens"
SHAPES = {Q0: (32, 32), V1: (16, 32), UP0: (64, 32), "model.layers.1.mlp.down_proj": (32, 64),
          "lm_head": (64, 32)}  # (out, in) of the tiny Llama's linear layers


def factors(seed: int, out_f: int, in_f: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, in_f, generator=g) * 0.1, torch.randn(out_f, r, generator=g) * 0.1


def write_adapter(d: Path, lora: dict[str, tuple[torch.Tensor, torch.Tensor]], *, r: int = 4,
                  alpha: float = 8, embedding: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                  whole: dict[str, torch.Tensor] | None = None, fmt: str = "safetensors",
                  **config) -> Path:
    """A peft LoRA adapter directory: module -> (A, B); embedding module -> (A, B); whole tensors
    (modules_to_save, biases) under their peft keys."""
    tensors = {}
    for mod, (a, b) in lora.items():
        tensors[f"{P}{mod}.lora_A.weight"], tensors[f"{P}{mod}.lora_B.weight"] = a, b
    for mod, (a, b) in (embedding or {}).items():
        tensors[f"{P}{mod}.lora_embedding_A"], tensors[f"{P}{mod}.lora_embedding_B"] = a, b
    tensors.update({P + k: v for k, v in (whole or {}).items()})
    d.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(tensors, d / "adapter_model.bin")
    names = sorted({m.split(".")[-1] for m in [*lora, *(embedding or {})]})
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": names,
           "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
           "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
           "base_model_name_or_path": "tiny-llama", **config}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


def base_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def merged(ref: str) -> dict[str, torch.Tensor]:
    return {n: r.load() for n, r in load_space(ref).items()}


def assert_only_changed(got: dict, base: dict, expected: dict) -> None:
    """`got` is `base` except for the tensors in `expected`, which match to float32 rounding."""
    assert got.keys() == base.keys()
    for n in base:
        if n in expected:
            torch.testing.assert_close(got[n], expected[n], rtol=1e-6, atol=1e-7, msg=n)
            assert not torch.equal(got[n], base[n]), n
        else:
            assert torch.equal(got[n], base[n]), n


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return write_tiny_llama(tmp_path / "models" / "base", seed=0)


# ---------------------------------------------------------------- the merged tensors


def test_linear_layers_get_alpha_over_r_times_b_at_a(base, tmp_path):
    lora = {m: factors(i, *SHAPES[m], 4) for i, m in enumerate([Q0, V1, UP0])}
    ad = write_adapter(tmp_path / "lora", lora, r=4, alpha=8)
    w = base_tensors(base)
    expected = {f"{m}.weight": w[f"{m}.weight"] + (8 / 4) * b @ a for m, (a, b) in lora.items()}
    space = load_space(f"{base}+{ad}")
    assert isinstance(space[f"{Q0}.weight"], LoraRef)
    assert isinstance(space["model.norm.weight"], ir.SafetensorsRef)  # untouched: the base's own ref
    assert_only_changed(merged(f"{base}+{ad}"), w, expected)
    # the config, tokenizer files and layout come from the base
    assert space.meta["config"] == load_space(base).meta["config"]
    assert list(space) == list(load_space(base))


def test_rslora_scales_by_alpha_over_sqrt_r(base, tmp_path):
    lora = {Q0: factors(1, *SHAPES[Q0], 9)}
    ad = write_adapter(tmp_path / "lora", lora, r=9, alpha=6, use_rslora=True)
    a, b = lora[Q0]
    w = base_tensors(base)
    assert_only_changed(merged(f"{base}+{ad}"), w,
                        {f"{Q0}.weight": w[f"{Q0}.weight"] + (6 / math.sqrt(9)) * b @ a})


def test_rank_and_alpha_patterns_set_r_and_alpha_per_module_as_peft_matches_them(base, tmp_path):
    # peft: the first pattern matching the end of the module name wins, else r / lora_alpha
    lora = {Q0: factors(1, *SHAPES[Q0], 2), V1: factors(2, *SHAPES[V1], 4),
            UP0: factors(3, *SHAPES[UP0], 6)}
    ad = write_adapter(tmp_path / "lora", lora, r=4, alpha=8,
                       rank_pattern={"layers.0.self_attn.q_proj": 2, "up_proj": 6},
                       alpha_pattern={"v_proj": 3, r"layers\.0\.mlp\.up_proj": 12})
    w = base_tensors(base)
    scale = {Q0: 8 / 2, V1: 3 / 4, UP0: 12 / 6}
    expected = {f"{m}.weight": w[f"{m}.weight"] + scale[m] * b @ a for m, (a, b) in lora.items()}
    assert_only_changed(merged(f"{base}+{ad}"), w, expected)


def test_embeddings_add_the_transposed_product_rounded_to_the_base_dtype(tmp_path):
    # peft's Embedding merge: weight += ((B @ A)^T * scale).to(weight.dtype); A [r, vocab], B [dim, r]
    base = write_tiny_llama(tmp_path / "base16", seed=0, dtype=torch.bfloat16)
    a, b = factors(5, 32, 64, 4)
    ad = write_adapter(tmp_path / "lora", {}, r=4, alpha=4, embedding={EMBED: (a, b)})
    w = base_tensors(base)[f"{EMBED}.weight"]
    delta = ((b @ a).T * 1.0).to(torch.bfloat16)
    got = load_space(f"{base}+{ad}")[f"{EMBED}.weight"].load()
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, (w.float() + delta.float()).to(torch.bfloat16))


def test_bf16_base_gets_the_float32_sum_cast_once(tmp_path):
    base = write_tiny_llama(tmp_path / "base16", seed=0, dtype=torch.bfloat16)
    a, b = (t.to(torch.bfloat16) for t in factors(1, *SHAPES[Q0], 4))
    ad = write_adapter(tmp_path / "lora", {Q0: (a, b)}, r=4, alpha=16)
    w = base_tensors(base)[f"{Q0}.weight"]
    ref = load_space(f"{base}+{ad}")[f"{Q0}.weight"]
    want = (w.float() + 4.0 * b.float() @ a.float()).to(torch.bfloat16)
    assert ref.dtype == torch.bfloat16 and torch.equal(ref.load(), want)
    # a float32 caller gets the same values: the LoRA sum is cast to the base dtype first
    assert torch.equal(ref.load("cpu", torch.float32), want.float())


def _gpt2_like(d: Path) -> Path:
    """Conv1D layers as GPT-2 stores them: weight (in, out)."""
    g = torch.Generator().manual_seed(0)
    t = {"transformer.h.0.attn.c_attn.weight": torch.randn(32, 96, generator=g),
         "transformer.h.0.attn.c_attn.bias": torch.randn(96, generator=g),
         "transformer.h.0.attn.c_proj.weight": torch.randn(32, 32, generator=g),
         "transformer.h.0.attn.c_proj.bias": torch.randn(32, generator=g),
         "transformer.wte.weight": torch.randn(64, 32, generator=g)}
    WeightSpace.from_tensors(t).save(d, config={"model_type": "gpt2", "n_embd": 32, "n_layer": 1})
    return d


def test_conv1d_layers_stored_in_by_out_get_the_transposed_product(tmp_path):
    # peft sets fan_in_fan_out for Conv1D whatever the config says; the square c_proj follows the
    # architecture (gpt2), the non-square c_attn its shape
    base = _gpt2_like(tmp_path / "gpt2")
    attn, proj = "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"
    lora = {attn: factors(1, 96, 32, 4), proj: factors(2, 32, 32, 4)}
    bias_a = torch.full((96,), 0.5)
    w = base_tensors(base)
    for flag in (True, False):
        ad = write_adapter(tmp_path / f"lora-{flag}", lora, r=4, alpha=2, fan_in_fan_out=flag,
                           whole={f"{attn}.base_layer.bias": bias_a}, bias="lora_only")
        expected = {f"{m}.weight": w[f"{m}.weight"] + 0.5 * (b @ a).T for m, (a, b) in lora.items()}
        expected[f"{attn}.bias"] = bias_a  # trained with bias: lora_only, stored whole
        assert_only_changed(merged(f"{base}+{ad}"), w, expected)


def test_modules_to_save_replace_and_lora_b_bias_adds(tmp_path):
    base = _gpt2_like(tmp_path / "gpt2")
    attn = "transformer.h.0.attn.c_attn"
    a, b = factors(1, 96, 32, 4)
    lora_bias = torch.linspace(-1, 1, 96)
    wte = torch.zeros(64, 32)
    ad = write_adapter(tmp_path / "lora", {attn: (a, b)}, r=4, alpha=8, fan_in_fan_out=True,
                       lora_bias=True, modules_to_save=["wte"],
                       whole={f"{attn}.lora_B.bias": lora_bias, "transformer.wte.weight": wte})
    w = base_tensors(base)
    assert_only_changed(merged(f"{base}+{ad}"), w, {
        f"{attn}.weight": w[f"{attn}.weight"] + 2.0 * (b @ a).T,
        f"{attn}.bias": w[f"{attn}.bias"] + 2.0 * lora_bias,
        "transformer.wte.weight": wte})


def test_a_bin_adapter_loads_with_weights_only(base, tmp_path, monkeypatch):
    lora = {Q0: factors(1, *SHAPES[Q0], 4)}
    ad = write_adapter(tmp_path / "lora", lora, fmt="bin")
    seen = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("weights_only")) or real(*a, **k))
    a, b = lora[Q0]
    w = base_tensors(base)
    assert_only_changed(merged(f"{base}+{ad}"), w, {f"{Q0}.weight": w[f"{Q0}.weight"] + 2 * b @ a})
    assert seen and all(seen)


def test_loading_one_tensor_reads_that_base_tensor_and_its_factors_only(base, tmp_path, monkeypatch):
    lora = {Q0: factors(1, *SHAPES[Q0], 4), V1: factors(2, *SHAPES[V1], 4)}
    ad = write_adapter(tmp_path / "lora", lora)
    reads: list[str] = []
    real = ir.read_tensor
    monkeypatch.setattr(ir, "read_tensor", lambda path, e: reads.append(e.name) or real(path, e))
    space = load_space(f"{base}+{ad}")
    assert reads == []  # opening reads headers only
    space[f"{Q0}.weight"].load()
    assert sorted(reads) == sorted([f"{Q0}.weight", f"{P}{Q0}.lora_A.weight", f"{P}{Q0}.lora_B.weight"])


def test_row_blocks_of_a_lora_tensor_read_only_those_rows_and_match(tmp_path, monkeypatch):
    base = _gpt2_like(tmp_path / "gpt2")
    attn = "transformer.h.0.attn.c_attn"
    llama = write_tiny_llama(tmp_path / "llama", seed=0)
    cases = [(f"{llama}+{write_adapter(tmp_path / 'l', {UP0: factors(1, 64, 32, 4)})}", f"{UP0}.weight"),
             (f"{base}+{write_adapter(tmp_path / 'g', {attn: factors(2, 96, 32, 4)})}", f"{attn}.weight"),
             (f"{llama}+{write_adapter(tmp_path / 'e', {}, embedding={EMBED: factors(3, 32, 64, 4)})}",
              f"{EMBED}.weight")]
    for ref, name in cases:
        full = load_space(ref)[name]
        whole = full.load()
        for r0, r1 in [(0, 5), (7, 19), (full.shape[0] - 3, full.shape[0])]:
            assert torch.equal(slice_rows(full, r0, r1).load(), whole[r0:r1]), (name, r0)
    # a merge that streams large tensors in row blocks writes the same bytes
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"merge_method: linear\nmodels:\n  - model: {cases[0][0]}\n    parameters: {{weight: 1}}\n"
                    f"  - model: {llama}\n    parameters: {{weight: 1}}\n")
    run_plan(plan_merge(load_spec(spec)), tmp_path / "whole", progress=False)
    monkeypatch.setattr(merge_mod, "BLOCK_BYTES", 1024)
    plan = plan_merge(load_spec(spec))
    assert sum(s.name == f"{UP0}.weight" for s in plan.steps) > 4
    run_plan(plan, tmp_path / "blocks", progress=False)
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(
        str(tmp_path / "blocks" / "model.safetensors"))
    assert all(torch.equal(a[n], b[n]) for n in a)


# ---------------------------------------------------------------- specs and the CLI


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A spec beside its base model and two adapters, as a user keeps them."""
    d = tmp_path / "project"
    write_tiny_llama(d / "models" / "base", seed=0)
    (d / "models" / "base" / "tokenizer_config.json").write_text('{"model_max_length": 9}')
    write_adapter(d / "adapters" / "a", {Q0: factors(1, *SHAPES[Q0], 4), UP0: factors(2, *SHAPES[UP0], 4)})
    write_adapter(d / "adapters" / "b", {Q0: factors(3, *SHAPES[Q0], 2)}, r=2, alpha=1)
    return d


def _expected_lora(project: Path, name: str) -> dict[str, torch.Tensor]:
    """Base + scale * B @ A for adapter `name`, from its own files."""
    w = base_tensors(project / "models" / "base")
    ad = project / "adapters" / name
    cfg = json.loads((ad / "adapter_config.json").read_text())
    t = load_file(str(ad / "adapter_model.safetensors"))
    out = dict(w)
    for k in t:
        if k.endswith(".lora_A.weight"):
            mod = k[len(P):-len(".lora_A.weight")]
            b = t[f"{P}{mod}.lora_B.weight"]
            out[f"{mod}.weight"] = w[f"{mod}.weight"] + cfg["lora_alpha"] / cfg["r"] * b @ t[k]
    return out


def test_cli_linear_and_task_arithmetic_with_lora_models_from_another_folder(project, tmp_path,
                                                                             run_cli, monkeypatch):
    (project / "linear.yaml").write_text(
        "merge_method: linear\nmodels:\n  - model: models/base+adapters/a\n    parameters: {weight: 0.25}\n"
        "  - model: models/base+adapters/b\n    parameters: {weight: 0.75}\n")
    (project / "ta.yaml").write_text(
        "merge_method: task_arithmetic\nbase_model: models/base\nmodels:\n"
        "  - model: models/base+adapters/a\n    parameters: {weight: 0.5}\n"
        "  - model: models/base+adapters/b\n    parameters: {weight: 2.0}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    base, a, b = base_tensors(project / "models" / "base"), _expected_lora(project, "a"), _expected_lora(project, "b")
    for spec, want in [("linear.yaml", {n: 0.25 * a[n] + 0.75 * b[n] for n in base}),
                       ("ta.yaml", {n: base[n] + 0.5 * (a[n] - base[n]) + 2.0 * (b[n] - base[n]) for n in base})]:
        out = tmp_path / f"out-{spec}"
        code, _, err = run_cli("run", project / spec, out)
        assert code == 0, err
        assert "note:" not in err
        got = load_file(str(out / "model.safetensors"))
        assert got.keys() == want.keys()
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-7, msg=n)
        assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 9}'
        assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2


def test_both_parts_follow_the_spec_relative_path_rules(project, tmp_path, monkeypatch):
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    spec = spec_dir / "spec.yaml"
    spec.write_text("merge_method: linear\nmodels:\n  - model: models/base+adapters/a\n"
                    "    parameters: {weight: 1}\n")
    # found only in the working directory (mergekit's habit): used, with one note naming both parts
    monkeypatch.chdir(project)
    plan = plan_merge(load_spec(spec), spec_dir=spec_dir)
    assert len(plan.notes) == 1
    note = plan.notes[0]
    assert note.startswith("models[0].model (line 3): the base model 'models/base' is not beside the spec")
    assert f"; the LoRA adapter 'adapters/a' is not beside the spec ({spec_dir / 'adapters' / 'a'}); " \
           f"using {project / 'adapters' / 'a'} from the working directory" in note
    # a different adapter of the same name beside the spec: refused, naming both
    write_adapter(spec_dir / "adapters" / "a", {Q0: factors(9, *SHAPES[Q0], 4)})
    with pytest.raises(SpecError, match=r"models\[0\]\.model \(line 3\): 'adapters/a' names two different "
                                        r"things: " + re.escape(str(spec_dir / "adapters" / "a"))):
        plan_merge(load_spec(spec), spec_dir=spec_dir)


def test_a_missing_adapter_or_base_says_which_part_and_where_it_looked(project, tmp_path, run_cli,
                                                                        monkeypatch, write_spec):
    import weightspace.hub as hub

    monkeypatch.setattr(hub, "resolve_hub", lambda ref: pytest.fail(f"the Hub was asked for {ref}"))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    for ref, part, missing in [("models/base+adapters/nope", "LoRA adapter", "adapters/nope"),
                               ("models/bsae+adapters/a", "base model", "models/bsae")]:
        spec = project / "spec.yaml"
        spec.write_text(f"merge_method: linear\nmodels:\n  - model: {ref}\n    parameters: {{weight: 1}}\n")
        code, _, err = run_cli("run", spec, out)
        assert code == 1
        single_error_line(err)
        assert err == (f"error: {spec}: models[0].model (line 3): {ref}: the {part} {missing}: no such "
                       f"file or directory (looked for {project / missing} or {tmp_path / missing})\n")
        assert_nothing_written(out)


def test_several_plus_signs_split_where_both_parts_exist(tmp_path):
    base = write_tiny_llama(tmp_path / "clean+noise", seed=0)
    ad = write_adapter(tmp_path / "my+lora", {Q0: factors(1, *SHAPES[Q0], 4)})
    space = load_space(f"{base}+{ad}")
    assert isinstance(space[f"{Q0}.weight"], LoraRef)
    assert load_space(base).meta["location"] == base.resolve()  # a folder named with '+' is a path
    with pytest.raises(SpecError, match="cannot tell the base model from the LoRA adapter"):
        load_space(f"{tmp_path}/a+b+c")
    with pytest.raises(SpecError, match="a LoRA reference is base\\+adapter"):
        load_space(f"{base}+")


def test_hub_base_and_adapter_are_downloaded_and_cached(tmp_path):
    from tests.fake_hub import FakeHub

    write_tiny_llama(tmp_path / "src" / "base", seed=0)
    lora = {Q0: factors(1, *SHAPES[Q0], 4)}
    write_adapter(tmp_path / "src" / "lora", lora)
    files = lambda d: {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}  # noqa: E731
    spec = tmp_path / "spec.yaml"
    spec.write_text("merge_method: linear\nmodels:\n  - model: org/base+org/lora@v1\n    parameters: {weight: 1}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE", "WSMERGE_DEBUG"))}
    repo = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH")) if p)
    with FakeHub() as hub:
        hub.add_repo("org/base", files(tmp_path / "src" / "base"))
        hub.add_repo("org/lora", files(tmp_path / "src" / "lora"), tag="v1")
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1")

        def wsmerge(*args: str, **extra: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "weightspace.cli.main", *args], cwd=tmp_path,
                                  env={**env, **extra}, capture_output=True, text=True, timeout=180)

        r = wsmerge("run", str(spec), str(tmp_path / "out"))
        assert r.returncode == 0, r.stderr
        assert ("GET", "/api/models/org/lora/revision/v1") in hub.requests
        n = len(hub.requests)
        r = wsmerge("run", str(spec), str(tmp_path / "out2"), HF_HUB_OFFLINE="1")
        assert r.returncode == 0, r.stderr
        assert len(hub.requests) == n
        spec.write_text("merge_method: linear\nmodels:\n  - model: org/base+org/nolora\n    parameters: {weight: 1}\n")
        r = wsmerge("run", str(spec), str(tmp_path / "out3"))
        assert r.returncode == 1 and "org/base+org/nolora: the LoRA adapter org/nolora: no such adapter on the Hub" \
            in r.stderr, r.stderr
    a, b = lora[Q0]
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    w = base_tensors(tmp_path / "src" / "base")
    torch.testing.assert_close(got[f"{Q0}.weight"], w[f"{Q0}.weight"] + 2 * b @ a)
    snap = next((tmp_path / "hf" / "hub" / "models--org--lora" / "snapshots").iterdir())
    assert sorted(p.name for p in snap.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


# ---------------------------------------------------------------- what is refused


def _bad(tmp_path: Path, base: Path, **kw) -> tuple[Path, str]:
    ad = write_adapter(tmp_path / "bad", **kw)
    return ad, f"{base}+{ad}"


REFUSED = [
    # (adapter, the error's text after "<ref>: the LoRA adapter <dir>: ")
    (dict(lora={"model.layers.0.self_attn.qq_proj": factors(1, 32, 32, 4)}, target_modules=["qq_proj"]),
     "target module 'model.layers.0.self_attn.qq_proj' does not exist in the base model {base}: it has no "
     "tensor 'model.layers.0.self_attn.qq_proj.weight' (closest: 'model.layers.0.self_attn.q_proj.weight')"),
    (dict(lora={V1: factors(1, 32, 32, 4)}),
     "module 'model.layers.1.self_attn.v_proj': the LoRA delta B @ A is [32, 32] (lora_A [4, 32], "
     "lora_B [32, 4]) but the base tensor 'model.layers.1.self_attn.v_proj.weight' is [16, 32]; is the "
     "adapter for another model?"),
    (dict(lora={Q0: factors(1, 32, 32, 4)}, r=8),
     "module 'model.layers.0.self_attn.q_proj': the weights have rank 4 but adapter_config.json's r gives 8"),
    (dict(lora={Q0: factors(1, 32, 32, 4)}, use_dora=True),
     "DoRA (use_dora: true) rescales each column by a learned magnitude: this adapter is not supported"),
    (dict(lora={Q0: factors(1, 32, 32, 4)}, whole={f"{Q0}.lora_magnitude_vector": torch.ones(32)}),
     f"tensor '{P}{Q0}.lora_magnitude_vector' is a DoRA magnitude: DoRA adapters are not supported"),
    (dict(lora={Q0: factors(1, 32, 32, 4)}, peft_type="LOHA"),
     "peft_type 'LOHA' is not supported: only LoRA adapters (peft_type LORA) can be applied"),
    (dict(lora={Q0: factors(1, 32, 32, 4)}, init_lora_weights="pissa"),
     "init_lora_weights 'pissa' changed the base weights when the adapter was made"),
    (dict(lora={Q0: factors(1, 32, 32, 4)}, target_modules=["v_proj"]),
     "module 'model.layers.0.self_attn.q_proj' has LoRA weights, but adapter_config.json's target_modules "
     "['v_proj'] does not name it"),
    (dict(lora={}, whole={"model.embed_tokens.weight": torch.zeros(66, 32)}, modules_to_save=["embed_tokens"]),
     "the adapter's 'base_model.model.model.embed_tokens.weight' is [66, 32] but the base's "
     "'model.embed_tokens.weight' is [64, 32]; the adapter was trained with a resized vocabulary"),
    (dict(lora={Q0: factors(1, 32, 32, 4)}, r=0), "r must be a positive integer, got 0"),
]


@pytest.mark.parametrize("adapter, message", REFUSED)
def test_refused_adapters_name_the_module_tensor_and_file_before_reading(base, tmp_path, monkeypatch,
                                                                          adapter, message):
    ad, ref = _bad(tmp_path, base, **adapter)
    monkeypatch.setattr(ir, "read_tensor", lambda *a: pytest.fail("a tensor was read"))
    with pytest.raises(InputError) as e:
        load_space(ref)
    text = str(e.value)
    where = ad / "adapter_config.json" if "peft_type" in message or "must be" in message or \
        "init_lora" in message or "use_dora" in message else ad / "adapter_model.safetensors" \
        if "DoRA magnitude" in message else ad
    assert text.startswith(f"{ref}: the LoRA adapter {where}: "), text
    assert message.format(base=base) in text, text


def test_cli_refusals_exit_1_with_one_line_and_write_nothing(base, tmp_path, run_cli, write_spec):
    out = tmp_path / "out"
    for i, (adapter, message) in enumerate(REFUSED[:4]):
        ad = write_adapter(tmp_path / f"bad{i}", **adapter)
        spec = write_spec(f"merge_method: linear\nmodels:\n  - model: {base}+{ad}\n    parameters: {{weight: 1}}\n")
        code, _, err = run_cli("run", spec, out)
        assert code == 1, err
        single_error_line(err)
        assert f"{spec}: models[0].model (line 3): {base}+{ad}: the LoRA adapter " in err
        assert message.format(base=base).split(":")[0] in err
        assert_nothing_written(out)


def test_not_an_adapter_directory(base, tmp_path):
    other = write_tiny_llama(tmp_path / "full", seed=1)
    with pytest.raises(InputError, match="it has no adapter_config.json; it looks like a full model: merge "
                                         "it as a model, not as base\\+adapter"):
        load_space(f"{base}+{other}")
    (other / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    with pytest.raises(InputError, match="the adapter has no adapter_model.safetensors or adapter_model.bin"):
        load_space(f"{base}+{other}")


def test_lora_on_a_tied_output_layer_goes_to_the_embedding_after_its_own(tmp_path):
    # the base stores no lm_head (tie_word_embeddings): peft's merges both change the shared weight,
    # the embedding's first, each rounded to the base dtype
    src = write_tiny_llama(tmp_path / "b", seed=0, dtype=torch.bfloat16)
    t = {k: v for k, v in base_tensors(src).items() if k != "lm_head.weight"}
    cfg = json.loads((src / "config.json").read_text()) | {"tie_word_embeddings": True}
    base = tmp_path / "tied"
    WeightSpace.from_tensors(t).save(base, config=cfg)
    (ha, hb), (ea, eb) = factors(1, 64, 32, 4), factors(2, 32, 64, 4)
    ad = write_adapter(tmp_path / "lora", {"lm_head": (ha, hb)}, r=4, alpha=8, embedding={EMBED: (ea, eb)},
                       whole={"lm_head.base_layer.weight": t[f"{EMBED}.weight"].clone(),
                              f"{EMBED}.base_layer.weight": t[f"{EMBED}.weight"]})
    got = load_space(f"{base}+{ad}")[f"{EMBED}.weight"].load()
    w = t[f"{EMBED}.weight"].float()
    step = (w + (2 * (eb @ ea).T).to(torch.bfloat16).float()).to(torch.bfloat16)
    assert torch.equal(got, (step.float() + 2 * hb @ ha).to(torch.bfloat16))
    # an adapter that trains lm_head apart from the tied embedding (modules_to_save) is refused
    ad = write_adapter(tmp_path / "mts", {Q0: factors(3, *SHAPES[Q0], 4)}, modules_to_save=["lm_head"],
                       whole={"lm_head.weight": torch.zeros(64, 32)})
    with pytest.raises(InputError, match="has no tensor 'lm_head.weight'; the base ties its output layer "
                                         "to the input embeddings, and an adapter that trains them apart"):
        load_space(f"{base}+{ad}")

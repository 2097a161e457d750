"""RegMean on causal LMs and every linear kind: Grams against X^T X / N of inputs captured by
hand (GPT-2 Conv1D, Llama Linear, Conv1d/Conv2d patches extracted by loops), the merge against
least squares on the stacked activations, sharded and multi-pass output against one file and
one pass, bf16 models, tied embeddings, and the CLI's errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from weightspace.binding import ClassifierAdapter, HFCausalLMAdapter
from weightspace.errors import SpecError
from weightspace.merges.regmean import GramRun, gram_info, gram_matrices, save_gram, write_grams
from weightspace.methods import TensorParams, get_method
from weightspace.safetensors_io import read_header
from weightspace.sources import load_space
from weightspace.tokenizers.word_level import write_word_tokenizer

WORDS = ["apple", "pear", "fig", "sum", "integral", "proof", "verb", "noun", "poem", "rhyme"]


def gram_of(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x.T @ x / x.shape[0]


def stacked_lstsq(xs, ws, weights):
    """argmin_W sum_i w_i ||X_i W^T - X_i W_i^T||^2 / N_i on the stacked rows, W (out, in),
    by the pseudo-inverse with an explicit cut (see tests/test_regmean.py)."""
    a = torch.cat([x.double() * (c / len(x)) ** 0.5 for x, c in zip(xs, weights)])
    b = torch.cat([(x.double() @ w.double().T) * (c / len(x)) ** 0.5 for x, w, c in zip(xs, ws, weights)])
    return (torch.linalg.pinv(a, rtol=1e-10) @ b).T


def capture(model: nn.Module, names: list[str], run) -> dict[str, list[torch.Tensor]]:
    """The inputs each named module gets while `run()` runs, by plain forward pre-hooks."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    mods = dict(model.named_modules())
    hs = [mods[n].register_forward_pre_hook(lambda m, a, n=n: got[n].append(a[0].detach().clone()))
          for n in names]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hs:
            h.remove()
    return got


def gpt2(seed: int, dtype=torch.float32):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=50,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # LayerNorm at init (gain 1, bias 0) centres its output: a singular Gram
        for n, p in model.named_parameters():
            if ".ln_" in n:
                p.add_(torch.randn_like(p) * 0.5)
    return model.to(dtype).eval()


def llama(seed: int, dtype=torch.float32, family: str = "llama"):
    """A Llama-shaped (or Qwen2-shaped: q/k/v with biases) causal LM, 2 layers, hidden 32."""
    import transformers

    torch.manual_seed(seed)
    kw = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=50, max_position_embeddings=32, tie_word_embeddings=False)
    if family == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw)).to(dtype).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).to(dtype).eval()


def token_batches(seed: int, n: int = 2, b: int = 3, t: int = 7):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(b, t, dtype=torch.long)
        mask[1, 5:] = 0  # right padding in two rows
        mask[2, 3:] = 0
        out.append({"input_ids": torch.randint(0, 50, (b, t), generator=g), "attention_mask": mask})
    return out


def real_rows(xs: list[torch.Tensor], batches) -> torch.Tensor:
    """Captured (B, T, in) inputs with the padding positions dropped, stacked."""
    return torch.cat([x[bt["attention_mask"].bool()] for x, bt in zip(xs, batches)])


# ---------------------------------------------------------------- GPT-2: Conv1D, tied lm_head


@pytest.mark.requires("hf")
def test_gpt2_conv1d_grams_are_their_inputs_and_the_tied_lm_head_is_skipped():
    model, batches = gpt2(0), token_batches(0)
    conv = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj",
                                                                 "mlp.c_fc", "mlp.c_proj")]
    adapter = HFCausalLMAdapter(model)
    with pytest.warns(UserWarning, match=r"no Gram for 1 layer \(its weight is tied.*\): lm_head"):
        grams = gram_matrices(adapter, batches)
    assert list(grams) == [f"{n}.weight" for n in conv]
    assert grams.meta["skipped"] == {"lm_head": "tied"}
    assert set(grams.meta["layouts"].values()) == {"conv1d"}
    seen = capture(model, conv, lambda: [adapter.forward(adapter.params(), b) for b in batches])
    for n in conv:
        x = real_rows(seen[n], batches)
        w = dict(model.named_parameters())[f"{n}.weight"]
        g = grams[f"{n}.weight"].load()
        assert g.shape == (w.shape[0], w.shape[0])  # Conv1D stores (in, out): the Gram is (in, in)
        torch.testing.assert_close(g.double(), gram_of(x), rtol=1e-5, atol=1e-6)
        assert grams.meta["tokens"][f"{n}.weight"] == int(sum(b["attention_mask"].sum() for b in batches))


@pytest.mark.requires("hf")
def test_regmean_on_gpt2_conv1d_is_least_squares_on_the_stacked_activations(tmp_path):
    """Every Conv1D (c_proj is square: only the Gram file's layout says it is (in, out)) merged
    by regression, not averaged."""
    models = [gpt2(0), gpt2(1)]
    data = [token_batches(10), token_batches(11)]
    paths = []
    for i, (m, bs) in enumerate(zip(models, data)):
        with pytest.warns(UserWarning):
            paths.append(save_gram(gram_matrices(HFCausalLMAdapter(m), bs), tmp_path / f"g{i}"))
    method = get_method("regmean")
    for n in ("transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_fc"):
        name = f"{n}.weight"
        xs = []
        for m, bs in zip(models, data):
            ad = HFCausalLMAdapter(m)
            xs.append(real_rows(capture(m, [n], lambda ad=ad, bs=bs: [ad.forward(ad.params(), b) for b in bs])[n], bs))
        ws = [dict(m.named_parameters())[name].detach() for m in models]
        params = TensorParams(values={"alpha": 1.0}, tensor_name=name,
                              per_model=[{"weight": w, "gram": str(p)} for w, p in zip((1.0, 3.0), paths)])
        method.check_params(params, ["m0", "m1"])
        assert method.companion_shape("gram", name, tuple(ws[0].shape)) == (ws[0].shape[0],) * 2
        gs = [load_space(p)[name].load() for p in paths]
        got = method.merge(name, None, ws, params, {"gram": gs})
        assert got.shape == ws[0].shape
        expect = stacked_lstsq(xs, [w.T for w in ws], [1.0, 3.0]).T  # solved as (out, in), stored (in, out)
        torch.testing.assert_close(got.double(), expect, rtol=1e-4, atol=1e-5)
        assert (got - (ws[0] + 3 * ws[1]) / 4).abs().max() > 1e-3


# ---------------------------------------------------------------- Llama: shared inputs, shards, passes


@pytest.mark.requires("hf")
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_llama_grams_share_q_k_v_and_gate_up_and_equal_their_inputs(family):
    model, batches = llama(0, family=family), token_batches(1)
    adapter = HFCausalLMAdapter(model)
    run = GramRun(adapter, batches)
    p = "model.layers.0."
    share = run.share
    assert share[p + "self_attn.k_proj.weight"] == share[p + "self_attn.v_proj.weight"] \
        == share[p + "self_attn.q_proj.weight"] == p + "self_attn.q_proj.weight"
    assert share[p + "mlp.up_proj.weight"] == p + "mlp.gate_proj.weight"
    assert share[p + "mlp.down_proj.weight"] == p + "mlp.down_proj.weight"
    assert share[p + "self_attn.o_proj.weight"] == p + "self_attn.o_proj.weight"
    grams = gram_matrices(adapter, batches)
    layers = [n[:-7] for n in grams]
    assert len(layers) == 2 * 7 + 1 and "lm_head" in layers and grams.meta["skipped"] == {}
    seen = capture(model, layers, lambda: [adapter.forward(adapter.params(), b) for b in batches])
    for n in layers:
        torch.testing.assert_close(grams[f"{n}.weight"].load().double(), gram_of(real_rows(seen[n], batches)),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.requires("hf")
def test_sharded_and_multi_pass_output_equals_one_file_and_one_pass(tmp_path):
    model, batches = llama(0), token_batches(2)
    adapter = HFCausalLMAdapter(model)
    one = gram_matrices(adapter, batches)
    f = save_gram(one, tmp_path / "one.gram.safetensors")
    # 32 x 32 float32 is 4 KiB, 48 x 48 9 KiB: 12 KiB fits 2 or 3 accumulators, so several passes
    info = write_grams(adapter, iter(batches), tmp_path / "sharded", max_memory=12 * 1024, shard_size=10_000)
    assert info["passes"] > 3 and info["examples"] == 6 and info["batches"] == 2
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "model.safetensors.index.json" in files and "gram.json" in files
    assert sum(n.endswith(".safetensors") for n in files) > 3
    _, meta = read_header(tmp_path / "sharded" / next(n for n in files if n.endswith(".safetensors")))
    assert meta["weightspace_kind"] == "gram" and meta["weightspace_gram_info"] == "gram.json"
    back, single = load_space(tmp_path / "sharded"), load_space(f)
    assert sorted(back) == sorted(single) == sorted(one)
    for n in one:
        torch.testing.assert_close(back[n].load(), single[n].load(), rtol=1e-6, atol=1e-7)
    disk = gram_info(tmp_path / "sharded")
    assert disk["tokens"] == one.meta["tokens"] and disk["layouts"] == one.meta["layouts"]
    assert gram_info(f)["tokens"] == one.meta["tokens"]
    # float64 accumulation and storage
    g64 = gram_matrices(adapter, batches, dtype=torch.float64, max_memory=20_000)
    assert g64.meta["passes"] > 1 and g64["lm_head.weight"].dtype == torch.float64
    torch.testing.assert_close(g64["lm_head.weight"].load().float(), one["lm_head.weight"].load(),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(SpecError, match=r"--max-stats-memory 1000 bytes is less than one Gram: layer "
                                        r"'model.layers.0.mlp.down_proj' needs 48 x 48 float32"):
        gram_matrices(adapter, batches, max_memory=1000)


@pytest.mark.requires("hf")
def test_a_bf16_model_gives_float32_grams_within_bf16_tolerance_of_the_fp32_model():
    batches = token_batches(3)
    ref = gram_matrices(HFCausalLMAdapter(llama(0)), batches)
    low = gram_matrices(HFCausalLMAdapter(llama(0, torch.bfloat16)), batches)
    for n in ref:
        g, r = low[n].load(), ref[n].load()
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=0.05, atol=0.05 * float(r.abs().max()))


# ---------------------------------------------------------------- convolutions


def patches_by_loops(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Every (in * kh * kw) input patch of a 2-D convolution, channel-major, zero padding."""
    ph, pw = conv.padding
    x = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    rows = []
    for b in range(x.shape[0]):
        for i in range(0, x.shape[2] - dh * (kh - 1), sh):
            for j in range(0, x.shape[3] - dw * (kw - 1), sw):
                rows.append(x[b, :, i:i + dh * (kh - 1) + 1:dh, j:j + dw * (kw - 1) + 1:dw].reshape(-1))
    return torch.stack(rows)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c2 = nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 1), dilation=(1, 2))
        self.c1 = nn.Conv1d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.c2(x))            # (B, 3, H', W')
        h = self.c1(h.mean(dim=3))             # (B, 4, H')
        return self.head(h.mean(dim=2))


def test_conv2d_and_conv1d_grams_are_of_their_patches_and_the_merge_is_least_squares(tmp_path):
    torch.manual_seed(0)
    models = [ConvNet().eval(), ConvNet().eval()]
    xs = [torch.randn(4, 2, 7, 6), torch.randn(5, 2, 7, 6)]
    paths, rows = [], []
    for i, (m, x) in enumerate(zip(models, xs)):
        grams = gram_matrices(ClassifierAdapter(m), [{"x": x[:2]}, {"x": x[2:]}])
        assert grams.meta["layouts"] == {"c2.weight": "conv", "c1.weight": "conv", "head.weight": "linear"}
        seen = capture(m, ["c2", "c1"], lambda m=m, x=x: m(x))
        p2 = patches_by_loops(seen["c2"][0], m.c2)
        p1 = patches_by_loops(seen["c1"][0].unsqueeze(2), nn.Conv2d(3, 4, (1, 3), padding=(0, 1)))
        assert grams["c2.weight"].shape == (2 * 3 * 2,) * 2 and grams.meta["tokens"]["c2.weight"] == len(p2)
        torch.testing.assert_close(grams["c2.weight"].load().double(), gram_of(p2), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grams["c1.weight"].load().double(), gram_of(p1), rtol=1e-5, atol=1e-6)
        rows.append(p2)
        paths.append(save_gram(grams, tmp_path / f"c{i}.gram.safetensors"))
    ws = [m.c2.weight.detach() for m in models]
    params = TensorParams(values={"alpha": 1.0}, tensor_name="c2.weight",
                          per_model=[{"weight": 1.0, "gram": str(p)} for p in paths])
    method = get_method("regmean")
    assert method.companion_shape("gram", "c2.weight", tuple(ws[0].shape)) == (12, 12)
    got = method.merge("c2.weight", None, ws, params,
                       {"gram": [load_space(p)["c2.weight"].load() for p in paths]})
    expect = stacked_lstsq(rows, [w.reshape(3, -1) for w in ws], [1.0, 1.0]).reshape(ws[0].shape)
    torch.testing.assert_close(got.double(), expect, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the CLI on a GPT-2 directory


def write_tokenizer(d: Path) -> None:
    """A whitespace WordLevel tokenizer: <unk>, <s>, </s> at ids 0, 1, 2, then WORDS."""
    write_word_tokenizer(d, WORDS)


@pytest.mark.requires("hf")
def test_wsmerge_gram_on_gpt2_streams_to_a_directory_and_run_merges_every_conv1d(tmp_path, run_cli,
                                                                                write_spec):
    text = tmp_path / "data.txt"
    text.write_text("\n".join(" ".join(WORDS[(i + j) % 10] for j in range(3 + i % 4)) for i in range(12)))
    dirs = []
    for seed in (0, 1):
        d = tmp_path / f"gpt2-{seed}"
        gpt2(seed).save_pretrained(d)
        write_tokenizer(d)
        dirs.append(d)
        code, out, err = run_cli("gram", str(d), "--data", str(text), "-o", str(tmp_path / f"g{seed}"),
                                 "--max-stats-memory", "70KiB", "--shard-size", "8K", "--batch-size", "5",
                                 "--task", "causal-lm", "--device", "cpu", "--no-progress")
        assert code == 0, err
        assert "Gram matrices of 8 linear layers" in out and "over 12 examples" in out, out
        assert "passes over the data" in out and "1 layer (its weight is tied" in out, out
    spec = write_spec(f"""
        merge_method: regmean
        models:
          - {{model: {dirs[0]}, parameters: {{gram: {tmp_path}/g0}}}}
          - {{model: {dirs[1]}, parameters: {{gram: {tmp_path}/g1}}}}
    """)
    code, out, err = run_cli("run", str(spec), str(tmp_path / "out"), "--no-progress")
    assert code == 0, err
    assert "g0, g1 hold no Gram for 1 layer (its weight is tied" in err, err
    merged, a, b = (load_space(p) for p in (tmp_path / "out", *dirs))
    name = "transformer.h.0.attn.c_proj.weight"  # a square Conv1D
    ga, gb = (load_space(tmp_path / f"g{i}")[name].load() for i in (0, 1))
    wa, wb = (s[name].load() for s in (a, b))
    expect = get_method("regmean").merge(name, None, [wa, wb], TensorParams(
        values={"alpha": 0.1}, tensor_name=name,
        per_model=[{"weight": 1.0, "gram": str(tmp_path / f"g{i}")} for i in (0, 1)]), {"gram": [ga, gb]})
    torch.testing.assert_close(merged[name].load(), expect)
    assert (expect - (wa + wb) / 2).abs().max() > 1e-4


@pytest.mark.parametrize("args, match", [
    (["--max-stats-memory", "lots"], "Invalid value for '--max-stats-memory': cannot read size 'lots'"),
    (["--max-stats-memory", "1K"], "--max-stats-memory 1000 bytes is less than one Gram"),
    (["--gram-dtype", "float16"], "Invalid value for '--gram-dtype': 'float16' is not one of"),
    (["--shard-size", "1B"], "Invalid value for '--shard-size': size '1B' is ambiguous"),
])
def test_gram_option_errors_name_the_option(tmp_path, run_cli, args, match):
    code, out, err = run_cli("gram", str(Path(__file__).parents[1] / "examples" / "digits" / "ft0"), "--data", "digits:classes=0-3",
                             "-o", str(tmp_path / "g"), *args, "--no-progress")
    assert code == 2 and match in err, err
    assert not (tmp_path / "g").exists()


def test_a_layer_reused_twice_gets_the_gram_of_both_calls_and_a_weight_tied_across_modules_none():
    """One module object called twice (weight sharing across depth) is one regression over both
    inputs; a weight shared by two module objects (a tied lm_head) gets no Gram."""
    class Reused(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Linear(4, 4)
            self.again = self.block            # the same module under a second path
            self.emb = nn.Embedding(5, 4)
            self.out = nn.Linear(4, 5, bias=False)
            self.out.weight = self.emb.weight  # tied across two modules

        def forward(self, x):
            h = torch.tanh(self.block(x))
            return self.out(self.again(h))

    torch.manual_seed(0)
    model, x = Reused(), torch.randn(6, 4)
    with pytest.warns(UserWarning, match=r"tied.*\): out"):
        grams = gram_matrices(ClassifierAdapter(model), [{"x": x}])
    assert list(grams) == ["block.weight"] and grams.meta["skipped"] == {"out": "tied"}
    h = torch.tanh(model.block(x)).detach()
    torch.testing.assert_close(grams["block.weight"].load().double(), gram_of(torch.cat([x, h])),
                               rtol=1e-5, atol=1e-6)
    assert grams.meta["tokens"]["block.weight"] == 12


def test_the_solve_in_blocks_of_output_rows_equals_the_whole_solve(monkeypatch):
    """An lm_head has tens of thousands of output rows: the solve takes them in blocks (and a
    rank-deficient sum goes through least squares) with the same result."""
    import weightspace.merges.regmean.method as method_module
    from weightspace.merges.regmean import regmean_solve

    torch.manual_seed(0)
    xs = [torch.randn(40, 6), torch.randn(30, 6)]
    xs[1][:, 5] = xs[1][:, 4]  # still full rank summed; the second case drops a column everywhere
    ws = [torch.randn(11, 6), torch.randn(11, 6)]
    for drop in (False, True):
        gs = [gram_of(x * (torch.arange(6) != 5) if drop else x).float() for x in xs]
        whole = regmean_solve(ws, gs, [1.0, 2.0], 0.5)
        monkeypatch.setattr(method_module, "BLOCK_ELEMENTS", 13)  # 2 rows per block
        blocked = regmean_solve(ws, gs, [1.0, 2.0], 0.5)
        monkeypatch.undo()
        torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=1e-6)
    # alpha = 1 on full-rank data: least squares on the stacked rows
    gs = [gram_of(x).float() for x in xs]
    monkeypatch.setattr(method_module, "BLOCK_ELEMENTS", 13)
    torch.testing.assert_close(regmean_solve(ws, gs, [1.0, 2.0], 1.0).double(),
                               stacked_lstsq(xs, ws, [1.0, 2.0]), rtol=1e-4, atol=1e-5)

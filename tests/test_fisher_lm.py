"""Fisher diagonals of causal LMs (GPT-2- and Llama-shaped, built here): per-example gradients
against a brute-force loop, grouped passes, sharded directories, tied embeddings, bf16, the CLI.

The brute force is written out here: one example at a time through the module itself, its
log-likelihood summed over its non-padding next-token predictions, autograd, the gradient
squared, averaged over examples.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from weightspace.sources import load_space
from weightspace.tokenizers.word_level import write_word_tokenizer

pytestmark = pytest.mark.requires("hf")

V = 24  # vocabulary
WORDS = [f"w{i}" for i in range(V - 3)]


def gpt2(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=V, n_layer=2, n_embd=32, n_head=2, n_positions=32,
                                  bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(cfg).eval()  # wte and lm_head tied (GPT-2's default)


def llama(seed: int = 0, tied: bool = False):
    import transformers

    from weightspace.zoo.tiny import tiny_llama_config

    cfg = tiny_llama_config(hidden=16, layers=2, vocab=V, intermediate=32, heads=2, kv_heads=1)
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")}
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg, "tie_word_embeddings": tied})).eval()


def qwen2(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    return transformers.Qwen2ForCausalLM(cfg).eval()  # q/k/v biases, tied embeddings


MODELS = {"gpt2": gpt2, "llama": llama, "qwen2": qwen2}


def batch_of(seed: int = 0, b: int = 3, t: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 4:] = 0  # right padding: its predictions are left out
    return {"input_ids": ids, "attention_mask": mask}


def brute_force(model, batches, estimator="empirical", n_samples=1, seed=0) -> dict[str, torch.Tensor]:
    """sum_i (1/S) sum_s g_i(y_s)^2 / N, one example and one draw at a time (S=1, y = next tokens:
    the empirical Fisher). Sampled draws are torch.multinomial over the batch's softmax with a
    generator seeded once, in the order the estimator takes them."""
    params = dict(model.named_parameters())
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    seen = 0
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        b, t = ids.shape
        if estimator == "sampled":
            with torch.no_grad():
                probs = torch.softmax(model(**batch).logits[:, :-1].float(), -1)
            draws = torch.multinomial(probs.reshape(b * (t - 1), V), n_samples, replacement=True,
                                      generator=gen).reshape(b, t - 1, n_samples)
            targets = [draws[..., s] for s in range(n_samples)]
        else:
            targets = [ids[:, 1:]]
        for i in range(b):
            keep = mask[i, 1:].bool()
            for y in targets:
                logp = torch.log_softmax(model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1])
                                         .logits[0, :-1].float(), -1)
                ll = logp.gather(1, y[i][:, None]).squeeze(1)[keep].sum()
                grads = torch.autograd.grad(ll, list(params.values()), allow_unused=True)
                for n, g in zip(params, grads):
                    if g is not None:
                        out[n] += g.float() ** 2 / len(targets)
        seen += b
    return {n: f / seen for n, f in out.items()}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("estimator", ["empirical", "sampled"])
@pytest.mark.parametrize("per_example", ["vmap", "loop"])
def test_causal_lm_fisher_equals_the_brute_force_loop(arch, estimator, per_example):
    from weightspace.binding import HFCausalLMAdapter
    from weightspace.merges.fisher import fisher_diagonal

    model = MODELS[arch]()
    batches = [batch_of(0), batch_of(1, b=2)]
    n = 2 if estimator == "sampled" else 1
    got = fisher_diagonal(HFCausalLMAdapter(model), batches, estimator=estimator, n_samples=n, seed=3,
                          per_example=per_example)
    want = brute_force(model, batches, estimator, n, seed=3)
    assert got.meta["fisher"]["per_example"] == per_example and got.meta["fisher"]["examples"] == 5
    assert list(got) == list(want)  # a tied lm_head is one parameter: GPT-2, this Qwen2 have none
    for name, f in want.items():
        torch.testing.assert_close(got[name].load(), f, atol=1e-7, rtol=2e-4, msg=name)
    probe = {"llama": "lm_head.weight", "qwen2": "model.layers.0.self_attn.q_proj.bias",
             "gpt2": "transformer.h.0.attn.c_attn.weight"}[arch]  # GPT-2's Conv1D: nothing special
    assert float(got[probe].load().sum()) > 0
    assert ("lm_head.weight" in got) == (arch == "llama")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_vmap_runs_transformers_models_with_eager_attention_and_restores_sdpa(arch):
    """vmap switches sdpa to eager for the run and back; auto takes the loop on the CPU."""
    from weightspace.binding import HFCausalLMAdapter
    from weightspace.merges.fisher import fisher_diagonal

    model = MODELS[arch]()
    model.set_attn_implementation("sdpa")  # sdpa's mask code calls padding_mask.all(): not vmappable
    vm = fisher_diagonal(HFCausalLMAdapter(model), [batch_of(0)], estimator="empirical", vmap_chunk=2,
                         per_example="vmap")
    loop = fisher_diagonal(HFCausalLMAdapter(model), [batch_of(0)], estimator="empirical", per_example="loop")
    auto = fisher_diagonal(HFCausalLMAdapter(model), [batch_of(0)], estimator="empirical")
    assert auto.meta["fisher"]["per_example"] == "loop"
    auto = vm
    assert auto.meta["fisher"]["per_example"] == "vmap"
    assert model.config._attn_implementation == "sdpa"
    assert auto.meta["fisher"]["examples_per_second"] > 0
    for name in auto:
        torch.testing.assert_close(auto[name].load(), loop[name].load(), atol=1e-7, rtol=2e-4)


def test_tied_embeddings_one_tensor_the_sum_of_both_uses_and_the_names_written():
    from weightspace.merges.fisher.stream import output_names

    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    # the gradient of the one tied tensor is the sum of the embedding's and the head's
    ids = batch_of(0)["input_ids"][:1]
    emb = model.transformer.wte.weight.detach().clone().requires_grad_(True)
    head = model.transformer.wte.weight.detach().clone().requires_grad_(True)
    params = {n: p.detach() for n, p in model.named_parameters()}
    h = torch.func.functional_call(model.transformer, {k[len("transformer."):]: v for k, v in params.items()
                                                        if k.startswith("transformer.")} |
                                   {"wte.weight": emb}, (ids,)).last_hidden_state
    ll = torch.log_softmax(h @ head.T, -1)[0, :-1].gather(1, ids[0, 1:, None]).sum()
    g_emb, g_head = torch.autograd.grad(ll, [emb, head])
    tied = torch.autograd.grad(torch.log_softmax(model(ids).logits, -1)[0, :-1].gather(1, ids[0, 1:, None]).sum(),
                               model.transformer.wte.weight)[0]
    torch.testing.assert_close(tied, g_emb + g_head)
    names = output_names(model, [n for n, _ in model.named_parameters()])
    assert names["transformer.wte.weight"] == ["transformer.wte.weight"] and "lm_head.weight" not in names
    both = output_names(model, ["transformer.wte.weight", "lm_head.weight"])
    assert both["transformer.wte.weight"] == ["transformer.wte.weight", "lm_head.weight"]
    assert output_names(model)["transformer.wte.weight"] == ["transformer.wte.weight"]


def test_grouped_passes_equal_one_pass_and_the_sharded_dir_equals_the_file(tmp_path):
    from weightspace.binding import HFCausalLMAdapter
    from weightspace.merges.fisher import check_fisher, fisher_norms
    from weightspace.merges.fisher.stream import write_fisher

    model = llama(tied=True)
    adapter = HFCausalLMAdapter(model)
    batches = [batch_of(0), batch_of(1, b=2)]
    stored = [n for n, _ in model.named_parameters(remove_duplicate=False)]  # both tied names
    one = write_fisher(adapter, batches, tmp_path / "one.safetensors", estimator="sampled", n_samples=2,
                       stored_names=stored)
    grouped = write_fisher(adapter, batches, tmp_path / "grouped", estimator="sampled", n_samples=2,
                           max_stats_memory="2K", shard_size="3K", stored_names=stored, vmap_chunk=1)
    assert one["passes"] == 1
    sizes = sorted(p.numel() * 4 for p in model.parameters())
    assert grouped["passes"] > 5 and sizes[-1] > 2000  # a tensor larger than the budget: a pass of its own
    files = sorted(p.name for p in (tmp_path / "grouped").iterdir())
    assert "model.safetensors.index.json" in files and "fisher.json" in files
    assert sum(f.startswith("model-") for f in files) > 3
    single = load_file(tmp_path / "one.safetensors")
    space = load_space(tmp_path / "grouped")
    assert sorted(space) == sorted(single) == sorted(stored)
    torch.testing.assert_close(single["lm_head.weight"], single["model.embed_tokens.weight"])
    for name, ref in space.items():
        torch.testing.assert_close(ref.load(), single[name], atol=1e-8, rtol=1e-5, msg=name)
    # the metadata travels with both; the checks and norms read a directory as a file
    info = json.loads((tmp_path / "grouped" / "fisher.json").read_text())
    assert info["passes"] == grouped["passes"] and info["estimator"] == "sampled" and info["examples"] == 5
    assert info["examples_per_second"] > 0 and info["seed"] == 0
    header = check_fisher(tmp_path / "one.safetensors")
    assert header["fisher"]["passes"] == 1 and header["fisher"]["n_samples"] == 2
    summary = check_fisher(tmp_path / "grouped")
    assert summary["fisher"]["passes"] == grouped["passes"] and summary["tensors"] == len(single)
    norm = math.sqrt(sum(float(t.double().square().sum()) for t in single.values()))
    assert fisher_norms([tmp_path / "grouped", tmp_path / "one.safetensors"]) == pytest.approx([norm, norm])


def test_bf16_model_gives_float32_fishers_close_to_float32_models():
    from weightspace.binding import HFCausalLMAdapter
    from weightspace.merges.fisher import fisher_diagonal

    model = llama()
    f32 = fisher_diagonal(HFCausalLMAdapter(model), [batch_of(0)], estimator="empirical")
    bf16 = fisher_diagonal(HFCausalLMAdapter(model.to(torch.bfloat16)), [batch_of(0)], estimator="empirical")
    for name in f32:
        a, b = f32[name].load(), bf16[name].load()
        assert b.dtype == torch.float32 and bool(torch.isfinite(b).all())
        rel = float((a - b).norm() / a.norm())
        assert rel < 0.05, (name, rel)  # bf16 keeps 8 bits of mantissa in the forward and backward


# ------------------------------------------------------------------ the command on saved models


def write_tokenizer(d: Path) -> None:
    """A whitespace WordLevel tokenizer: <unk>, <s>, </s> at ids 0, 1, 2, then WORDS."""
    write_word_tokenizer(d, WORDS)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    from weightspace.zoo.tiny import write_tiny_llama

    root = tmp_path_factory.mktemp("fisher-lm")
    for k in range(2):
        write_tiny_llama(root / f"ft{k}", seed=0, delta_seed=k + 1, delta_scale=0.05, layers=1, hidden=16,
                         intermediate=32, vocab=V, heads=2, kv_heads=1)
        write_tokenizer(root / f"ft{k}")
    gpt2().save_pretrained(root / "gpt2")
    write_tokenizer(root / "gpt2")
    lines = [" ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(2 + i % 4)) for i in range(6)]
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "short.txt").write_text("w1\nw2\n\nw3\n")  # one token each: nothing to predict
    return root


def test_cli_writes_a_sharded_dir_in_passes_equal_to_the_file(saved, run_cli, tmp_path):
    m, data = saved / "ft0", saved / "train.txt"
    code, out, err = run_cli("fisher", str(m), "--data", str(data), "--estimator", "empirical",
                             "-o", str(tmp_path / "f.safetensors"), "--no-progress")
    assert code == 0, err
    assert "over 6 examples, 1 pass (loop)" in out and "examples/s" in out
    code, out, err = run_cli("fisher", str(m), "--data", str(data), "--estimator", "empirical",
                             "-o", str(tmp_path / "fdir"), "--max-stats-memory", "4K", "--shard-size", "6K",
                             "--batch-size", "4", "--no-progress")
    assert code == 0, err
    passes = json.loads((tmp_path / "fdir" / "fisher.json").read_text())["passes"]
    assert passes > 2 and f"{passes} passes (loop)" in out
    single = load_file(tmp_path / "f.safetensors")
    assert sorted(single) == sorted(load_space(m).keys())
    for name, ref in load_space(tmp_path / "fdir").items():
        torch.testing.assert_close(ref.load(), single[name], atol=1e-8, rtol=1e-5)


def test_cli_gpt2_writes_the_tied_embedding_once(saved, run_cli, tmp_path):
    code, out, err = run_cli("fisher", str(saved / "gpt2"), "--data", str(saved / "train.txt"),
                             "--estimator", "sampled", "--task", "causal-lm", "-o", str(tmp_path / "g"),
                             "--no-progress")  # GPT2LMHeadModel: auto does not know the name
    assert code == 0, err
    names = set(load_space(tmp_path / "g").keys())
    assert names == set(load_space(saved / "gpt2").keys()) and "lm_head.weight" not in names


def test_fisher_merge_with_directory_companions_equals_the_formula(saved, run_cli, write_spec, tmp_path):
    for k in range(2):
        code, _, err = run_cli("fisher", str(saved / f"ft{k}"), "--data", str(saved / "train.txt"),
                               "--estimator", "empirical", "-o", str(tmp_path / f"f{k}"),
                               "--max-stats-memory", "8K", "--no-progress")
        assert code == 0, err
    spec = write_spec(f"""
        merge_method: fisher
        models:
          - {{model: {saved / 'ft0'}, parameters: {{weight: 0.6, fisher: {tmp_path / 'f0'}}}}}
          - {{model: {saved / 'ft1'}, parameters: {{weight: 0.4, fisher: {tmp_path / 'f1'}}}}}
        dtype: float32
    """)
    code, out, err = run_cli("run", str(spec), str(tmp_path / "merged"), "--no-progress")
    assert code == 0, err
    merged = load_space(tmp_path / "merged")
    x = [load_space(saved / f"ft{k}") for k in range(2)]
    f = [load_space(tmp_path / f"f{k}") for k in range(2)]
    norms = [math.sqrt(sum(float(r.load().double().square().sum()) for r in fk.values())) for fk in f]
    for name in x[0]:  # the defaults: 0.6/|F0| max(F0, 1e-6) and 0.4/|F1| F1
        w0 = 0.6 / norms[0] * f[0][name].load().clamp(min=1e-6)
        w1 = 0.4 / norms[1] * f[1][name].load()
        want = (w0 * x[0][name].load() + w1 * x[1][name].load()) / (w0 + w1)
        torch.testing.assert_close(merged[name].load(), want, msg=name)


@pytest.mark.parametrize("args, code, match", [
    (["--data", "short.txt", "--estimator", "empirical"], 1, "nothing to predict.*one token or padding"),
    (["--data", "train.txt", "--estimator", "exact"], 2, "one prediction per example.*sampled or empirical"),
    (["--data", "train.txt", "--max-stats-memory", "lots"], 2, "--max-stats-memory.*cannot read size 'lots'"),
    (["--data", "train.txt", "--shard-size", "0"], 2, "--shard-size.*must be positive"),
    (["--data", "train.txt", "--vmap-chunk", "0"], 2, "--vmap-chunk"),
    (["--data", "train.txt", "--per-example", "jit"], 2, "--per-example"),
])
def test_cli_errors_name_what_is_wrong(saved, run_cli, tmp_path, args, code, match):
    import re

    args = [a if a not in ("short.txt", "train.txt") else str(saved / a) for a in args]
    rc, out, err = run_cli("fisher", str(saved / "ft0"), *args, "-o", str(tmp_path / "f"), "--no-progress")
    assert rc == code, (out, err)
    assert re.search(match, err, re.S), err
    assert not (tmp_path / "f").exists()


def test_a_failure_in_a_later_group_leaves_nothing(tmp_path, monkeypatch):
    from weightspace.binding import HFCausalLMAdapter
    from weightspace.merges.fisher import fisher_diagonal as real
    from weightspace.merges.fisher.stream import write_fisher

    calls = []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        write_fisher(HFCausalLMAdapter(llama()), [batch_of(0)], tmp_path / "out", estimator="empirical",
                     max_stats_memory="1K", shard_size="1K", estimate=second_fails)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_cli_on_a_bf16_checkpoint_writes_float32_close_to_the_float32_one(saved, run_cli, tmp_path):
    from weightspace.zoo.tiny import write_tiny_llama

    bf16 = write_tiny_llama(tmp_path / "bf16", seed=0, delta_seed=1, delta_scale=0.05, layers=1, hidden=16,
                            intermediate=32, vocab=V, heads=2, kv_heads=1, dtype=torch.bfloat16)
    write_tokenizer(bf16)
    for m, o in ((saved / "ft0", "f32.safetensors"), (bf16, "bf16.safetensors")):
        code, _, err = run_cli("fisher", str(m), "--data", str(saved / "train.txt"), "--estimator", "empirical",
                               "-o", str(tmp_path / o), "--no-progress")
        assert code == 0, err
    a, b = load_file(tmp_path / "f32.safetensors"), load_file(tmp_path / "bf16.safetensors")
    assert {t.dtype for t in b.values()} == {torch.float32}
    for name in a:  # the bf16 weights are the float32 ones rounded, and the arithmetic is bf16
        rel = float((a[name] - b[name]).norm() / a[name].norm())
        assert rel < 0.05, (name, rel)  # 0.017 at worst when written

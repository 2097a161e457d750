"""aTLAS on causal language models: a Llama-shaped and a GPT-2-shaped model built here.

Tiny seeded models (2 layers, hidden 32, vocab 64) and fine-tunes of them (base + a seeded
delta), a whitespace WordLevel tokenizer in the base folder, a text file of short lines. The
objective is the mean next-token NLL over non-padding tokens; the coefficient gradient is
checked against sum over the block of tau * dL/dtheta and against finite differences.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from weightspace.merges.atlas import learn_coefficients, load_coefficients
from weightspace.merges.atlas.objectives import supervised_loss
from weightspace.merges.atlas.task_vectors import TaskVectors
from weightspace.sources import load_space
from weightspace.tokenizers.word_level import write_word_tokenizer

pytestmark = pytest.mark.requires("hf")

WORDS = ["apple", "pear", "fig", "sum", "integral", "proof", "verb", "noun", "poem", "rhyme"]
TEXT = ["apple pear fig sum", "integral proof", "verb noun poem rhyme apple pear",
        "fig fig apple", "proof sum integral verb noun", "poem rhyme"]


def write_tokenizer(d: Path) -> None:
    """A whitespace WordLevel tokenizer: <unk>, <s>, </s> at ids 0, 1, 2, then WORDS."""
    write_word_tokenizer(d, WORDS)


def _llama(root: Path, dtype: torch.dtype = torch.float32) -> tuple[Path, list[Path]]:
    from weightspace.zoo.tiny import write_tiny_llama

    base = write_tiny_llama(root / "base", seed=0, dtype=dtype)
    fts = [write_tiny_llama(root / f"ft{i}", seed=0, delta_seed=i, delta_scale=0.02, dtype=dtype)
           for i in (1, 2)]
    write_tokenizer(base)
    return Path(base), [Path(f) for f in fts]


def _gpt2(root: Path) -> tuple[Path, list[Path]]:
    """GPT-2 (Conv1D layers, learned positions, lm_head tied to wte), saved without lm_head."""
    import transformers

    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                  bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(root / "base")
    write_tokenizer(root / "base")
    fts = []
    for i in (1, 2):
        g = torch.Generator().manual_seed(100 + i)
        m = transformers.GPT2LMHeadModel.from_pretrained(root / "base")
        with torch.no_grad():
            for p in m.parameters():      # the tied wte / lm_head gets one delta
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        m.save_pretrained(root / f"ft{i}")
        fts.append(root / f"ft{i}")
    return root / "base", fts


BUILD = {"llama": _llama, "gpt2": _gpt2}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"atlas-{request.param}")
    base, fts = BUILD[request.param](root)
    text = root / "train.txt"
    text.write_text("\n".join(TEXT) + "\n")
    return request.param, base, fts, text


def _open(base: Path, text: Path, dtype: torch.dtype | None = None, batch_size: int = 4):
    from weightspace.zoo.bind import open_batches, open_model

    adapter = open_model(base, task="causal-lm", dtype=dtype)   # GPT2LMHeadModel: not *ForCausalLM
    return adapter, open_batches(str(text), adapter, tokenizer=base, batch_size=batch_size)


def _nll_by_hand(module, batch) -> float:
    """Mean over the non-padding next tokens of -log p(token t+1 | tokens <= t), written out."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        logp = torch.log_softmax(module(input_ids=ids, attention_mask=mask).logits.double(), -1)
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if mask[b, t + 1]:
                total -= float(logp[b, t, ids[b, t + 1]])
                count += 1
    return total / count


def test_the_objective_is_the_mean_next_token_nll_over_non_padding_tokens(lm):
    _, base, fts, text = lm
    adapter, batches = _open(base, text)
    assert any(bool((b["attention_mask"] == 0).any()) for b in batches)   # there is padding
    c = learn_coefficients(adapter, load_space(base), [load_space(f) for f in fts], batches, steps=1,
                           tv_dtype=torch.float32)
    # before the first step lambda = 0: the base's loss, per batch then averaged over batches
    by_hand = sum(_nll_by_hand(adapter.module, b) for b in batches) / len(batches)
    assert c.meta["objective_start"] == pytest.approx(by_hand, rel=1e-5)


def _loss(adapter, tvs, lam, batch):
    return supervised_loss(adapter.logits(tvs.params(lam), batch), adapter.labels(batch))


def test_coefficient_gradients_are_the_block_sums_of_tau_times_dl_dtheta(lm):
    """dL/dlambda_(i,b) = sum over block b of tau_(i,b) * dL/dtheta_b; checked by finite differences.
    For GPT-2 the tied wte / lm_head is one block: its dL/dtheta sums both uses."""
    kind, base, fts, text = lm
    adapter, batches = _open(base, text, dtype=torch.float64)
    base_ws, ft_ws = load_space(base), [load_space(f) for f in fts]
    tvs = TaskVectors(adapter, base_ws, ft_ws, ["a", "b"], partitions=1, seed=0, tv_dtype=torch.float64,
                      device=torch.device("cpu"), max_relative_norm=1.0)
    if kind == "gpt2":
        assert adapter.module.lm_head.weight is adapter.module.transformer.wte.weight
        assert "lm_head.weight" not in tvs.blocks and "transformer.wte.weight" in tvs.blocks
    g = torch.Generator().manual_seed(0)
    lam0 = 0.3 * torch.randn(2, len(tvs.blocks), 1, generator=g, dtype=torch.float64)
    lam = lam0.clone().requires_grad_(True)
    batch = batches[0]
    (grad,) = torch.autograd.grad(_loss(adapter, tvs, lam, batch), lam)
    assert grad.dtype == torch.float64 and grad.abs().sum() > 0

    # explicit formula: theta_b = base_b + sum_i lam_(i,b) tau_(i,b) as leaves, then the block sums
    theta = {}
    for j, n in enumerate(tvs.blocks):
        t = base_ws[n].load("cpu", torch.float64).clone()
        for i, f in enumerate(ft_ws):
            t += float(lam0[i, j, 0]) * (f[n].load("cpu", torch.float64) - base_ws[n].load("cpu", torch.float64))
        theta[n] = t.requires_grad_(True)
    loss = supervised_loss(adapter.logits({**tvs.extras, **theta}, batch), adapter.labels(batch))
    dtheta = torch.autograd.grad(loss, list(theta.values()))
    expected = torch.tensor([[float((tvs.taus[i][n] * d).sum()) for n, d in zip(theta, dtheta)]
                             for i in range(2)], dtype=torch.float64)
    torch.testing.assert_close(grad[..., 0], expected, rtol=1e-9, atol=1e-12)

    # finite differences on a few coefficients (the embedding, a first-layer weight, the last block)
    picks = [tvs.blocks.index(n) for n in tvs.blocks if "emb" in n or "wte" in n][:1]
    picks += [next(j for j, n in enumerate(tvs.blocks) if ".0." in n and n.endswith("weight")), len(tvs.blocks) - 1]
    eps = 1e-2  # transformers' RMSNorm / softmax run in float32 even for a float64 model: a wide step
    with torch.no_grad():
        for i in range(2):
            for j in picks:
                up, down = lam.detach().clone(), lam.detach().clone()
                up[i, j, 0] += eps
                down[i, j, 0] -= eps
                fd = (_loss(adapter, tvs, up, batch) - _loss(adapter, tvs, down, batch)) / (2 * eps)
                assert float(fd) == pytest.approx(float(grad[i, j, 0]), rel=2e-3, abs=1e-6)


def test_learned_coefficients_lower_the_lm_loss_on_the_training_text(lm):
    _, base, fts, text = lm
    adapter, batches = _open(base, text)
    c = learn_coefficients(adapter, load_space(base), [load_space(f) for f in fts], batches,
                           steps=20, lr=0.05)
    assert c.meta["objective_end"] < c.meta["objective_start"] - 1e-3
    assert c.values.shape == (2, len(c.blocks)) and c.values.abs().sum() > 0
    assert c.meta["memory"]["tv_dtype"] == "float16"              # a float32 model: float16 task vectors
    assert c.meta["memory"]["base_copied"] == 0                    # the module's own tensors are the base


def test_cli_learns_and_the_atlas_merge_is_base_plus_lambda_tau(lm, tmp_path, run_cli, write_spec):
    """`wsmerge atlas learn` on a text file, then `merge_method: atlas`: the merged checkpoint loads
    in transformers, is base + sum_i lambda_(i,b) tau_i tensor by tensor, and has the learned loss."""
    import transformers

    kind, base, fts, text = lm
    coeffs = tmp_path / "c.safetensors"
    code, out, err = run_cli("atlas", "learn", "--base", str(base), "--task-vectors", *map(str, fts),
                             "--data", str(text), "--steps", "15", "--lr", "0.05", "--batch-size", "4",
                             "--tv-dtype", "float32", "--device", "cpu", "-o", str(coeffs), "--no-progress",
                             "--task", "causal-lm")
    assert code == 0, err
    c = load_coefficients(coeffs)
    assert c.meta["objective_end"] < c.meta["objective_start"]
    assert c.meta["tokenizer"] == str(base) and c.meta["memory"]["tv_dtype"] == "float32"
    spec = write_spec(f"merge_method: atlas\nbase_model: {base}\nmodels:\n"
                      + "".join(f"  - model: {f}\n" for f in fts)
                      + f"parameters: {{coefficients: {coeffs}}}\ndtype: float32\n")
    code, _, err = run_cli("run", str(spec), str(tmp_path / "merged"), "--no-progress")
    assert code == 0, err
    base_ws, ft_ws, merged = load_space(base), [load_space(f) for f in fts], load_space(tmp_path / "merged")
    assert set(merged.keys()) == set(base_ws.keys())
    for n in base_ws.keys():
        b = base_ws[n].load("cpu", torch.float32)
        want = b + sum(c.lambda_for(i, n) * (f[n].load("cpu", torch.float32) - b) for i, f in enumerate(ft_ws))
        torch.testing.assert_close(merged[n].load("cpu", torch.float32), want, rtol=1e-6, atol=1e-7)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    if kind == "gpt2":                                             # still tied, one coefficient
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    _, batches = _open(base, text)
    merged_loss = sum(_nll_by_hand(model, b) for b in batches) / len(batches)
    assert merged_loss == pytest.approx(c.meta["objective_end"], rel=1e-4)


def test_a_bf16_model_keeps_bf16_task_vectors_and_float32_coefficient_gradients(tmp_path):
    base, fts = _llama(tmp_path, dtype=torch.bfloat16)
    text = tmp_path / "train.txt"
    text.write_text("\n".join(TEXT) + "\n")
    adapter, batches = _open(base, text)
    assert next(adapter.module.parameters()).dtype == torch.bfloat16
    base_ws, ft_ws = load_space(base), [load_space(f) for f in fts]
    tvs = TaskVectors(adapter, base_ws, ft_ws, ["a", "b"], partitions=1, seed=0, tv_dtype=None,
                      device=torch.device("cpu"), max_relative_norm=1.0)
    assert {t.dtype for tau in tvs.taus for t in tau.values()} == {torch.bfloat16}
    assert {t.dtype for t in tvs.base.values()} == {torch.bfloat16}
    module_ptrs = {p.data_ptr() for p in adapter.module.parameters()}
    assert all(t.data_ptr() in module_ptrs for t in tvs.base.values())   # no second copy of the base
    lam = torch.full((2, len(tvs.blocks), 1), 0.2, requires_grad=True)
    params = tvs.params(lam)
    assert {params[n].dtype for n in tvs.blocks} == {torch.bfloat16}    # the step's merged weights
    (grad,) = torch.autograd.grad(_loss(adapter, tvs, lam, batches[0]), lam)
    assert grad.dtype == torch.float32
    # the same gradient from a float32 copy of the model, to bf16 accuracy
    a32, b32 = _open(base, text, dtype=torch.float32)
    tvs32 = TaskVectors(a32, base_ws, ft_ws, ["a", "b"], partitions=1, seed=0, tv_dtype=torch.float32,
                        device=torch.device("cpu"), max_relative_norm=1.0)
    (g32,) = torch.autograd.grad(_loss(a32, tvs32, lam, b32[0]), lam)
    assert float((grad - g32).norm() / g32.norm()) < 0.1

    c = learn_coefficients(adapter, base_ws, ft_ws, batches, steps=10, lr=0.05)
    m = c.meta["memory"]
    numel = sum(t.numel() for t in tvs.base.values())
    assert (m["tv_dtype"], m["compute_dtype"]) == ("bfloat16", "bfloat16")
    assert m["task_vectors"] == 2 * numel * 2 and m["base"] == numel * 2 and m["base_copied"] == 0
    assert m["coefficients"] == 2 * len(c.blocks) * 4 * 4          # float32: value, grad, 2 moments
    assert c.meta["objective_end"] < c.meta["objective_start"]


def test_errors_name_the_text_file_or_the_model_without_a_tokenizer(lm, tmp_path, run_cli):
    _, base, fts, text = lm
    out = tmp_path / "c.safetensors"
    common = ["--base", str(base), "--task-vectors", *map(str, fts), "--steps", "1", "-o", str(out),
              "--no-progress", "--device", "cpu", "--task", "causal-lm"]
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n")
    code, _, err = run_cli("atlas", "learn", *common, "--data", str(blank))
    assert code == 1 and f"--data {blank}: no text" in err
    one = tmp_path / "one-token.txt"
    one.write_text("apple\npear\n")
    code, _, err = run_cli("atlas", "learn", *common, "--data", str(one))
    assert code == 1 and f"--data {one}: no token to predict" in err
    code, _, err = run_cli("atlas", "learn", *common, "--data", str(tmp_path / "missing.txt"))
    assert code == 1 and "missing.txt: no such file" in err
    # a fine-tune folder has no tokenizer: as the base it is refused before any model is read
    bare = ["--base", str(fts[0]), "--task-vectors", str(fts[1]), "--steps", "1", "-o", str(out),
            "--no-progress", "--data", str(text), "--task", "causal-lm"]
    code, _, err = run_cli("atlas", "learn", *bare)
    assert code == 1 and f"--base {fts[0]}: no tokenizer files" in err and "--tokenizer DIR" in err
    code, _, err = run_cli("atlas", "learn", *bare, "--tokenizer", str(fts[1]))
    assert code == 1 and f"--tokenizer {fts[1]}: no tokenizer files" in err
    assert not out.exists()
    code, _, err = run_cli("atlas", "learn", *bare, "--tokenizer", str(base))   # the fix works
    assert code == 0, err
    assert out.exists()


@pytest.mark.parametrize("partitions", [1, 3])
def test_the_backward_chunks_give_the_whole_block_gradient(tmp_path, monkeypatch, partitions):
    """Coefficient gradients summed over float32 chunks of 7 entries equal one pass over each
    block, with and without partitions, on a bf16 model."""
    import weightspace.merges.atlas.blocks as blocks

    base, fts = _llama(tmp_path, dtype=torch.bfloat16)
    text = tmp_path / "train.txt"
    text.write_text("\n".join(TEXT) + "\n")
    adapter, batches = _open(base, text)
    tvs = TaskVectors(adapter, load_space(base), [load_space(f) for f in fts], ["a", "b"],
                      partitions=partitions, seed=0, tv_dtype=None, device=torch.device("cpu"),
                      max_relative_norm=1.0)
    lam = torch.full((2, len(tvs.blocks), partitions), 0.2, requires_grad=True)
    grads = []
    for chunk in (1 << 20, 7):
        monkeypatch.setattr(blocks, "GRAD_CHUNK", chunk)
        grads.append(torch.autograd.grad(_loss(adapter, tvs, lam, batches[0]), lam)[0])
    assert grads[0].dtype == torch.float32 and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)

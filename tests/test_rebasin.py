"""Git Re-Basin weight matching: specs, function preservation, planted permutations,
loss barriers of trained digits models, `wsmerge align` end to end, and its errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from weightspace.errors import InputError
from weightspace.ir import WeightSpace
from weightspace.merges.rebasin import align, apply_permutation, permutation_spec, weight_matching
from weightspace.sources import load_space
from weightspace.zoo.arch import build_model
from weightspace.zoo.data import load_task

ARCHS = [
    {"arch": "mlp", "width": 32, "depth": 3},
    {"arch": "cnn", "width": 8, "depth": 3},
    {"arch": "resmlp", "width": 16, "depth": 2, "mlp_ratio": 2},
]


@pytest.fixture(scope="module")
def digits():
    return load_task("digits")


def make(cfg: dict, seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = build_model(cfg, (1, 8, 8), 10)
    return model, {k: v.detach().clone() for k, v in model.named_parameters()}


def shapes(params: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in params.items()}


def random_perms(spec, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randperm(n, generator=g) for p, n in spec.sizes.items()}


def zoo_config(arch: dict) -> dict:
    return {"model_type": "weightspace-zoo", "arch": arch, "dataset": "digits",
            "input_shape": [1, 8, 8], "num_classes": 10}


# --- the spec -----------------------------------------------------------------------------------

def test_mlp_spec_chains_layers():
    _, p = make({"arch": "mlp", "width": 8, "depth": 2}, 0)
    spec = permutation_spec("mlp", shapes(p))
    assert spec.axes == {
        "layers.0.weight": ("layers.0", None), "layers.0.bias": ("layers.0",),
        "layers.1.weight": ("layers.1", "layers.0"), "layers.1.bias": ("layers.1",),
        "head.weight": (None, "layers.1"), "head.bias": (None,),
    }
    assert spec.sizes == {"layers.0": 8, "layers.1": 8}


def test_resmlp_spec_shares_the_residual_stream():
    _, p = make({"arch": "resmlp", "width": 8, "depth": 2, "mlp_ratio": 3}, 0)
    spec = permutation_spec("resmlp", shapes(p))
    assert spec.sizes == {"residual": 8, "blocks.0.hidden": 24, "blocks.1.hidden": 24}
    on_residual = {(n, ax) for n, ax in spec.perm_to_axes["residual"]}
    assert on_residual == {
        ("stem.weight", 0), ("stem.bias", 0), ("norm.weight", 0), ("norm.bias", 0), ("head.weight", 1),
        *((f"blocks.{i}.{t}", ax) for i in range(2) for t, ax in
          (("norm.weight", 0), ("norm.bias", 0), ("fc1.weight", 1), ("fc2.weight", 0), ("fc2.bias", 0))),
    }
    assert spec.axes["blocks.1.fc2.weight"] == ("residual", "blocks.1.hidden")
    assert spec.axes["stem.weight"] == ("residual", None)


# --- (a) a permutation does not change the function -------------------------------------------

@pytest.mark.parametrize("cfg", ARCHS, ids=[c["arch"] for c in ARCHS])
def test_permutation_preserves_function(cfg, digits):
    model, p = make(cfg, 0)
    spec = permutation_spec(cfg["arch"], shapes(p))
    perms = random_perms(spec, 1)
    assert all((perm != torch.arange(len(perm))).any() for perm in perms.values())
    q = apply_permutation(spec, perms, p)
    x = digits.test.x
    with torch.no_grad():
        want, got = functional_call(model, p, (x,)), functional_call(model, q, (x,))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert any(not torch.equal(p[k], q[k]) for k in p)


# --- (b) weight matching finds a planted permutation ------------------------------------------

@pytest.mark.parametrize("cfg", ARCHS, ids=[c["arch"] for c in ARCHS])
def test_align_recovers_planted_permutation(cfg):
    _, p = make(cfg, 0)
    spec = permutation_spec(cfg["arch"], shapes(p))
    planted = random_perms(spec, 2)
    a = WeightSpace.from_tensors(p, {"source": "a", "config": zoo_config(cfg)})
    b = WeightSpace.from_tensors(apply_permutation(spec, planted, p),
                                 {"source": "b", "config": zoo_config(cfg)})
    aligned, report = align(a, b)
    got = aligned.materialize()
    for k in p:
        assert torch.equal(got[k], p[k]), k
    assert aligned.meta["config"] == zoo_config(cfg)
    assert report["arch"] == cfg["arch"] and report["converged"]
    assert report["moved"] == {q: int((perm != torch.arange(len(perm))).sum()) for q, perm in planted.items()}
    norm2 = sum(float((t.double() ** 2).sum()) for t in p.values())
    assert report["similarity_after"] == pytest.approx(norm2, rel=1e-9)
    assert report["similarity_before"] < report["similarity_after"] - 1.0


def test_weight_matching_is_deterministic_for_a_seed():
    cfg = {"arch": "mlp", "width": 32, "depth": 2}
    (_, pa), (_, pb) = make(cfg, 0), make(cfg, 1)
    spec = permutation_spec("mlp", shapes(pa))
    runs = [weight_matching(pa, pb, spec, seed=s) for s in (7, 7)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in spec.sizes)
    stats: dict = {}
    weight_matching(pa, pb, spec, max_iter=1, seed=7, stats=stats)
    assert stats["iterations"] == 1


# --- (c) alignment lowers the loss barrier between independently trained models --------------

def train(cfg: dict, seed: int, x: torch.Tensor, y: torch.Tensor, steps: int = 200):
    model, _ = make(cfg, seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (128,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, {k: v.detach().clone() for k, v in model.named_parameters()}


def barrier(model, pa, pb, x, y) -> float:
    """max over alpha of train loss((1-alpha) A + alpha B), minus the mean of the two end losses."""
    losses = []
    for alpha in torch.linspace(0, 1, 11).tolist():
        mix = {k: (1 - alpha) * pa[k] + alpha * pb[k] for k in pa}
        with torch.no_grad():
            losses.append(F.cross_entropy(functional_call(model, mix, (x,)), y).item())
    assert max(losses[0], losses[-1]) < 0.25  # both ends are trained models
    return max(losses) - (losses[0] + losses[-1]) / 2


@pytest.mark.parametrize("cfg, ratio", [
    ({"arch": "mlp", "width": 64, "depth": 2}, 0.3),        # measured: 0.92 -> 0.05
    ({"arch": "resmlp", "width": 32, "depth": 2}, 0.75),    # measured: 0.74 -> 0.43
], ids=["mlp", "resmlp"])
def test_alignment_lowers_loss_barrier(cfg, ratio, digits):
    x, y = digits.train.x, digits.train.y
    model, pa = train(cfg, 0, x, y)
    _, pb = train(cfg, 1, x, y)
    a = WeightSpace.from_tensors(pa, {"source": "a", "config": zoo_config(cfg)})
    b = WeightSpace.from_tensors(pb, {"source": "b", "config": zoo_config(cfg)})
    aligned, report = align(a, b)
    pb_aligned = aligned.materialize()
    before, after = barrier(model, pa, pb, x, y), barrier(model, pa, pb_aligned, x, y)
    assert before > 0.3
    assert after < ratio * before, (before, after)
    assert report["similarity_after"] > report["similarity_before"]
    with torch.no_grad():  # aligned B is still B
        torch.testing.assert_close(functional_call(model, pb_aligned, (x,)),
                                   functional_call(model, pb, (x,)), atol=1e-5, rtol=0)


# --- (d) wsmerge align end to end -------------------------------------------------------------

def save_zoo(path: Path, params: dict[str, torch.Tensor], arch: dict) -> Path:
    WeightSpace.from_tensors(params).save(path, config=zoo_config(arch))
    return path


def test_cli_align_end_to_end(tmp_path, run_cli, digits):
    cfg = {"arch": "mlp", "width": 32, "depth": 2}
    (model, pa), (_, pb) = make(cfg, 0), make(cfg, 1)
    a, b = save_zoo(tmp_path / "a", pa, cfg), save_zoo(tmp_path / "b", pb, cfg)
    out = tmp_path / "b_aligned"
    code, stdout, stderr = run_cli("align", a, b, "-o", out, "--seed", "3")
    assert code == 0, stderr
    assert "converged" in stdout and "layers.0" in stdout and f"wrote {out}" in stdout
    aligned = load_space(out)
    assert aligned.meta["config"] == zoo_config(cfg)
    q = aligned.materialize()
    assert set(q) == set(pb) and any(not torch.equal(q[k], pb[k]) for k in pb)
    x = digits.test.x
    with torch.no_grad():
        torch.testing.assert_close(functional_call(model, q, (x,)), functional_call(model, pb, (x,)),
                                   atol=1e-5, rtol=0)
    # an existing output needs --overwrite
    code, _, stderr = run_cli("align", a, b, "-o", out)
    assert code == 2 and "--overwrite" in stderr
    code, _, stderr = run_cli("align", a, b, "-o", out, "--overwrite", "--arch", "mlp")
    assert code == 0, stderr


# --- (e) errors -------------------------------------------------------------------------------

def test_api_errors_name_the_arch_and_tensor():
    cfg = {"arch": "mlp", "width": 8, "depth": 2}
    _, p = make(cfg, 0)
    a = WeightSpace.from_tensors(p, {"source": "a", "config": zoo_config(cfg)})
    with pytest.raises(InputError, match=r"'vit'.*Supported architectures: mlp, cnn, resmlp"):
        align(a, a, arch="vit")
    with pytest.raises(InputError, match=r"'resmpl': unknown\. Did you mean 'resmlp'"):
        align(a, a, arch="resmpl")
    with pytest.raises(InputError, match=r"cannot tell the architecture.*--arch"):
        align(WeightSpace.from_tensors(p), WeightSpace.from_tensors(p))
    with pytest.raises(InputError, match=r"as cnn: tensor 'layers.0.weight' has shape \[8, 64\]"):
        align(a, a, arch="cnn")
    with pytest.raises(InputError, match=r"tensor 'layers.1.bias' is in a but not in"):
        align(a, WeightSpace.from_tensors({k: v for k, v in p.items() if k != "layers.1.bias"}))
    wider = {**p, "layers.1.weight": torch.zeros(8, 9)}
    with pytest.raises(InputError, match=r"'layers.1.weight' axis 1 has 9 units, but layers.0.weight axis 0 has 8"):
        permutation_spec("mlp", shapes(wider))


@pytest.mark.parametrize("case, message", [
    ("vit", r"'vit'.*Supported architectures: mlp, cnn, resmlp"),
    ("shapes", r"tensor 'head.weight' has shape \[10, 32\] in .*/a but \[10, 16\] in .*/b"),
    ("unknown", r"'transformer': unknown.*Supported architectures: mlp, cnn, resmlp"),
])
def test_cli_errors_leave_no_output(case, message, tmp_path, run_cli):
    cfg_a = {"arch": "vit", "width": 16, "depth": 1, "patch": 2, "heads": 2, "mlp_ratio": 2} \
        if case == "vit" else {"arch": "mlp", "width": 32, "depth": 2}
    cfg_b = {**cfg_a, "width": 16} if case == "shapes" else cfg_a
    a = save_zoo(tmp_path / "a", make(cfg_a, 0)[1], cfg_a)
    b = save_zoo(tmp_path / "b", make(cfg_b, 1)[1], cfg_b)
    extra = ["--arch", "transformer"] if case == "unknown" else []
    code, stdout, stderr = run_cli("align", a, b, "-o", tmp_path / "out", *extra)
    assert code == 1
    assert stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1
    assert re.search(message, stderr), stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]

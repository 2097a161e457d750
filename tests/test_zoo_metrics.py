"""weightspace.zoo.metrics against exact answers: dense Hessians of tiny networks, the HSIC form of CKA,
hand-computed loss landscapes for mode connectivity, and two trained digits MLPs."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from weightspace.errors import InputError, SpecError
from weightspace.zoo.arch import build_model
from weightspace.zoo.data import load_task
from weightspace.zoo.metrics import (
    cka,
    curve_losses,
    evaluate,
    fit_bezier,
    hessian_top_eigenvalue,
    hessian_trace,
    landscape_metrics,
    linear_path,
    logit_cka,
    logits,
    mode_connectivity,
    pair_metrics,
)

# ---------------------------------------------------------------------------------------------
# helpers


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# (arch config, input shape): tiny enough for a dense Hessian; vit/cnn/resmlp check that
# attention, layer norm, gelu and max-pool all have working second derivatives
TINY = [
    ({"arch": "mlp", "width": 3, "depth": 1}, (5,)),
    ({"arch": "resmlp", "width": 3, "depth": 1, "mlp_ratio": 1}, (5,)),
    ({"arch": "cnn", "width": 2, "depth": 2}, (1, 4, 4)),
    ({"arch": "vit", "width": 4, "depth": 1, "patch": 2, "heads": 2, "mlp_ratio": 1}, (1, 4, 4)),
]


def tiny_problem(config: dict, input_shape: tuple[int, ...], seed: int = 0, n: int = 20):
    torch.manual_seed(seed)
    model = build_model(config, input_shape, num_classes=3)
    params = {k: v * 2 for k, v in params_of(model).items()}  # larger weights: more curvature
    x = torch.randn(n, *input_shape)
    y = torch.randint(0, 3, (n,))
    return model, params, x, y


def exact_hessian(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                  y: torch.Tensor) -> torch.Tensor:
    """The dense Hessian of the mean cross-entropy in the flattened parameters, in float64."""
    names = list(params)
    shapes = [params[k].shape for k in names]
    flat = torch.cat([params[k].double().flatten() for k in names])

    def loss(v: torch.Tensor) -> torch.Tensor:
        chunks = v.split([math.prod(s) for s in shapes])
        p = {k: c.reshape(s) for k, c, s in zip(names, chunks, shapes)}
        return F.cross_entropy(functional_call(model, p, (x.double(),)), y)

    return torch.autograd.functional.hessian(loss, flat)


class Product(nn.Module):
    """logits = [u * v * x, 0]: the loss depends on u*v only, so (1, 1) and (-1, -1) are two
    equivalent minima with a barrier between them, and a straight line can be worked by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.ones(1))
        self.v = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.u * self.v * x[:, 0]
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def uv(u: float, v: float) -> dict[str, torch.Tensor]:
    return {"u": torch.tensor([u]), "v": torch.tensor([v])}


def softplus(z: float) -> float:
    return math.log1p(math.exp(z))


# ---------------------------------------------------------------------------------------------
# evaluate / logits


def test_evaluate_matches_direct_computation_in_uneven_batches():
    model, params, x, y = tiny_problem(*TINY[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = functional_call(model, params, (x,))
    got = evaluate(model, params, x, y, batch_size=7)
    assert got["loss"] == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-6)
    assert got["acc"] == pytest.approx(float((out.argmax(1) == y).float().mean()))
    assert torch.allclose(logits(model, params, x, batch_size=6), out, atol=1e-6)
    # the module's own tensors are untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_live_module_parameters_are_read_not_trained():
    model, _, x, y = tiny_problem(*TINY[0])
    live = dict(model.named_parameters())                                  # requires_grad=True
    before = {k: v.detach().clone() for k, v in live.items()}
    hessian_top_eigenvalue(model, live, x, y, iters=3)
    hessian_trace(model, live, x, y, n_samples=3)
    theta = fit_bezier(model, live, live, x, y, steps=3)
    assert all(not t.requires_grad for t in theta.values())
    assert all(torch.equal(before[k], v) and v.grad is None for k, v in live.items())


def test_params_are_checked_against_the_module():
    model, params, x, y = tiny_problem(*TINY[0])
    missing = dict(params)
    missing.pop("head.bias")
    with pytest.raises(InputError, match="head.bias"):
        evaluate(model, missing, x, y)
    with pytest.raises(InputError, match="shape"):
        evaluate(model, {**params, "head.bias": torch.zeros(4)}, x, y)
    with pytest.raises(InputError, match="examples"):
        evaluate(model, params, x, y[:5])


# ---------------------------------------------------------------------------------------------
# Hessian


@pytest.mark.parametrize("config,shape", TINY, ids=[c["arch"] for c, _ in TINY])
def test_top_eigenvalue_matches_dense_hessian(config, shape):
    model, params, x, y = tiny_problem(config, shape)
    eig = torch.linalg.eigvalsh(exact_hessian(model, params, x, y))
    by_mag = eig[eig.abs().argsort(descending=True)]
    # power iteration needs a gap; the test is meaningless without one
    assert abs(by_mag[1]) < 0.95 * abs(by_mag[0])
    got = hessian_top_eigenvalue(model, params, x, y, iters=2000, tol=1e-7, batch_size=7)
    assert got == pytest.approx(float(by_mag[0]), rel=1e-3)


def test_top_eigenvalue_deterministic_and_default_tolerance_close():
    model, params, x, y = tiny_problem(*TINY[0])
    a = hessian_top_eigenvalue(model, params, x, y, seed=5)
    assert hessian_top_eigenvalue(model, params, x, y, seed=5) == a
    eig = torch.linalg.eigvalsh(exact_hessian(model, params, x, y))
    assert a == pytest.approx(float(eig[eig.abs().argmax()]), rel=1e-2)


@pytest.mark.parametrize("config,shape", TINY[::3], ids=["mlp", "vit"])
def test_hutchinson_trace_within_three_stderr_of_exact(config, shape):
    model, params, x, y = tiny_problem(config, shape)
    h = exact_hessian(model, params, x, y)
    n = 500
    mean, se = hessian_trace(model, params, x, y, n_samples=n, seed=1, batch_size=10)
    assert abs(mean - float(h.trace())) < 3 * se
    # Rademacher probes: Var(z^T H z) = 2 * sum_{i != j} H_ij^2
    off = float((h ** 2).sum() - (h.diagonal() ** 2).sum())
    assert se == pytest.approx(math.sqrt(2 * off / n), rel=0.2)


def test_hutchinson_reproducible_for_a_seed():
    model, params, x, y = tiny_problem(*TINY[0])
    a = hessian_trace(model, params, x, y, n_samples=20, seed=3)
    assert hessian_trace(model, params, x, y, n_samples=20, seed=3) == a
    assert hessian_trace(model, params, x, y, n_samples=20, seed=4) != a


def test_hutchinson_exact_for_one_parameter():
    # with one parameter z^T H z = z^2 H = H for z = +-1: Rademacher probes have no variance
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.w

    model = Scale()
    torch.manual_seed(0)
    x, y = torch.randn(12, 4), torch.randint(0, 4, (12,))
    params = {"w": torch.tensor([0.7])}
    exact = float(exact_hessian(model, params, x, y))
    mean, se = hessian_trace(model, params, x, y, n_samples=10)
    assert mean == pytest.approx(exact, rel=1e-5)
    assert se == pytest.approx(0.0, abs=1e-6 * exact)
    assert hessian_top_eigenvalue(model, params, x, y) == pytest.approx(exact, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# CKA


def cka_hsic(a: torch.Tensor, b: torch.Tensor) -> float:
    """CKA from its kernel definition: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    a, b = a.double(), b.double()
    n = a.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    k, l_ = a @ a.T, b @ b.T

    def hsic(p: torch.Tensor, q: torch.Tensor) -> float:
        return float(torch.trace(p @ h @ q @ h))

    return hsic(k, l_) / math.sqrt(hsic(k, k) * hsic(l_, l_))


def test_cka_identity_invariances_and_formula():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 4, generator=g, dtype=torch.float64)
    b = torch.randn(30, 6, generator=g, dtype=torch.float64) + a[:, :1]  # partly related
    assert cka(a, a) == pytest.approx(1.0, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    base = cka(a, b)
    assert 0.05 < base < 0.95
    assert base == pytest.approx(cka_hsic(a, b), rel=1e-10)
    assert cka(a, b @ q) == pytest.approx(base, rel=1e-10)       # rotation
    assert cka(a, 3.7 * b) == pytest.approx(base, rel=1e-10)              # isotropic scale
    assert cka(a + 5.0, b) == pytest.approx(base, rel=1e-10)              # shift (centred)
    assert cka(b, a) == pytest.approx(base, rel=1e-12)                    # symmetric
    # not invariant to anisotropic scaling
    assert cka(a, b * torch.tensor([10.0, 1, 1, 1, 1, 1], dtype=torch.float64)) != pytest.approx(base, rel=1e-3)


def test_cka_errors():
    with pytest.raises(InputError, match="rows"):
        cka(torch.randn(5, 2), torch.randn(6, 2))
    with pytest.raises(InputError, match="constant"):
        cka(torch.ones(5, 2), torch.randn(5, 2))


# ---------------------------------------------------------------------------------------------
# mode connectivity on hand-computed landscapes


def test_same_model_is_flat_and_connected():
    model, params, x, y = tiny_problem(*TINY[0])
    out = mode_connectivity(model, params, params, x, y, curve="linear")
    assert out["mc"] == pytest.approx(0.0, abs=1e-6)
    assert out["losses"] == pytest.approx([out["losses"][0]] * 11, rel=1e-5)
    assert out["ts"] == pytest.approx([i / 10 for i in range(11)])


def test_linear_path_barrier_between_symmetric_minima():
    # (u, v) = (1-2t)(1, 1), so u*v = (1-2t)^2 and L(t) = softplus(-3 (1-2t)^2)
    model, x, y = Product(), torch.tensor([[3.0]]), torch.tensor([0])
    pa, pb = uv(1, 1), uv(-1, -1)
    losses = linear_path(model, pa, pb, x, y, n_points=5)
    assert losses == pytest.approx([softplus(-3 * (1 - 2 * t) ** 2) for t in (0, .25, .5, .75, 1)],
                                   rel=1e-5)
    out = mode_connectivity(model, pa, pb, x, y, curve="linear", n_points=5)
    assert out["t_star"] == 0.5
    assert out["mc"] == pytest.approx(softplus(-3) - math.log(2), rel=1e-5)
    assert out["mc"] < 0


def test_linear_path_dip_in_a_convex_valley():
    # u*v = -2 + 4t on a valley with its floor at u*v = 0: the middle is below the ends
    model, x, y = Product(), torch.tensor([[1.0], [1.0]]), torch.tensor([0, 1])
    out = mode_connectivity(model, uv(-2, 1), uv(2, 1), x, y, curve="linear", n_points=11)
    ends = (softplus(2) + softplus(-2)) / 2
    assert out["losses"][0] == pytest.approx(ends, rel=1e-6)
    assert out["t_star"] == 0.5
    assert out["mc"] == pytest.approx(ends - math.log(2), rel=1e-5)
    assert out["mc"] > 0


def test_bezier_curve_losses_follow_the_formula():
    model, x, y = Product(), torch.tensor([[3.0]]), torch.tensor([0])
    pa, pb, theta = uv(1, 1), uv(-1, -1), uv(2, -0.5)
    ts = [i / 4 for i in range(5)]

    def expected(t: float) -> float:
        u = (1 - t) ** 2 * 1 + 2 * t * (1 - t) * 2 + t ** 2 * -1
        v = (1 - t) ** 2 * 1 + 2 * t * (1 - t) * -0.5 + t ** 2 * -1
        return softplus(-3 * u * v)

    got = curve_losses(model, pa, pb, theta, x, y, n_points=5)
    assert got == pytest.approx([expected(t) for t in ts], rel=1e-5)
    # with theta at the midpoint the Bezier curve is the straight line
    assert curve_losses(model, pa, pb, uv(0, 0), x, y, n_points=5) == pytest.approx(
        linear_path(model, pa, pb, x, y, n_points=5), rel=1e-6)
    # a given theta is used as is
    out = mode_connectivity(model, pa, pb, x, y, curve="bezier", n_points=5, theta=theta)
    assert out["losses"] == pytest.approx(got, rel=1e-6)


def test_mode_connectivity_argument_errors():
    model, x, y = Product(), torch.tensor([[3.0]]), torch.tensor([0])
    with pytest.raises(SpecError, match="curve"):
        mode_connectivity(model, uv(1, 1), uv(-1, -1), x, y, curve="cubic")
    with pytest.raises(SpecError, match="n_points"):
        linear_path(model, uv(1, 1), uv(-1, -1), x, y, n_points=1)
    with pytest.raises(InputError, match="pb"):
        linear_path(model, uv(1, 1), {"u": torch.ones(1)}, x, y)


# ---------------------------------------------------------------------------------------------
# two trained digits MLPs


@pytest.fixture(scope="module")
def digits():
    return load_task("digits")


def train_mlp(task, seed: int, width: int, depth: int, steps: int = 200):
    torch.manual_seed(seed)
    model = build_model({"arch": "mlp", "width": width, "depth": depth}, task.input_shape,
                        task.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        loss = F.cross_entropy(model(task.train.x), task.train.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, params_of(model)


@pytest.fixture(scope="module")
def two_mlps(digits):
    model, pa = train_mlp(digits, seed=0, width=16, depth=1)
    _, pb = train_mlp(digits, seed=1, width=16, depth=1)
    return model, pa, pb


def test_bezier_lowers_the_barrier_between_two_seeds(digits, two_mlps):
    model, pa, pb = two_mlps
    x, y = digits.train.x, digits.train.y
    pa0 = {k: v.clone() for k, v in pa.items()}
    lin = mode_connectivity(model, pa, pb, x, y, curve="linear")
    theta = fit_bezier(model, pa, pb, x, y, seed=0)
    assert all(torch.equal(pa0[k], pa[k]) for k in pa)                    # ends untouched
    bez = curve_losses(model, pa, pb, theta, x, y)
    assert lin["mc"] < -0.1                                                # a real barrier
    assert max(bez) < 0.5 * max(lin["losses"])
    out = mode_connectivity(model, pa, pb, x, y, curve="bezier", seed=0)
    assert out["losses"] == pytest.approx(bez, rel=1e-6)                  # deterministic
    assert out["mc"] > lin["mc"]


def test_logit_cka_of_two_seeds(digits, two_mlps):
    model, pa, pb = two_mlps
    x = digits.test.x
    assert logit_cka(model, pa, pa, x) == pytest.approx(1.0, abs=1e-9)
    value = logit_cka(model, pa, pb, x, batch_size=100)
    assert value == pytest.approx(cka_hsic(logits(model, pa, x), logits(model, pb, x)), rel=1e-6)
    assert 0.3 < value < 1.0


LANDSCAPE_KEYS = {"train_loss", "train_acc", "test_loss", "test_acc", "gap", "gap_acc",
                  "hessian_top_eig", "hessian_trace", "hessian_trace_se"}


def test_landscape_and_pair_metrics_on_a_digits_mlp(digits):
    model, pa = train_mlp(digits, seed=0, width=64, depth=2, steps=60)
    _, pb = train_mlp(digits, seed=1, width=64, depth=2, steps=60)
    # CPU time, not wall time: other processes on a shared machine do not count
    t0 = time.process_time()
    row = landscape_metrics(model, pa, digits)
    t1 = time.process_time()
    pair = pair_metrics(model, pa, pb, digits)
    t2 = time.process_time()
    assert set(row) == LANDSCAPE_KEYS
    assert all(isinstance(v, float) and math.isfinite(v) for v in row.values())
    assert row["gap"] == pytest.approx(row["test_loss"] - row["train_loss"])
    assert row["gap_acc"] == pytest.approx(row["train_acc"] - row["test_acc"])
    assert row["train_acc"] > 0.9 and row["hessian_top_eig"] > 0 and row["hessian_trace"] > 0
    assert row["hessian_top_eig"] < row["hessian_trace"] + 3 * row["hessian_trace_se"]
    assert set(pair) == {"mc_linear", "mc_bezier", "cka"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in pair.values())
    assert pair["mc_bezier"] > pair["mc_linear"] and 0 < pair["cka"] <= 1
    # 2 cores: a few seconds of wall time is at most twice that in CPU time
    assert t1 - t0 < 10 and t2 - t1 < 10


def test_landscape_subsample_is_deterministic(digits):
    model, pa = train_mlp(digits, seed=0, width=16, depth=1, steps=30)
    a = landscape_metrics(model, pa, digits, max_examples=100, hessian_iters=20, trace_samples=5)
    b = landscape_metrics(model, pa, digits, max_examples=100, hessian_iters=20, trace_samples=5)
    full = landscape_metrics(model, pa, digits, hessian_iters=20, trace_samples=5)
    assert a == b
    assert a["train_loss"] == full["train_loss"]                           # losses use whole splits
    assert a["hessian_top_eig"] != full["hessian_top_eig"]
    with pytest.raises(SpecError, match="split"):
        landscape_metrics(model, pa, digits, split="dev")

"""D2NWG building blocks: the latent DDPM (schedule, forward process, loss, DDIM/DDPM sampling)
and the dataset set-encoder (invariances, class sampling, contrastive loss)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from weightspace.errors import InputError, SpecError
from weightspace.zoo.data import Split, load_task
from weightspace.zoo.gen.diffusion import (
    LatentDDPM,
    linear_beta_schedule,
    sqrt_linear_beta_schedule,
)
from weightspace.zoo.gen.setenc import (
    DatasetEncoder,
    SupportSets,
    class_samples,
    contrastive_loss,
    embed_task,
)

CENTERS = torch.tensor([[2.0, 2.0], [-2.0, -2.0]])


def two_modes(n: int = 512, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Points of a 50/50 mixture of N(+-(2, 2), 0.3^2 I) and the mode each came from."""
    g = torch.Generator().manual_seed(seed)
    mode = torch.randint(0, 2, (n,), generator=g)
    return CENTERS[mode] + 0.3 * torch.randn(n, 2, generator=g), mode


def near(samples: torch.Tensor, mode: int) -> float:
    return float(((samples - CENTERS[mode]).norm(dim=1) < 1.0).float().mean())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def unconditional() -> tuple[LatentDDPM, torch.Tensor, list[float]]:
    z, _ = two_modes()
    torch.manual_seed(0)
    model = LatentDDPM(2, hidden=64, depth=2, timesteps=200)
    history = model.fit(z, None, epochs=60, batch_size=64, lr=2e-3, seed=0)
    return model, z, history


@pytest.fixture(scope="module")
def conditional() -> LatentDDPM:
    z, mode = two_modes()
    torch.manual_seed(0)
    model = LatentDDPM(2, cond_dim=2, hidden=64, depth=2, timesteps=200)
    model.fit(z, F.one_hot(mode, 2).float(), epochs=60, batch_size=64, lr=2e-3, seed=0)
    return model


# ---------------------------------------------------------------- schedule and forward process

def test_schedule_and_alpha_bar_match_the_product_formula():
    T, b0, b1 = 10, 1e-3, 0.2
    betas = linear_beta_schedule(T, b0, b1)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    expected_betas = [b0 + (b1 - b0) * i / (T - 1) for i in range(T)]
    assert betas.tolist() == pytest.approx(expected_betas, rel=1e-12)

    m = LatentDDPM(3, timesteps=T, beta_start=b0, beta_end=b1)
    for t in range(T):
        prod = 1.0
        for s in range(t + 1):
            prod *= 1.0 - expected_betas[s]
        assert float(m.alpha_bar[t]) == pytest.approx(prod, rel=1e-6)
        assert float(m.alphas[t]) == pytest.approx(1.0 - expected_betas[t], rel=1e-6)
        prev = 1.0 if t == 0 else float(m.alpha_bar[t - 1])
        assert float(m.alpha_bar_prev[t]) == pytest.approx(prev, rel=1e-6)


def test_sqrt_linear_schedule_is_latent_diffusions_linear():
    """D2NWG's schedule (make_beta_schedule("linear") in its stage2/modules/util.py, linear_start
    0.0015, linear_end 0.0155, 1024 steps): the square roots of the betas are evenly spaced."""
    T, b0, b1 = 1024, 0.0015, 0.0155
    betas = sqrt_linear_beta_schedule(T)
    expected = [(math.sqrt(b0) + t / (T - 1) * (math.sqrt(b1) - math.sqrt(b0))) ** 2 for t in range(T)]
    assert betas.dtype == torch.float64 and betas.tolist() == pytest.approx(expected, rel=1e-12)
    m = LatentDDPM(3, timesteps=T, schedule="sqrt_linear")
    assert (m.beta_start, m.beta_end) == (b0, b1)
    assert m.betas.tolist() == pytest.approx(expected, rel=1e-6)
    assert float(m.alpha_bar[-1]) == pytest.approx(math.prod(1 - b for b in expected), rel=1e-4)
    # the linear schedule stays Ho et al.'s default
    assert LatentDDPM(3, timesteps=10).betas.tolist() == pytest.approx(linear_beta_schedule(10).tolist())
    with pytest.raises(SpecError, match="schedule must be one of linear, sqrt_linear"):
        LatentDDPM(3, schedule="cosine")


def test_fit_trains_a_learned_condition_with_the_diffusion_loss():
    """`condition_params` are optimized by the denoising loss itself (D2NWG's cond_stage_trainable):
    one full-batch AdamW step moves every parameter by about lr against the sign of d loss / d param,
    with the loss replayed here from the same seeded draws."""
    z = torch.randn(8, 2, generator=gen(0))
    feats = torch.randn(8, 3, generator=gen(1))

    def build():
        torch.manual_seed(0)
        m = LatentDDPM(2, cond_dim=2, hidden=16, depth=1, timesteps=50)
        torch.nn.init.normal_(m.out.weight, std=0.3)   # it starts at zero: no gradient would reach cond
        torch.manual_seed(1)
        return m, torch.nn.Linear(3, 2)

    m, enc = build()
    before = [p.detach().clone() for p in enc.parameters()]
    lr = 1e-4
    m.fit(z, epochs=1, batch_size=8, lr=lr, seed=3, condition=lambda idx, g: enc(feats[idx]),
          condition_params=list(enc.parameters()))
    after = [p.detach() for p in enc.parameters()]

    ref, ref_enc = build()
    ref.set_normalization(z)
    g = torch.Generator().manual_seed(3)
    idx = torch.randperm(8, generator=g)
    loss = ref.loss(z[idx], ref_enc(feats[idx]), generator=g)
    grads = torch.autograd.grad(loss, list(ref_enc.parameters()))
    for b, a, gr in zip(before, after, grads):
        step = (a - b) / lr
        moved = gr.abs() > 1e-6
        assert moved.any()
        assert torch.allclose(step[moved], -torch.sign(gr[moved]), atol=0.05)
    # without condition_params the encoder stays as it was
    m2, enc2 = build()
    frozen = [p.detach().clone() for p in enc2.parameters()]
    m2.fit(z, epochs=2, batch_size=8, seed=3, condition=lambda idx, g: enc2(feats[idx]).detach())
    assert all(torch.equal(a, b) for a, b in zip(frozen, enc2.parameters()))
    with pytest.raises(InputError, match="either cond or condition"):
        m2.fit(z, feats[:, :2], condition=lambda idx, g: feats[idx, :2])


def test_q_sample_written_out():
    m = LatentDDPM(3, timesteps=50)
    z0, eps = torch.randn(4, 3, generator=gen(0)), torch.randn(4, 3, generator=gen(1))
    t = torch.tensor([0, 7, 30, 49])
    out = m.q_sample(z0, t, eps)
    for i in range(4):
        ab = float(m.alpha_bar[t[i]])
        assert torch.allclose(out[i], math.sqrt(ab) * z0[i] + math.sqrt(1 - ab) * eps[i], atol=1e-6)


def test_loss_is_the_eps_mse_with_draws_from_the_generator():
    torch.manual_seed(0)
    m = LatentDDPM(3, cond_dim=2, hidden=16, depth=1, timesteps=40)
    torch.nn.init.normal_(m.out.weight, std=0.1)          # not the zero start: eps_hat != 0
    z0 = 5.0 + 3.0 * torch.randn(6, 3, generator=gen(2))
    cond = torch.randn(6, 2, generator=gen(3))
    m.set_normalization(z0)
    loss = m.loss(z0, cond, generator=gen(7)).detach()

    g = gen(7)                                             # the same draws, in the same order
    t = torch.randint(0, 40, (6,), generator=g)
    eps = torch.randn(6, 3, generator=g)
    zn = (z0 - z0.mean(0)) / z0.std(0, unbiased=False)
    ab = m.alpha_bar[t][:, None]
    with torch.no_grad():
        expected = ((m(ab.sqrt() * zn + (1 - ab).sqrt() * eps, t, cond) - eps) ** 2).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert m.loss(z0, cond, generator=gen(7)).item() == pytest.approx(float(loss), rel=1e-6)


def test_normalization_stats_and_round_trip():
    m = LatentDDPM(3)
    z = torch.stack([torch.linspace(-1, 1, 9) * 100 + 50, torch.linspace(0, 1, 9), torch.full((9,), 4.0)], 1)
    m.set_normalization(z)
    assert torch.allclose(m.z_shift, z.mean(0))
    assert torch.allclose(m.z_scale[:2], z[:, :2].std(0, unbiased=False))
    assert float(m.z_scale[2]) == 1.0                   # a constant dimension is not blown up
    assert torch.allclose(m.denormalize(m.normalize(z)), z, atol=1e-4)


# ---------------------------------------------------------------- sampling

def test_untrained_ddim_is_the_written_out_update():
    # the output layer starts at zero, so eps_hat = 0 and DDIM maps x_T to x_T / sqrt(ab_{T-1})
    m = LatentDDPM(4, timesteps=100)
    m.set_normalization(torch.randn(20, 4, generator=gen(0)) * 3 + 1)
    out = m.sample(5, steps=7, generator=gen(11))
    x_t = torch.randn(5, 4, generator=gen(11))
    expected = x_t / m.alpha_bar[99].sqrt() * m.z_scale + m.z_shift
    assert torch.allclose(out, expected, atol=1e-4)


def test_ddpm_and_ddim_chains_written_out():
    torch.manual_seed(0)
    T = 7
    m = LatentDDPM(3, cond_dim=1, hidden=16, depth=1, timesteps=T, beta_start=0.05, beta_end=0.3)
    torch.nn.init.normal_(m.out.weight, std=0.5)            # a denoiser that is not zero
    cond = torch.tensor([0.7])
    b, a, ab = m.betas.double(), m.alphas.double(), m.alpha_bar.double()

    def eps_hat(x, t):
        with torch.no_grad():
            return m(x.float(), torch.full((4,), t), cond.expand(4, 1)).double()

    g = gen(5)                                               # ancestral DDPM, posterior variance
    x = torch.randn(4, 3, generator=g).double()
    for t in reversed(range(T)):
        x = (x - b[t] / (1 - ab[t]).sqrt() * eps_hat(x, t)) / a[t].sqrt()
        if t > 0:
            x = x + (b[t] * (1 - ab[t - 1]) / (1 - ab[t])).sqrt() * torch.randn(4, 3, generator=g)
    got = m.sample(4, cond, method="ddpm", generator=gen(5))
    assert torch.allclose(got.double(), x, atol=1e-4)

    eta, ts = 0.5, [6, 3, 0]                                 # DDIM over 3 of the 7 steps
    g = gen(6)
    x = torch.randn(4, 3, generator=g).double()
    for i, t in enumerate(ts):
        prev = ab[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        e = eps_hat(x, t)
        x0 = (x - (1 - ab[t]).sqrt() * e) / ab[t].sqrt()
        sigma = eta * ((1 - prev) / (1 - ab[t]) * (1 - ab[t] / prev)).sqrt()
        x = prev.sqrt() * x0 + (1 - prev - sigma**2).sqrt() * e
        if i + 1 < len(ts):
            x = x + sigma * torch.randn(4, 3, generator=g)
    got = m.sample(4, cond, steps=3, eta=eta, generator=gen(6))
    assert torch.allclose(got.double(), x, atol=1e-4)


def test_fit_reduces_the_loss(unconditional):
    _, _, history = unconditional
    assert len(history) == 60
    assert history[0] > 0.8                               # zero-initialised head: loss starts ~1
    assert sum(history[-5:]) / 5 < 0.5 * history[0]


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_unconditional_samples_match_the_data(unconditional, method):
    model, z, _ = unconditional
    s = model.sample(1000, steps=50, generator=gen(0), method=method)
    assert s.shape == (1000, 2)
    assert torch.allclose(s.mean(0), z.mean(0), atol=0.5)
    assert torch.allclose(s.std(0), z.std(0), rtol=0.25)
    # both modes are populated, and most samples sit on one of them
    assert near(s, 0) > 0.3 and near(s, 1) > 0.3
    assert near(s, 0) + near(s, 1) > 0.8


@pytest.mark.parametrize("mode", [0, 1])
def test_conditional_samples_land_on_the_chosen_mode(conditional, mode):
    s = conditional.sample(400, torch.eye(2)[mode], steps=50, generator=gen(0))
    assert s.shape == (400, 2)
    assert (s.mean(0) - CENTERS[mode]).norm() < 0.8
    assert near(s, mode) > 0.7
    assert near(s, 1 - mode) < 0.1


def test_sampling_is_seeded_and_takes_per_sample_conditions(conditional):
    cond = torch.eye(2)
    a = conditional.sample(8, cond[0], steps=20, generator=gen(3))
    assert torch.equal(a, conditional.sample(8, cond[0], steps=20, generator=gen(3)))
    assert not torch.allclose(a, conditional.sample(8, cond[0], steps=20, generator=gen(4)))
    # eta > 0 adds fresh noise at each step: still seeded, but another path
    b = conditional.sample(8, cond[0], steps=20, eta=1.0, generator=gen(3))
    assert torch.equal(b, conditional.sample(8, cond[0], steps=20, eta=1.0, generator=gen(3)))
    assert not torch.allclose(a, b)
    d = conditional.sample(8, cond[0], generator=gen(3), method="ddpm")
    assert torch.equal(d, conditional.sample(8, cond[0], generator=gen(3), method="ddpm"))
    # one condition per row == the shared condition, row for row
    per_row = conditional.sample(8, cond[0].expand(8, 2), steps=20, generator=gen(3))
    assert torch.allclose(per_row, a)
    mixed = conditional.sample(2, cond, steps=20, generator=gen(3))
    assert mixed.shape == (2, 2)
    assert not torch.is_grad_enabled() or not mixed.requires_grad


def test_classifier_free_guidance_runs_with_cond_drop():
    z, mode = two_modes(128)
    torch.manual_seed(0)
    m = LatentDDPM(2, cond_dim=2, hidden=32, depth=1, timesteps=50, cond_drop=0.2)
    m.fit(z, F.one_hot(mode, 2).float(), epochs=3, seed=0)
    plain = m.sample(4, torch.eye(2)[0], steps=10, generator=gen(0))
    guided = m.sample(4, torch.eye(2)[0], steps=10, generator=gen(0), guidance=3.0)
    assert guided.shape == (4, 2) and not torch.allclose(plain, guided)


@pytest.mark.parametrize("call, err, match", [
    (lambda m: m.loss(torch.randn(4, 3), torch.randn(4, 2)), InputError, r"shape \(N, 2\)"),
    (lambda m: m.loss(torch.randn(4, 2), None), InputError, "conditional"),
    (lambda m: m.loss(torch.randn(4, 2), torch.randn(3, 2)), InputError, "cond must have shape"),
    (lambda m: m.sample(2, torch.randn(2), method="euler"), SpecError, "ddim"),
    (lambda m: m.sample(2, torch.randn(2), steps=0), SpecError, "steps"),
    (lambda m: m.sample(2, torch.randn(2), steps=51), SpecError, "steps"),
    (lambda m: LatentDDPM(0), SpecError, "latent_dim"),
])
def test_diffusion_errors(call, err, match):
    with pytest.raises(err, match=match):
        call(LatentDDPM(2, cond_dim=2, hidden=8, depth=1, timesteps=50))


def test_unconditional_model_refuses_a_condition():
    with pytest.raises(InputError, match="unconditional"):
        LatentDDPM(2, hidden=8, depth=1, timesteps=60).sample(2, torch.ones(3))


# ---------------------------------------------------------------- dataset encoder

def test_encoder_shapes_and_batch_agree():
    enc = DatasetEncoder(5, hidden=16, out_dim=7)
    x = torch.randn(3, 4, 6, 5, generator=gen(0))           # B=3 sets, 4 classes, 6 examples
    out = enc(x)
    assert out.shape == (3, 7) and enc(x[1]).shape == (7,)
    for b in range(3):
        assert torch.allclose(out[b], enc(x[b]), atol=1e-6)


def test_encoder_is_invariant_to_example_and_class_order():
    enc = DatasetEncoder(5, hidden=16, out_dim=7)
    x = torch.randn(4, 6, 5, generator=gen(0))
    ref = enc(x)
    g = gen(1)
    within = torch.stack([x[c, torch.randperm(6, generator=g)] for c in range(4)])
    assert not torch.equal(within, x)
    assert torch.allclose(enc(within), ref, atol=1e-5)
    across = x[torch.tensor([2, 0, 3, 1])]
    assert torch.allclose(enc(across), ref, atol=1e-5)
    # but not to moving one example into another class
    moved = x.clone()
    moved[0, 0], moved[1, 0] = x[1, 0], x[0, 0]
    assert not torch.allclose(enc(moved), ref, atol=1e-4)


def test_encoder_seed_fixes_the_random_map():
    x = torch.randn(4, 6, 5, generator=gen(0))
    a, b, c = (DatasetEncoder(5, seed=s)(x) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_distinct_tasks_get_distinct_embeddings():
    enc = DatasetEncoder(64)
    digits, rotated = load_task("digits"), load_task("digits:rotate=90")
    e = embed_task(enc, digits, k=16, seed=0)
    assert e.shape == (32,) and not e.requires_grad
    assert torch.equal(e, embed_task(enc, digits.train, k=16, seed=0))   # a TaskData uses .train
    resampled = embed_task(enc, digits, k=16, seed=1)
    gap = (e - embed_task(enc, rotated, k=16, seed=0)).norm()
    # another task is much farther away than another draw of the same task
    assert gap > 3 * (e - resampled).norm()
    assert embed_task(enc, digits, grad=True).requires_grad


def test_embed_task_vector_inputs_and_class_subsets():
    teacher = load_task("teacher")
    assert embed_task(DatasetEncoder(16), teacher, k=4).shape == (32,)
    # a class-subset task is embedded over the classes it has
    assert embed_task(DatasetEncoder(64), load_task("digits:classes=0-4"), k=4).shape == (32,)


def test_class_samples_are_per_class_seeded_and_flattened():
    x = torch.arange(10 * 4, dtype=torch.float32).reshape(10, 1, 2, 2)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 0, 2])
    s = class_samples(x, y, k=3, num_classes=3, seed=0)
    assert s.shape == (3, 3, 4)
    flat = x.reshape(10, 4)
    for c in range(3):
        members = {tuple(r.tolist()) for r in flat[y == c]}
        rows = [tuple(r.tolist()) for r in s[c]]
        assert set(rows) <= members and len(set(rows)) == 3       # k <= size: no repeats
    assert torch.equal(s, class_samples(x, y, k=3, num_classes=3, seed=0))
    assert not torch.equal(s, class_samples(x, y, k=3, num_classes=3, seed=5))
    # class 1 has 3 examples: k=8 samples them with replacement
    big = class_samples(x, y, k=8, num_classes=3, seed=0)
    assert big.shape == (3, 8, 4)
    assert {tuple(r.tolist()) for r in big[1]} <= {tuple(r.tolist()) for r in flat[y == 1]}


def test_support_sets_are_fresh_distinct_per_class_and_seeded():
    """D2NWG conditions every training row and every sample on its own draw of 5 examples per class."""
    x = torch.arange(12 * 4, dtype=torch.float32).reshape(12, 1, 2, 2)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 0, 2, 0, 1])
    sets = SupportSets(Split(x, y))
    assert sets.classes == [0, 1, 2]
    s = sets.draw(200, k=3, generator=gen(0))
    assert s.shape == (200, 3, 3, 4)
    flat = x.reshape(12, 4)
    for c in range(3):
        members = {tuple(r.tolist()) for r in flat[y == c]}
        for b in range(0, 200, 37):
            rows = [tuple(r.tolist()) for r in s[b, c]]
            assert set(rows) <= members and len(set(rows)) == 3      # k distinct examples of class c
    # fresh: the 200 draws of class 0 (5 examples, 3 each) are not all the same subset, and every
    # example turns up about 3/5 of the time
    firsts = {tuple(sorted(r[0] for r in s[b, 0].tolist())) for b in range(200)}
    assert len(firsts) == math.comb(5, 3)
    counts = torch.stack([(s[:, 0, :, 0] == flat[i, 0]).any(1) for i in torch.nonzero(y == 0).flatten()])
    assert counts.float().mean(1).tolist() == pytest.approx([0.6] * 5, abs=0.12)
    assert torch.equal(s, sets.draw(200, k=3, generator=gen(0)))
    # class 1 has 4 examples: k=5 draws every class with replacement, still within the class
    big = sets.draw(3, k=5, generator=gen(1))
    assert big.shape == (3, 3, 5, 4)
    assert {tuple(r.tolist()) for r in big[:, 1].reshape(-1, 4)} <= {tuple(r.tolist()) for r in flat[y == 1]}
    with pytest.raises(SpecError, match="k must be"):
        sets.draw(1, k=0)


@pytest.mark.parametrize("y, k, num_classes, err, match", [
    (torch.tensor([0, 1, 0, 1]), 2, 3, InputError, "no example of class 2"),
    (torch.tensor([0, 0, 0, 2]), 2, 4, InputError, r"no example of class 1 \(nor of 3\)"),
    (torch.tensor([0, 1, 5, 1]), 2, 2, InputError, "label 5 is outside"),
    (torch.tensor([0, 1, 0]), 2, 2, InputError, "same N"),
    (torch.tensor([0, 1, 0, 1]), 0, 2, SpecError, "k must be"),
])
def test_class_samples_errors(y, k, num_classes, err, match):
    with pytest.raises(err, match=match):
        class_samples(torch.rand(4, 3), y, k=k, num_classes=num_classes)


def test_contrastive_loss_written_out():
    d = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 2.0]])
    w = torch.tensor([[2.0, 0.1], [0.5, 0.5], [-0.3, 1.0]])
    tau = 0.5
    dn = [r / r.norm() for r in d]
    wn = [r / r.norm() for r in w]
    sim = [[float(dn[i] @ wn[j]) / tau for j in range(3)] for i in range(3)]
    rows = -sum(sim[i][i] - math.log(sum(math.exp(sim[i][j]) for j in range(3))) for i in range(3)) / 3
    cols = -sum(sim[j][j] - math.log(sum(math.exp(sim[i][j]) for i in range(3))) for j in range(3)) / 3
    assert float(contrastive_loss(d, w, temperature=tau)) == pytest.approx((rows + cols) / 2, rel=1e-5)
    # matched pairs score lower than shuffled ones
    e = torch.randn(8, 4, generator=gen(0))
    assert contrastive_loss(e, e) < contrastive_loss(e, e.roll(1, 0))
    with pytest.raises(InputError, match="same shape"):
        contrastive_loss(d, w[:2])


def test_split_and_task_embedding_share_a_device_and_dtype():
    enc = DatasetEncoder(64).double()
    split = load_task("digits").val
    assert isinstance(split, Split)
    assert embed_task(enc, split, k=2).dtype == torch.float64

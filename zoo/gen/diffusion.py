"""A small conditional latent diffusion model (DDPM training, DDIM or DDPM sampling) for weight latents.

    ddpm = LatentDDPM(latent_dim=16, cond_dim=32)
    history = ddpm.fit(z, cond, epochs=300)                       # z (N, 16), cond (N, 32)
    z_new = ddpm.sample(8, cond[0], steps=50, generator=torch.Generator().manual_seed(0))

The diffusion stage of D2NWG ("Diffusion-Based Neural Network Weights Generation",
Soro et al., ICLR 2025): weights are first encoded into latents by a VAE, and a denoiser
conditioned on a dataset embedding learns the distribution of those latents. Here the
denoiser is an MLP on concat([z_t, time embedding, condition]) that predicts the noise
(Ho et al., 2020); sampling is DDIM (Song et al., 2021; deterministic at eta=0) over a
few evenly spaced steps, or the full ancestral DDPM chain. Classifier-free guidance
(Ho & Salimans, 2022) is available when the model is trained with `cond_drop > 0`: the
null condition is the zero vector.

Latents are standardised per dimension inside the model (`z_shift`, `z_scale`, set by
`fit(normalize=True)`), so the unit-variance noise schedule suits latents of any scale;
`loss`, `q_sample` and the denoiser work in that standardised space and `sample` maps
back. Every random draw (timesteps, noise, condition dropout, shuffling, sampling noise)
comes from the `torch.Generator` passed in, so a seed fixes the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from weightspace.errors import InputError, SpecError

TIME_EMBED_DIM = 64


def linear_beta_schedule(T: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> torch.Tensor:
    """The DDPM linear noise schedule: T betas from `beta_start` to `beta_end`, float64.

        betas = linear_beta_schedule(1000)
        alpha_bar = torch.cumprod(1 - betas, 0)          # what LatentDDPM keeps as a buffer
    """
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise SpecError(f"diffusion: timesteps must be an integer >= 1, got {T!r}")
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise SpecError(f"diffusion: need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def sqrt_linear_beta_schedule(T: int, beta_start: float = 1.5e-3, beta_end: float = 1.55e-2
                              ) -> torch.Tensor:
    """Latent diffusion's "linear" schedule: betas whose square roots are evenly spaced, float64.

        betas = sqrt_linear_beta_schedule(1024)      # D2NWG: linear_start 0.0015, linear_end 0.0155

    beta_t = (sqrt(beta_start) + t / (T - 1) (sqrt(beta_end) - sqrt(beta_start)))^2, as
    `make_beta_schedule("linear", ...)` in the D2NWG repository (stage2/modules/util.py,
    github:sorobedio/DNNWG, from latent diffusion) computes it; the defaults are that
    repository's stage2/configs/base_config.yaml.
    """
    linear_beta_schedule(T, beta_start, beta_end)                  # the same checks
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2


SCHEDULES = {"linear": linear_beta_schedule, "sqrt_linear": sqrt_linear_beta_schedule}


def timestep_embedding(t: torch.Tensor, dim: int = TIME_EMBED_DIM, max_period: float = 10000.0
                       ) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (B,) -> (B, dim): [sin(t f_i), cos(t f_i)]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
           ) -> torch.Tensor:
    # drawn on the generator's device, then moved: a CPU seed gives the same noise everywhere
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


class _ResBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(F.silu(self.fc1(F.silu(self.norm(h)))))


class LatentDDPM(nn.Module):
    """Conditional DDPM over vectors: an MLP denoiser on concat([z_t, emb(t), cond]) predicting eps.

        ddpm = LatentDDPM(2, cond_dim=2, hidden=128, depth=2, timesteps=200)
        ddpm.fit(z, onehot, epochs=100)                   # returns the per-epoch mean losses
        ddpm.sample(100, torch.tensor([1.0, 0.0]), steps=50, generator=g)   # (100, 2)

    Buffers: `betas`, `alphas`, `alpha_bar`, `alpha_bar_prev` (float32, computed in
    float64) and the latent standardisation `z_shift`, `z_scale`. `schedule` is "linear"
    (Ho et al.; betas 1e-4 to 0.02 unless given) or "sqrt_linear" (latent diffusion's and
    D2NWG's; betas 0.0015 to 0.0155 unless given). `cond_drop` is the probability, in
    training, of replacing a condition by the null (zero) condition, which enables
    `sample(..., guidance=w)`.
    """

    def __init__(self, latent_dim: int, cond_dim: int = 0, hidden: int = 256, depth: int = 3,
                 timesteps: int = 1000, beta_start: float | None = None, beta_end: float | None = None,
                 *, schedule: str = "linear", cond_drop: float = 0.0):
        super().__init__()
        if schedule not in SCHEDULES:
            raise SpecError(f"diffusion: schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        defaults = {"linear": (1e-4, 2e-2), "sqrt_linear": (1.5e-3, 1.55e-2)}[schedule]
        beta_start = defaults[0] if beta_start is None else beta_start
        beta_end = defaults[1] if beta_end is None else beta_end
        self.schedule, self.beta_start, self.beta_end = schedule, float(beta_start), float(beta_end)
        for name, value, lo in (("latent_dim", latent_dim, 1), ("cond_dim", cond_dim, 0),
                                ("hidden", hidden, 1), ("depth", depth, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise SpecError(f"diffusion: {name} must be an integer >= {lo}, got {value!r}")
        if not 0.0 <= cond_drop < 1.0:
            raise SpecError(f"diffusion: cond_drop must be in [0, 1), got {cond_drop!r}")
        self.latent_dim, self.cond_dim, self.timesteps = latent_dim, cond_dim, timesteps
        self.cond_drop = float(cond_drop)

        betas = SCHEDULES[schedule](timesteps, beta_start, beta_end)
        alphas = 1.0 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        for name, value in (("betas", betas), ("alphas", alphas), ("alpha_bar", alpha_bar),
                            ("alpha_bar_prev", alpha_bar_prev)):
            self.register_buffer(name, value.to(torch.float32))
        self.register_buffer("z_shift", torch.zeros(latent_dim))
        self.register_buffer("z_scale", torch.ones(latent_dim))

        self.inp = nn.Linear(latent_dim + TIME_EMBED_DIM + cond_dim, hidden)
        self.blocks = nn.ModuleList(_ResBlock(hidden) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, latent_dim)
        # start as "predict zero noise": the loss starts at 1 and early steps are tame
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    # ------------------------------------------------------------------ model

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Predicted noise for standardised noisy latents z_t (B, D) at integer steps t (B,)."""
        parts = [z_t, timestep_embedding(t).to(z_t.dtype)]
        if self.cond_dim:
            parts.append(cond if cond is not None else z_t.new_zeros(z_t.shape[0], self.cond_dim))
        h = self.inp(torch.cat(parts, dim=1))
        for block in self.blocks:
            h = block(h)
        return self.out(F.silu(self.out_norm(h)))

    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The forward process: sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) eps, per row."""
        ab = self.alpha_bar[t].to(z0.dtype)[:, None]
        return ab.sqrt() * z0 + (1.0 - ab).sqrt() * eps

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.z_shift) / self.z_scale

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.z_scale + self.z_shift

    def set_normalization(self, z: torch.Tensor) -> None:
        """Standardise latents per dimension with the mean and std of `z` (N, D)."""
        z = self._check_z(z).detach().to(self.z_shift)
        std = z.std(dim=0, unbiased=False)
        # a (nearly) constant dimension keeps scale 1 rather than being blown up
        self.z_shift.copy_(z.mean(dim=0))
        self.z_scale.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    # ------------------------------------------------------------------ checks

    def _check_z(self, z: torch.Tensor) -> torch.Tensor:
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[1] != self.latent_dim:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise InputError(f"diffusion: latents must have shape (N, {self.latent_dim}), got {got}")
        if not z.is_floating_point():
            raise InputError(f"diffusion: latents must be floating point, got {z.dtype}")
        return z

    def _check_cond(self, cond: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """`cond` as (n, cond_dim) on the model's device; None for an unconditional model."""
        if self.cond_dim == 0:
            if cond is not None and cond.numel():
                raise InputError("diffusion: this model is unconditional (cond_dim=0); pass cond=None")
            return None
        if cond is None:
            raise InputError(f"diffusion: this model is conditional (cond_dim={self.cond_dim}); "
                             f"pass cond of shape ({self.cond_dim},) or (N, {self.cond_dim})")
        if cond.dim() == 1:
            cond = cond[None, :].expand(n, -1)
        if cond.dim() != 2 or cond.shape != (n, self.cond_dim):
            raise InputError(f"diffusion: cond must have shape ({self.cond_dim},) or "
                             f"({n}, {self.cond_dim}), got {tuple(cond.shape)}")
        return cond.to(device=self.betas.device, dtype=self.betas.dtype)

    # ------------------------------------------------------------------ training

    def loss(self, z0: torch.Tensor, cond: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """DDPM loss: MSE between eps and the predicted eps at t ~ U{0..T-1}, eps ~ N(0, I).

        `z0` (B, D) are raw latents (standardised here with `z_shift`/`z_scale`); `cond`
        (B, C). With `cond_drop > 0` each row's condition is zeroed with that probability.
        """
        z0 = self.normalize(self._check_z(z0).to(self.betas))
        b, device = z0.shape[0], z0.device
        cond = self._check_cond(cond, b)
        gdev = generator.device if generator is not None else device
        t = torch.randint(0, self.timesteps, (b,), generator=generator, device=gdev).to(device)
        eps = _randn(tuple(z0.shape), generator, device)
        if cond is not None and self.cond_drop > 0:
            keep = torch.rand((b, 1), generator=generator, device=gdev).to(device) >= self.cond_drop
            cond = cond * keep.to(cond.dtype)
        return F.mse_loss(self(self.q_sample(z0, t, eps), t, cond), eps)

    def fit(self, z: torch.Tensor, cond: torch.Tensor | None = None, *, epochs: int = 300,
            batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
            normalize: bool = True, progress: bool = False,
            condition: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
            condition_params: Iterable[nn.Parameter] = ()) -> list[float]:
        """Train with AdamW on latents `z` (N, D) and conditions `cond` (N, C); per-epoch mean losses.

            ddpm.fit(z, cond, epochs=300)                                  # fixed conditions
            ddpm.fit(z, condition=lambda idx, g: enc(sets(idx, g)),        # a learned condition
                     condition_params=enc.parameters())

        `condition` (instead of `cond`) computes the (B, C) conditions of the rows `idx`
        of every batch, with gradients, from the same generator; `condition_params` are
        optimized together with the denoiser by the same loss. That is D2NWG's
        `cond_stage_trainable: True` (`LatentDiffusion.configure_optimizers` in
        stage2/models/ddpm.py of github:sorobedio/DNNWG adds the condition encoder's
        parameters to the denoiser's). `normalize` first sets the latent standardisation
        from `z`. Shuffling and all noise come from a generator seeded with `seed`; the
        initial weights come from torch's global RNG when the model was built.
        """
        z = self._check_z(z)
        if condition is not None and cond is not None:
            raise InputError("diffusion: pass either cond or condition, not both")
        cond = None if condition is not None else self._check_cond(cond, z.shape[0])
        if epochs < 1 or batch_size < 1:
            raise SpecError(f"diffusion: epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
        if normalize:
            self.set_normalization(z)
        device = self.betas.device
        z = z.detach().to(device=device, dtype=self.betas.dtype)
        g = torch.Generator().manual_seed(seed)
        params = [*self.parameters(), *condition_params]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        history: list[float] = []
        epochs_iter = range(epochs)
        if progress:
            from tqdm.auto import tqdm

            epochs_iter = tqdm(epochs_iter, desc="diffusion", unit="epoch")
        for _ in epochs_iter:
            perm = torch.randperm(z.shape[0], generator=g).to(device)
            total, count = 0.0, 0
            for start in range(0, z.shape[0], batch_size):
                idx = perm[start:start + batch_size]
                c = condition(idx, g) if condition is not None else None if cond is None else cond[idx]
                loss = self.loss(z[idx], c, generator=g)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                total += loss.item() * len(idx)
                count += len(idx)
            history.append(total / count)
            if progress:
                epochs_iter.set_postfix(loss=f"{history[-1]:.4f}")
        return history

    # ------------------------------------------------------------------ sampling

    def _eps(self, x: torch.Tensor, t: int, cond: torch.Tensor | None, guidance: float
             ) -> torch.Tensor:
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = self(x, tt, cond)
        if cond is not None and guidance != 1.0:
            eps_null = self(x, tt, torch.zeros_like(cond))
            eps = eps_null + guidance * (eps - eps_null)
        return eps

    @torch.no_grad()
    def sample(self, n: int, cond: torch.Tensor | None = None, *, steps: int = 50,
               eta: float = 0.0, generator: torch.Generator | None = None,
               method: str = "ddim", guidance: float = 1.0) -> torch.Tensor:
        """Draw n latents (n, D), in the original (de-standardised) scale.

        `method="ddim"`: `steps` evenly spaced timesteps from T-1 down to 0; `eta=0` is
        deterministic given the initial noise, `eta=1` is DDPM-like. `method="ddpm"`: the
        full ancestral chain over all T steps with the posterior variance (`steps` and
        `eta` unused). `cond` is one condition (C,) for all samples or one per sample
        (n, C). `guidance` w != 1 mixes eps_null + w (eps_cond - eps_null) (classifier-free
        guidance; meaningful for a model trained with cond_drop > 0).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise SpecError(f"diffusion: n must be an integer >= 1, got {n!r}")
        if method not in ("ddim", "ddpm"):
            raise SpecError(f"diffusion: method must be 'ddim' or 'ddpm', got {method!r}")
        if method == "ddim" and not 1 <= steps <= self.timesteps:
            raise SpecError(f"diffusion: steps must be in 1..{self.timesteps}, got {steps!r}")
        if eta < 0:
            raise SpecError(f"diffusion: eta must be >= 0, got {eta!r}")
        cond = self._check_cond(cond, n)
        x = _randn((n, self.latent_dim), generator, self.betas.device)
        if method == "ddpm":
            x = self._ddpm_loop(x, cond, guidance, generator)
        else:
            x = self._ddim_loop(x, cond, guidance, steps, eta, generator)
        return self.denormalize(x)

    def _ddim_loop(self, x: torch.Tensor, cond: torch.Tensor | None, guidance: float,
                   steps: int, eta: float, generator: torch.Generator | None) -> torch.Tensor:
        # spacing (T-1)/(steps-1) >= 1, so rounding keeps the timesteps distinct
        ts = torch.linspace(self.timesteps - 1, 0, steps).round().long().tolist()
        for i, t in enumerate(ts):
            ab = self.alpha_bar[t]
            ab_prev = self.alpha_bar[ts[i + 1]] if i + 1 < len(ts) else torch.ones_like(ab)
            eps = self._eps(x, t, cond, guidance)
            x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
            sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).clamp_min(0).sqrt()
            x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).clamp_min(0).sqrt() * eps
            if eta > 0 and i + 1 < len(ts):
                x = x + sigma * _randn(tuple(x.shape), generator, x.device)
        return x

    def _ddpm_loop(self, x: torch.Tensor, cond: torch.Tensor | None, guidance: float,
                   generator: torch.Generator | None) -> torch.Tensor:
        for t in range(self.timesteps - 1, -1, -1):
            beta, alpha, ab = self.betas[t], self.alphas[t], self.alpha_bar[t]
            eps = self._eps(x, t, cond, guidance)
            x = (x - beta / (1 - ab).sqrt() * eps) / alpha.sqrt()
            if t > 0:
                var = beta * (1 - self.alpha_bar_prev[t]) / (1 - ab)
                x = x + var.sqrt() * _randn(tuple(x.shape), generator, x.device)
        return x

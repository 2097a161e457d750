"""Sample latents near the zoo's best models: the hyper-representation sampler, and a per-dimension KDE.

    kde = KDESampler(fraction=0.3).fit(latents, val_acc)    # latents (N, D), one score per model
    z = kde.sample(20, seed=0)                               # (20, D)

Both samplers keep the top `fraction` of the zoo by validation accuracy (the
"anchors") and fit a 1-D Gaussian kernel density to every latent dimension
(Schürholt et al., "Hyper-Representations as Generative Models: Sampling Unseen
Neural Network Weights", NeurIPS 2022). They differ in how they draw:

- "anchor" (the default) is the authors' sampler, `sample` in
  src/ghrp/sampling_auxiliaries/sample_finetune_auxiliaries.py of
  github:HSG-AIML/NeurIPS_2022-Generative_Hyper_Representations: one
  `KernelDensity(kernel="gaussian", bandwidth=0.002)` per dimension, each drawn
  with `sample(n, random_state=42)`. Because every dimension is drawn from a fresh
  generator with the same seed, every dimension picks the same anchor and the same
  standard-normal draw: sample i is anchor a_i plus h * g_i in every dimension, so
  it sits next to one anchor and keeps the correlation between dimensions. We draw
  exactly that (u = uniform(n), a_i = anchors[floor(u_i * n_anchors)], g = normal(n)
  from one `RandomState(seed)`), and do not clip, as they do not.
- "independent" draws every dimension on its own: a different anchor per dimension,
  with a wide bandwidth (Scott's rule), clipped to the anchors' range. A sample is a
  mix of many anchors; the dimensions' correlation is lost. This was our sampler
  before; it is kept as an option.

Bandwidth: a fixed float (default 0.002 for "anchor", the authors' value, in latent
units), or Scott's rule for a Gaussian kernel in one dimension, h = 1.06 * std *
n^(-1/5), per dimension (the default for "independent"; sklearn's "scott" is
n^(-1/5) alone, which assumes standardized data; latent dimensions are not), or
Silverman's rule, 0.9 * min(std, IQR / 1.34) * n^(-1/5). A dimension with no spread
gets a tiny bandwidth.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from weightspace.errors import InputError

MIN_BANDWIDTH = 1e-6
KDE_SAMPLERS = ("anchor", "independent")
AUTHORS_BANDWIDTH = 0.002     # KernelDensity(kernel="gaussian", bandwidth=0.002) in the authors' `sample`


def bandwidths(x: np.ndarray, rule: str | float = "scott") -> np.ndarray:
    """Per-column bandwidths of (n, D) data by Scott's or Silverman's rule (or one fixed value)."""
    n = x.shape[0]
    if isinstance(rule, (int, float)) and not isinstance(rule, bool):
        if rule <= 0:
            raise InputError(f"bandwidth must be positive, got {rule}")
        return np.full(x.shape[1], float(rule))
    std = x.std(axis=0, ddof=1) if n > 1 else np.zeros(x.shape[1])
    factor = n ** (-1.0 / 5.0)
    if rule == "scott":
        h = 1.06 * std * factor
    elif rule == "silverman":
        iqr = np.subtract(*np.percentile(x, [75, 25], axis=0))
        spread = np.where(iqr > 0, np.minimum(std, iqr / 1.34), std)
        h = 0.9 * spread * factor
    else:
        raise InputError(f"bandwidth: unknown rule {rule!r}; use scott, silverman or a number")
    return np.maximum(h, MIN_BANDWIDTH)


class KDESampler:
    """Gaussian KDEs over the latents of the zoo's top models, drawn near one anchor or per dimension."""

    def __init__(self, fraction: float = 0.3, bandwidth: str | float | None = None, sampler: str = "anchor"):
        if not 0 < fraction <= 1:
            raise InputError(f"fraction must be in (0, 1], got {fraction}")
        if sampler not in KDE_SAMPLERS:
            raise InputError(f"KDE sampler must be one of {', '.join(KDE_SAMPLERS)}, got {sampler!r}")
        self.fraction = fraction
        self.sampler = sampler
        self.bandwidth = bandwidth if bandwidth is not None else (
            AUTHORS_BANDWIDTH if sampler == "anchor" else "scott")
        self.anchors: np.ndarray | None = None      # (n_anchors, D)
        self.h: np.ndarray | None = None            # (D,)

    def fit(self, latents: torch.Tensor | np.ndarray, scores: torch.Tensor | np.ndarray | list[float]
            ) -> KDESampler:
        """Keep the top `fraction` of rows by `scores` (at least one), in their order in `latents` (as
        the authors' `z_full[idx_best]` keeps them: which anchor a draw picks depends on it), and fit
        every dimension."""
        z = np.asarray(latents, dtype=np.float64)
        s = np.asarray(scores, dtype=np.float64)
        if z.ndim != 2 or z.shape[0] == 0:
            raise InputError(f"KDE needs (N, D) latents of at least one model, got shape {list(z.shape)}")
        if s.shape != (z.shape[0],):
            raise InputError(f"KDE needs one score per model: {z.shape[0]} latents, {s.size} scores")
        s = np.where(np.isfinite(s), s, -np.inf)
        k = max(1, math.ceil(self.fraction * z.shape[0]))
        top = np.sort(np.argsort(-s, kind="stable")[:k])
        return self.fit_anchors(z[top])

    def fit_anchors(self, anchors: np.ndarray) -> KDESampler:
        """Fit on these rows as they are (used when loading a saved sampler)."""
        self.anchors = np.asarray(anchors, dtype=np.float64)
        self.h = bandwidths(self.anchors, self.bandwidth)
        return self

    @property
    def dim(self) -> int:
        return 0 if self.anchors is None else self.anchors.shape[1]

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """(n, D) float32 latents (seeded); see the module docstring for the two samplers."""
        if self.anchors is None:
            raise InputError("the KDE sampler is not fitted")
        if self.sampler == "anchor":
            # sklearn's KernelDensity.sample, reseeded for every dimension: the same u and the same
            # normal draws in every column
            rng = np.random.RandomState(seed)
            u = rng.uniform(0, 1, size=n)
            i = (u * self.anchors.shape[0]).astype(np.int64)
            g = rng.normal(size=n)
            z = self.anchors[i] + g[:, None] * self.h[None, :]
        else:
            rng = np.random.RandomState(seed)
            cols = []
            for d, h in enumerate(self.h):             # KernelDensity.sample per dimension, one stream
                u = rng.uniform(0, 1, size=n)
                i = (u * self.anchors.shape[0]).astype(np.int64)
                cols.append(rng.normal(self.anchors[i, d], h))
            z = np.clip(np.stack(cols, axis=1), self.anchors.min(axis=0), self.anchors.max(axis=0))
        return torch.from_numpy(z).float()

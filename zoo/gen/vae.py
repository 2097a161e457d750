"""A VAE over weight chunks: the first stage of D2NWG and of hyper-representation sampling.

    vae = ChunkVAE(n_chunks=chunker.n_chunks, chunk=chunker.chunk, latent_dim=16)
    history = vae.fit(tokens, epochs=300, lr=1e-3, seed=0)      # tokens (N_models, n_chunks, chunk)
    z = vae.encode_models(tokens)        # (N_models, n_chunks * latent_dim), the posterior means
    tokens_hat = vae.decode_models(z)    # (N_models, n_chunks, chunk)

Every chunk is encoded on its own by one MLP that also sees a learned
embedding of the chunk's position, so one small network serves every layer;
a model's latent is the concatenation of its chunks' latents (D2NWG, Soro et
al., ICLR 2025, encodes layer-wise chunks the same way).

Loss per chunk: mean squared reconstruction error (weighted so that every tensor
counts as the square root of its size and padding not at all: `tensor_weights`)
+ `kl_weight` x KL(q(z|x) ||
N(0, I)) averaged over latent dims. The KL weight is small (1e-4): the
decoder must reproduce weights closely enough that the models still work,
and the diffusion model or the KDE, not the prior, models the latent
distribution; the KL term only keeps the latent scale bounded.

Noise augmentation, as p-diff (Wang et al., 2024) found necessary for
generated weights that work, not just reconstructed ones: during training
Gaussian noise of std `input_noise` (0.001, in normalized weight units,
where every tensor has unit std over the zoo) is added to the chunks the
encoder sees, and noise of std `latent_noise` (0.1) to the latent sample the
decoder sees. The decoder thus learns to map a neighbourhood of each
latent, not a point, to working weights, which is what sampling needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from einops import rearrange
from torch import nn

from weightspace.errors import InputError

if TYPE_CHECKING:
    from weightspace.zoo.gen.chunking import WeightChunker

DEFAULT_KL_WEIGHT = 1e-4
DEFAULT_INPUT_NOISE = 1e-3
DEFAULT_LATENT_NOISE = 0.1


def tensor_weights(chunker: WeightChunker) -> torch.Tensor:
    """(n_chunks, chunk) loss weights: 0 on padding, and 1 / sqrt(numel) per value of a tensor,
    scaled to mean 1 over the real values.

    With plain MSE a 512-value weight matrix outweighs its 8-value bias 64 to 1 and
    the VAE reconstructs biases worst (8 % relative error vs 2 % on a 12-model zoo);
    with these weights every tensor counts as the square root of its size and the
    relative errors even out (2.5-3.6 %), at the same cost."""
    mask = chunker.mask().float()
    size = dict(zip(chunker.names, chunker.numels))
    w = torch.stack([mask[i] / size[n] ** 0.5 for i, n in enumerate(chunker.chunk_owner())])
    return w * (mask.sum() / w.sum())


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class ChunkVAE(nn.Module):
    """MLP encoder/decoder on chunk vectors, with a chunk-position embedding."""

    def __init__(self, n_chunks: int, chunk: int, latent_dim: int = 16, hidden: int = 256,
                 depth: int = 2, pos_dim: int = 16, kl_weight: float = DEFAULT_KL_WEIGHT,
                 input_noise: float = DEFAULT_INPUT_NOISE, latent_noise: float = DEFAULT_LATENT_NOISE):
        super().__init__()
        self.n_chunks, self.chunk, self.latent_dim = n_chunks, chunk, latent_dim
        self.hidden, self.depth, self.pos_dim = hidden, depth, pos_dim
        self.kl_weight, self.input_noise, self.latent_noise = kl_weight, input_noise, latent_noise
        self.pos = nn.Embedding(n_chunks, pos_dim)
        self.encoder = _mlp([chunk + pos_dim] + [hidden] * depth + [2 * latent_dim])
        self.decoder = _mlp([latent_dim + pos_dim] + [hidden] * depth + [chunk])

    def settings(self) -> dict:
        """Constructor arguments (stored in generator.json to rebuild the module)."""
        return {"n_chunks": self.n_chunks, "chunk": self.chunk, "latent_dim": self.latent_dim,
                "hidden": self.hidden, "depth": self.depth, "pos_dim": self.pos_dim,
                "kl_weight": self.kl_weight, "input_noise": self.input_noise,
                "latent_noise": self.latent_noise}

    @property
    def model_latent_dim(self) -> int:
        return self.n_chunks * self.latent_dim

    def _pos(self, n_models: int) -> torch.Tensor:
        return self.pos.weight.unsqueeze(0).expand(n_models, -1, -1)

    def encode(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, n_chunks, chunk) -> mean and log-variance, each (N, n_chunks, latent_dim)."""
        h = self.encoder(torch.cat([tokens, self._pos(tokens.shape[0])], dim=-1))
        mu, logvar = h.chunk(2, dim=-1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(N, n_chunks, latent_dim) -> (N, n_chunks, chunk)."""
        return self.decoder(torch.cat([z, self._pos(z.shape[0])], dim=-1))

    def loss(self, tokens: torch.Tensor, generator: torch.Generator | None = None,
             weight: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction MSE (weighted per value by `weight`, (n_chunks, chunk), if given)
        + kl_weight * KL, with input and latent noise augmentation."""
        def noise(like: torch.Tensor) -> torch.Tensor:
            return torch.randn(like.shape, generator=generator, dtype=like.dtype)

        x = tokens + self.input_noise * noise(tokens)
        mu, logvar = self.encode(x)
        z = mu + (0.5 * logvar).exp() * noise(mu)
        z = z + self.latent_noise * noise(z)
        err = (self.decode(z) - tokens).pow(2)
        recon = err.mean() if weight is None else (err * weight).mean()
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        return recon + self.kl_weight * kl

    def _check(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (self.n_chunks, self.chunk):
            raise InputError(f"tokens have shape {list(tokens.shape)}; this VAE takes "
                             f"(N, {self.n_chunks}, {self.chunk})")

    def fit(self, tokens: torch.Tensor, *, epochs: int = 300, lr: float = 1e-3, batch_size: int = 32,
            seed: int = 0, progress: bool = False, weight: torch.Tensor | None = None) -> list[float]:
        """Train on (N_models, n_chunks, chunk) tokens; returns the mean loss of every epoch.

        Deterministic for a seed on CPU: initialization, batch order and noise
        all come from it. Batches are whole models (all their chunks). `weight`
        (n_chunks, chunk) weighs every value's squared error (see `tensor_weights`)."""
        self._check(tokens)
        if weight is not None and tuple(weight.shape) != (self.n_chunks, self.chunk):
            raise InputError(f"weight has shape {list(weight.shape)}; expected [{self.n_chunks}, {self.chunk}]")
        torch.manual_seed(seed)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.reset_parameters()
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs), eta_min=lr * 0.05)
        n = tokens.shape[0]
        bs = max(1, min(batch_size, n))
        history: list[float] = []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=epochs, desc="vae", unit="epoch", dynamic_ncols=True, leave=False)
        self.train()
        try:
            for _ in range(epochs):
                order = torch.randperm(n, generator=g)
                total = 0.0
                for i in range(0, n, bs):
                    batch = tokens[order[i:i + bs]]
                    loss = self.loss(batch, g, weight)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * batch.shape[0]
                sched.step()
                history.append(total / n)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{history[-1]:.4g}")
        finally:
            if bar is not None:
                bar.close()
        self.eval()
        return history

    @torch.no_grad()
    def encode_models(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, n_chunks, chunk) -> (N, n_chunks * latent_dim): the posterior means, concatenated."""
        self._check(tokens)
        mu, _ = self.encode(tokens)
        return rearrange(mu, "n c d -> n (c d)")

    @torch.no_grad()
    def decode_models(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, n_chunks * latent_dim) -> (N, n_chunks, chunk)."""
        if latents.dim() != 2 or latents.shape[1] != self.model_latent_dim:
            raise InputError(f"latents have shape {list(latents.shape)}; this VAE decodes "
                             f"(N, {self.model_latent_dim})")
        return self.decode(rearrange(latents, "n (c d) -> n c d", c=self.n_chunks))

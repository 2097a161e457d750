"""Weight generators trained on a zoo: D2NWG latent diffusion, or KDE on hyper-representations.

    gen = train_generator("zoo/", "gen/", method="d2nwg")           # or method="kde"
    paths = sample("gen/", "digits:classes=0-4", 20, "samples/", seed=0)
    open_model(paths[0])            # a zoo checkpoint like any other (inspect, merge, fine-tune)

Both methods share the first stage: the zoo's checkpoints (one architecture)
are cut into normalized chunks (`weightspace.zoo.gen.chunking`, per-tensor statistics) and a
chunk VAE (`weightspace.zoo.gen.vae`) maps every model to a latent vector.

- d2nwg (Soro et al., "Diffusion-Based Neural Network Weights Generation",
  ICLR 2025): a dataset encoder (`weightspace.zoo.gen.setenc`, a seeded random Deep Set,
  optionally aligned contrastively with the latents) embeds every row's
  dataset, and a conditional latent DDPM (`weightspace.zoo.gen.diffusion`) learns
  p(latent | dataset embedding). Sampling embeds the requested dataset, so an
  unseen dataset with seen classes (a rotation, a corruption) gets weights too.
  The DDPM runs on the latents' principal coordinates (at most N - 1 for N
  checkpoints, at most `pca_dim`), which a small zoo needs: see `latent_pca`.
- kde (Schürholt et al., "Hyper-Representations as Generative Models", NeurIPS
  2022): per-dimension kernel densities on the latents of the top 30 % of the
  zoo by validation accuracy (`weightspace.zoo.gen.kde`), one sampler per task plus a
  pooled one; the dataset only picks the sampler.

The work is split by job: `weightspace.zoo.gen.training` (train_generator),
`weightspace.zoo.gen.sampling` (sample, generate_weights, check_data) and
`weightspace.zoo.gen.store` (the generator directory and load_generator). This
module gathers their public names, so callers import them from one place.

A sample is a zoo checkpoint directory (model.safetensors + config.json with
model_type weightspace-zoo, arch, input_shape, num_classes, train, and
`generated_by`).
"""

from __future__ import annotations

from weightspace.zoo.gen.sampling import (
    _ranges,  # noqa: F401  (cli/generate.py formats class sets with it)
    check_data,
    generate_weights,
    sample,
    sample_latents,
)
from weightspace.zoo.gen.store import (
    FORMAT,
    FORMAT_VERSION,
    GENERATOR_FILE,
    METHODS,
    ZOO_MODEL_TYPE,
    Generator,
    load_generator,
    write_generator,
)
from weightspace.zoo.gen.training import CLIP_MARGIN, condition_stats, latent_pca, train_generator

__all__ = ["CLIP_MARGIN", "FORMAT", "FORMAT_VERSION", "GENERATOR_FILE", "METHODS", "ZOO_MODEL_TYPE",
           "Generator", "check_data", "condition_stats", "generate_weights", "latent_pca",
           "load_generator", "sample", "sample_latents", "train_generator", "write_generator"]

"""Weight generators: latent diffusion over weight latents, dataset encoders, weight chunkers (D2NWG)."""

from weightspace.zoo.gen.chunking import WeightChunker
from weightspace.zoo.gen.evaluate import evaluate_samples
from weightspace.zoo.gen.generator import load_generator, sample, train_generator
from weightspace.zoo.gen.kde import KDESampler
from weightspace.zoo.gen.vae import ChunkVAE

__all__ = ["ChunkVAE", "KDESampler", "WeightChunker", "evaluate_samples", "load_generator", "sample",
           "train_generator"]

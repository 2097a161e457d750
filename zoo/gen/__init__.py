"""Weight generators: latent diffusion over weight latents, dataset encoders, tokenizers (D2NWG)."""

from weightspace.zoo.gen.evaluate import evaluate_samples
from weightspace.zoo.gen.generator import load_generator, sample, train_generator
from weightspace.zoo.gen.kde import KDESampler
from weightspace.zoo.gen.tokenize import Tokenizer
from weightspace.zoo.gen.vae import ChunkVAE

__all__ = ["ChunkVAE", "KDESampler", "Tokenizer", "evaluate_samples", "load_generator", "sample",
           "train_generator"]

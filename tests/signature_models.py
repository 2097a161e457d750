"""Seeded models and signatures the signature tests share.

    from tests.signature_models import two_signatures_fixture, zoo_models_fixture  # noqa: F401

Importing a fixture function makes its fixture (`zoo_models`, `two_signatures`) available in
that test module, built once per module; the functions carry a `_fixture` suffix so that a
test's `zoo_models` argument does not shadow the import.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from weightspace.ir import WeightSpace
from weightspace.merges.signatures import extract_signature, save_signature
from weightspace.sources import load_space
from weightspace.zoo.arch import build_model

ARCH = {"arch": "resmlp", "width": 16, "depth": 3, "mlp_ratio": 2}
CONFIG = {"model_type": "weightspace-zoo", "arch": ARCH, "input_shape": [1, 8, 8], "num_classes": 10}


def _finetune(pre: dict[str, torch.Tensor], seed: int, shallow: float, deep: float) -> dict[str, torch.Tensor]:
    """pre + seeded noise: `shallow` on the stem and block 0, `deep` elsewhere."""
    g = torch.Generator().manual_seed(seed)
    return {n: t + (shallow if n.startswith(("stem.", "blocks.0.")) else deep) * torch.randn(t.shape, generator=g)
            for n, t in pre.items()}


@pytest.fixture(scope="module", name="zoo_models")
def zoo_models_fixture(tmp_path_factory) -> dict[str, Path]:
    """A seeded ResMLP (stem, 3 blocks, norm, head) as `pre`; `clean` and two robust fine-tunes
    that moved mostly in the shallow layers, saved as zoo checkpoints."""
    root = tmp_path_factory.mktemp("rws")
    torch.manual_seed(0)
    pre = {n: p.detach().clone() for n, p in build_model(ARCH, (1, 8, 8), 10).state_dict().items()}
    models = {"pre": pre, "clean": _finetune(pre, 1, 0.01, 0.01),
              "noise": _finetune(pre, 2, 0.08, 0.005), "blur": _finetune(pre, 3, 0.06, 0.005)}
    paths = {}
    for name, tensors in models.items():
        paths[name] = root / name
        WeightSpace.from_tensors(tensors).save(paths[name], config=CONFIG)
    paths["root"] = root
    return paths


def _spaces(m):
    return load_space(m["pre"]), load_space(m["clean"]), load_space(m["noise"])


@pytest.fixture(scope="module", name="two_signatures")
def two_signatures_fixture(zoo_models) -> tuple[Path, Path]:
    pre, clean = load_space(zoo_models["pre"]), load_space(zoo_models["clean"])
    out = []
    for name, layers, bits in (("noise", "first:1", 4), ("blur", "blocks.1.*", None)):
        sig = extract_signature(pre, clean, load_space(zoo_models[name]), layers=layers, bits=bits)
        out.append(save_signature(sig, zoo_models["root"] / f"{name}.rws.safetensors"))
    return out[0], out[1]

"""Robust weight signatures: the formula, and extracting a signature from three models."""

from __future__ import annotations

import pytest
import torch

from tests.signature_models import (
    _spaces,
    zoo_models_fixture,  # noqa: F401  (fixtures)
)
from weightspace.errors import InputError, SpecError
from weightspace.ir import WeightSpace
from weightspace.merges.signatures import Signature, extract_signature, robust_weight_signature

# ---------------------------------------------------------------------------------------------
# the formula


def test_rws_against_a_hand_computation():
    d_c = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    d_s = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # <d_c, d_s> = 4, <d_s, d_s> = 2: RWS = d_c - 2 d_s
    r = robust_weight_signature(d_c, d_s)
    assert torch.equal(r, torch.tensor([[-1.0, 2.0], [1.0, 4.0]]))
    assert float((r * d_s).sum()) == 0.0
    assert torch.equal(robust_weight_signature(d_c, torch.zeros(2, 2)), d_c)  # <d_s, d_s> = 0


def test_rws_is_orthogonal_to_the_clean_change():
    g = torch.Generator().manual_seed(0)
    d_c, d_s = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    r = robust_weight_signature(d_c, d_s)
    assert abs(float((r.double() * d_s.double()).sum())) < 1e-5 * float(r.norm() * d_s.norm())
    # and it is what is left of d_c after removing its projection on d_s
    proj = (d_c * d_s).sum() / (d_s * d_s).sum() * d_s
    torch.testing.assert_close(r, d_c - proj, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# extraction checks


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": 1}, "bits must be between 2 and 8"),
    ({"bits": 9}, "bits must be between 2 and 8"),
    ({"bits": True}, "bits must be between 2 and 8"),
    ({"bits": "4"}, "bits must be between 2 and 8"),
    ({"bits": 4, "scheme": "tanh"}, "scheme must be one of"),
    ({"bits": 4, "granularity": "column"}, "granularity must be one of"),
    ({"share": 1.5}, "share must be in"),
    ({"layers": "first:zero"}, "K in first:K"),
])
def test_bad_options_are_refused_before_reading(kwargs, message):
    never = WeightSpace({}, {"source": "never read"})
    with pytest.raises(SpecError, match=message):
        extract_signature(never, never, never, **kwargs)


def test_extracted_signature_matches_the_formula(zoo_models):
    pre, clean, robust = _spaces(zoo_models)
    sig = extract_signature(pre, clean, robust, layers="first:1", provenance={"corruption": "noise"})
    for name in sig.kept:
        p = pre[name].load()
        torch.testing.assert_close(sig.tensors[name],
                                   robust_weight_signature(robust[name].load() - p, clean[name].load() - p))
    prov = sig.meta["provenance"]
    assert prov["corruption"] == "noise" and prov["robust"] == str(zoo_models["noise"].resolve())
    assert len(prov["pretrained_fingerprint"]) == 64 and len(sig.fingerprint) == 64
    assert sig.nbytes_stored == sum(4 * t.numel() for t in sig.tensors.values())


def test_mismatched_models_are_refused(zoo_models):
    pre, clean, robust = _spaces(zoo_models)
    t = robust.materialize()
    missing = WeightSpace.from_tensors({k: v for k, v in t.items() if k != "head.bias"},
                                       {"source": "robust-without-head"})
    with pytest.raises(InputError, match="'head.bias' is in the pretrained model .* not in the robust model"):
        extract_signature(pre, clean, missing)
    reshaped = WeightSpace.from_tensors({**t, "stem.weight": torch.zeros(16, 65)}, {"source": "other"})
    with pytest.raises(InputError, match=r"'stem.weight' has shape \[16, 64\] in the pretrained .*\[16, 65\] in the robust"):
        extract_signature(pre, clean, reshaped)
    half = WeightSpace.from_tensors({**t, "head.weight": t["head.weight"].half()}, {"source": "half"})
    with pytest.raises(InputError, match="'head.weight' is float32 in the pretrained .* float16 in the clean"):
        extract_signature(pre, half, robust)
    g = torch.Generator().manual_seed(9)
    stranger = WeightSpace.from_tensors({k: 3 * torch.randn(v.shape, generator=g) for k, v in t.items()},
                                        {"source": "stranger"})
    with pytest.raises(InputError, match="robust model \\(stranger\\) looks unrelated"):
        extract_signature(pre, clean, stranger)


def test_signature_repr_and_space(zoo_models):
    sig = extract_signature(*_spaces(zoo_models), layers="first:1", bits=8)
    assert isinstance(sig, Signature) and "8-bit uniform" in repr(sig)
    assert set(sig.space()) == set(sig.kept)

"""Robust weight signatures: patching and unpatching, with patch records."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from tests.signature_models import ARCH, CONFIG, two_signatures_fixture, zoo_models_fixture  # noqa: F401  (fixtures)
from weightspace.errors import InputError, SpecError
from weightspace.ir import WeightSpace
from weightspace.merges.signatures import (
    RECORD_KEY,
    extract_signature,
    load_signature,
    patch,
    patch_record,
    read_patch_record,
    save_patched,
    unpatch,
)
from weightspace.safetensors_io import read_header
from weightspace.sources import load_space
from weightspace.zoo.arch import build_model


def test_patch_writes_theta_plus_alpha_rws(zoo_models, two_signatures, tmp_path):
    noise, _ = two_signatures
    clean = load_space(zoo_models["clean"])
    out = save_patched(patch(clean, [(noise, 0.8)]), tmp_path / "patched")
    got, sig, orig = load_space(out), load_signature(noise), clean.materialize()
    for name in orig:
        t = got[name].load()
        if name in sig.tensors:
            torch.testing.assert_close(t, orig[name] + 0.8 * sig.tensors[name], rtol=0, atol=1e-6)
        else:
            assert torch.equal(t, orig[name])  # untouched tensors are copied bit for bit
    assert json.loads((out / "config.json").read_text()) == CONFIG
    entries = read_patch_record(got)
    assert entries == [{"fingerprint": sig.fingerprint, "signature": "noise.rws.safetensors", "alpha": 0.8}]
    _, header = read_header(out / "model.safetensors")
    assert json.loads(header[RECORD_KEY]) == entries


def test_composed_signatures_apply_each_alpha_once(zoo_models, two_signatures, tmp_path):
    """Regression test for the public bug that scales each signature by alpha twice."""
    noise, blur = two_signatures
    clean = load_space(zoo_models["clean"])
    a, b = 0.7, 0.3
    got = load_space(save_patched(patch(clean, [(noise, a), (blur, b)]), tmp_path / "both"))
    r1, r2 = load_signature(noise).tensors, load_signature(blur).tensors
    assert not set(r1) & set(r2)
    for name, theta in clean.materialize().items():
        want = theta + a * r1.get(name, torch.zeros_like(theta)) + b * r2.get(name, torch.zeros_like(theta))
        twice = theta + a * a * r1.get(name, torch.zeros_like(theta)) + b * b * r2.get(name, torch.zeros_like(theta))
        t = got[name].load()
        torch.testing.assert_close(t, want, rtol=0, atol=1e-6)
        if name in r1 or name in r2:
            assert not torch.allclose(t, twice, rtol=0, atol=1e-6)
    # overlapping signatures on one tensor add up too: theta + a R + b R
    same = patch(clean, [(noise, a), (noise, b)])
    name = "stem.weight"
    torch.testing.assert_close(same[name].load(), clean[name].load() + (a + b) * r1[name], rtol=0, atol=1e-6)


def test_in_memory_and_file_signatures_patch_alike(zoo_models, two_signatures):
    noise, _ = two_signatures
    clean = load_space(zoo_models["clean"])
    sig = load_signature(noise)
    x, y = patch(clean, [(sig, 0.5)]), patch(clean, [(noise, 0.5)])
    for name in sig.kept:
        assert torch.equal(x[name].load(), y[name].load())
    assert patch_record(clean, [(sig, 0.5)])[0]["fingerprint"] == sig.fingerprint


def test_unpatch_restores_the_original_and_the_record(zoo_models, two_signatures, tmp_path):
    noise, blur = two_signatures
    clean = load_space(zoo_models["clean"])
    both = load_space(save_patched(patch(clean, [(noise, 1.0), (blur, 0.5)]), tmp_path / "both"))
    assert [e["alpha"] for e in read_patch_record(both)] == [1.0, 0.5]
    one = load_space(save_patched(unpatch(both, [(blur, 0.5)]), tmp_path / "one"))
    assert [(e["signature"], e["alpha"]) for e in read_patch_record(one)] == [("noise.rws.safetensors", 1.0)]
    restored = load_space(save_patched(unpatch(one, [(noise, 1.0)]), tmp_path / "restored"))
    assert read_patch_record(restored) == []
    _, header = read_header(tmp_path / "restored" / "model.safetensors")
    assert RECORD_KEY not in header
    for name, theta in clean.materialize().items():
        torch.testing.assert_close(restored[name].load(), theta, rtol=0, atol=1e-6)
    # unpatching both at once, straight from the lazy space, restores it too
    at_once = unpatch(patch(clean, [(noise, 1.0), (blur, 0.5)]), [(noise, 1.0), (blur, 0.5)])
    assert at_once.meta[RECORD_KEY] == []
    for name, theta in clean.materialize().items():
        torch.testing.assert_close(at_once[name].load(), theta, rtol=0, atol=1e-6)


def test_unpatch_of_a_signature_never_applied_is_refused(zoo_models, two_signatures, tmp_path):
    noise, blur = two_signatures
    clean = load_space(zoo_models["clean"])
    with pytest.raises(InputError, match="never added .* does not list it; pass force=True"):
        unpatch(clean, [(noise, 1.0)])
    patched = load_space(save_patched(patch(clean, [(noise, 1.0)]), tmp_path / "p"))
    with pytest.raises(InputError, match="added with alpha 1, not 0.5"):
        unpatch(patched, [(noise, 0.5)])
    with pytest.raises(InputError, match="blur.rws.safetensors"):
        unpatch(patched, [(blur, 1.0)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        forced = unpatch(patched, [(blur, 1.0)], force=True)
    assert any("subtracting signature blur.rws.safetensors" in str(w.message) for w in caught)
    assert [e["signature"] for e in forced.meta[RECORD_KEY]] == ["noise.rws.safetensors"]


def test_a_signature_for_another_architecture_is_refused(two_signatures):
    noise, _ = two_signatures
    torch.manual_seed(0)
    wider = {n: p.detach() for n, p in build_model({**ARCH, "width": 24}, (1, 8, 8), 10).state_dict().items()}
    with pytest.raises(InputError, match=r"noise.rws.safetensors: tensor 'blocks.0.fc1.bias' has shape \[32\] "
                                         r"there but \[48\] in the model .*another architecture"):
        patch(WeightSpace.from_tensors(wider), [(noise, 1.0)])
    mlp = {n: p.detach() for n, p in build_model({"arch": "mlp", "width": 16, "depth": 2}, (1, 8, 8), 10)
           .state_dict().items()}
    with pytest.raises(InputError, match="tensor 'blocks.0.*' is not in the model .*another architecture"):
        patch(WeightSpace.from_tensors(mlp), [(noise, 1.0)])
    with pytest.raises(SpecError, match="alpha must be a finite number"):
        patch(WeightSpace.from_tensors(wider), [(noise, float("nan"))])


def test_a_failed_patch_leaves_no_output(zoo_models, two_signatures, tmp_path):
    noise, blur = two_signatures
    sig_file = tmp_path / "changing.rws.safetensors"
    sig_file.write_bytes(Path(noise).read_bytes())
    lazy = patch(load_space(zoo_models["clean"]), [(sig_file, 1.0)])
    # the file changes under the running patch: same layout, other codes
    entries, _ = read_header(sig_file)
    e = entries["stem.weight::q"]
    with open(sig_file, "r+b") as f:
        f.seek(e.start)
        data = bytearray(f.read(e.nbytes))
        f.seek(e.start)
        f.write(bytes(b ^ 0xFF for b in data))
    out = tmp_path / "patched"
    with pytest.raises(InputError, match="does not match its recorded digest"):
        save_patched(lazy, out)
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_patch_refuses_values_past_the_model_dtype(tmp_path):
    from weightspace.errors import NonFiniteError

    spaces = [WeightSpace.from_tensors({"layers.0.w": t}) for t in
              (torch.ones(4), torch.full((4,), 1.01), torch.tensor([1.5, 0.5, 1.2, 1.0]))]
    sig = extract_signature(*spaces, layers="all")
    half = WeightSpace.from_tensors({"layers.0.w": torch.full((4,), 60000.0).half()})
    with pytest.raises(NonFiniteError, match="'layers.0.w': patching produced NaN/Inf values in float16"):
        save_patched(patch(half, [(sig, 1e5)]), tmp_path / "out")
    assert not (tmp_path / "out").exists()

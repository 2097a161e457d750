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
    coefficients,
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
    assert entries == [{"fingerprint": sig.fingerprint, "signature": "noise.rws.safetensors", "alpha": 0.8,
                        "scaling": "linear", "coefficient": 0.8}]
    _, header = read_header(out / "model.safetensors")
    assert json.loads(header[RECORD_KEY]) == entries


def test_composed_signatures_apply_each_alpha_once(zoo_models, two_signatures, tmp_path):
    """The default, linear scaling adds alpha x RWS once per signature (the authors' code adds
    (alpha / n)^2 x RWS: scaling="authors", tested below)."""
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


def _authors_decompose(pre, std, robusts, patched, alpha):
    """model_patching.py `decompose` with `main`'s weights, written out from the authors' code
    (VITA-Group/Robust_Weight_Signatures): weight = alpha * ones(n) / n; per kept key
    param = stack((theta_c - theta_pre) * weight[c]); vectors = get_projection(d_s, param)
    with tools.get_projection's outer-product form; new = patched + sum(diag(weight) @ vectors)."""
    n = len(robusts)
    weight = alpha * torch.ones(n, dtype=torch.float64) / n
    out = {}
    for key, theta in patched.items():
        param = torch.stack([(r[key].double() - pre[key].double()) * weight[i] for i, r in enumerate(robusts)])
        param = param.reshape(n, -1)
        a = (std[key].double() - pre[key].double()).flatten().reshape(1, -1)
        projection_matrix = (a.T.matmul(a)) / (a.matmul(a.T))
        vectors = param - projection_matrix.matmul(param.T).T
        combined = torch.sum(torch.diag(weight).matmul(vectors), dim=0)
        out[key] = combined.reshape_as(theta) + theta.double()
    return out


@pytest.mark.parametrize("alpha", [1.0, 2.0, -1.5])
def test_authors_scaling_matches_their_decompose(zoo_models, alpha):
    """Regression test: scaling="authors" adds what the authors' model_patching.py adds,
    (alpha / n)^2 RWS_c each, which linear scaling (alpha RWS_c each) does not."""
    pre, clean = load_space(zoo_models["pre"]), load_space(zoo_models["clean"])
    robust = [load_space(zoo_models[k]) for k in ("noise", "blur")]
    sigs = [extract_signature(pre, clean, r, layers="all") for r in robust]
    mats = [sp.materialize() for sp in (pre, clean, *robust)]
    want = _authors_decompose(mats[0], mats[1], mats[2:], mats[1], alpha)
    got = patch(clean, [(sigs[0], alpha), (sigs[1], alpha)], scaling="authors")
    linear = patch(clean, [(sigs[0], alpha), (sigs[1], alpha)])
    assert [e["coefficient"] for e in got.meta[RECORD_KEY]] == [(alpha / 2) ** 2] * 2
    for name in ("stem.weight", "blocks.0.fc1.weight", "head.bias"):
        torch.testing.assert_close(got[name].load().double(), want[name], rtol=0, atol=1e-5)
        assert not torch.allclose(linear[name].load().double(), want[name], rtol=0, atol=1e-5)
    # one signature at alpha: alpha^2 RWS, as their --alpha with one corruption
    one = patch(clean, [(sigs[0], alpha)], scaling="authors")
    want1 = _authors_decompose(mats[0], mats[1], mats[2:3], mats[1], alpha)
    torch.testing.assert_close(one["stem.weight"].load().double(), want1["stem.weight"], rtol=0, atol=1e-5)


def test_coefficients_table():
    assert coefficients([1.0, 0.5], "linear") == [1.0, 0.5]
    assert coefficients([1.0], "authors") == [1.0]
    assert coefficients([1.0, 1.0], "authors") == [0.25, 0.25]
    assert coefficients([3.0, -3.0, 1.5], "authors") == [1.0, 1.0, 0.25]
    with pytest.raises(SpecError, match="scaling must be one of linear, authors"):
        coefficients([1.0], "squared")


def test_authors_scaling_unpatches_what_it_added(zoo_models, two_signatures, tmp_path):
    noise, blur = two_signatures
    clean = load_space(zoo_models["clean"])
    both = load_space(save_patched(patch(clean, [(noise, 1.0), (blur, 1.0)], scaling="authors"),
                                   tmp_path / "both"))
    assert [(e["alpha"], e["scaling"], e["coefficient"]) for e in read_patch_record(both)] == [
        (1.0, "authors", 0.25), (1.0, "authors", 0.25)]
    r1, r2 = load_signature(noise).tensors, load_signature(blur).tensors
    name = "blocks.1.fc1.weight"  # kept by blur only
    torch.testing.assert_close(both[name].load(), clean[name].load() + 0.25 * r2[name], rtol=0, atol=1e-6)
    with pytest.raises(InputError, match=r"added with alpha 1 with authors scaling \(coefficient 0.25\), not alpha 1"):
        unpatch(both, [(blur, 1.0)])  # linear: not what was added
    # one of the two comes off alone with its recorded coefficient, 0.25, not (1/1)^2
    one = load_space(save_patched(unpatch(both, [(blur, 1.0)], scaling="authors"), tmp_path / "one"))
    torch.testing.assert_close(one[name].load(), clean[name].load(), rtol=0, atol=1e-6)
    torch.testing.assert_close(one["stem.weight"].load(), clean["stem.weight"].load() + 0.25 * r1["stem.weight"],
                               rtol=0, atol=1e-6)
    back = unpatch(one, [(noise, 1.0)], scaling="authors")
    assert back.meta[RECORD_KEY] == []
    for n, theta in clean.materialize().items():
        torch.testing.assert_close(back[n].load(), theta, rtol=0, atol=1e-6)


def test_records_from_before_scalings_read_as_linear(zoo_models, two_signatures, tmp_path):
    from weightspace.merges.signatures.patching import _parse_record

    old = json.dumps([{"fingerprint": "ab", "signature": "x.rws.safetensors", "alpha": 0.5}])
    assert _parse_record(old, "f") == [{"fingerprint": "ab", "signature": "x.rws.safetensors", "alpha": 0.5,
                                        "scaling": "linear", "coefficient": 0.5}]
    with pytest.raises(InputError, match="corrupt 'weightspace.rws' patch record"):
        _parse_record(json.dumps([{"fingerprint": "ab", "signature": "x", "alpha": 1, "scaling": "sq"}]), "f")


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

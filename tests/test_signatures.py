"""Robust weight signatures: the formula, layer selection, quantization and packing, the file,
patching/unpatching with records, and `wsmerge rws`."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
import weightspace.merges.signatures.file_format as rws_file
import weightspace.merges.signatures.quantize as rws_quantize
from weightspace.merges.signatures import (
    RECORD_KEY,
    Signature,
    dequantize_tensor,
    extract_signature,
    layer_report,
    layer_summary,
    load_signature,
    pack_bits,
    packed_size,
    patch,
    patch_record,
    quantize_tensor,
    read_patch_record,
    robust_weight_signature,
    save_patched,
    save_signature,
    select_layers,
    signature_size_report,
    unpack_bits,
    unpatch,
)
from weightspace.zoo.arch import build_model

from weightspace.errors import InputError, SpecError
from weightspace.ir import WeightSpace
from weightspace.safetensors_io import read_header
from weightspace.sources import load_space

ARCH = {"arch": "resmlp", "width": 16, "depth": 3, "mlp_ratio": 2}
CONFIG = {"model_type": "weightspace-zoo", "arch": ARCH, "input_shape": [1, 8, 8], "num_classes": 10}


def _finetune(pre: dict[str, torch.Tensor], seed: int, shallow: float, deep: float) -> dict[str, torch.Tensor]:
    """pre + seeded noise: `shallow` on the stem and block 0, `deep` elsewhere."""
    g = torch.Generator().manual_seed(seed)
    return {n: t + (shallow if n.startswith(("stem.", "blocks.0.")) else deep) * torch.randn(t.shape, generator=g)
            for n, t in pre.items()}


@pytest.fixture(scope="module")
def zoo_models(tmp_path_factory) -> dict[str, Path]:
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


def test_layer_report_numbers_and_depths(zoo_models):
    pre, clean, robust = _spaces(zoo_models)
    rows = {r["name"]: r for r in layer_report(pre, clean, robust)}
    assert set(rows) == set(pre)
    name = "blocks.0.fc1.weight"
    p = pre[name].load().double()
    dc, ds = robust[name].load().double() - p, clean[name].load().double() - p
    r = rows[name]
    assert r["layer"] == 0 and r["position"] == 0.0 and r["depth"] == 0.0 and r["numel"] == p.numel()
    assert r["rel_change_robust"] == pytest.approx(float(dc.norm() / p.norm()), rel=1e-9)
    assert r["rel_change_clean"] == pytest.approx(float(ds.norm() / p.norm()), rel=1e-9)
    assert r["cos_robust_clean"] == pytest.approx(float((dc * ds).sum() / (dc.norm() * ds.norm())), abs=1e-9)
    rws_t = robust_weight_signature(dc, ds).double()
    assert r["rws_share"] == pytest.approx(float(rws_t.norm() / dc.norm()), rel=1e-6)
    # the stem sits before the stack, the head and final norm after it
    assert rows["stem.weight"]["position"] == -1.0 and rows["stem.weight"]["depth"] == 0.0
    assert rows["head.weight"]["position"] == 3.0 and rows["head.weight"]["layer"] is None
    assert rows["blocks.2.fc2.bias"]["position"] == 2.0 and rows["blocks.2.fc2.bias"]["depth"] == 1.0


def test_layer_report_skips_integer_buffers():
    t = {"layers.0.weight": torch.ones(2, 2), "layers.0.steps": torch.tensor([3])}
    ft = {"layers.0.weight": torch.full((2, 2), 1.1), "layers.0.steps": torch.tensor([3])}
    rows = layer_report(*(WeightSpace.from_tensors(x) for x in (t, ft, ft)))
    assert [r["name"] for r in rows] == ["layers.0.weight"]


# ---------------------------------------------------------------------------------------------
# layer selection


def _row(name, position, layer, rws_norm):
    return {"name": name, "position": position, "layer": layer, "rws_norm": rws_norm}


REPORT = [
    _row("embed.weight", -1.0, None, 1.0),            # rws^2 = 1
    _row("layers.0.w", 0.0, 0, 2.0),                  # 4
    _row("layers.0.b", 0.0, 0, 1.0),                  # 1
    _row("layers.1.w", 1.0, 1, 2.0),                  # 4
    _row("layers.2.w", 2.0, 2, 1.0),                  # 1
    _row("head.weight", 3.0, None, 3.0),              # 9   (total 20)
]


@pytest.mark.parametrize("spec, share, expected", [
    ("all", 0.5, [r["name"] for r in REPORT]),
    ("first:1", 0.5, ["embed.weight", "layers.0.w", "layers.0.b"]),
    ("first:2", 0.5, ["embed.weight", "layers.0.w", "layers.0.b", "layers.1.w"]),
    ("first:3", 0.5, ["embed.weight", "layers.0.w", "layers.0.b", "layers.1.w", "layers.2.w"]),
    ("layers.0.*", 0.5, ["layers.0.w", "layers.0.b"]),
    ("*.w", 0.5, ["layers.0.w", "layers.1.w", "layers.2.w"]),
    ("re:^layers\\.[12]\\.", 0.5, ["layers.1.w", "layers.2.w"]),
    # auto: cumulative rws^2 by depth: pre 1 (5%), +layer 0 -> 6 (30%), +layer 1 -> 10 (50%), ...
    ("auto", 0.05, ["embed.weight"]),
    ("auto", 0.3, ["embed.weight", "layers.0.w", "layers.0.b"]),
    ("auto", 0.31, ["embed.weight", "layers.0.w", "layers.0.b", "layers.1.w"]),
    ("auto", 0.5, ["embed.weight", "layers.0.w", "layers.0.b", "layers.1.w"]),
    ("auto", 0.51, ["embed.weight", "layers.0.w", "layers.0.b", "layers.1.w", "layers.2.w"]),
    ("auto", 1.0, [r["name"] for r in REPORT]),
])
def test_select_layers(spec, share, expected):
    assert select_layers(REPORT, spec, share) == expected


@pytest.mark.parametrize("spec, message", [
    ("first:0", "K in first:K"),
    ("first:x", "K in first:K"),
    ("first:4", "only 3 layers"),
    ("re:[", "not a valid regular expression"),
    ("frist:2", "selects no tensor"),
    ("", "empty layer selection"),
])
def test_select_layers_errors_name_the_spec(spec, message):
    with pytest.raises(SpecError, match=message) as e:
        select_layers(REPORT, spec)
    assert repr(spec) in str(e.value) or spec == ""


def test_select_layers_refuses_first_k_without_a_stack_and_a_zero_signature():
    flat = [_row("conv.weight", 0.0, None, 1.0), _row("fc.weight", 0.0, None, 1.0)]
    with pytest.raises(SpecError, match="no layer stack"):
        select_layers(flat, "first:1")
    zero = [dict(r, rws_norm=0.0) for r in REPORT]
    with pytest.raises(SpecError, match="zero everywhere"):
        select_layers(zero, "auto")
    with pytest.raises(SpecError, match="share"):
        select_layers(REPORT, "auto", share=0.0)


def test_auto_keeps_the_shallow_layers_of_a_shallow_robust_change(zoo_models):
    sig = extract_signature(*_spaces(zoo_models), layers="auto", share=0.5)
    assert sig.kept == [n for n in load_space(zoo_models["pre"]) if n.startswith(("stem.", "blocks.0."))]
    summary = layer_summary(sig.meta["report"], sig.kept)
    assert [u["label"] for u in summary] == ["pre", "layer 0", "layer 1", "layer 2", "post"]
    assert [u["kept"] for u in summary] == ["all", "all", "none", "none", "none"]
    assert sum(u["rws_fraction"] for u in summary) == pytest.approx(1.0, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# packing and quantization


def test_pack_bits_golden():
    assert pack_bits(torch.tensor([1, 2, 3]), 2).tolist() == [0b00111001]
    assert pack_bits(torch.tensor([5, 3]), 3).tolist() == [0b00011101]  # 5 | 3 << 3
    assert pack_bits(torch.tensor([255, 1]), 8).tolist() == [255, 1]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [0, 1, 3, 7, 9, 13, 61])
def test_pack_round_trip_odd_sizes(bits, n, monkeypatch):
    monkeypatch.setattr(rws_quantize, "_CHUNK", 16)  # several chunks, and a partial last one
    g = torch.Generator().manual_seed(bits * 100 + n)
    codes = torch.randint(0, 1 << bits, (n,), generator=g)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(n, bits) == math.ceil(n * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_unpack_refuses_a_wrong_length():
    with pytest.raises(InputError, match="expected 2 uint8 bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 2, 5)


def _heavy(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g))
    x.view(-1)[::7] = 0.0  # exact zeros (entries a fine-tune did not move)
    return x


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_uniform_quantization_error_is_at_most_half_a_step(bits, granularity):
    x = _heavy((6, 11), seed=bits)
    x[2] += 3.0  # a row that is all positive: the range still includes 0
    parts = quantize_tensor(x, bits, "uniform", granularity)
    groups = 6 if granularity == "row" else 1
    assert parts["scale"].shape == (groups,) and parts["zero"].dtype == torch.uint8
    assert parts["q"].numel() == packed_size(x.numel(), bits)
    y = dequantize_tensor(parts, x.shape, bits, "uniform")
    half = (parts["scale"] / 2).reshape(-1, 1) if groups > 1 else parts["scale"] / 2
    err = (y - x).reshape(groups, -1).abs()
    assert bool((err <= half * (1 + 1e-4) + 1e-7).all())
    assert bool((y[x == 0] == 0).all()) and int((x == 0).sum()) >= 5  # zeros stay exact


def test_row_granularity_is_tighter_and_vectors_use_one_group():
    x = torch.stack([torch.linspace(-1, 1, 32) * s for s in (0.01, 1.0, 100.0)])
    err = {g: (dequantize_tensor(quantize_tensor(x, 4, "uniform", g), x.shape, 4) - x).abs()[0].max()
           for g in ("tensor", "row")}
    assert err["row"] < err["tensor"] / 10
    assert quantize_tensor(torch.randn(5), 4, "uniform", "row")["scale"].shape == (1,)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_log_quantization_error_is_at_most_half_a_step_in_log_space(bits, granularity):
    x = _heavy((5, 13), seed=10 + bits)
    parts = quantize_tensor(x, bits, "log", granularity)
    y = dequantize_tensor(parts, x.shape, bits, "log")
    nz = x != 0
    assert bool((y[~nz] == 0).all()) and bool((torch.sign(y[nz]) == torch.sign(x[nz])).all())
    step = parts["log2_step"].reshape(-1, 1) if granularity == "row" else parts["log2_step"]
    err = (torch.log2(y.abs().double()) - torch.log2(x.abs().double())).reshape(step.shape[0], -1)
    err = torch.where(nz.reshape(err.shape), err.abs(), torch.zeros_like(err))
    assert bool((err <= step.double() / 2 + 1e-5).all())
    # the grid covers [min |x|, max |x|] of the nonzero entries in n = 2^(b-1) - 1 bins
    mag = x.abs()[nz]
    if granularity == "tensor":
        n = (1 << (bits - 1)) - 1
        expect = (math.log2(float(mag.max())) - math.log2(float(mag.min()))) / n
        assert float(parts["log2_step"]) == pytest.approx(expect, rel=1e-5)


@pytest.mark.parametrize("scheme", ["uniform", "log"])
def test_constant_zero_and_empty_tensors_survive(scheme):
    for x in (torch.zeros(3, 4), torch.full((4,), -0.25), torch.zeros(0, 3)):
        parts = quantize_tensor(x, 3, scheme, "row")
        assert torch.equal(dequantize_tensor(parts, x.shape, 3, scheme), x)


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


# ---------------------------------------------------------------------------------------------
# extraction checks


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


# ---------------------------------------------------------------------------------------------
# the file


@pytest.mark.parametrize("bits, scheme, granularity", [(None, "uniform", "tensor"), (4, "uniform", "row"),
                                                       (3, "log", "tensor"), (2, "log", "row")])
def test_save_load_round_trip(zoo_models, tmp_path, bits, scheme, granularity):
    sig = extract_signature(*_spaces(zoo_models), layers="first:1", bits=bits, scheme=scheme,
                            granularity=granularity)
    path = save_signature(sig, tmp_path / "noise.rws.safetensors")
    back = load_signature(path)
    assert back.kept == sig.kept and back.fingerprint == sig.fingerprint
    assert back.nbytes_stored == sig.nbytes_stored
    for n in sig.kept:
        assert torch.equal(back.tensors[n], sig.tensors[n])
    assert back.meta["report"] == sig.meta["report"]
    entries, header = read_header(path)
    assert header["kind"] == "weightspace-rws" and header["format"] == "pt"
    name = "stem.weight"
    if bits is None:
        assert set(entries) == set(sig.kept) and entries[name].dtype == torch.float32
    else:
        a, b = ("scale", "zero") if scheme == "uniform" else ("log2_min", "log2_step")
        assert set(entries) == {f"{n}::{k}" for n in sig.kept for k in ("q", a, b)}
        assert entries[f"{name}::q"].dtype == torch.uint8
        assert entries[f"{name}::q"].shape == (packed_size(16 * 64, bits),)
        assert entries[f"{name}::{a}"].shape == ((16,) if granularity == "row" else (1,))
        # packed codes plus two parameters per group: a fraction of the float32 bytes
        groups = {n: (sig.meta["shapes"][n][0] if granularity == "row" and len(sig.meta["shapes"][n]) > 1 else 1)
                  for n in sig.kept}
        per_group = 4 + (1 if scheme == "uniform" else 4)
        assert sig.nbytes_stored == sum(packed_size(t.numel(), bits) + per_group * groups[n]
                                        for n, t in sig.tensors.items())


def test_size_report(zoo_models, tmp_path):
    pre, clean, robust = _spaces(zoo_models)
    sig = extract_signature(pre, clean, robust, layers="first:1", bits=4)
    path = save_signature(sig, tmp_path / "s.rws.safetensors")
    size = signature_size_report(path, robust.nbytes)
    assert size["bytes"] == path.stat().st_size and size["payload_bytes"] == sig.nbytes_stored
    assert size["model_bytes"] == robust.nbytes
    assert size["fraction"] == pytest.approx(size["bytes"] / robust.nbytes)
    assert size["times_smaller"] == pytest.approx(robust.nbytes / size["bytes"])
    assert size["kept_params"] == sum(t.numel() for t in sig.tensors.values())


def test_malformed_files_are_refused_naming_them(zoo_models, tmp_path):
    from safetensors.torch import load_file, save_file

    sig = extract_signature(*_spaces(zoo_models), layers="first:1", bits=4)
    good = save_signature(sig, tmp_path / "good.rws.safetensors")
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(InputError, match="other.safetensors' is not a robust weight signature"):
        load_signature(other)
    with pytest.raises(InputError, match="no such signature file"):
        load_signature(tmp_path / "missing.rws.safetensors")
    with pytest.raises(SpecError, match="safetensors"):
        save_signature(sig, tmp_path / "noise.rws")

    _, header = read_header(good)
    tensors = load_file(str(good))
    meta = json.loads(header["rws"])

    def write(name, t, m):
        p = tmp_path / name
        save_file(t, str(p), metadata={**header, "rws": json.dumps(m)})
        return p

    # a flipped code: the tensor no longer matches its digest
    flipped = dict(tensors)
    flipped["stem.weight::q"] = tensors["stem.weight::q"].clone() ^ 1
    with pytest.raises(InputError, match="flipped.rws.safetensors.*'stem.weight' does not match its recorded digest"):
        load_signature(write("flipped.rws.safetensors", flipped, meta))
    # a missing part, an edited fingerprint, bits out of range
    partial = {k: v for k, v in tensors.items() if k != "stem.bias::zero"}
    with pytest.raises(InputError, match="'stem.bias::zero' is missing"):
        load_signature(write("partial.rws.safetensors", partial, meta))
    with pytest.raises(InputError, match="fingerprint does not match"):
        load_signature(write("fp.rws.safetensors", tensors, {**meta, "fingerprint": "0" * 64}))
    with pytest.raises(InputError, match="bits must be between 2 and 8"):
        load_signature(write("bits.rws.safetensors", tensors, {**meta, "bits": 12}))
    with pytest.raises(InputError, match="corrupt metadata"):
        load_signature(write("meta.rws.safetensors", tensors, {**meta, "kept": "stem.weight"}))


# ---------------------------------------------------------------------------------------------
# patching


@pytest.fixture(scope="module")
def two_signatures(zoo_models) -> tuple[Path, Path]:
    pre, clean = load_space(zoo_models["pre"]), load_space(zoo_models["clean"])
    out = []
    for name, layers, bits in (("noise", "first:1", 4), ("blur", "blocks.1.*", None)):
        sig = extract_signature(pre, clean, load_space(zoo_models[name]), layers=layers, bits=bits)
        out.append(save_signature(sig, zoo_models["root"] / f"{name}.rws.safetensors"))
    return out[0], out[1]


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


# ---------------------------------------------------------------------------------------------
# wsmerge rws


def test_parse_signature_arguments(tmp_path):
    from weightspace.cli.rws import _parse_sig_args

    odd = tmp_path / "a:0.5"
    odd.write_text("")
    assert _parse_sig_args(("noise.rws.safetensors", "blur.rws.safetensors:0.5", "c:/x:y.safetensors",
                            "dir:1/s.safetensors:-1e-1", str(odd))) == [
        ("noise.rws.safetensors", 1.0), ("blur.rws.safetensors", 0.5), ("c:/x:y.safetensors", 1.0),
        ("dir:1/s.safetensors", -0.1), (str(odd), 1.0)]


def test_cli_end_to_end(zoo_models, run_cli, tmp_path):
    m = {k: str(v) for k, v in zoo_models.items()}
    sig = tmp_path / "noise.rws.safetensors"
    code, out, err = run_cli("rws", "extract", "--pretrained", m["pre"], "--clean", m["clean"],
                             "--robust", m["noise"], "-o", sig, "--bits", "4", "--per-row")
    assert code == 0, err
    assert "stem.weight  [16, 64]" in out and "blocks.0.fc1.weight" in out and "blocks.1." not in out
    assert "x smaller" in out and "layer 0" in out and "post" in out
    code, _, err = run_cli("rws", "extract", "--pretrained", m["pre"], "--clean", m["clean"],
                           "--robust", m["noise"], "-o", sig, "--bits", "9")
    assert code == 1 and "exists" in err
    code, _, err = run_cli("rws", "extract", "--pretrained", m["pre"], "--clean", m["clean"],
                           "--robust", m["noise"], "-o", tmp_path / "x.rws.safetensors", "--bits", "9")
    assert code == 2 and "bits must be between 2 and 8" in err
    blur = tmp_path / "blur.rws.safetensors"
    assert run_cli("rws", "extract", "--pretrained", m["pre"], "--clean", m["clean"], "--robust", m["blur"],
                   "-o", blur, "--layers", "first:1", "--scheme", "log", "--bits", "3")[0] == 0

    code, out, err = run_cli("rws", "inspect", sig)
    assert code == 0, err
    assert "4-bit uniform (per row)" in out and "fingerprint" in out and m["noise"] in out
    code, out, _ = run_cli("rws", "inspect", sig, "--json")
    info = json.loads(out)
    assert info["meta"]["bits"] == 4 and [u["kept"] for u in info["layers"]][:3] == ["all", "all", "none"]
    assert info["size"]["model_bytes"] == load_space(zoo_models["noise"]).nbytes

    both = tmp_path / "both"
    code, out, err = run_cli("rws", "patch", m["clean"], sig, f"{blur}:0.5", "-o", both)
    assert code == 0, err
    assert "+ 1 x noise.rws.safetensors + 0.5 x blur.rws.safetensors" in out
    assert [e["alpha"] for e in read_patch_record(load_space(both))] == [1.0, 0.5]
    code, _, err = run_cli("rws", "unpatch", both, f"{blur}:0.25", "-o", tmp_path / "bad")
    assert code == 1 and "added with alpha 0.5, not 0.25" in err and not (tmp_path / "bad").exists()
    code, _, err = run_cli("rws", "unpatch", both, f"{blur}:0.25", "-o", tmp_path / "forced", "--force")
    assert code == 0 and "warning: subtracting signature blur.rws.safetensors" in err
    restored = tmp_path / "restored"
    code, out, err = run_cli("rws", "unpatch", both, sig, f"{blur}:0.5", "-o", restored)
    assert code == 0 and "patch record: empty" in out, err
    clean = load_space(zoo_models["clean"])
    back = load_space(restored)
    for name in clean:
        torch.testing.assert_close(back[name].load(), clean[name].load(), rtol=0, atol=1e-6)
    code, _, err = run_cli("rws", "patch", m["clean"], sig, "-o", both)
    assert code == 2 and "--overwrite" in err


def test_cli_refuses_another_architecture_and_bad_files(zoo_models, two_signatures, run_cli, tmp_path):
    noise, _ = two_signatures
    torch.manual_seed(0)
    other = tmp_path / "mlp"
    WeightSpace.from_tensors({n: p.detach() for n, p in build_model({"arch": "mlp", "width": 16, "depth": 2},
                                                                     (1, 8, 8), 10).state_dict().items()}
                             ).save(other)
    code, _, err = run_cli("rws", "patch", other, noise, "-o", tmp_path / "out")
    assert code == 1 and "another architecture" in err and not (tmp_path / "out").exists()
    code, _, err = run_cli("rws", "inspect", zoo_models["clean"] / "model.safetensors")
    assert code == 1 and "is not a robust weight signature" in err


@pytest.mark.requires("plot")
def test_cli_inspect_plot(two_signatures, run_cli, tmp_path):
    noise, _ = two_signatures
    png = tmp_path / "layers.png"
    code, out, err = run_cli("rws", "inspect", noise, "--plot", png)
    assert code == 0, err
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_interrupted_patch_leaves_no_output(zoo_models, two_signatures, run_cli, tmp_path, monkeypatch):
    noise, _ = two_signatures
    real = rws_file._read_values
    calls = []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(rws_file, "_read_values", interrupt)
    out = tmp_path / "patched"
    code, _, err = run_cli("rws", "patch", zoo_models["clean"], noise, "-o", out)
    assert code == 130 and "nothing was written" in err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_signature_repr_and_space(zoo_models):
    sig = extract_signature(*_spaces(zoo_models), layers="first:1", bits=8)
    assert isinstance(sig, Signature) and "8-bit uniform" in repr(sig)
    assert set(sig.space()) == set(sig.kept)


def test_patch_refuses_values_past_the_model_dtype(tmp_path):
    from weightspace.errors import NonFiniteError

    spaces = [WeightSpace.from_tensors({"layers.0.w": t}) for t in
              (torch.ones(4), torch.full((4,), 1.01), torch.tensor([1.5, 0.5, 1.2, 1.0]))]
    sig = extract_signature(*spaces, layers="all")
    half = WeightSpace.from_tensors({"layers.0.w": torch.full((4,), 60000.0).half()})
    with pytest.raises(NonFiniteError, match="'layers.0.w': patching produced NaN/Inf values in float16"):
        save_patched(patch(half, [(sig, 1e5)]), tmp_path / "out")
    assert not (tmp_path / "out").exists()

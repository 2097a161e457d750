"""Robust weight signatures: the file, its size, and malformed files."""

from __future__ import annotations

import json

import pytest
import torch

from tests.signature_models import (
    _spaces,
    zoo_models_fixture,  # noqa: F401  (fixtures)
)
from weightspace.errors import InputError, SpecError
from weightspace.merges.signatures import (
    extract_signature,
    load_signature,
    packed_size,
    save_signature,
    signature_size_report,
)
from weightspace.safetensors_io import read_header


@pytest.mark.parametrize("bits, scheme, granularity", [(None, "uniform", "tensor"), (4, "uniform", "row"),
                                                       (3, "log", "tensor"), (2, "log", "row"),
                                                       (4, "minmax", "tensor"), (3, "minmax", "row")])
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
        a, b = {"uniform": ("scale", "zero"), "log": ("log2_min", "log2_step"), "minmax": ("min", "step")}[scheme]
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


def test_size_report_compares_file_with_file(zoo_models, tmp_path):
    """Regression test: the signature file is compared with the checkpoint's file, both with
    their headers, not with the checkpoint's tensor bytes."""
    from weightspace.merges.signatures import checkpoint_file_bytes

    pre, clean, robust = _spaces(zoo_models)
    sig = extract_signature(pre, clean, robust, layers="first:1", bits=4)
    path = save_signature(sig, tmp_path / "s.rws.safetensors")
    ck = (zoo_models["noise"] / "model.safetensors").stat().st_size
    assert checkpoint_file_bytes(robust) == ck > robust.nbytes and sig.meta["model_file_bytes"] == ck
    size = signature_size_report(path)
    assert size["bytes"] == path.stat().st_size and size["payload_bytes"] == sig.nbytes_stored
    assert size["header_bytes"] == path.stat().st_size - sig.nbytes_stored
    assert size["model_bytes"] == ck and size["model_bytes_are"] == "file"
    assert size["fraction"] == pytest.approx(path.stat().st_size / ck)
    assert size["times_smaller"] == pytest.approx(ck / path.stat().st_size)
    assert size["kept_params"] == sum(t.numel() for t in sig.tensors.values())
    # another checkpoint to compare with, given in bytes
    assert signature_size_report(path, 1000)["times_smaller"] == pytest.approx(1000 / path.stat().st_size)
    # extracted in memory: no file to compare with; the tensor bytes stand in, and say so
    from weightspace.ir import WeightSpace

    mem = [WeightSpace.from_tensors(sp.materialize()) for sp in (pre, clean, robust)]
    assert checkpoint_file_bytes(mem[2]) is None
    p2 = save_signature(extract_signature(*mem, layers="first:1"), tmp_path / "m.rws.safetensors")
    size = signature_size_report(p2)
    assert size["model_bytes"] == robust.nbytes and size["model_bytes_are"] == "tensors"


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

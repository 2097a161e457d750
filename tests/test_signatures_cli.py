"""Robust weight signatures: `wsmerge rws` extract, inspect, patch and unpatch."""

from __future__ import annotations

import json
import os

import pytest
import torch

import weightspace.merges.signatures.file_format as rws_file
from tests.signature_models import two_signatures_fixture, zoo_models_fixture  # noqa: F401  (fixtures)
from weightspace.ir import WeightSpace
from weightspace.merges.signatures import read_patch_record
from weightspace.sources import load_space
from weightspace.zoo.arch import build_model


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
    ratio = (zoo_models["noise"] / "model.safetensors").stat().st_size / sig.stat().st_size
    assert "for the robust checkpoint's file" in out and f"{ratio:.1f}x smaller" in out
    code, _, err = run_cli("rws", "extract", "--pretrained", m["pre"], "--clean", m["clean"],
                           "--robust", m["noise"], "-o", sig, "--bits", "9")
    assert code == 2 and "already exists" in err
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
    # file against file (regression: the checkpoint's tensor bytes used to stand in for its file)
    ck_file = (zoo_models["noise"] / "model.safetensors").stat().st_size
    assert ck_file > load_space(zoo_models["noise"]).nbytes
    assert info["size"]["model_bytes"] == ck_file and info["size"]["model_bytes_are"] == "file"
    assert info["size"]["bytes"] == sig.stat().st_size
    assert info["size"]["times_smaller"] == pytest.approx(ck_file / sig.stat().st_size)
    assert info["size"]["header_bytes"] == sig.stat().st_size - info["size"]["payload_bytes"]

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


def test_cli_authors_scaling(zoo_models, two_signatures, run_cli, tmp_path):
    """--scaling authors adds (alpha / n)^2 x each signature, as the authors' model_patching.py."""
    from weightspace.merges.signatures import load_signature

    noise, blur = two_signatures
    out = tmp_path / "both"
    code, text, err = run_cli("rws", "patch", zoo_models["clean"], f"{noise}:2", f"{blur}:1", "--scaling",
                              "authors", "-o", out)
    assert code == 0, err
    assert ("+ 1 x noise.rws.safetensors (alpha 2, authors scaling) "
            "+ 0.25 x blur.rws.safetensors (alpha 1, authors scaling)") in text
    rec = read_patch_record(load_space(out))
    assert [(e["alpha"], e["scaling"], e["coefficient"]) for e in rec] == [(2.0, "authors", 1.0),
                                                                          (1.0, "authors", 0.25)]
    clean, got = load_space(zoo_models["clean"]), load_space(out)
    r2 = load_signature(blur).tensors["blocks.1.fc1.weight"]
    torch.testing.assert_close(got["blocks.1.fc1.weight"].load(),
                               clean["blocks.1.fc1.weight"].load() + 0.25 * r2, rtol=0, atol=1e-6)
    code, _, err = run_cli("rws", "unpatch", out, f"{blur}:1", "-o", tmp_path / "bad")
    assert code == 1 and "authors scaling (coefficient 0.25)" in err
    code, text, err = run_cli("rws", "unpatch", out, f"{blur}:1", "--scaling", "authors", "-o", tmp_path / "one")
    assert code == 0, err
    assert "- 0.25 x blur.rws.safetensors (alpha 1, authors scaling)" in text  # what was added, not (1/1)^2
    back = load_space(tmp_path / "one")
    torch.testing.assert_close(back["blocks.1.fc1.weight"].load(), clean["blocks.1.fc1.weight"].load(),
                               rtol=0, atol=1e-6)
    code, _, err = run_cli("rws", "patch", zoo_models["clean"], noise, "--scaling", "squared", "-o", tmp_path / "x")
    assert code == 2 and "squared" in err


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

"""Hostile zoos, generators and genes (issue 17): sizes a file claims are checked before anything
is allocated from them, counts are bounded before anything is expanded, reading a zoo never
changes it, and catalog rows are checked once. Every fixture is built here; nothing is downloaded."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from weightspace.errors import InputError, SpecError
from weightspace.zoo import arch as zoo_arch
from weightspace.zoo.arch import build_model
from weightspace.zoo.build import build_zoo
from weightspace.zoo.spec import parse_zoo_spec
from weightspace.zoo.store import Zoo, read_catalog, write_catalog

TINY_ZOO = "arch: {arch: mlp, width: 4, depth: 1}\ntrain: {epochs: 1, batch_size: 256}\ngrid: {seed: [0, 1]}\n"


def one_line(err: str) -> str:
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def no_big_modules(monkeypatch):
    """Fail (instead of allocating) if a zoo model wider than 1024 is built for real."""
    real = zoo_arch._construct

    def guarded(cfg, input_shape, num_classes):
        if torch.empty(0).device.type != "meta" and cfg["width"] > 1024:
            raise AssertionError(f"a {cfg['width']}-wide model was allocated from a file's claim")
        return real(cfg, input_shape, num_classes)

    monkeypatch.setattr(zoo_arch, "_construct", guarded)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-model zoo, a kde and a d2nwg generator on it (seconds)."""
    from weightspace.zoo.gen.generator import train_generator

    root = tmp_path_factory.mktemp("hostile")
    build_zoo(parse_zoo_spec(TINY_ZOO), root / "zoo", workers=1, progress=False)
    train_generator(root / "zoo", root / "kde", method="kde", vae_epochs=1, vae_hidden=8, seed=0)
    train_generator(root / "zoo", root / "d2nwg", method="d2nwg", vae_epochs=1, diffusion_epochs=1,
                    vae_hidden=8, diffusion_hidden=8, timesteps=10, seed=0)
    return root


def zoo_checkpoint(d: Path, width_claimed: int, width: int = 16, depth: int = 2) -> Path:
    """A zoo checkpoint whose config.json claims `width_claimed` next to tensors of `width`."""
    d.mkdir(parents=True)
    torch.manual_seed(0)
    m = build_model({"arch": "mlp", "width": width, "depth": depth}, (1, 8, 8), 10)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({
        "model_type": "weightspace-zoo", "arch": {"arch": "mlp", "width": width_claimed, "depth": depth},
        "input_shape": [1, 8, 8], "num_classes": 10}))
    return d


def files_of(d: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else b"", p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*"))}


# ---------------------------------------------------------------- 5. sizes read from files

def test_fisher_refuses_a_config_wider_than_its_tensors_before_allocating(tmp_path, run_cli, no_big_modules):
    ck = zoo_checkpoint(tmp_path / "ck", width_claimed=60000)
    t0 = time.perf_counter()
    code, _, err = run_cli("fisher", ck, "--data", "digits", "-o", tmp_path / "f.safetensors", "--n-examples", "8")
    assert time.perf_counter() - t0 < 10
    assert code == 1, err
    one_line(err)
    assert f"{ck}/config.json" in err and "arch.width=60000" in err and "'layers.0.weight'" in err
    assert "[60000, 64]" in err and "[16, 64]" in err
    assert not (tmp_path / "f.safetensors").exists()
    # the same check wherever a zoo config meets its tensors: metrics, gram, the API
    with pytest.raises(InputError, match="arch.width=60000"):
        zoo_arch.model_from_config(json.loads((ck / "config.json").read_text()), str(ck),
                                   tensors={"layers.0.weight": (16, 64)})
    code, _, err = run_cli("fisher", zoo_checkpoint(tmp_path / "ok", width_claimed=16), "--data", "digits",
                           "-o", tmp_path / "ok.safetensors", "--n-examples", "8")
    assert code == 0, err


@pytest.mark.parametrize("field, value, words", [
    ("hidden", 3_000_000, ["vae.hidden=3000000", "vae.safetensors", "[8, 80]"]),
    ("hidden", -5, ["vae.hidden must be >= 1, got -5"]),
    ("n_chunks", 10 ** 11, ["vae.n_chunks is 100,000,000,000, more than"]),
    ("depth", 10 ** 8, ["vae.depth is 100,000,000, more than the 4,096"]),
    ("latent_dim", "16", ["vae.latent_dim must be a whole number"]),
])
def test_generator_json_sizes_are_checked_before_any_module_is_built(tiny, tmp_path, run_cli, field, value, words):
    bad = tmp_path / "gen"
    shutil.copytree(tiny / "kde", bad)
    meta = json.loads((bad / "generator.json").read_text())
    meta["vae"][field] = value
    (bad / "generator.json").write_text(json.dumps(meta))
    t0 = time.perf_counter()
    code, _, err = run_cli("generate", "sample", bad, "--data", "digits", "-n", "1", "-o", tmp_path / "s")
    assert time.perf_counter() - t0 < 5
    assert code == 1, err
    one_line(err)
    assert f"{bad}/generator.json" in err and all(w in err for w in words), err
    assert "negative dimension" not in err and "RuntimeError" not in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("section, field, value", [
    ("diffusion", "hidden", 100_000), ("diffusion", "timesteps", 5_000_000), ("encoder", "out_dim", -1),
])
def test_d2nwg_modules_are_checked_against_their_files(tiny, tmp_path, section, field, value):
    from weightspace.zoo.gen.generator import load_generator

    bad = tmp_path / "gen"
    shutil.copytree(tiny / "d2nwg", bad)
    meta = json.loads((bad / "generator.json").read_text())
    meta[section][field] = value
    (bad / "generator.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=rf"generator.json: .*{section}\.{field}"):
        load_generator(bad)


def test_chunker_and_vae_must_agree(tiny, tmp_path):
    from weightspace.zoo.gen.generator import load_generator

    bad = tmp_path / "gen"
    shutil.copytree(tiny / "kde", bad)
    meta = json.loads((bad / "generator.json").read_text())
    meta["tokenizer"]["shapes"][0] = [4, 640]           # 2,560 values: more chunks than the VAE reads
    meta["tokenizer"].pop("padding")
    (bad / "generator.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"the weight chunker .* cuts \d+ chunks of 64, but the VAE reads 7"):
        load_generator(bad)


def test_zoo_build_refuses_a_model_too_large_up_front(tmp_path, run_cli, no_big_modules):
    spec = tmp_path / "wide.yaml"
    spec.write_text("arch: {arch: mlp, depth: 2}\ntrain: {epochs: 1}\ngrid: {width: [8, 100000]}\n")
    code, _, err = run_cli("zoo", "build", spec, "-o", tmp_path / "z", "--workers", "1", "--no-progress")
    assert code == 2, err
    one_line(err)
    assert str(spec) in err and "more than the 100,000,000" in err and "grid point width=100000" in err
    assert not (tmp_path / "z").exists()
    with pytest.raises(SpecError, match="arch.width: 20,000,000 is more than the 16,777,216"):
        parse_zoo_spec("arch: {arch: mlp, width: 20000000}\n")


# ---------------------------------------------------------------- 6. counts bounded first

def test_a_huge_grid_is_refused_from_its_axes_before_expanding(tmp_path, run_cli):
    values = ", ".join(str(i + 1) for i in range(100))
    text = "arch: {arch: mlp, depth: 1}\ngrid:\n" + "".join(
        f"  {a}: [{values}]\n" for a in ("width", "batch_size", "epochs", "warmup_epochs"))
    spec = tmp_path / "huge.yaml"
    spec.write_text(text)
    for extra in ((), ("--yes",), ("--dry-run",)):
        t0 = time.perf_counter()
        code, _, err = run_cli("zoo", "build", spec, "-o", tmp_path / "z", *extra)
        assert time.perf_counter() - t0 < 2, extra
        assert code == 2 and "grid: 100,000,000 models (100 width x 100 batch_size" in err, err
        one_line(err)
    assert not (tmp_path / "z").exists()
    # more than 1000 models: --yes, counted before the expansion
    spec.write_text("grid: {seed: [" + ",".join(map(str, range(1001))) + "]}\n")
    code, _, err = run_cli("zoo", "build", spec, "-o", tmp_path / "z")
    assert code == 2 and "1001 models (more than 1000); pass --yes" in err


def test_learngene_depth_is_bounded(tmp_path, run_cli):
    from weightspace.merges.learngene import expand, load_gene
    from weightspace.zoo.tiny import write_tiny_llama

    src = write_tiny_llama(tmp_path / "llama", seed=0, layers=3)
    code, _, err = run_cli("learngene", "fit", src, "-o", tmp_path / "g.gene")
    assert code == 0, err
    t0 = time.perf_counter()
    code, _, err = run_cli("learngene", "expand", tmp_path / "g.gene", "--depth", "100000000", "-o", tmp_path / "x")
    assert time.perf_counter() - t0 < 2
    assert code == 2 and "'--depth': 100000000 is not in the range 1<=x<=4096" in err, err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SpecError, match="depth: 100,000,000 layers is more than the 4,096"):
        expand(load_gene(tmp_path / "g.gene"), 10 ** 8)
    # a gene that claims a huge source depth
    meta = json.loads((tmp_path / "g.gene" / "gene.json").read_text())
    meta["source_depth"] = 10 ** 8
    (tmp_path / "g.gene" / "gene.json").write_text(json.dumps(meta))
    code, _, err = run_cli("learngene", "inspect", tmp_path / "g.gene")
    assert code == 1 and "source_depth must be in 1..4,096, got 100,000,000" in err, err


def test_generate_sample_count_is_bounded(tiny, tmp_path, run_cli):
    code, _, err = run_cli("generate", "sample", tiny / "kde", "--data", "digits", "-n", "100000000",
                           "-o", tmp_path / "s")
    assert code == 2 and "'-n': 100000000 is not in the range 1<=x<=10000" in err, err
    from weightspace.zoo.gen.generator import generate_weights, load_generator

    with pytest.raises(SpecError, match="-n: 100,000,000 models is more than the 10,000"):
        generate_weights(load_generator(tiny / "kde"), "digits", 10 ** 8)


# ---------------------------------------------------------------- 8. reading a zoo never writes

def interrupted(tiny, tmp_path) -> tuple[Path, str, int]:
    """A copy of the zoo as a kill leaves it: a model not yet in the catalog, a temporary dir."""
    root = tmp_path / "z"
    shutil.copytree(tiny / "zoo", root)
    rows = read_catalog(root / "catalog.parquet")
    victim = rows[0]["model_id"]
    write_catalog(root / "catalog.parquet", [r for r in rows if r["model_id"] != victim])
    (root / "models" / ".tmp-deadbeef-x").mkdir()
    return root, victim, len(rows)


def test_reading_commands_leave_the_zoo_byte_identical(tiny, tmp_path, run_cli):
    root, victim, n = interrupted(tiny, tmp_path)
    before = files_of(root)
    for args in (("zoo", "show", root), ("zoo", "show", root, "--all", "--json"),
                 ("zoo", "find", root, "seed=0"), ("zoo", "build", tmp_path / "s.yaml", "-o", root, "--dry-run")):
        (tmp_path / "s.yaml").write_text(TINY_ZOO)
        code, out, err = run_cli(*args)
        assert code == 0, (args, err)
        assert files_of(root) == before, args
    code, out, _ = run_cli("zoo", "show", root, "--all", "--json")
    assert victim in out                                # the finished model is seen, in memory
    assert Zoo(root).adopted == [victim] and files_of(root) == before
    z = Zoo(root, write=True)                           # a build (or metrics) finishes the recovery
    assert z.adopted == [victim] and not (root / "models" / ".tmp-deadbeef-x").exists()
    assert len(read_catalog(root / "catalog.parquet")) == n
    with pytest.raises(Exception, match="opened read-only"):
        Zoo(root).update_rows({})


def test_rows_json_leaving_the_zoo_is_refused(tiny, tmp_path, run_cli):
    root, victim, _ = interrupted(tiny, tmp_path)
    outside = tmp_path / "outside" / "epoch-0001"
    shutil.copytree(root / "models" / victim / "epoch-0001", outside)
    rows = json.loads((root / "models" / victim / "rows.json").read_text())
    rows[0]["path"] = "../outside/epoch-0001"
    (root / "models" / victim / "rows.json").write_text(json.dumps(rows))
    before = files_of(root)
    code, out, err = run_cli("zoo", "show", root)
    assert code == 1, err
    one_line(err)
    assert f"{root}/models/{victim}/rows.json" in err and "'../outside/epoch-0001'" in err and "leaves" in err
    assert files_of(root) == before and out == ""
    # a path that stays in the zoo but not in its own model directory is no better
    other = next(d.name for d in (root / "models").iterdir() if d.name not in (victim, ".tmp-deadbeef-x"))
    rows[0]["path"] = f"models/{other}/epoch-0001"
    (root / "models" / victim / "rows.json").write_text(json.dumps(rows))
    listed = read_catalog(root / "catalog.parquet")
    with pytest.raises(InputError, match=f"leaves its model directory models/{victim}"):
        Zoo(root, write=True)
    assert read_catalog(root / "catalog.parquet") == listed           # nothing adopted


# ---------------------------------------------------------------- 12. catalog rows checked once

def test_catalog_without_a_required_column_or_with_an_escaping_path(tiny, tmp_path, run_cli):
    import pyarrow.parquet as pq

    root = tmp_path / "z"
    shutil.copytree(tiny / "zoo", root)
    table = pq.read_table(root / "catalog.parquet")
    pq.write_table(table.drop(["model_id"]), root / "catalog.parquet")
    for args in (("zoo", "show", root), ("zoo", "find", root, "seed=0"), ("generate", "train", root, "-o", tmp_path / "g")):
        code, _, err = run_cli(*args)
        assert code == 1, (args, err)
        one_line(err)
        assert f"{root}/catalog.parquet: the zoo catalog has no 'model_id' column" in err
        assert "KeyError" not in err
    rows = table.to_pylist()
    rows[0]["path"] = "../../etc"
    write_catalog(root / "catalog.parquet", rows)
    code, _, err = run_cli("zoo", "show", root)
    assert code == 1 and "row 0" in err and "'../../etc', which leaves the zoo directory" in err, err
    for r in rows:
        r["path"], r["dataset"] = f"models/{r['model_id']}/epoch-{r['epoch']:04d}", None
    write_catalog(root / "catalog.parquet", rows)
    code, _, err = run_cli("generate", "train", root, "-o", tmp_path / "g")
    assert code == 1 and "has no 'dataset'" in err and "catalog.parquet: row 0" in err, err
    assert not (tmp_path / "g").exists()

"""Shared by the error tests: spec writers, checks that a failed run left nothing behind,
and the `out` / `good_out` fixtures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from weightspace.sources import load_space

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
UP_PROJ = "model.layers.1.mlp.up_proj.weight"


# ---------------------------------------------------------------- helpers


def linear_spec(*models: Path, method: str = "linear", weights: list[float] | None = None,
                model_params: str = "weight: {w}", extra: str = "") -> str:
    weights = weights or [0.5] * len(models)
    lines = [f"merge_method: {method}", "models:"]
    for m, w in zip(models, weights):
        lines += [f"  - model: {m}", f"    parameters: {{{model_params.format(w=w)}}}"]
    return "\n".join(lines) + "\n" + extra


def hidden_leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.wsmerge-"))


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was created by a failed run"
    assert hidden_leftovers(out) == []


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def single_error_line(err: str) -> str:
    """The CLI's default error style: one `error: ...` message and no traceback."""
    assert "Traceback" not in err
    assert err.startswith("error: "), err
    return err


def save_tensors(d: Path, tensors: dict[str, torch.Tensor], config_from: Path | None = None) -> Path:
    d.mkdir(parents=True)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    if config_from is not None:
        shutil.copy(config_from / "config.json", d / "config.json")
    return d


# Fixtures: a test module imports out_fixture (and good_out_fixture) and asks for `out`
# (`good_out`); the function names differ from the fixture names so that a test's
# parameter does not shadow the import.


@pytest.fixture(name="out")
def out_fixture(tmp_path: Path) -> Path:
    return tmp_path / "merged"


@pytest.fixture(name="good_out")
def good_out_fixture(tiny_models, run_cli, write_spec, out) -> dict[str, bytes]:
    """A finished merge already at OUT; returns its files' bytes."""
    spec = write_spec(linear_spec(tiny_models.ft_a, tiny_models.ft_b), name="good.yaml")
    code, _, err = run_cli("run", spec, out)
    assert code == 0, err
    return snapshot(out)


def write_sharded(src: Path, dst: Path, shard_size: str = "20K") -> list[str]:
    """Re-save a checkpoint as several shards; returns the shard file names."""
    load_space(src).save(dst, shard_size=shard_size, config=json.loads((src / "config.json").read_text()))
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    return shards

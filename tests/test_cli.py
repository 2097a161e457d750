"""The `wsmerge` commands end to end: methods, inspect, demo, run on the examples."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from weightspace import load_space

REPO = Path(__file__).resolve().parents[1]
CLASSIC = ["breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della", "della_linear",
           "linear", "model_stock", "nuslerp", "passthrough", "slerp", "task_arithmetic", "ties"]


def test_methods_lists_every_method_with_defaults(run_cli):
    code, out, _ = run_cli("methods", "--json")
    assert code == 0
    data = {m["name"]: m for m in json.loads(out)}
    assert set(CLASSIC) <= set(data)
    ties = data["ties"]
    glob = {p["name"]: p for p in ties["global_parameters"]}
    per = {p["name"]: p for p in ties["model_parameters"]}
    assert glob["normalize"]["default"] is True and glob["lambda"]["default"] == 1.0
    assert per["weight"]["required"] is True and per["density"]["default"] == 1.0
    assert ties["base_model"] == "required" and "arxiv.org" in ties["url"]
    assert {p["name"] for p in data["dare_ties"]["global_parameters"]} >= {"seed"}
    code, out, _ = run_cli("methods")
    assert code == 0 and "ties  -  " in out and "density" in out


def test_methods_unknown_name_suggests(run_cli):
    code, _, err = run_cli("methods", "tie")
    assert code == 2
    assert "unknown merge_method 'tie'. Did you mean 'ties'?" in err


def test_inspect_and_compare(tmp_path, run_cli):
    a = {"model.layers.0.w": torch.tensor([3.0, 4.0]), "model.layers.1.w": torch.tensor([1.0, 0.0]),
         "lm_head.weight": torch.ones(2, 2)}
    b = {k: 2 * v for k, v in a.items()}
    b["model.layers.1.w"] = torch.tensor([0.0, 1.0])  # orthogonal
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    code, out, _ = run_cli("inspect", str(tmp_path / "a.safetensors"), "--vs",
                           str(tmp_path / "b.safetensors"), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["model"]["parameters"] == 8 and data["model"]["tensors"] == 3
    assert data["model"]["layer_stacks"] == {"model.layers": 2}
    rows = {r["name"]: r for r in data["comparison"]["tensors"]}
    # b = 2a: cosine 1, ||a - 2a|| / ||a|| = 1
    assert rows["model.layers.0.w"]["cosine"] == pytest.approx(1.0)
    assert rows["model.layers.0.w"]["rel_diff"] == pytest.approx(1.0)
    assert rows["model.layers.1.w"]["cosine"] == pytest.approx(0.0)
    assert rows["model.layers.1.w"]["rel_diff"] == pytest.approx(2**0.5)
    assert data["comparison"]["min_cosine"] == pytest.approx(0.0)
    code, out, _ = run_cli("inspect", str(tmp_path / "a.safetensors"), "--vs", str(tmp_path / "b.safetensors"))
    assert code == 0 and "min cosine" in out and "model.layers.N x 2" in out


def test_demo_runs_and_writes_loadable_merges(tmp_path, run_cli):
    code, out, err = run_cli("demo", str(tmp_path / "demo"), "--device", "cpu")
    assert code == 0, err
    for m in ["linear", "task_arithmetic", "ties", "dare_ties", "slerp", "model_stock"]:
        assert m in out
        space = load_space(tmp_path / "demo" / "merges" / m)
        assert len(space) == 21  # tiny Llama: embed + 2 x 9 + norm + head
        assert (tmp_path / "demo" / "specs" / f"{m}.yaml").is_file()


# example specs of other commands, each run by its own test
OTHER_COMMANDS = {"moe.yaml": "wsmerge moe: tests/test_moe.py::test_the_example_runs",
                  "evolve_digits.yaml": "wsmerge evolve: tests/test_evolve.py::test_the_example_runs"}


@pytest.mark.parametrize("spec", sorted(p.name for p in (REPO / "examples").glob("*.yaml")
                                        if p.name not in OTHER_COMMANDS))
def test_examples_run(tmp_path, run_cli, spec):
    out = tmp_path / "out"
    code, _, err = run_cli("run", str(REPO / "examples" / spec), str(out), "--no-progress")
    assert code == 0, err
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "- merge\n- weightspace\n" in card
    cfg = json.loads((out / "config.json").read_text())
    if cfg.get("model_type") == "weightspace-zoo":      # digits MLPs (fisher, regmean examples)
        assert "library_name" not in card
        assert load_space(out).structure().num_layers == cfg["arch"]["depth"]
        return
    assert "library_name: transformers" in card
    expected_layers = 6 if spec == "passthrough_slices.yaml" else 4
    assert cfg["num_hidden_layers"] == expected_layers
    assert load_space(out).structure().num_layers == expected_layers


@pytest.mark.requires("hf")
def test_merged_llama_loads_with_transformers(tmp_path, run_cli):
    import transformers

    out = tmp_path / "ties"
    code, _, err = run_cli("run", str(REPO / "examples" / "ties.yaml"), str(out), "--no-progress",
                           "--shard-size", "60K")
    assert code == 0, err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    sd = model.state_dict()
    merged = load_space(out)
    for name in ["model.layers.2.mlp.up_proj.weight", "lm_head.weight"]:
        assert torch.equal(sd[name], merged[name].load())
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()


def _fake_hub_cache(root: Path, repo: str, seed: int, delta_seed: int | None = None) -> None:
    """A Hugging Face cache entry as huggingface_hub lays it out (refs/ + snapshots/)."""
    from weightspace.zoo.tiny import write_tiny_llama

    folder = root / f"models--{repo.replace('/', '--')}"
    commit = (f"{seed:02d}{delta_seed or 0:02d}" * 10)[:40]
    write_tiny_llama(folder / "snapshots" / commit, seed=seed, delta_seed=delta_seed)
    (folder / "refs").mkdir(parents=True)
    for ref in ("main", "v1"):
        (folder / "refs" / ref).write_text(commit)


def test_hub_ids_resolve_from_the_cache_offline(tmp_path, run_cli, write_spec, monkeypatch):
    cache = tmp_path / "hf-cache"
    _fake_hub_cache(cache, "acme/base", seed=0)
    _fake_hub_cache(cache, "acme/ft", seed=0, delta_seed=1)
    monkeypatch.chdir(tmp_path)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    spec = write_spec("merge_method: task_arithmetic\nbase_model: acme/base@v1\nmodels:\n"
                      "  - model: acme/ft\n    parameters: {weight: 0.5}\n")
    code, _, err = run_cli("run", str(spec), str(tmp_path / "out"), "--no-progress", env=env)
    assert code == 0, err
    card = (tmp_path / "out" / "README.md").read_text()
    front = card.split("---")[1]
    assert "- acme/base" in front and "- acme/ft" in front  # base_model lists the Hub models
    n = "model.layers.1.mlp.up_proj.weight"
    snap = next((cache / "models--acme--ft" / "snapshots").iterdir())
    base = load_space(next((cache / "models--acme--base" / "snapshots").iterdir()))[n].load()
    ft = load_space(snap)[n].load()
    assert torch.allclose(load_space(tmp_path / "out")[n].load(), base + 0.5 * (ft - base), atol=1e-7)
    # an id that is not cached fails cleanly offline, naming it
    spec2 = write_spec("merge_method: linear\nmodels:\n  - model: acme/missing\n    parameters: {weight: 1}\n",
                       name="missing.yaml")
    code, _, err = run_cli("run", str(spec2), str(tmp_path / "out2"), env=env)
    assert code == 1 and "acme/missing: not a local path, and not in the Hub cache" in err
    assert not (tmp_path / "out2").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_device_without_cuda_is_a_clear_error(tmp_path, run_cli):
    code, _, err = run_cli("run", str(REPO / "examples" / "linear.yaml"), str(tmp_path / "o"),
                           "--device", "cuda:0", "--no-progress")
    assert code == 1 and "device 'cuda:0' requested but CUDA is not available" in err
    assert not (tmp_path / "o").exists()
    code, _, err = run_cli("run", str(REPO / "examples" / "linear.yaml"), str(tmp_path / "o"),
                           "--device", "tpu", "--no-progress")
    assert code == 1 and "unknown device 'tpu': use auto, cpu, cuda or cuda:N" in err


def test_greedy_option_takes_a_list_or_repeats():
    import click
    from click.testing import CliRunner

    from weightspace.cli.options import Command, GreedyOption

    @click.command(cls=Command)
    @click.option("--tasks", cls=GreedyOption, multiple=True)
    @click.option("--data")
    def cmd(tasks, data):
        click.echo(f"{list(tasks)} {data}")

    r = CliRunner().invoke(cmd, ["--tasks", "a", "b", "c", "--data", "d"])
    assert r.output.strip() == "['a', 'b', 'c'] d"
    r = CliRunner().invoke(cmd, ["--tasks", "a", "--data", "d", "--tasks", "b"])
    assert r.output.strip() == "['a', 'b'] d"

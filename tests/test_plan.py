"""Spec validation, parameter evaluation, planning and slices (layer stacking)."""

import json

import pytest
import torch

from weightspace import SpecError, load_space
from weightspace.cli.main import main
from weightspace.merge import evaluate, plan_merge, run_plan
from weightspace.spec import Condition, parse_spec
from weightspace.zoo.tiny import write_tiny_llama


@pytest.mark.parametrize(
    "setting,name,t,expected",
    [
        (0.3, "x", 0.7, 0.3),
        ([0.0, 1.0], "x", 0.25, 0.25),
        # mergekit: scaled = t*(n-1) = 2.4 -> 0.6*v[2] + 0.4*v[3]
        ([0.0, 0.5, 0.3, 0.7, 1.0], "x", 0.6, 0.6 * 0.3 + 0.4 * 0.7),
        ([0.0, 0.5, 0.3, 0.7, 1.0], "x", 1.0, 1.0),
        ([Condition(filter="mlp", value=0.1), Condition(value=0.9)], "layers.0.mlp.up", 0, 0.1),
        ([Condition(filter="mlp", value=0.1), Condition(value=0.9)], "layers.0.attn.q", 0, 0.9),
        ([Condition(filter="*", value=[1.0, 3.0])], "anything", 0.5, 2.0),
        ([Condition(filter="mlp", value=0.1)], "attn", 0, None),
    ],
)
def test_evaluate_setting(setting, name, t, expected):
    got = evaluate(setting, name, t)
    assert got == pytest.approx(expected) if expected is not None else got is None


@pytest.fixture
def four_layer(tmp_path):
    a = write_tiny_llama(tmp_path / "a", seed=0, layers=4)
    b = write_tiny_llama(tmp_path / "b", seed=5, layers=4)
    return tmp_path, a, b


def test_parameter_precedence_and_gradient(four_layer):
    tmp, a, b = four_layer
    spec = parse_spec(f"""
merge_method: linear
models:
  - model: {a}
    parameters:
      weight:
        - filter: mlp
          value: [1.0, 0.0]
  - model: {b}
parameters: {{weight: 1.0, normalize: true}}
""")
    plan = plan_merge(spec)
    run_plan(plan, tmp / "out", progress=False)
    A, B, M = load_space(a), load_space(b), load_space(tmp / "out")
    for i in range(4):
        n = f"model.layers.{i}.mlp.up_proj.weight"
        wa = 1.0 - i / 3  # gradient over depth for the mlp filter; b inherits the global weight 1.0
        expected = (wa * A[n].load() + 1.0 * B[n].load()) / (wa + 1.0)
        assert torch.allclose(M[n].load(), expected, atol=1e-7), n
        q = f"model.layers.{i}.self_attn.q_proj.weight"  # no filter match, falls back to global 1.0
        assert torch.allclose(M[q].load(), (A[q].load() + B[q].load()) / 2, atol=1e-7)


def test_slices_stack_layers(four_layer):
    tmp, a, b = four_layer
    spec = parse_spec(f"""
slices:
  - sources:
      - model: {a}
        layer_range: [0, 3]
  - sources:
      - model: {b}
        layer_range: [1, 4]
merge_method: passthrough
dtype: float32
""")
    plan = plan_merge(spec)
    assert plan.num_layers == 6
    run_plan(plan, tmp / "out", progress=False)
    A, B, M = load_space(a), load_space(b), load_space(tmp / "out")
    assert M.structure().num_layers == 6
    for out_i, (src, in_i) in enumerate([(A, 0), (A, 1), (A, 2), (B, 1), (B, 2), (B, 3)]):
        n = "mlp.down_proj.weight"
        assert torch.equal(M[f"model.layers.{out_i}.{n}"].load(), src[f"model.layers.{in_i}.{n}"].load())
    assert torch.equal(M["model.embed_tokens.weight"].load(), A["model.embed_tokens.weight"].load())
    assert torch.equal(M["lm_head.weight"].load(), B["lm_head.weight"].load())
    cfg = json.loads((tmp / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6


def test_slice_range_outside_model(four_layer):
    tmp, a, _ = four_layer
    spec = parse_spec(f"""
slices:
  - sources:
      - model: {a}
        layer_range: [2, 9]
merge_method: passthrough
""")
    with pytest.raises(SpecError, match=r"slices\[0\]\.sources\[0\]\.layer_range \(line 5\): \[2, 9\] "
                                        r"is outside model .* which has 4 layers"):
        plan_merge(spec)


def test_dtype_and_out_dtype(four_layer):
    tmp, a, b = four_layer
    spec = parse_spec(f"""
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.25}}
  - model: {b}
    parameters: {{weight: 0.75}}
dtype: float32
out_dtype: bfloat16
""")
    run_plan(plan_merge(spec), tmp / "out", progress=False)
    M, A, B = load_space(tmp / "out"), load_space(a), load_space(b)
    n = "model.layers.1.self_attn.o_proj.weight"
    assert M[n].dtype == torch.bfloat16
    assert torch.equal(M[n].load(), (0.25 * A[n].load() + 0.75 * B[n].load()).bfloat16())
    assert json.loads((tmp / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_spec_errors_name_field_and_line():
    with pytest.raises(SpecError) as e:
        parse_spec("merge_method: ties\nmodels:\n  - model: a\n    parameters: {weight: 1}\n    paramters: {}\n")
    assert "models[0].paramters (line 5): unknown key 'paramters'" in str(e.value)
    with pytest.raises(SpecError, match="exactly one of 'models' or 'slices'"):
        parse_spec("merge_method: linear\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        parse_spec("merge_method: [linear\n")
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        parse_spec("- a\n- b\n")


def test_safe_yaml_refuses_python_tags():
    with pytest.raises(SpecError, match="not valid YAML"):
        parse_spec("merge_method: !!python/object/apply:os.system ['echo hi']\nmodels: []\n")


def test_dry_run_reads_no_tensor_data(four_layer, monkeypatch, capsys):
    tmp, a, b = four_layer
    spec = tmp / "spec.yaml"
    spec.write_text(f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n"
                    f"  - model: {b}\n    parameters: {{weight: 1}}\n")
    import weightspace.ir as ir

    def boom(*args, **kw):
        raise AssertionError("tensor data was read during --dry-run")

    monkeypatch.setattr(ir, "read_tensor", boom)
    assert main(["run", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "tensors        39" in out  # 4 layers x 9 + embed + norm + head
    assert "will read" in out and "peak memory" in out
    assert main(["run", str(spec), "--dry-run", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tensors"] == 39 and data["read_bytes"] == 2 * data["write_bytes"]
    assert not (tmp / "out").exists()


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "passthrough"])
def test_elementwise_methods_stream_large_tensors_in_row_blocks(four_layer, monkeypatch, method):
    """Row-blocked execution writes the same bytes as whole-tensor execution."""
    import weightspace.tensor_steps as wm  # the block sizes the planner reads

    tmp, a, b = four_layer
    if method == "passthrough":
        text = f"merge_method: passthrough\nmodels:\n  - model: {a}\n    parameters: {{scale: 0.5}}\n"
    else:
        base = f"base_model: {a}\n" if method == "task_arithmetic" else ""
        text = (f"merge_method: {method}\n{base}models:\n  - model: {a}\n    parameters: {{weight: 0.3}}\n"
                f"  - model: {b}\n    parameters: {{weight: 0.9}}\nout_dtype: bfloat16\n")
    whole = plan_merge(parse_spec(text))
    run_plan(whole, tmp / "whole", progress=False, shard_size=30_000)
    monkeypatch.setattr(wm, "BLOCK_BYTES", 1000)  # 64x32 fp32 tensors -> blocks of 7 rows
    blocked = plan_merge(parse_spec(text))
    assert len(blocked.steps) > len(whole.steps)
    assert blocked.summary()["tensors"] == whole.summary()["tensors"]
    assert any(s.info.get("rows") == (7, 14) for s in blocked.steps)
    run_plan(blocked, tmp / "blocked", progress=False, shard_size=30_000)
    for f in sorted(p.name for p in (tmp / "whole").iterdir()):
        if f.endswith(".safetensors") or f.endswith(".json"):
            assert (tmp / "whole" / f).read_bytes() == (tmp / "blocked" / f).read_bytes(), f


def _integer_models(root, shape=(64, 32), n=3, seed=0):
    """Checkpoints with small integer values: exact deltas, many magnitude ties."""
    from weightspace import WeightSpace

    g = torch.Generator().manual_seed(seed)
    paths = []
    for k in range(n):
        t = {"model.embed_tokens.weight": torch.randint(-4, 5, shape, generator=g).float(),
             "model.layers.0.mlp.up_proj.weight": torch.randint(-4, 5, shape, generator=g).float()}
        paths.append(WeightSpace.from_tensors(t).save(root / f"m{k}"))
    return paths


def test_blocked_ties_equals_whole_tensor_ties(tmp_path, monkeypatch):
    """TIES streamed in row blocks (statistics pass, then blocks) writes the same bytes."""
    import weightspace.tensor_steps as wm  # the block sizes the planner reads

    base, a, b = _integer_models(tmp_path)
    text = (f"merge_method: ties\nbase_model: {base}\nmodels:\n"
            f"  - model: {a}\n    parameters: {{weight: 1.0, density: 0.3}}\n"
            f"  - model: {b}\n    parameters: {{weight: 0.5, density: 0.6}}\n")
    whole = plan_merge(parse_spec(text))
    assert all(s.shape is not None for s in whole.steps)
    run_plan(whole, tmp_path / "whole", progress=False)
    monkeypatch.setattr(wm, "BLOCKED_MIN_BYTES", 0)
    monkeypatch.setattr(wm, "BLOCK_BYTES", 1000)  # 64x32 fp32 -> blocks of 7 rows
    blocked = plan_merge(parse_spec(text))
    assert sum(s.shape is None for s in blocked.steps) == 2  # one statistics pass per tensor
    assert len(blocked.steps) > 10
    run_plan(blocked, tmp_path / "blocked", progress=False)
    assert ((tmp_path / "whole" / "model.safetensors").read_bytes()
            == (tmp_path / "blocked" / "model.safetensors").read_bytes())


@pytest.mark.parametrize("sample_rows", [[0], list(range(0, 40, 3)), []])
def test_blocked_trim_thresholds_are_exact_even_when_the_sample_misleads(sample_rows):
    """A sample that brackets the threshold badly falls back to an exact selection."""
    from weightspace.merges.generalized_ta import _trim_whole, trim_blocked

    g = torch.Generator().manual_seed(1)
    base = torch.randint(-3, 4, (40, 9), generator=g).float()
    xs = [base + torch.randint(-5, 6, (40, 9), generator=g).float() for _ in range(2)]
    dens = [0.25, 0.9]
    ref = _trim_whole(base, xs, dens)

    def sample():
        for r in sample_rows or [0]:
            yield base[r : r + 1] * 0 + 100, [x[r : r + 1] * 0 for x in xs] if not sample_rows else [
                x[r : r + 1] for x in xs]

    def blocks():
        for r in range(0, 40, 6):
            yield base[r : r + 6], [x[r : r + 6] for x in xs]

    got = trim_blocked(base.numel(), dens, 2, sample, blocks)
    assert [float(t) for t in got.thresholds] == [float(t) for t in ref.thresholds]
    assert got.tied_to_keep == ref.tied_to_keep


def test_mergekit_slerp_slices_config_runs_unchanged(four_layer):
    """The common mergekit slerp config (slices over the full range, filtered gradients)
    gives the same tensors as the models form."""
    tmp, a, b = four_layer
    params = """parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
"""
    sliced = parse_spec(f"""slices:
  - sources:
      - model: {a}
        layer_range: [0, 4]
      - model: {b}
        layer_range: [0, 4]
merge_method: slerp
base_model: {a}
""" + params)
    flat = parse_spec(f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n" + params)
    run_plan(plan_merge(sliced), tmp / "sliced", progress=False)
    run_plan(plan_merge(flat), tmp / "flat", progress=False)
    got, want = load_space(tmp / "sliced").materialize(), load_space(tmp / "flat").materialize()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # t at layer 2 of 4 for self_attn: t = 2/3 over [0, .5, .3, .7, 1] -> scaled 2.667 -> .3*.333 + .7*.667
    plan = plan_merge(flat)
    step = next(s for s in plan.steps if s.name == "model.layers.2.self_attn.q_proj.weight")
    assert step.info["t"] == pytest.approx(2 / 3)


def test_mergekit_ties_config_with_base_listed_and_mergekit_keys(four_layer):
    tmp, a, b = four_layer
    spec = parse_spec(f"""models:
  - model: {a}
    # no parameters necessary for base model
  - model: {b}
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: {a}
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
""")
    plan = plan_merge(spec)
    run_plan(plan, tmp / "out", progress=False)
    out = load_space(tmp / "out")
    n = "model.layers.0.mlp.up_proj.weight"
    assert out[n].dtype == torch.bfloat16
    # one model besides the base: ties with normalize = base + trimmed delta (weight divides out)
    A, B = load_space(a)[n].load(torch.bfloat16), load_space(b)[n].load(torch.bfloat16)
    # mergekit's dtype is the compute dtype: the arithmetic itself runs in bfloat16
    d = B - A
    k = int(0.5 * d.numel())
    keep = torch.zeros(d.numel(), dtype=torch.bool)
    keep[torch.argsort(d.abs().float().reshape(-1), descending=True, stable=True)[:k]] = True
    wd = d * keep.reshape(d.shape) * 0.5
    divisor = torch.where(wd != 0, 0.5, 1.0).to(torch.bfloat16)
    expected = A + wd / divisor
    assert torch.equal(out[n].load(), expected)

"""Adapter-space merges (`wsmerge lora merge`): peft's add_weighted_adapter, module by module.

Two kinds of test: the formulas written out on adapters written here by hand (no peft), and
every combination type against peft's own `add_weighted_adapter` on adapters peft made
(`requires("peft", "hf")`). DARE's masks: ours are drawn per (module, factor, adapter) from a
seeded generator, peft's from torch's global stream; the peft tests replace peft's
`random_pruning` by one that draws our mask for the tensor it is given (the module known from the
call it is in), so everything but the random numbers is peft's code; `dare_mask` itself is
checked for its density and determinism.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightspace.errors import SpecError
from weightspace.lora.combine import (
    COMBINATION_TYPES,
    combine_tensors,
    dare_mask,
    load_lora_merge_spec,
    parse_lora_merge_spec,
    plan_lora_merge,
    write_lora_merge,
)
from weightspace.zoo.tiny import write_tiny_llama

P = "base_model.model."
Q0, V0, Q1 = (f"model.layers.{i}.self_attn.{m}" for i, m in ((0, "q_proj"), (0, "v_proj"), (1, "q_proj")))


def write_adapter(d: Path, modules: dict[str, tuple[torch.Tensor, torch.Tensor]], r: int, alpha: float,
                  **cfg) -> Path:
    """A peft adapter folder by hand: module -> (A [r, in], B [out, r])."""
    d.mkdir(parents=True)
    tensors = {}
    for mod, (a, b) in modules.items():
        tensors[f"{P}{mod}.lora_A.weight"] = a.contiguous()
        tensors[f"{P}{mod}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "base_model_name_or_path": "tiny",
              "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}), "task_type": "CAUSAL_LM",
              **cfg}
    (d / "adapter_config.json").write_text(json.dumps(config))
    return d


def factors(seed: int, out: int, inp: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)


@pytest.fixture
def two(tmp_path):
    """Adapters a (r 4, alpha 8: scale 2) on q0, v0 and b (r 4, alpha 4: scale 1) on q0, q1."""
    a = write_adapter(tmp_path / "a", {Q0: factors(1, 32, 32, 4), V0: factors(2, 16, 32, 4)}, 4, 8)
    b = write_adapter(tmp_path / "b", {Q0: factors(3, 32, 32, 4), Q1: factors(4, 32, 32, 4)}, 4, 4)
    return tmp_path, a, b


def spec_file(root: Path, kind: str, weights=(0.7, 0.3), names=("a", "b"), params: str = "",
              extra: str = "") -> Path:
    text = f"combination_type: {kind}\n{extra}adapters:\n" + "".join(
        f"  - adapter: ./{n}\n    parameters: {{weight: {w}}}\n" for n, w in zip(names, weights))
    if params:
        text += f"parameters: {{{params}}}\n"
    p = root / f"{kind}.yaml"
    p.write_text(text)
    return p


def merged(root: Path, spec: Path, out: str = "out") -> tuple[dict, dict]:
    plan = plan_lora_merge(load_lora_merge_spec(spec), spec_dir=spec.parent, spec_path=spec)
    write_lora_merge(plan, root / out)
    return (load_file(str(root / out / "adapter_model.safetensors")),
            json.loads((root / out / "adapter_config.json").read_text()))


# ---------------------------------------------------------------- the formulas, without peft


def test_linear_combines_a_and_b_separately_with_square_roots_of_weight_times_scale(two):
    root, a, b = two
    t, cfg = merged(root, spec_file(root, "linear", weights=(0.7, -0.3)))
    (qa1, qb1), (qa2, qb2) = factors(1, 32, 32, 4), factors(3, 32, 32, 4)
    wa1, wa2 = math.sqrt(0.7 * 2), -math.sqrt(0.3 * 1)      # the sign goes on A only
    wb1, wb2 = math.sqrt(0.7 * 2), math.sqrt(0.3 * 1)
    torch.testing.assert_close(t[f"{P}{Q0}.lora_A.weight"], wa1 * qa1 + wa2 * qa2, rtol=0, atol=1e-6)
    torch.testing.assert_close(t[f"{P}{Q0}.lora_B.weight"], wb1 * qb1 + wb2 * qb2, rtol=0, atol=1e-6)
    # a module only one adapter holds: that adapter's factors, weighted
    va, vb = factors(2, 16, 32, 4)
    torch.testing.assert_close(t[f"{P}{V0}.lora_A.weight"], wa1 * va, rtol=0, atol=1e-6)
    torch.testing.assert_close(t[f"{P}{V0}.lora_B.weight"], wb1 * vb, rtol=0, atol=1e-6)
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["alpha_pattern"]) == (4, 4, {}, {})
    assert cfg["target_modules"] == ["q_proj", "v_proj"]      # the union
    assert set(t) == {f"{P}{m}.lora_{x}.weight" for m in (Q0, V0, Q1) for x in "AB"}


def test_cat_stacks_weighted_scaled_a_and_b_and_sums_the_ranks(two):
    root, a, b = two
    t, cfg = merged(root, spec_file(root, "cat"))
    (qa1, qb1), (qa2, qb2) = factors(1, 32, 32, 4), factors(3, 32, 32, 4)
    assert cfg["r"] == cfg["lora_alpha"] == 8
    torch.testing.assert_close(t[f"{P}{Q0}.lora_A.weight"], torch.cat([qa1 * 0.7 * 2, qa2 * 0.3 * 1]))
    torch.testing.assert_close(t[f"{P}{Q0}.lora_B.weight"], torch.cat([qb1, qb2], dim=1))
    # v0 only in a: its rows first, zeros after (peft fills the first rows)
    va, vb = factors(2, 16, 32, 4)
    torch.testing.assert_close(t[f"{P}{V0}.lora_A.weight"], torch.cat([va * 0.7 * 2, torch.zeros(4, 32)]))
    torch.testing.assert_close(t[f"{P}{V0}.lora_B.weight"], torch.cat([vb, torch.zeros(16, 4)], dim=1))
    # the delta is exact: B @ A = sum of weight * scale * B_i @ A_i
    delta = t[f"{P}{Q0}.lora_B.weight"] @ t[f"{P}{Q0}.lora_A.weight"]
    torch.testing.assert_close(delta, 0.7 * 2 * qb1 @ qa1 + 0.3 * qb2 @ qa2, rtol=1e-5, atol=1e-5)


def test_svd_factors_the_weighted_sum_of_deltas_to_the_largest_rank(two):
    root, a, b = two
    t, cfg = merged(root, spec_file(root, "svd"))
    (qa1, qb1), (qa2, qb2) = factors(1, 32, 32, 4), factors(3, 32, 32, 4)
    delta = 0.7 * 2 * qb1 @ qa1 + 0.3 * qb2 @ qa2               # rank 8, truncated to 4
    u, s, vh = torch.linalg.svd(delta)
    best = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    got = t[f"{P}{Q0}.lora_B.weight"] @ t[f"{P}{Q0}.lora_A.weight"]
    assert cfg["r"] == 4
    torch.testing.assert_close(got, best, rtol=1e-4, atol=1e-4)


def test_combine_tensors_ties_and_magnitude_prune_by_formula():
    x = torch.tensor([[3.0, -1.0, 0.5, -4.0]])
    y = torch.tensor([[-2.0, 2.0, 1.0, -1.0]])
    w = torch.tensor([1.0, 0.5])
    # density 0.5: x keeps 3, -4; y keeps -2, 2. Signs by total mass of weighted? peft elects on the
    # unweighted pruned tensors: sums [1, 2, 0, -4] -> + + + -
    ties = combine_tensors("ties", [x, y], w, density=0.5)
    # agreeing entries, weighted, averaged over how many agree
    torch.testing.assert_close(ties, torch.tensor([[3.0, 1.0, 0.0, -4.0]]))
    mp = combine_tensors("magnitude_prune", [x, y], w, density=0.5)
    torch.testing.assert_close(mp, torch.tensor([[3.0 - 1.0, 1.0, 0.0, -4.0]]))
    freq = combine_tensors("ties", [x, y], w, density=1.0, majority_sign_method="frequency")
    # signs counted: [0, 0, 2, -2] -> + + + -; entries agreeing: [3 | 1 | 0.5, 0.5 | -4, -0.5]
    torch.testing.assert_close(freq, torch.tensor([[3.0, 1.0, 0.5, -2.25]]))


def test_dare_mask_is_seeded_per_key_and_keeps_density():
    t = torch.ones(200, 100)
    m = dare_mask(0, "model.layers.0.q\0A\x000", t, 0.3)
    assert torch.equal(m, dare_mask(0, "model.layers.0.q\0A\x000", t, 0.3))
    assert not torch.equal(m, dare_mask(1, "model.layers.0.q\0A\x000", t, 0.3))
    assert not torch.equal(m, dare_mask(0, "model.layers.0.q\0B\x000", t, 0.3))
    assert set(m.unique().tolist()) == {0.0, 1.0}
    assert abs(m.mean().item() - 0.3) < 0.02                  # 20,000 draws: sd 0.003


def test_dare_linear_is_the_masked_rescaled_linear_combination(two):
    root, a, b = two
    t, _ = merged(root, spec_file(root, "dare_linear", params="density: 0.5, seed: 7"))
    t2, _ = merged(root, spec_file(root, "dare_linear", params="density: 0.5, seed: 7"), out="again")
    assert all(torch.equal(t[k], t2[k]) for k in t)           # deterministic for its seed
    (qa1, _), (qa2, _) = factors(1, 32, 32, 4), factors(3, 32, 32, 4)
    m1 = dare_mask(7, f"{Q0}\0A\0{0}", qa1, 0.5)
    m2 = dare_mask(7, f"{Q0}\0A\0{1}", qa2, 0.5)
    want = math.sqrt(0.7 * 2) * (qa1 * m1 / 0.5) + math.sqrt(0.3) * (qa2 * m2 / 0.5)
    torch.testing.assert_close(t[f"{P}{Q0}.lora_A.weight"], want, rtol=0, atol=1e-6)


def test_dtype_and_rank_pattern_padding(tmp_path):
    # b gives q0 rank 2 by rank_pattern (max rank 4 = a's): svd result r 4, every module [4, in]
    write_adapter(tmp_path / "a", {Q0: factors(1, 32, 32, 4)}, 4, 8)
    write_adapter(tmp_path / "b", {Q0: factors(3, 32, 32, 2), Q1: factors(4, 32, 32, 4)}, 4, 4,
                  rank_pattern={"layers.0.self_attn.q_proj": 2})
    t, cfg = merged(tmp_path, spec_file(tmp_path, "cat", extra="dtype: bfloat16\n"))
    assert cfg["r"] == 8 and t[f"{P}{Q0}.lora_A.weight"].dtype == torch.bfloat16
    assert t[f"{P}{Q0}.lora_A.weight"].shape == (8, 32)
    assert torch.count_nonzero(t[f"{P}{Q0}.lora_A.weight"][6:]) == 0      # 4 + 2 rows, then zeros
    with pytest.raises(SpecError, match="different ranks adapters\\[0\\] r=4, adapters\\[1\\] r=2"):
        plan_lora_merge(load_lora_merge_spec(spec_file(tmp_path, "linear")), spec_dir=tmp_path)


# ---------------------------------------------------------------- spec and input errors


@pytest.mark.parametrize("body, message", [
    ("combination_type: tie\nadapters: [{adapter: a, parameters: {weight: 1}}]",
     "unknown combination type 'tie' \\(did you mean 'ties'\\?\\); known: linear, cat, svd"),
    ("combination_type: ties\nadapters: [{adapter: a, parameters: {weight: 1}}]",
     "parameters.density is required by combination_type ties"),
    ("combination_type: ties\nadapters: [{adapter: a, parameters: {weight: 1}}]\nparameters: {density: 1.5}",
     "parameters.density \\(line 3\\): density must be in \\(0, 1\\]"),
    ("combination_type: linear\nadapters: [{adapter: a, parameters: {weight: 1}}]\nparameters: {density: 0.5}",
     "parameters.density is not used by combination_type linear"),
    ("combination_type: cat\nadapters: [{adapter: a, parameters: {weight: 1}}]\nparameters: {svd_rank: 2}",
     "parameters.svd_rank is not used by combination_type cat"),
    ("combination_type: svd\nadapters: [{adapter: a, parameters: {}}]",
     "adapters\\[0\\].parameters.weight \\(line 2\\): Field required"),
    ("combination_type: svd\nadapters: [{adapter: a, parameters: {weight: .nan}}]",
     "adapters\\[0\\].parameters.weight"),
    ("combination_type: svd\nadapters: [{adapter: a, parameters: {wieght: 1}}]",
     "unknown key 'wieght'; did you mean 'weight'\\?"),
    ("combination_type: svd\nadapters: []", "adapters"),
    ("combination_type: svd\nmodels: [{model: a}]", "unknown key 'models'"),
])
def test_spec_errors_name_the_field(body, message):
    with pytest.raises(SpecError, match=message):
        parse_lora_merge_spec(body, "s.yaml")


def test_adapters_of_different_bases_and_shapes_are_refused(two):
    root, a, b = two
    cfg = json.loads((b / "adapter_config.json").read_text())
    (b / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "other"}))
    with pytest.raises(SpecError, match="adapters\\[1\\] \\(./b\\) was trained on 'other' but "
                                        "adapters\\[0\\] \\(./a\\) on 'tiny'"):
        plan_lora_merge(load_lora_merge_spec(spec_file(root, "svd")), spec_dir=root)
    write_adapter(root / "c", {Q0: factors(5, 48, 32, 4)}, 4, 8)
    with pytest.raises(SpecError, match="module 'model.layers.0.self_attn.q_proj': adapters\\[1\\] "
                                        "\\(./c\\) holds a linear layer's LoRA for \\[out 48, in 32\\]"):
        plan_lora_merge(load_lora_merge_spec(spec_file(root, "svd", names=("a", "c"))), spec_dir=root)


def test_refusals_and_mixed_target_module_kinds(two):
    root, a, b = two
    cfg = json.loads((b / "adapter_config.json").read_text())
    (b / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(SpecError, match="adapters\\[1\\].adapter ./b: .*DoRA"):
        plan_lora_merge(load_lora_merge_spec(spec_file(root, "svd")), spec_dir=root)
    (b / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ".*q_proj"}))
    with pytest.raises(SpecError, match="mix module-name lists and regular expressions"):
        plan_lora_merge(load_lora_merge_spec(spec_file(root, "svd")), spec_dir=root)
    with pytest.raises(SpecError, match="base_model: ./nobase: no such file"):
        plan_lora_merge(load_lora_merge_spec(spec_file(root, "svd", extra="base_model: ./nobase\n")),
                        spec_dir=root)
    with pytest.raises(SpecError, match="adapters\\[1\\].adapter: ./missing: no such file"):
        plan_lora_merge(load_lora_merge_spec(spec_file(root, "svd", names=("a", "missing"))), spec_dir=root)


def test_base_model_checks_every_adapter_against_it(two):
    root, a, b = two
    write_tiny_llama(root / "base", seed=0)                   # hidden 32: q_proj [32, 32], v_proj [16, 32]
    plan = plan_lora_merge(load_lora_merge_spec(spec_file(root, "svd", extra="base_model: ./base\n")),
                           spec_dir=root)
    assert plan.rank == 4
    write_adapter(root / "wide", {Q0: factors(5, 48, 48, 4)}, 4, 8)
    with pytest.raises(SpecError, match="adapters\\[1\\].adapter ./wide: does not fit base_model ./base: "
                                        ".*is the adapter for another model"):
        plan_lora_merge(load_lora_merge_spec(spec_file(root, "svd", names=("a", "wide"),
                                                       extra="base_model: ./base\n")), spec_dir=root)


def test_one_adapter_is_linear_as_in_peft(two):
    root, a, b = two
    plan = plan_lora_merge(load_lora_merge_spec(spec_file(root, "ties", weights=(0.5,), names=("a",),
                                                          params="density: 0.5")), spec_dir=root)
    assert plan.kind == "linear" and "combined as linear" in plan.notes[0]


def test_every_combination_type_is_in_the_table():
    assert set(COMBINATION_TYPES) == {k for k, _ in PEFT_CASES}


# ---------------------------------------------------------------- against peft's add_weighted_adapter

PEFT_CASES = [
    ("linear", {}),
    ("cat", {}),
    ("svd", {}),
    ("ties", {"density": 0.5}),
    ("ties_svd", {"density": 0.6, "majority_sign_method": "frequency"}),
    ("dare_linear", {"density": 0.5}),
    ("dare_ties", {"density": 0.7}),
    ("dare_linear_svd", {"density": 0.5, "svd_rank": 3}),
    ("dare_ties_svd", {"density": 0.5}),
    ("magnitude_prune", {"density": 0.4}),
    ("magnitude_prune_svd", {"density": 0.4, "svd_rank": 6, "svd_clamp": 0.95, "svd_full_matrices": False}),
]


def _peft_adapter(base: Path, out: Path, seed: int, **cfg) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(**cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:                               # lora_B starts at zero: make it count
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def peft_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    base = write_tiny_llama(root / "base", seed=0)
    a = _peft_adapter(base, root / "a", 1, r=4, lora_alpha=8,
                      target_modules=["q_proj", "v_proj", "embed_tokens"])
    b = _peft_adapter(base, root / "b", 2, r=4, lora_alpha=16, use_rslora=True,
                      target_modules=["q_proj", "down_proj", "embed_tokens"])
    return root, base, a, b


def _peft_merge(root: Path, base: Path, kind: str, weights: list[float], params: dict) -> dict:
    """peft's add_weighted_adapter on adapters a and b, its DARE masks replaced by ours."""
    from peft import PeftModel
    from peft.tuners.lora import model as lora_model
    from peft.utils import get_peft_model_state_dict, merge_utils
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), root / "a", adapter_name="a")
    model.load_adapter(root / "b", adapter_name="b")
    names = {id(m): n for n, m in model.base_model.model.named_modules()}
    seed = params.pop("seed", 0)
    calls: dict = {}

    def wrap(fn, what):
        def inner(self, combination_type, adapters, weights, *args, **kw):
            target = next(a for a in args if hasattr(a, "lora_A"))
            valid = [i for i, ad in enumerate(adapters) if ad in target.lora_A or ad in target.lora_embedding_A]
            calls.update(module=names[id(target)], valid=valid, n=0, what=what,
                         embedding=bool(target.lora_embedding_A))
            return fn(self, combination_type, adapters, weights, *args, **kw)
        return inner

    def pruning(tensor, density, rescale):
        c = calls
        k = c["n"]
        c["n"] += 1
        part = c["what"] if c["what"] == "delta" else "AB"[k // len(c["valid"])]
        idx = c["valid"][k % len(c["valid"])]
        key = f"{c['module']}\0{part}\0{idx}"
        if part == "delta" and c["embedding"]:  # peft prunes an embedding's delta as (B @ A)^T
            mask = dare_mask(seed, key, tensor.T, density).T
        else:
            mask = dare_mask(seed, key, tensor, density)
        out = tensor * mask
        return out / density if rescale else out

    mp = pytest.MonkeyPatch()
    mp.setattr(lora_model.LoraModel, "_generalized_task_arithmetic_weighted_adapter",
               wrap(lora_model.LoraModel._generalized_task_arithmetic_weighted_adapter, "AB"))
    mp.setattr(lora_model.LoraModel, "_svd_generalized_task_arithmetic_weighted_adapter",
               wrap(lora_model.LoraModel._svd_generalized_task_arithmetic_weighted_adapter, "delta"))
    mp.setattr(merge_utils, "random_pruning", pruning)
    try:
        model.add_weighted_adapter(["a", "b"], weights, "m", combination_type=kind, **params)
    finally:
        mp.undo()
    return get_peft_model_state_dict(model, adapter_name="m"), model.peft_config["m"]


@pytest.mark.requires("peft", "hf")
@pytest.mark.parametrize("kind, params", PEFT_CASES, ids=[k for k, _ in PEFT_CASES])
def test_equals_peft_add_weighted_adapter(peft_adapters, tmp_path, kind, params):
    import warnings

    root, base, a, b = peft_adapters
    weights = [0.7, -0.4]
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({"combination_type": kind, "base_model": str(base), "parameters": params,
                                "adapters": [{"adapter": str(a), "parameters": {"weight": weights[0]}},
                                             {"adapter": str(b), "parameters": {"weight": weights[1]}}]}))
    plan = plan_lora_merge(load_lora_merge_spec(spec), spec_dir=tmp_path)
    write_lora_merge(plan, tmp_path / "out")
    ours = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, config = _peft_merge(root, base, kind, weights, dict(params))
    assert set(ours) == set(theirs)
    for k in ours:
        assert ours[k].shape == theirs[k].shape, k
        assert torch.equal(ours[k], theirs[k]), (k, (ours[k] - theirs[k]).abs().max())
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (config.r, config.lora_alpha)
    assert set(cfg["target_modules"]) == set(config.target_modules)
    assert cfg["use_rslora"] is False                         # the scales are folded in


@pytest.mark.requires("peft", "hf")
def test_result_loads_in_peft_and_as_base_plus_adapter(peft_adapters, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from weightspace.sources import load_local, load_space

    root, base, a, b = peft_adapters
    spec = spec_file(root, "cat", names=("a", "b"), extra=f"base_model: {base}\n")
    plan = plan_lora_merge(load_lora_merge_spec(spec), spec_dir=root)
    write_lora_merge(plan, tmp_path / "cat")
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), tmp_path / "cat")
    dense = model.merge_and_unload().state_dict()
    ours = load_space(f"{base}+{tmp_path / 'cat'}")
    # cat is exact: base + sum of weight * scale * B_i @ A_i, here read three ways
    ws = load_local(base)
    sa, sb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    want = ws[f"{name}.weight"].load() + 0.7 * 2 * (sa[f"{P}{name}.lora_B.weight"] @ sa[f"{P}{name}.lora_A.weight"]) \
        + 0.3 * (16 / 2) * (sb[f"{P}{name}.lora_B.weight"] @ sb[f"{P}{name}.lora_A.weight"])
    torch.testing.assert_close(ours[f"{name}.weight"].load(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dense[f"{name}.weight"], want, rtol=1e-5, atol=1e-6)
    for n in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"):
        torch.testing.assert_close(ours[n].load(), dense[n], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- the command

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_cli_dry_run_plans_and_the_run_writes_a_loadable_adapter(run_cli, tmp_path):
    from weightspace.sources import load_local, load_space

    spec = EXAMPLES / "lora" / "merge.yaml"
    code, out, err = run_cli("lora", "merge", spec, "--dry-run")
    assert code == 0, err
    assert out.splitlines()[0].startswith("ties_svd: 2 adapters -> r 8, lora_alpha 8, 20 modules")
    code, out, err = run_cli("lora", "merge", spec, "--dry-run", "--json")
    plan = json.loads(out)
    # q, v, o (sql) and q, v, up, down (math) on 4 layers; r * (in + out) each
    assert (plan["r"], plan["modules"], plan["parameters"]) == (
        8, 20, 8 * 4 * ((32 + 32) + (32 + 16) + (32 + 32) + (32 + 64) + (64 + 32)))
    code, out, err = run_cli("lora", "merge", spec, "-o", tmp_path / "m")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]          # nothing else left beside it
    t = load_file(str(tmp_path / "m" / "adapter_model.safetensors"))
    assert len(t) == 40 and all(v.shape[0] == 8 or v.shape[1] == 8 for v in t.values())
    merged_model = load_space(f"{EXAMPLES / 'models' / 'base'}+{tmp_path / 'm'}")
    name = "model.layers.2.mlp.up_proj"
    want = load_local(EXAMPLES / "models" / "base")[f"{name}.weight"].load() + \
        t[f"{P}{name}.lora_B.weight"] @ t[f"{P}{name}.lora_A.weight"]           # lora_alpha = r: scale 1
    torch.testing.assert_close(merged_model[f"{name}.weight"].load(), want)


@pytest.mark.parametrize("args, message", [
    (["--dry-run"], None),
    ([], "missing -o OUT"),
    (["-o", "{ex}/lora/adapters/sql/out"], "lies inside the input"),
    (["-o", "{ex}/models/base/out"], "lies inside the input"),         # base_model: read too
])
def test_cli_usage_errors(run_cli, tmp_path, args, message):
    import shutil

    shutil.copytree(EXAMPLES / "lora", tmp_path / "lora")
    shutil.copytree(EXAMPLES / "models" / "base", tmp_path / "models" / "base")
    code, out, err = run_cli("lora", "merge", tmp_path / "lora" / "merge.yaml",
                             *[a.format(ex=tmp_path) for a in args])
    if message is None:
        assert code == 0
        return
    assert code == 2 and message in err, err
    assert not (tmp_path / "lora" / "adapters" / "sql" / "out").exists()
    assert not (tmp_path / "models" / "base" / "out").exists()


def test_cli_spec_error_exit_2_and_a_failed_run_leaves_nothing(run_cli, two, monkeypatch):
    root, a, b = two
    spec = spec_file(root, "tie")
    code, _, err = run_cli("lora", "merge", spec, "-o", root / "out")
    assert code == 2 and "unknown combination type 'tie' (did you mean 'ties'?)" in err
    from weightspace.lora import combine

    def boom(*args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(combine, "combine_module", boom)
    code, _, err = run_cli("lora", "merge", spec_file(root, "svd"), "-o", root / "out")
    assert code == 1 and "disk on fire" in err
    assert sorted(p.name for p in root.iterdir()) == ["a", "b", "svd.yaml", "tie.yaml"]


def test_svd_rank_above_a_layers_rank_pads_and_rslora_is_folded_in(tmp_path):
    # v0 is [16, 32]: rank at most 16; svd_rank 20 keeps the exact delta, zero-padded to r 20
    write_adapter(tmp_path / "a", {V0: factors(1, 16, 32, 12)}, 12, 12, use_rslora=True)
    write_adapter(tmp_path / "b", {V0: factors(2, 16, 32, 12)}, 12, 24)
    t, cfg = merged(tmp_path, spec_file(tmp_path, "svd", params="svd_rank: 20"))
    a, b = t[f"{P}{V0}.lora_A.weight"], t[f"{P}{V0}.lora_B.weight"]
    assert a.shape == (20, 32) and b.shape == (16, 20)
    assert torch.count_nonzero(a[16:]) == 0 and torch.count_nonzero(b[:, 16:]) == 0
    (a1, b1), (a2, b2) = factors(1, 16, 32, 12), factors(2, 16, 32, 12)
    want = 0.7 * (12 / math.sqrt(12)) * b1 @ a1 + 0.3 * (24 / 12) * b2 @ a2
    torch.testing.assert_close(b @ a, want, rtol=1e-4, atol=1e-4)
    # the first adapter's config, the scale 1 written out: lora_alpha = r, no rslora
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (20, 20, False)


@pytest.mark.slow  # two wsmerge processes against a local fake Hub: about 7 s
def test_adapters_from_the_hub_are_downloaded(two):
    import os
    import subprocess
    import sys

    from tests.fake_hub import FakeHub

    root, a, b = two
    spec = root / "hub.yaml"
    spec.write_text("combination_type: cat\nadapters:\n  - adapter: org/sql@v1\n    parameters: {weight: 0.7}\n"
                    "  - adapter: ./b\n    parameters: {weight: 0.3}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE", "WSMERGE_DEBUG"))}
    repo = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH")) if p)
    with FakeHub() as hub:
        hub.add_repo("org/sql", {p.name: p.read_bytes() for p in a.iterdir()}, tag="v1")
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(root / "hf"), HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1")

        def wsmerge(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "weightspace.cli.main", "lora", "merge", *args],
                                  cwd=root, env=env, capture_output=True, text=True, timeout=120)

        r = wsmerge(str(spec), "-o", str(root / "hub-out"))
        assert r.returncode == 0, r.stderr
        assert ("GET", "/api/models/org/sql/revision/v1") in hub.requests
        spec.write_text(spec.read_text().replace("org/sql@v1", "org/nosql"))
        r = wsmerge(str(spec), "-o", str(root / "hub-out2"))
        assert r.returncode == 1 and "adapters[0].adapter: org/nosql: no such adapter on the Hub" in r.stderr
    local, _ = merged(root, spec_file(root, "cat"))
    hub_made = load_file(str(root / "hub-out" / "adapter_model.safetensors"))
    assert all(torch.equal(local[k], hub_made[k]) for k in local)

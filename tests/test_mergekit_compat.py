"""mergekit 0.1.5 configs and habits give mergekit's tensors (the formulas written out here;
`benchmarks/compare_mergekit.py` checks the same configs against mergekit itself)."""

from __future__ import annotations

import re

import pytest
import torch

from weightspace import load_space
from weightspace.merge import plan_merge, run_plan
from weightspace.spec import parse_spec
from weightspace.zoo.tiny import write_tiny_llama


@pytest.fixture
def four(tmp_path):
    """A 4-layer tiny Llama base and two fine-tunes."""
    d = tmp_path / "m"
    return (write_tiny_llama(d / "base", seed=0, layers=4),
            write_tiny_llama(d / "a", seed=0, delta_seed=1, layers=4),
            write_tiny_llama(d / "b", seed=0, delta_seed=2, layers=4))


def _merge(text: str, out) -> dict[str, torch.Tensor]:
    run_plan(plan_merge(parse_spec(text)), out, progress=False)
    return {n: r.load() for n, r in load_space(out).items()}


def _lerp(values: list[float], t: float) -> float:
    """mergekit's gradient: the list spread evenly over t in [0, 1], linear in between."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    return (1 - (scaled - i0)) * values[i0] + (scaled - i0) * values[i1]


def test_gradients_give_every_tensor_outside_the_layers_the_first_value(four, tmp_path):
    """mergekit 0.1.5 plans the embeddings, the final norm and lm_head with t = 0 (its
    ConfigReader for pre and post weights is made with t=0); layer i of n sits at i/(n-1)."""
    base, a, b = four
    got = _merge(f"""
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: [0.2, 0.8]}}
  - model: {b}
    parameters: {{weight: 0.5}}
dtype: float32
""", tmp_path / "out")
    B, A, Bm = (load_space(p) for p in (base, a, b))
    for n in got:
        ln = n.split(".")
        t = int(ln[2]) / 3 if n.startswith("model.layers.") else 0.0
        w = _lerp([0.2, 0.8], t)
        want = B[n].load() + w * (A[n].load() - B[n].load()) + 0.5 * (Bm[n].load() - B[n].load())
        torch.testing.assert_close(got[n], want, rtol=0, atol=1e-6, msg=n)
    assert _lerp([0.2, 0.8], 0.0) == 0.2  # so lm_head and model.norm took 0.2, not 0.8


def test_slices_restart_the_gradient_per_slice_and_post_weights_sit_at_zero(four, tmp_path):
    base, a, _ = four
    got = _merge(f"""
merge_method: linear
slices:
  - sources:
      - model: {a}
        layer_range: [0, 2]
        parameters: {{weight: [1.0, 0.0]}}
      - model: {base}
        layer_range: [0, 2]
        parameters: {{weight: [0.0, 1.0]}}
  - sources:
      - model: {a}
        layer_range: [2, 4]
        parameters: {{weight: [0.0, 1.0]}}
      - model: {base}
        layer_range: [2, 4]
        parameters: {{weight: [1.0, 0.0]}}
dtype: float32
""", tmp_path / "out")
    B, A = load_space(base), load_space(a)
    # slice 0, layer 0 at t=0 -> all a; layer 1 at t=1 -> all base. slice 1 the other way round.
    for out_layer, (src_layer, from_a) in enumerate([(0, True), (1, False), (2, False), (3, True)]):
        n = f"model.layers.{out_layer}.mlp.up_proj.weight"
        src = f"model.layers.{src_layer}.mlp.up_proj.weight"
        torch.testing.assert_close(got[n], (A if from_a else B)[src].load(), rtol=0, atol=0)
    # embeddings from the first slice's parameters, final norm and lm_head from the last's, both
    # at t = 0: slice 0 gives a weight 1 there, slice 1 gives the base weight 1 (at t = 1 it would
    # have been a)
    torch.testing.assert_close(got["model.embed_tokens.weight"], A["model.embed_tokens.weight"].load())
    torch.testing.assert_close(got["lm_head.weight"], B["lm_head.weight"].load())


# ---------------------------------------------------------------------------------------------
# every method in float32, float16 and bfloat16 (mergekit's own examples/ties.yml is fp16)

# method -> (spec lines after merge_method, with @BASE @A @B placeholders); every registered
# method must be here, so a new one is added to this table with its usual parameters
DTYPE_TABLE: dict[str, str] = {
    "linear": "models:\n  - {model: @A, parameters: {weight: 0.6}}\n  - {model: @B, parameters: {weight: 0.4}}\n",
    "task_arithmetic": "base_model: @BASE\nmodels:\n  - {model: @A, parameters: {weight: 1.0}}\n"
                       "  - {model: @B, parameters: {weight: 0.5}}\nparameters: {lambda: 0.8}\n",
    "ties": "base_model: @BASE\nmodels:\n  - {model: @A, parameters: {weight: 1.0, density: 0.5}}\n"
            "  - {model: @B, parameters: {weight: 0.5, density: 0.5}}\nparameters: {normalize: true}\n",
    "dare_ties": "base_model: @BASE\nmodels:\n  - {model: @A, parameters: {weight: 1.0, density: 0.5}}\n"
                 "  - {model: @B, parameters: {weight: 0.5, density: 0.5}}\nparameters: {seed: 3}\n",
    "dare_linear": "base_model: @BASE\nmodels:\n  - {model: @A, parameters: {weight: 1.0, density: 0.5}}\n"
                   "  - {model: @B, parameters: {weight: 0.5, density: 0.5}}\nparameters: {seed: 3}\n",
    "breadcrumbs": "base_model: @BASE\nmodels:\n  - {model: @A, parameters: {weight: 1.0, density: 0.6, gamma: 0.05}}\n"
                   "  - {model: @B, parameters: {weight: 0.5, density: 0.6, gamma: 0.05}}\n",
    "breadcrumbs_ties": "base_model: @BASE\nmodels:\n  - {model: @A, parameters: {weight: 1.0, density: 0.6, gamma: 0.05}}\n"
                        "  - {model: @B, parameters: {weight: 0.5, density: 0.6, gamma: 0.05}}\n",
    "della": "base_model: @BASE\nmodels:\n  - {model: @A, parameters: {weight: 1.0, density: 0.5, epsilon: 0.1}}\n"
             "  - {model: @B, parameters: {weight: 0.5, density: 0.5, epsilon: 0.1}}\nparameters: {seed: 3}\n",
    "della_linear": "base_model: @BASE\nmodels:\n  - {model: @A, parameters: {weight: 1.0, density: 0.5, epsilon: 0.1}}\n"
                    "  - {model: @B, parameters: {weight: 0.5, density: 0.5, epsilon: 0.1}}\nparameters: {seed: 3}\n",
    "slerp": "base_model: @A\nmodels:\n  - {model: @A}\n  - {model: @B}\nparameters: {t: [0.2, 0.8]}\n",
    "nuslerp": "models:\n  - {model: @A, parameters: {weight: 0.6}}\n  - {model: @B, parameters: {weight: 0.4}}\n",
    "model_stock": "base_model: @BASE\nmodels:\n  - {model: @A}\n  - {model: @B}\n",
    "passthrough": "models:\n  - {model: @A, parameters: {scale: 0.5}}\n",
    "fisher": "models:\n  - {model: @A, parameters: {weight: 0.6, fisher: @A.fisher.safetensors}}\n"
              "  - {model: @B, parameters: {weight: 0.4, fisher: @B.fisher.safetensors}}\n",
    "regmean": "models:\n  - {model: @A, parameters: {gram: @A.gram.safetensors}}\n"
               "  - {model: @B, parameters: {gram: @B.gram.safetensors}}\n",
    "atlas": "base_model: @BASE\nmodels:\n  - {model: @A}\n  - {model: @B}\n"
             "parameters: {coefficients: @coeffs.safetensors}\n",
    "sce": "base_model: @BASE\nmodels:\n  - {model: @A}\n  - {model: @B}\nparameters: {select_topk: 0.5}\n",
    "multislerp": "base_model: @BASE\nmodels:\n  - {model: @A, parameters: {weight: 0.6}}\n"
                  "  - {model: @B, parameters: {weight: 0.4}}\n",
    "karcher": "models:\n  - {model: @A}\n  - {model: @B}\n",
    "nearswap": "base_model: @BASE\nmodels:\n  - {model: @A}\nparameters: {t: 0.001}\n",
    "arcee_fusion": "base_model: @BASE\nmodels:\n  - {model: @A}\n",
    "ram": "base_model: @BASE\nmodels:\n  - {model: @A}\n  - {model: @B}\n",
    "ramplus_tl": "base_model: @BASE\nmodels:\n  - {model: @A}\n  - {model: @B}\nparameters: {r: 0.1, alpha: 0.2}\n",
}


@pytest.fixture(scope="module")
def dtype_models(tmp_path_factory):
    """Tiny Llamas with big enough fine-tune deltas that float16 rounding matters, plus the
    companion files the data-aware methods read (seeded, positive, symmetric)."""
    from safetensors.torch import save_file

    from weightspace.merges.atlas import Coefficients, save_coefficients

    d = tmp_path_factory.mktemp("dtypes")
    paths = {"BASE": write_tiny_llama(d / "base", seed=0),
             "A": write_tiny_llama(d / "a", seed=0, delta_seed=1, delta_scale=0.02),
             "B": write_tiny_llama(d / "b", seed=0, delta_seed=2, delta_scale=0.02)}
    g = torch.Generator().manual_seed(0)
    for key in ("A", "B"):
        space = load_space(paths[key])
        save_file({n: torch.rand(space[n].shape, generator=g) + 0.05 for n in space},
                  str(d / f"{key}.fisher.safetensors"))
        grams = {}
        for n in space:
            if space[n].shape and len(space[n].shape) == 2 and n.endswith("proj.weight"):
                x = torch.randn(64, space[n].shape[1], generator=g)
                grams[n] = x.T @ x / 64
        save_file(grams, str(d / f"{key}.gram.safetensors"))
    blocks = list(load_space(paths["BASE"]))
    save_coefficients(Coefficients(torch.full((2, len(blocks)), 0.7), blocks, ["a", "b"]),
                      d / "coeffs.safetensors")
    return d, paths


def _spec(method: str, d, paths, dtype: str) -> str:
    import re

    body = DTYPE_TABLE[method]
    body = re.sub(r"@(BASE|A|B)\.", lambda m: f"{d}/{m[1]}.", body)        # companion files
    body = re.sub(r"@(BASE|A|B)\b", lambda m: str(paths[m[1]]), body)
    body = body.replace("@coeffs", f"{d}/coeffs")
    return f"merge_method: {method}\n{body}dtype: {dtype}\n"


def test_the_dtype_table_lists_every_method():
    from weightspace.methods import all_methods

    assert sorted(DTYPE_TABLE) == sorted(all_methods())


@pytest.mark.parametrize("method", sorted(DTYPE_TABLE))
def test_every_method_is_finite_and_close_in_float16_and_bfloat16(method, dtype_models, tmp_path):
    d, paths = dtype_models
    results = {}
    for dtype in ("float32", "float16", "bfloat16"):
        results[dtype] = _merge(_spec(method, d, paths, dtype), tmp_path / dtype)
    ref = results["float32"]
    for dtype, tol in (("float16", 2e-2), ("bfloat16", 5e-2)):
        got = results[dtype]
        for n, x in got.items():
            assert x.dtype == getattr(torch, dtype), (method, dtype, n)
            assert bool(torch.isfinite(x.float()).all()), f"{method} {dtype}: NaN/Inf in {n}"
            # the same merge to the precision of the format (trim ties may flip single entries)
            scale = float(ref[n].abs().max()) or 1.0
            err = float((x.double() - ref[n].double()).abs().mean()) / scale
            assert err < tol, f"{method} {dtype} {n}: mean |diff| / max|x| = {err:.3g}"


# ---------------------------------------------------------------------------------------------
# layer stacking rewrites every per-layer config list


@pytest.mark.requires("hf")
def test_stacking_a_qwen2_rewrites_layer_types_and_transformers_loads_it(tmp_path):
    import transformers

    kinds = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, layer_types=kinds,
                                   use_sliding_window=True, sliding_window=16, max_window_layers=2)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "q")
    spec = parse_spec(f"""
merge_method: passthrough
slices:
  - sources: [{{model: {tmp_path / 'q'}, layer_range: [0, 3]}}]
  - sources: [{{model: {tmp_path / 'q'}, layer_range: [1, 4]}}]
dtype: float32
""")
    run_plan(plan_merge(spec), tmp_path / "out", progress=False)
    out_cfg = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert out_cfg.num_hidden_layers == 6
    # output layers 0-2 are source layers 0-2, output layers 3-5 source layers 1-3
    assert out_cfg.layer_types == [kinds[i] for i in (0, 1, 2, 1, 2, 3)]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(model.model.layers) == 6
    src = load_space(tmp_path / "q")["model.layers.1.mlp.up_proj.weight"].load()
    torch.testing.assert_close(model.model.layers[3].mlp.up_proj.weight.detach(), src)


def test_a_parameter_the_method_ignores_is_refused_with_the_reason(four, run_cli, tmp_path):
    from weightspace.errors import SpecError

    base, a, _ = four
    for extra, name in (("    parameters: {weight: 1.0, density: 0.5}\n", "models[0].parameters.density"),
                        ("    parameters: {weight: 1.0}\nparameters: {rescale: true}\n", "parameters.rescale")):
        spec = parse_spec(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {a}\n{extra}")
        with pytest.raises(SpecError, match=rf"{re.escape(name)} \(line \d\): task_arithmetic sparsifies nothing"):
            plan_merge(spec)
    code, out, _ = run_cli("methods", "task_arithmetic")
    assert code == 0 and "density" not in out and "rescale" not in out


# ---------------------------------------------------------------------------------------------
# mergekit-yaml's command line


def _llama_spec(method: str, base, models, extra: str = "") -> str:
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    lines += [f"  - {{model: {m}, parameters: {{weight: 1.0, density: 0.5}}}}" for m in models]
    return "\n".join(lines) + "\n" + extra


def test_mergekit_flags_keep_their_meaning(four, tmp_path, run_cli, write_spec):
    base, a, b = four
    (base / "tokenizer_config.json").write_text('{"model_max_length": 9}')
    spec = write_spec(_llama_spec("ties", base, [a, b]))
    code, _, err = run_cli("run", spec, tmp_path / "plain", "--no-progress")
    assert code == 0, err
    code, out, err = run_cli("run", spec, tmp_path / "mk", "--out-shard-size", "60K", "--no-copy-tokenizer",
                             "--no-write-model-card", "--lazy-unpickle", "--low-cpu-memory", "--read-to-gpu",
                             "--async-write", "--clone-tensors", "-j", "1", "--random-seed", "5",
                             "--allow-crimes", "--quiet", "--safe-serialization")
    assert code == 0 and out == "", err
    mk = tmp_path / "mk"
    shards = sorted(mk.glob("model-*.safetensors"))
    assert len(shards) > 1 and all(p.stat().st_size <= 60_000 + 2_000 for p in shards)  # K = 1000 bytes
    assert not (mk / "tokenizer_config.json").exists() and (tmp_path / "plain" / "tokenizer_config.json").exists()
    assert not (mk / "README.md").exists() and (tmp_path / "plain" / "README.md").exists()
    assert (mk / "mergekit_config.yml").read_text() == (tmp_path / "plain" / "mergekit_config.yml").read_text()
    assert "merge_method: ties" in (mk / "mergekit_config.yml").read_text()
    plain, got = load_space(tmp_path / "plain"), load_space(mk)
    assert all(torch.equal(plain[n].load(), got[n].load()) for n in plain)  # the no-op flags change nothing


def test_mergekit_random_seed_is_the_spec_seed(four, tmp_path, run_cli, write_spec):
    base, a, b = four
    spec = write_spec(_llama_spec("dare_ties", base, [a, b]))
    seeded = write_spec(_llama_spec("dare_ties", base, [a, b], "parameters: {seed: 5}\n"), name="seeded.yaml")
    assert run_cli("run", spec, tmp_path / "x", "--random-seed", "5")[0] == 0
    assert run_cli("run", seeded, tmp_path / "y")[0] == 0
    assert run_cli("run", spec, tmp_path / "z", "--random-seed", "6")[0] == 0
    x, y, z = (load_space(tmp_path / d) for d in "xyz")
    n = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(x[n].load(), y[n].load()) and not torch.equal(x[n].load(), z[n].load())
    code, _, err = run_cli("run", seeded, tmp_path / "w", "--random-seed", "6")
    assert code == 2 and "the spec sets parameters.seed (5); drop it or --random-seed" in err


@pytest.mark.parametrize("argv, code, message", [
    (["--trust-remote-code"], 2, "--trust-remote-code: wsmerge never runs code from a model repository"),
    (["--no-safe-serialization"], 2, "wsmerge writes only safetensors"),
    (["--unsafe-truncate-embeddings"], 2, "give the models' vocabularies a common tokenizer"),
    (["--shard-size", "1G", "--out-shard-size", "1B"], 2, "give --shard-size or mergekit's --out-shard-size"),
    (["--device", "cpu", "--cuda"], 2, "give --device or mergekit's --cuda/--no-cuda, not both"),
    (["--out-shard-size", "5G"], 2, "a whole number with K, M or B"),
])
def test_mergekit_flags_wsmerge_does_not_take_are_refused_with_the_reason(four, tmp_path, run_cli, write_spec,
                                                                          argv, code, message):
    base, a, b = four
    spec = write_spec(_llama_spec("ties", base, [a, b]))
    got, _, err = run_cli("run", spec, tmp_path / "out", *argv)
    assert got == code and message in err, err
    assert not (tmp_path / "out").exists()


def test_models_of_different_architectures_need_allow_crimes(four, tmp_path, run_cli, write_spec):
    import json

    base, a, b = four
    cfg = json.loads((b / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (b / "config.json").write_text(json.dumps(cfg))
    spec = write_spec(_llama_spec("ties", base, [a, b]))
    code, _, err = run_cli("run", spec, tmp_path / "out")
    assert code == 1 and not (tmp_path / "out").exists()
    assert re.search(r"models\[1\]\.model \(line 5\): '.*/b' is a MistralForCausalLM but '.*/base' "
                     r"\(base_model \(line 2\)\) is a LlamaForCausalLM; mixing architectures is refused "
                     r"unless --allow-crimes", err), err
    code, _, err = run_cli("run", spec, tmp_path / "out", "--allow-crimes")
    assert code == 0, err


def test_step_gradients_of_booleans_and_strings_and_mergekit_slice_keys(four, tmp_path):
    from weightspace.params import evaluate

    # mergekit 0.1.5: a list of non-numbers is read as steps, entry int(t * (n - 1))
    assert [evaluate([True, False], "x", t) for t in (0.0, 0.49, 0.99, 1.0)] == [True, True, True, False]
    assert [evaluate(["a", "b", "c"], "x", t) for t in (0.0, 0.5, 0.9, 1.0)] == ["a", "b", "b", "c"]
    base, a, b = four
    # a step gradient of a boolean parameter: int(t * 2) is 0, 0, 1, 2 at t = 0, 1/3, 2/3, 1
    got = _merge(f"""
merge_method: linear
models:
  - {{model: {a}, parameters: {{weight: 1.0}}}}
  - {{model: {b}, parameters: {{weight: 1.0}}}}
parameters: {{normalize: [true, true, false]}}
""", tmp_path / "out")
    A, B = load_space(a), load_space(b)
    for layer, normalized in ((0, True), (1, True), (2, True), (3, False)):  # t = 0, 1/3, 2/3, 1
        n = f"model.layers.{layer}.mlp.up_proj.weight"
        want = A[n].load() + B[n].load()
        torch.testing.assert_close(got[n], want / 2 if normalized else want)
    # residual_weight is in mergekit's slice schema (and unused there): accepted, with a note
    plan = plan_merge(parse_spec(f"""
merge_method: passthrough
slices:
  - sources: [{{model: {a}, layer_range: [0, 2]}}]
    residual_weight: 0.5
"""))
    assert any("residual_weight" in n and "ignored" in n for n in plan.notes)
    from weightspace.errors import SpecError

    with pytest.raises(SpecError, match="modules: mergekit's per-module merges are not supported"):
        parse_spec(f"merge_method: linear\nmodules: {{text: {{models: [{{model: {a}}}]}}}}\n")


@pytest.mark.requires("hf")
def test_space_of_follows_state_dict_and_a_checkpoint_of_it_reloads_without_surprises(tmp_path):
    import transformers

    from weightspace.binding import load_into, space_of, tensors_for

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    non_persistent = {n for n, _ in model.named_buffers()} - set(model.state_dict())
    assert any(n.endswith("inv_freq") for n in non_persistent)  # the case the issue names
    space = space_of(model)
    assert set(space) == set(model.state_dict()) and not (set(space) & non_persistent)
    # tensors_for needs state_dict's names, and a tied name is satisfied by its twin
    del_tied = {n: space[n].load() for n in space if n != "lm_head.weight"}
    assert set(tensors_for(model, del_tied)) == set(del_tied)
    fresh = transformers.LlamaForCausalLM(cfg)
    load_into(fresh, del_tied)
    x = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(fresh(x).logits, model(x).logits)


def test_a_local_path_into_the_hub_cache_names_its_repo_in_the_model_card(tmp_path, run_cli, write_spec):
    import yaml

    snap = tmp_path / "hf" / "models--acme--tiny-llama" / "snapshots" / "0123abc"
    write_tiny_llama(snap, seed=0)
    ft = write_tiny_llama(tmp_path / "ft", seed=0, delta_seed=1)
    spec = write_spec(f"merge_method: task_arithmetic\nbase_model: {snap}\nmodels:\n"
                      f"  - {{model: {ft}, parameters: {{weight: 0.5}}}}\n")
    code, _, err = run_cli("run", spec, tmp_path / "out")
    assert code == 0, err
    front = yaml.safe_load((tmp_path / "out" / "README.md").read_text().split("---")[1])
    assert front["base_model"] == "acme/tiny-llama"  # the local fine-tune is not named
    from weightspace.sources import hub_origin

    assert hub_origin(tmp_path / "models--a--b" / "snapshots" / "r" / "x") == "a/b"
    assert hub_origin(tmp_path / "models--ab" / "snapshots" / "r") is None
    assert hub_origin(tmp_path / "ft") is None


def test_linear_averages_an_unlisted_base_model_as_mergekit_does(four, tmp_path):
    """mergekit 0.1.5 adds a base_model that is not listed to every method's inputs: linear
    averages it, with its weight from the global parameters (checked against mergekit itself in
    benchmarks/compare_mergekit.py, case linear-with-base)."""
    base, a, b = four
    got = _merge(f"merge_method: linear\nbase_model: {base}\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.5}}}}\n"
                 f"  - {{model: {b}, parameters: {{weight: 0.5}}}}\nparameters: {{weight: 1.0}}\n", tmp_path / "out")
    B, A, Bm = (load_space(p) for p in (base, a, b))
    for n in got:
        want = (0.5 * A[n].load() + 0.5 * Bm[n].load() + 1.0 * B[n].load()) / 2.0
        torch.testing.assert_close(got[n], want)
    from weightspace.errors import SpecError

    with pytest.raises(SpecError, match=r"missing required parameter 'weight' \(parameters, for base_model"):
        plan_merge(parse_spec(f"merge_method: linear\nbase_model: {base}\nmodels:\n"
                              f"  - {{model: {a}, parameters: {{weight: 0.5}}}}\n"))

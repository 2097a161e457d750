"""FusionBench 0.2.33's RegMean or Fisher merging of two causal LMs, for compare_fusionbench.py.

    /tmp/fbvenv/bin/python benchmarks/_fusionbench_child.py regmean --arch llama \\
        --base W/base --models W/ft_a W/ft_b --data W/data.txt --examples 64 --batch-size 8 \\
        --max-length 64 --ratio 0.1 --out W/fb-regmean [--dump W/fb-regmean-stats]

Run with FusionBench's own virtualenv (never the project's: FusionBench is not a dependency).
What it calls, and only this is changed from FusionBench:

- `RegMeanAlgorithmForGPT2.run(pool)` / `FisherMergingAlgorithmForGPT2.run(pool)`, the
  algorithms' own `run`, Gram / Fisher estimation (`get_regmean_weights` / `get_fisher_weights`:
  its DataLoader with shuffle=True, default_data_collator, Lightning Fabric on the CPU) and merge
  (`merging_with_regmean_weights` / `merging_with_fisher_weights`), on a `BaseModelPool` of the
  three models (`_pretrained_` is the base, which `run` loads the merged tensors into);
- subclassed only where those classes are tied to GPT-2 *sequence classification*:
  `on_*_start` (loads classification heads) does nothing, and `compute_logits` returns the
  causal LM's logits (RegMean: its forward, the hooks do the rest; Fisher: the next-token
  logits at the non-padding positions, (predictions, vocab): each next-token prediction is one
  classification in FusionBench's estimator); for a Llama the RegMean subclass hooks
  `nn.Linear` (RegMeanAlgorithm's own `_include_module_type`) instead of GPT-2's Conv1D;
- the pool's `load_train_dataset` returns the tokenized examples (a list of dicts).

The merged model is written with `save_pretrained` (safetensors) to --out. --dump DIR (an
untimed second run) also writes the statistics FusionBench computed, as `stats_<model>.safetensors`
(captured by wrapping the merge function the algorithm calls), and, with --ours-stats A B,
FusionBench's merge function applied to the project's statistics (`fb_merge_of_ours.safetensors`):
the merge step alone, with the statistics held equal. Phase times go to stdout as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

T0 = time.perf_counter()


def read_stats(path: Path):
    """A safetensors file or a sharded directory (every *.safetensors in it) as one dict."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("method", choices=["regmean", "fisher"])
    ap.add_argument("--arch", choices=["gpt2", "llama"], required=True)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--models", type=Path, nargs=2, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--examples", type=int, required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--max-length", type=int, required=True)
    ap.add_argument("--ratio", type=float, default=0.1, help="RegMean reduce_non_diagonal_ratio")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dump", type=Path, default=None)
    ap.add_argument("--ours-stats", type=Path, nargs=2, default=None)
    args = ap.parse_args()

    import fusion_bench.method.fisher_merging.fisher_merging as fb_fisher
    import fusion_bench.method.regmean.regmean as fb_regmean
    import lightning as L
    import torch
    import transformers
    from fusion_bench.method.fisher_merging.gpt2_fisher_merging import FisherMergingAlgorithmForGPT2
    from fusion_bench.method.regmean.gpt2_regmean import RegMeanAlgorithmForGPT2
    from fusion_bench.modelpool import BaseModelPool
    from torch import nn

    torch.manual_seed(args.seed)  # FusionBench's DataLoader shuffles
    t_import = time.perf_counter()

    tok = transformers.AutoTokenizer.from_pretrained(str(args.base), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lines = [ln for ln in args.data.read_text().splitlines() if ln.strip()][: args.examples]
    enc = tok(lines, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
    dataset = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i]}
               for i in range(len(lines))]

    def load(d: Path):
        return transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32,
                                                                 local_files_only=True)

    names = ["a", "b"]
    models = {"_pretrained_": load(args.base), **{n: load(d) for n, d in zip(names, args.models)}}
    t_load = time.perf_counter()

    class Pool(BaseModelPool):
        def load_train_dataset(self, dataset_name, *a, **k):
            return dataset

    pool = Pool(models)
    captured: dict = {}
    fabric = L.Fabric(accelerator="cpu", devices=1)
    fabric.launch()

    if args.method == "regmean":
        class LMRegMean(RegMeanAlgorithmForGPT2):
            _include_module_type = [nn.Linear] if args.arch == "llama" else RegMeanAlgorithmForGPT2._include_module_type

            def on_regmean_start(self):
                pass

            def compute_logits(self, module, batch, task):
                return module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

        algo = LMRegMean(cache_dir=str(args.out.parent), batch_size=args.batch_size, num_workers=0,
                         num_regmean_examples=args.examples, exclude_param_names_regex=[],
                         reduce_non_diagonal_ratio=args.ratio, weight_transpose=args.arch == "llama")
        merge_fn_name, module = "merging_with_regmean_weights", fb_regmean
    else:
        class LMFisher(FisherMergingAlgorithmForGPT2):
            def on_fisher_merging_start(self):
                pass

            def compute_logits(self, module, batch, task):
                logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                return logits[:, :-1][batch["attention_mask"][:, 1:].bool()]  # (predictions, vocab)

        algo = LMFisher(cache_dir=str(args.out.parent), batch_size=args.batch_size, num_workers=0,
                        exclude_param_names_regex=[], normalize_fisher_weight=True,
                        minimal_fisher_weight=1e-6, num_fisher_examples=args.examples)
        merge_fn_name, module = "merging_with_fisher_weights", fb_fisher
    algo.fabric = fabric

    if args.dump is not None:  # capture the statistics on their way into the merge (untimed run)
        original = getattr(module, merge_fn_name)

        def spy(*a, **k):
            stats = k.get("models_to_merge_regmean_weights_list", k.get("models_to_merge_fisher_weights_list"))
            captured["stats"] = stats
            captured["params"] = k["models_to_merge_param_dict"]
            return original(*a, **k)

        setattr(module, merge_fn_name, spy)

    merged = algo.run(pool)
    t_algo = time.perf_counter()
    merged.save_pretrained(str(args.out))
    t_save = time.perf_counter()

    if args.dump is not None:
        from safetensors.torch import save_file

        args.dump.mkdir(parents=True, exist_ok=True)
        for n, stats in zip(names, captured["stats"]):
            seen, flat = set(), {}
            for k, v in stats.items():  # a tied tensor appears under two names: keep the first
                if v.data_ptr() not in seen:
                    seen.add(v.data_ptr())
                    flat[k] = v.detach().contiguous()
            save_file(flat, str(args.dump / f"stats_{n}.safetensors"))
        if args.ours_stats is not None:
            ours = [read_stats(p) for p in args.ours_stats]
            params = {k: v for k, v in captured["params"].items()}
            if args.method == "regmean":
                ours = [{k[: -len(".weight")]: v for k, v in o.items()} for o in ours]
                with torch.no_grad():
                    out = fb_regmean.merging_with_regmean_weights(
                        models_to_merge_param_dict=params, models_to_merge_regmean_weights_list=ours,
                        reduce_non_diagonal_ratio=args.ratio, weight_transpose=args.arch == "llama")
            else:
                keep = set(ours[0])
                params = {k: v for k, v in params.items() if k in keep}
                out = original(models_to_merge_param_dict=params, models_to_merge_fisher_weights_list=ours,
                               fisher_scaling_coefficients=torch.ones(2) / 2, normalize_fisher_weight=True,
                               minimal_fisher_weight=1e-6)
            seen, flat = set(), {}
            for k, v in out.items():
                flat[k] = v.detach().contiguous().clone()
            save_file(flat, str(args.dump / "fb_merge_of_ours.safetensors"))
    print(json.dumps({"import_s": round(t_import - T0, 2), "load_s": round(t_load - t_import, 2),
                      "algorithm_s": round(t_algo - t_load, 2), "save_s": round(t_save - t_algo, 2),
                      "examples": len(dataset), "tokens": int(enc["attention_mask"].sum())}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

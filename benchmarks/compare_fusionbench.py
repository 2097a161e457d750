"""Side by side with FusionBench 0.2.33: Grams, Fishers and merges of causal LMs, wall and peak RSS.

    python3 -m venv /tmp/fbvenv && /tmp/fbvenv/bin/pip install "torch==2.13.0" "fusion-bench==0.2.33"
    OMP_NUM_THREADS=1 flock /tmp/i20-bench.lock .venv/bin/python benchmarks/compare_fusionbench.py \\
        --cases gpt2 llama40m --methods regmean fisher --examples 64 --tokens 64 --batch-size 8

Cases (each a base model and two "fine-tunes", base + 10% seeded noise per tensor, built
offline in a child process with a whitespace WordLevel tokenizer over 1,000 words):

- `gpt2`: GPT2LMHeadModel, n_layer=4, n_embd=256, n_head=4 (tied lm_head, Conv1D layers);
- `llama40m`: LlamaForCausalLM, hidden 512, intermediate 1408, 12 layers (~40M parameters);
- `llama134m`: the merge benchmark's 134M checkpoints (benchmarks/make_checkpoints.py, read from
  --ckpt-root, model_0 the base, model_1 and model_2 the two models; linked, not copied).

The data is one text file of --examples lines of exactly --tokens seeded words: no padding,
so "padding excluded" (ours) and "included" (FusionBench) see the same tokens. Per case and
method, each in its own child process (benchmarks/_measure.run_child: wall, ru_maxrss):

- ours: `wsmerge gram|fisher` on each model (-o DIR), then `wsmerge run` of the merge spec;
  the pipeline's wall is the sum, its peak the largest child's;
- theirs: benchmarks/_fusionbench_child.py in FusionBench's virtualenv (--fb-python): its
  algorithm's `run` on a pool of the three models, then `save_pretrained`;
- an untimed second FusionBench run that also dumps its statistics and applies its merge
  function to our statistics; then a comparison child: max abs / relative difference per
  tensor kind (the name with its layer index as `*`) of statistics, merged weights, and
  FusionBench's merge of our statistics against ours.

Results: benchmarks/results/compare_fusionbench.json (with the 1-minute load before and after
every run: the machine may be shared, say so with the numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import run_child  # noqa: E402

HERE = Path(__file__).resolve().parent
CASES = ("gpt2", "llama40m", "llama134m")
METHODS = ("regmean", "fisher")
# FusionBench's configs: reduce_non_diagonal_ratio 0.6 (config/method/regmean/gpt2_regmean.yaml)
# and 0.1 (regmean.yaml); our alpha is the same quantity
RATIO = {"gpt2": 0.6, "llama40m": 0.1, "llama134m": 0.1}
ARCH = {"gpt2": "gpt2", "llama40m": "llama", "llama134m": "llama"}

BUILD = r"""
import json, sys, torch, transformers as T
sys.path.insert(0, sys.argv[3])
from bench_stats import write_tokenizer
case, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
if case == "gpt2":
    cfg = T.GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=256, vocab_size=1003, bos_token_id=1,
                       eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    base = T.GPT2LMHeadModel(cfg)
else:
    cfg = T.LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=12, num_attention_heads=8,
                        num_key_value_heads=8, vocab_size=1003, max_position_embeddings=256, bos_token_id=1,
                        eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    base = T.LlamaForCausalLM(cfg)
for name, seed in (("base", None), ("ft_a", 1), ("ft_b", 2)):
    m = T.GPT2LMHeadModel(cfg) if case == "gpt2" else T.LlamaForCausalLM(cfg)
    m.load_state_dict(base.state_dict())
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                s = float(p.std()) if p.numel() > 1 else 0.0
                p.add_(torch.randn(p.shape, generator=g) * (0.1 * s if s > 0 else 0.02))  # zero biases too
    d = f"{out}/{name}"
    m.save_pretrained(d)
    write_tokenizer(__import__("pathlib").Path(d))
print(sum(p.numel() for p in base.parameters()))
"""


COMPARE = r"""
import json, re, sys, torch
from pathlib import Path
from safetensors.torch import load_file

def read(p):
    p = Path(p)
    out = {}
    for f in (sorted(p.glob("*.safetensors")) if p.is_dir() else [p]):
        out.update(load_file(str(f)))
    return out

def kind(n):
    return re.sub(r"\.\d+\.", ".*.", n)

def diff(a, b, rename=lambda k: k):
    rows = {}
    only_a = [k for k in a if rename(k) not in b]
    for k, x in a.items():
        if rename(k) not in b:
            continue
        y = b[rename(k)].double(); x = x.double()
        if x.shape != y.shape:
            rows.setdefault(kind(k), {"shape_mismatch": [list(x.shape), list(y.shape)]}); continue
        d = (x - y).abs().max().item(); s = max(x.abs().max().item(), y.abs().max().item(), 1e-30)
        cos = 1.0 if d == 0 else torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0).item()
        r = rows.setdefault(kind(k), {"tensors": 0, "max_abs": 0.0, "max_rel": 0.0, "min_cosine": 1.0,
                                      "ss_ours": 0.0, "ss_theirs": 0.0})
        r["ss_ours"] += float((x * x).sum()); r["ss_theirs"] += float((y * y).sum())
        r["tensors"] += 1; r["max_abs"] = max(r["max_abs"], d); r["max_rel"] = max(r["max_rel"], d / s)
        r["min_cosine"] = min(r["min_cosine"], cos)
    for r in rows.values():
        if "ss_ours" in r:
            r["norm_ours_over_theirs"] = (r.pop("ss_ours") / max(r.pop("ss_theirs"), 1e-300)) ** 0.5
        for k in ("max_abs", "max_rel", "min_cosine", "norm_ours_over_theirs"):
            if k in r: r[k] = float(f"{r[k]:.3g}")
    mapped = {rename(x) for x in a}
    return {"kinds": rows, "only_in_ours": only_a, "only_in_theirs": [k for k in b if k not in mapped]}

def reference(models, grams, alpha, transpose, targets):
    # W* = (sum_i G~_i)^-1 sum_i G~_i W_i in float64 (G~ = alpha G + (1 - alpha) diag G), from our
    # Grams: which of the two float32 answers is nearer the exact solution
    ws, gs = [read(m) for m in models], [read(g) for g in grams]
    out = {}
    for label, path in targets.items():
        got = read(path)
        rows = {}
        for name in gs[0]:
            a = sum((g[name].double() * alpha).fill_diagonal_(0) + torch.diag(g[name].double().diagonal()) for g in gs)
            w = [(x[name].double().T if transpose else x[name].double()) for x in ws]
            rhs = sum(((g[name].double() * alpha).fill_diagonal_(0) + torch.diag(g[name].double().diagonal())) @ wi
                      for g, wi in zip(gs, w))
            ref = torch.linalg.solve(a, rhs)
            ref = ref.T if transpose else ref
            d = (got[name].double() - ref).abs().max().item() / ref.abs().max().item()
            r = rows.setdefault(kind(name), 0.0)
            rows[kind(name)] = float(f"{max(r, d):.3g}")
        out[label] = rows
    return out

spec = json.loads(sys.argv[1])
ref = spec.pop("_reference", None)
out = {}
if ref is not None:
    out["regmean: max relative difference from the float64 solution, per kind"] = reference(**ref)
for label, (a, b, strip) in spec.items():
    ra, rb = read(a), read(b)
    out[label] = diff(ra, rb, (lambda k: k[:-7] if k.endswith(".weight") else k) if strip else (lambda k: k))
print(json.dumps(out))
"""


def ours_cmds(exe: str, method: str, case: str, models: list[Path], data: Path, work: Path,
              args: argparse.Namespace) -> tuple[list[tuple[str, list[str]]], list[Path], Path]:
    common = ["--data", str(data), "--n-examples", str(args.examples), "--batch-size", str(args.batch_size),
              "--max-length", str(args.tokens), "--task", "causal-lm", "--device", "cpu", "--overwrite",
              "--no-progress"]
    stats = [work / f"ours-{method}-{m.name}" for m in models]
    cmds = []
    for m, s in zip(models, stats):
        extra = ["--estimator", "empirical"] if method == "fisher" else ["--padding", args.padding]
        cmds.append((f"{'gram' if method == 'regmean' else 'fisher'} {m.name}",
                     [exe, "gram" if method == "regmean" else "fisher", str(m), "-o", str(s), *common, *extra]))
    spec = work / f"ours-{method}.yaml"
    if method == "regmean":
        spec.write_text(f"merge_method: regmean\nparameters: {{alpha: {RATIO[case]}}}\nmodels:\n"
                        + "".join(f"  - {{model: {m}, parameters: {{gram: {s}}}}}\n" for m, s in zip(models, stats)))
    else:  # FusionBench's merge: F + 1e-6 for every model, norm-normalized, equal weights
        spec.write_text("merge_method: fisher\nparameters: {normalize_fishers: true, fisher_floor: 1.0e-6, "
                        "floor_mode: add, favor_target: false}\nmodels:\n"
                        + "".join(f"  - {{model: {m}, parameters: {{weight: 0.5, fisher: {s}}}}}\n"
                                  for m, s in zip(models, stats)))
    merged = work / f"ours-{method}-merged"
    cmds.append(("merge", [exe, "run", str(spec), str(merged), "--overwrite", "--no-progress", "--device", "cpu"]))
    return cmds, stats, merged


def row_of(r: dict, label: str) -> dict:
    return {"run": label, "rc": r["rc"], "wall_s": round(r["wall_s"], 2),
            "peak_rss_mib": round(r["maxrss_kib"] / 1024, 1),
            "rss_anon_peak_mib": round(r["sampled_peak_kib"].get("RssAnon", 0) / 1024, 1),
            "load_before": r["load_before"], "load_after": r["load_after"]}


def prepare_case(case: str, args: argparse.Namespace, work: Path) -> tuple[Path, list[Path], int]:
    if case == "llama134m":
        from bench_stats import model_dir

        src = args.ckpt_root / "ckpt-134M-float32-n3-s0"
        if not (src / "model_0").is_dir():
            raise SystemExit(f"{src}: missing; build it with benchmarks/make_checkpoints.py")
        dirs = [model_dir(src / f"model_{i}", work / f"model_{i}") for i in range(3)]
        size = sum(f.stat().st_size for f in (src / "model_0").glob("*.safetensors")) // 4
        return dirs[0], dirs[1:], size
    if not (work / "ft_b" / "tokenizer.json").is_file():
        r = run_child([sys.executable, "-c", BUILD, case, str(work), str(HERE)], work / "logs" / "build.log", None)
        if r["rc"] != 0:
            raise SystemExit(Path(r["log"]).read_text()[-3000:])
    size = sum(f.stat().st_size for f in (work / "base").glob("*.safetensors")) // 4
    return work / "base", [work / "ft_a", work / "ft_b"], size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--cases", nargs="+", default=["gpt2", "llama40m"], metavar="CASE",
                    help=f"any of {', '.join(CASES)} (default: gpt2 llama40m)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD",
                    help=f"any of {', '.join(METHODS)} (default: both)")
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--fb-python", default="/tmp/fbvenv/bin/python",
                    help="the Python of FusionBench 0.2.33's own virtualenv")
    ap.add_argument("--ckpt-root", type=Path, default=HERE / "work")
    ap.add_argument("--work", type=Path, default=HERE / "work" / "compare-fusionbench")
    ap.add_argument("--ragged", type=int, default=None, metavar="MIN",
                    help="lines of MIN to --tokens words (seeded) instead of exactly --tokens: padded batches")
    ap.add_argument("--padding", choices=["exclude", "include"], default="exclude",
                    help="our `wsmerge gram --padding` (FusionBench's rows are every padded position)")
    ap.add_argument("--no-dump", action="store_true", help="timings only: no statistics comparison")
    ap.add_argument("-o", "--out", type=Path, default=HERE / "results" / "compare_fusionbench.json")
    ap.add_argument("--update", action="store_true",
                    help="keep the other cases already in --out (a case and method run again is replaced)")
    args = ap.parse_args(argv)
    bad = [c for c in args.cases if c not in CASES] + [m for m in args.methods if m not in METHODS]
    if bad:
        ap.error(f"unknown case(s) or method(s) {bad}; cases: {', '.join(CASES)}; methods: {', '.join(METHODS)}")
    if not Path(args.fb_python).exists():
        ap.error(f"--fb-python {args.fb_python}: not found; install FusionBench in its own virtualenv "
                 f"(the first command in --help)")
    exe = str(Path(sys.executable).parent / "wsmerge")
    child = str(HERE / "_fusionbench_child.py")
    from bench_stats import WORDS, write_data

    results = {"examples": args.examples, "tokens": args.tokens, "batch_size": args.batch_size,
               "ragged_min": args.ragged, "padding": args.padding,
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count(), "cases": []}
    # what each process pays before any work: our pipeline starts three, FusionBench's one
    floors = {"ours: import torch, transformers": [sys.executable, "-c", "import torch, transformers"],
              "theirs: import torch, transformers, lightning, fusion_bench algorithms": [
                  args.fb_python, "-c", "import torch, transformers, lightning; "
                  "import fusion_bench.method.regmean.gpt2_regmean, fusion_bench.method.fisher_merging.gpt2_fisher_merging"]}
    if args.update and args.out.is_file():
        before = json.loads(args.out.read_text())
        ran = {(c, m) for c in args.cases for m in args.methods}
        results["cases"] = [e for e in before.get("cases", []) if (e["case"], e["method"]) not in ran]
        results["startup_before"] = before.get("startup")
    results["startup"] = [row_of(run_child(cmd, args.work / "logs" / f"startup-{i}.log", None), label)
                          for i, (label, cmd) in enumerate(floors.items())]
    print(json.dumps(results["startup"]), flush=True)
    for case in args.cases:
        work = args.work / case
        work.mkdir(parents=True, exist_ok=True)
        base, models, n_params = prepare_case(case, args, work)
        if args.ragged:
            data = work / f"data-{args.examples}x{args.ragged}-{args.tokens}.txt"
            rng = random.Random(0)
            data.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(args.ragged, args.tokens)))
                                      for _ in range(args.examples)) + "\n")
        else:
            data = write_data(work / f"data-{args.examples}x{args.tokens}.txt", args.examples, args.tokens)
        for method in args.methods:
            entry = {"case": case, "method": method, "params": n_params, "runs": []}
            cmds, stats, merged = ours_cmds(exe, method, case, models, data, work, args)
            ours = []
            for label, cmd in cmds:
                r = run_child(cmd, work / "logs" / f"ours-{method}-{label.replace(' ', '_')}.log", None)
                ours.append(row_of(r, f"ours {label}"))
                print(json.dumps({"case": case, "method": method, **ours[-1]}), flush=True)
                if r["rc"] != 0:
                    print(Path(r["log"]).read_text()[-3000:], file=sys.stderr)
                    return 1
            fb_out = work / f"fb-{method}-merged"
            fb_cmd = [args.fb_python, child, method, "--arch", ARCH[case], "--base", str(base), "--models",
                      *map(str, models), "--data", str(data), "--examples", str(args.examples), "--batch-size",
                      str(args.batch_size), "--max-length", str(args.tokens), "--ratio", str(RATIO[case]),
                      "--out", str(fb_out)]
            r = run_child(fb_cmd, work / "logs" / f"fb-{method}.log", None)
            theirs = row_of(r, "fusionbench run + save_pretrained")
            log = Path(r["log"]).read_text()
            phases = [json.loads(ln) for ln in log.splitlines() if ln.startswith("{\"import_s\"")]
            theirs["phases"] = phases[-1] if phases else None
            print(json.dumps({"case": case, "method": method, **theirs}), flush=True)
            if r["rc"] != 0:
                print(log[-3000:], file=sys.stderr)
                return 1
            wall = sum(x["wall_s"] for x in ours)
            peak = max(x["peak_rss_mib"] for x in ours)
            entry["runs"] = ours + [theirs]
            entry["ours"] = {"wall_s": round(wall, 2), "peak_rss_mib": peak}
            entry["ratios"] = {"wall_ours_over_theirs": round(wall / theirs["wall_s"], 3),
                               "peak_rss_ours_over_theirs": round(peak / theirs["peak_rss_mib"], 3)}
            if not args.no_dump:
                dump = work / f"fb-{method}-stats"
                r = run_child(fb_cmd[:-1] + [str(work / f"fb-{method}-merged-dump"), "--dump", str(dump),
                                             "--ours-stats", *map(str, stats)],
                              work / "logs" / f"fb-{method}-dump.log", None)
                if r["rc"] != 0:
                    print(Path(r["log"]).read_text()[-3000:], file=sys.stderr)
                    return 1
                strip = method == "regmean"  # Gram names: ours the weight's, FusionBench's the module's
                spec = {f"stats {m.name}": [str(s), str(dump / f"stats_{n}.safetensors"), strip]
                        for m, s, n in zip(models, stats, ["a", "b"])}
                spec["merged (each tool end to end)"] = [str(merged), str(fb_out), False]
                spec["merged: FusionBench's merge of our statistics"] = [
                    str(merged), str(dump / "fb_merge_of_ours.safetensors"), False]
                if method == "regmean":
                    spec["_reference"] = {"models": list(map(str, models)), "grams": list(map(str, stats)),
                                          "alpha": RATIO[case], "transpose": ARCH[case] == "llama",
                                          "targets": {"ours": str(merged),
                                                      "fusionbench end to end": str(fb_out),
                                                      "fusionbench merge of our Grams":
                                                          str(dump / "fb_merge_of_ours.safetensors")}}
                r = run_child([sys.executable, "-c", COMPARE, json.dumps(spec)],
                              work / "logs" / f"compare-{method}.log", None)
                text = Path(r["log"]).read_text()
                if r["rc"] != 0:
                    print(text[-3000:], file=sys.stderr)
                    return 1
                entry["compare"] = json.loads(text.strip().splitlines()[-1])
            results["cases"].append(entry)
            print(json.dumps({k: entry[k] for k in ("case", "method", "ours", "ratios")}), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")  # after every method: partial stays
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

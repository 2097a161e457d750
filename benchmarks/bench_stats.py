"""Peak memory and wall time of `wsmerge gram` (or `fisher`) on Llama-shaped checkpoints.

    flock /tmp/i20-bench.lock python benchmarks/bench_stats.py --stat gram --sizes 134M 1B \\
        --examples 16 --tokens 64 --budget-frac 0.25

For each size, three children, each its own process (benchmarks/_measure.run_child: wall
clock, ru_maxrss):

- `forward`: open the model and run the same batches forward, no statistics: the floor;
- `gram` with the default --max-stats-memory (2GiB);
- `gram` with --max-stats-memory set to `--budget-frac` of the model's own size: the
  statistics' memory then grows with the model, not faster, whatever the Grams' total.

The checkpoints are the merge benchmark's (benchmarks/make_checkpoints.py, read from
benchmarks/work/ckpt-<size>-float32-n3-s0/model_0, or --ckpt-root); they have no tokenizer, so
a work directory beside them links their files and adds a whitespace WordLevel tokenizer, and
the data is a text file of `--examples` lines of exactly `--tokens` words. Results go to
benchmarks/results/stats_<stat>.json: per run the wall, the peak RSS, the passes the run took,
examples per second, the model's and the statistics' bytes on disk, and the 1-minute load
before and after (the machine may be shared: say so with the numbers).
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
WORDS = [f"w{i}" for i in range(1000)]

FORWARD = """
import sys, torch
from weightspace.zoo.bind import open_batches, open_model
model, data, n, bs, t, device = sys.argv[1:7]
ad = open_model(model, task="causal-lm", device=device)
batches = open_batches(data, ad, batch_size=int(bs), n_examples=int(n), tokenizer=model, max_length=int(t))
with torch.no_grad():
    for b in batches:
        ad.forward(ad.params(), {k: v.to(device) for k, v in b.items()})
"""


def write_tokenizer(d: Path) -> None:
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = {"version": "1.0", "truncation": None, "padding": None,
           "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for i, t in enumerate(specials)],
           "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
           "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    (d / "tokenizer.json").write_text(json.dumps(tok))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
        "eos_token": "</s>", "pad_token": "</s>"}))


def model_dir(src: Path, work: Path) -> Path:
    """`src`'s files linked (hard links where the filesystem allows, else symlinks) into `work`,
    plus a tokenizer: nothing is copied and `src` is not written to."""
    work.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        dst = work / f.name
        if not dst.exists():
            try:
                os.link(f, dst)
            except OSError:
                dst.symlink_to(f.resolve())
    write_tokenizer(work)
    return work


def write_data(path: Path, examples: int, tokens: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(tokens)) for _ in range(examples)) + "\n")
    return path


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.suffix == ".safetensors") if d.is_dir() else 0


def merge_run(args: argparse.Namespace, size: str, src: Path, model0: Path, common: list[str],
              model_bytes: int, results: dict, out: Path) -> None:
    """model_1's Grams (default budget), then a RegMean merge of model_0 and model_1 from the two
    Gram directories: its peak RSS against one model's size (the merge streams tensor by tensor)."""
    exe = str(Path(sys.executable).parent / "wsmerge")
    model1 = model_dir(src.parent / "model_1", args.work / f"model-{size}-1")
    g0, g1 = args.work / f"{size}-gram", args.work / f"{size}-gram-1"
    spec = args.work / f"{size}-regmean.yaml"
    spec.write_text(f"merge_method: regmean\nparameters: {{alpha: 0.1}}\nmodels:\n"
                    f"  - {{model: {model0}, parameters: {{gram: {g0}}}}}\n"
                    f"  - {{model: {model1}, parameters: {{gram: {g1}}}}}\n")
    merged = args.work / f"{size}-regmean-out"
    plans = [] if args.merge_only else [("gram model_1", [exe, "gram", str(model1), "-o", str(g1), *common])]
    plans += [("regmean merge", [exe, "run", str(spec), str(merged), "--overwrite", "--no-progress",
                                "--device", args.device])]
    for label, cmd in plans:
        r = run_child(cmd, args.work / "logs" / f"{size}-{label.replace(' ', '_')}.log", timeout=None)
        row = {"size": size, "run": label, "rc": r["rc"], "wall_s": round(r["wall_s"], 2),
               "peak_rss_mib": round(r["maxrss_kib"] / 1024, 1), "model_mib": round(model_bytes / 2**20, 1),
               "rss_anon_peak_mib": round(r["sampled_peak_kib"].get("RssAnon", 0) / 1024, 1),
               "load_before": r["load_before"], "load_after": r["load_after"], "cmd": " ".join(cmd)}
        row["peak_over_model"] = round(row["peak_rss_mib"] / row["model_mib"], 3)
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        if r["rc"] != 0:
            print(Path(r["log"]).read_text()[-3000:], file=sys.stderr)
            return


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stat", choices=["gram", "fisher"], default="gram")
    ap.add_argument("--sizes", nargs="+", default=["134M", "1B"])
    ap.add_argument("--ckpt-root", type=Path, default=HERE / "work")
    ap.add_argument("--work", type=Path, default=HERE / "work" / "stats")
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--budget-frac", type=float, default=0.25,
                    help="--max-stats-memory as this fraction of the model's size (0: skip that run)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-default", action="store_true", help="no run with the default budget")
    ap.add_argument("--merge", action="store_true",
                    help="also take model_1's Grams and time `wsmerge run` of a RegMean merge of "
                         "model_0 and model_1 reading the Gram directories")
    ap.add_argument("--merge-only", action="store_true",
                    help="only the merge runs, from the Gram directories an earlier --merge run left")
    ap.add_argument("-o", "--out", type=Path, default=None)
    args = ap.parse_args(argv)
    out = args.out or HERE / "results" / f"stats_{args.stat}.json"
    exe = str(Path(sys.executable).parent / "wsmerge")
    args.work.mkdir(parents=True, exist_ok=True)
    data = write_data(args.work / f"data-{args.examples}x{args.tokens}.txt", args.examples, args.tokens)
    results = {"stat": args.stat, "examples": args.examples, "tokens": args.tokens,
               "batch_size": args.batch_size, "device": args.device, "cpus": os.cpu_count(), "runs": []}
    common = ["--data", str(data), "--n-examples", str(args.examples), "--batch-size", str(args.batch_size),
              "--max-length", str(args.tokens), "--task", "causal-lm", "--device", args.device,
              "--overwrite", "--no-progress"]
    for size in args.sizes:
        src = args.ckpt_root / f"ckpt-{size}-float32-n3-s0" / "model_0"
        if not src.is_dir():
            print(f"{src}: missing; build it with benchmarks/make_checkpoints.py", file=sys.stderr)
            return 1
        model = model_dir(src, args.work / f"model-{size}")
        model_bytes = dir_bytes(src)
        plans = [("forward", [sys.executable, "-c", FORWARD, str(model), str(data), str(args.examples),
                              str(args.batch_size), str(args.tokens), args.device])]
        budgets = ([] if args.skip_default else [None]) + (
            [int(model_bytes * args.budget_frac)] if args.budget_frac > 0 else [])
        for budget in budgets:
            o = args.work / f"{size}-{args.stat}"
            cmd = [exe, args.stat, str(model), "-o", str(o), *common]
            if args.stat == "gram" and budget is not None:
                cmd += ["--max-stats-memory", str(budget)]
            elif args.stat == "fisher":
                cmd += ["--estimator", "empirical"]
            plans.append((f"{args.stat} budget={'default' if budget is None else budget}", cmd))
        for label, cmd in [] if args.merge_only else plans:
            r = run_child(cmd, args.work / "logs" / f"{size}-{label.replace(' ', '_')}.log", timeout=None)
            row = {"size": size, "run": label, "rc": r["rc"], "wall_s": round(r["wall_s"], 2),
                   "peak_rss_mib": round(r["maxrss_kib"] / 1024, 1), "model_mib": round(model_bytes / 2**20, 1),
                   "rss_anon_peak_mib": round(r["sampled_peak_kib"].get("RssAnon", 0) / 1024, 1),
                   "load_before": r["load_before"], "load_after": r["load_after"],
                   "cmd": " ".join(cmd[:2] + ["..."] if label == "forward" else cmd)}
            if label != "forward":
                o = args.work / f"{size}-{args.stat}"
                info = json.loads((o / "gram.json").read_text()) if (o / "gram.json").is_file() else {}
                row.update({"passes": info.get("passes", 1), "stats_mib": round(dir_bytes(o) / 2**20, 1),
                            "examples_per_s": round(args.examples / r["wall_s"], 2)})
            row["peak_over_model"] = round(row["peak_rss_mib"] / row["model_mib"], 3)
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n")  # after every run: partial results stay
            if r["rc"] != 0:
                print(Path(r["log"]).read_text()[-3000:], file=sys.stderr)
        if (args.merge or args.merge_only) and args.stat == "gram":
            merge_run(args, size, src, model, common, model_bytes, results, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

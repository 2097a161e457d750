"""Weight generators in miniature: D2NWG and hyper-representation KDE, trained on a digits zoo.

    python examples/generate_digits.py                    # 3 seeds: table on stdout
    python examples/generate_digits.py --json benchmarks/results/generate_digits.json --plot docs/generate-digits.png
    python examples/generate_digits.py --from-json benchmarks/results/generate_digits.json   # its tables again

The zoo is examples/zoo/digits-tasks.yaml (one 16-wide MLP architecture, six digit
tasks: identity, three rotations, two flips; ten seeds each). Every generator
learns from the four seen tasks (identity and the rotations) and is asked for
weights for all six: the two flips are held out. For every generator seed (the
zoo stays the same), four generators share one chunk VAE:

- d2nwg: the default, its dataset encoder trained with the diffusion loss (the
  authors' setting);
- d2nwg, random encoder: the encoder left a seeded random map (our old default);
- kde: the hyper-representation authors' sampler (near-anchor, bandwidth 0.002);
- kde, independent: every latent dimension drawn on its own (our old sampler).

Ten samples per task, each scored zero-shot and after one epoch of fine-tuning,
against random init trained the same way and against the generator's own
training models fine-tuned the same way (for a seen task its ten models, for a
held-out one all forty: what returning a training model gives). Copying is read
from the nearest training model: weight distance and normalized error
consistency, next to the same between zoo neighbours and between a training
model and its autoencoder reconstruction (a copy).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SEEN = ("digits", "digits:rotate=90", "digits:rotate=180", "digits:rotate=270")
HELD_OUT = ("digits:flip=h", "digits:flip=v")
CONFIGS: dict[str, dict[str, Any]] = {
    "d2nwg": {"method": "d2nwg"},
    "d2nwg, random encoder": {"method": "d2nwg", "encoder": "random"},
    "kde": {"method": "kde"},
    "kde, independent": {"method": "kde", "kde_sampler": "independent"},
}
COLUMNS = ("gen 0 ep", "gen 1 ep", "random 0 ep", "random 1 ep", "train models 0 ep", "train models 1 ep",
           "dist", "dist zoo nbrs", "dist AE copy", "consistency", "consistency zoo nbrs", "consistency AE copy")


def _training_models(zoo_dir: Path, data: str) -> list[Path]:
    """The generator's training models a copy could come from: the task's own if it was seen, else all."""
    from weightspace.zoo.store import Zoo

    zoo = Zoo(zoo_dir)
    tasks = {data} if data in SEEN else set(SEEN)
    return [zoo.root / r["path"] for r in zoo.final_rows() if r["dataset"] in tasks]


def _row(rep: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    mem = rep.get("memorization") or {}
    ref, copy = mem.get("zoo_reference") or {}, mem.get("autoencoder_copy") or {}
    return {
        "gen 0 ep": rep["generated"]["0"]["mean"], "gen 0 ep (best)": rep["generated"]["0"]["best"],
        "gen 1 ep": rep["generated"]["1"]["mean"],
        "random 0 ep": rep["random_init"]["0"]["mean"], "random 1 ep": rep["random_init"]["1"]["mean"],
        "train models 0 ep": base["generated"]["0"]["mean"], "train models 1 ep": base["generated"]["1"]["mean"],
        "zoo (same task)": (rep.get("zoo") or {}).get("mean"),
        "dist": (mem.get("distance") or {}).get("median"), "dist zoo nbrs": ref.get("distance_median"),
        "dist AE copy": copy.get("distance_median"),
        "consistency": (mem.get("consistency") or {}).get("median"),
        "consistency zoo nbrs": ref.get("consistency_median"), "consistency AE copy": copy.get("consistency_median"),
    }


def condition_geometry(gen_dir: Path, tasks: tuple[str, ...], *, draws: int = 50, seed: int = 0
                       ) -> dict[str, dict[str, Any]]:
    """d2nwg: where each dataset's condition lands among the seen tasks' (mean over `draws` support sets):
    its nearest seen task, the distance to it over the median distance between two seen tasks, and the
    spread of one dataset's conditions (their mean distance to their centre) over that median."""
    from weightspace.zoo.data import load_task
    from weightspace.zoo.gen.generator import load_generator
    from weightspace.zoo.gen.setenc import SupportSets

    gen = load_generator(gen_dir)
    e = gen.meta["encoder"]
    g = torch.Generator().manual_seed(seed)
    conds = {}
    with torch.no_grad():
        for t in dict.fromkeys(SEEN + tuple(tasks)):
            raw = gen.encoder(SupportSets(load_task(t)).draw(draws, e["k"], g))
            conds[t] = (raw - torch.tensor(e["cond_shift"])) / e["cond_scale"]
    centre = {t: c.mean(0) for t, c in conds.items()}
    between = statistics.median(float((centre[a] - centre[b]).norm()) for i, a in enumerate(SEEN) for b in SEEN[i + 1:])
    out = {}
    for t in tasks:
        d = {s: float((centre[t] - centre[s]).norm()) for s in SEEN if s != t}
        near = min(d, key=d.get)
        out[t] = {"nearest_seen": near, "to_nearest_seen": d[near] / between,
                  "spread": float((conds[t] - centre[t]).norm(dim=1).mean()) / between}
    return out


def generate_digits(workdir: str | Path, *, seeds: tuple[int, ...] = (0, 1, 2), n: int = 10,
                    configs: dict[str, dict[str, Any]] | None = None,
                    tasks: tuple[str, ...] = SEEN + HELD_OUT, **train_kw: Any) -> dict[str, Any]:
    """Build the zoo, train every generator config for every seed, sample and evaluate; per-task rows."""
    from weightspace.zoo.build import build_zoo
    from weightspace.zoo.gen.evaluate import evaluate_samples
    from weightspace.zoo.gen.generator import sample, train_generator
    from weightspace.zoo.spec import load_zoo_spec

    configs = CONFIGS if configs is None else configs
    work = Path(workdir).resolve()
    zoo_dir = work / "zoo"
    build_zoo(load_zoo_spec(REPO / "examples/zoo/digits-tasks.yaml"), zoo_dir, workers=1, progress=False)
    rows = []
    for seed in seeds:
        baselines = {data: evaluate_samples(_training_models(zoo_dir, data), data, finetune_epochs=(0, 1), seed=seed)
                     for data in tasks}
        first = None
        for name, kw in configs.items():
            gen = train_generator(zoo_dir, work / f"gen-{seed}-{name.replace(', ', '-').replace(' ', '_')}",
                                  tasks=list(SEEN), seed=seed, overwrite=True, vae_from=first, **{**train_kw, **kw})
            first = first or gen
            geometry = condition_geometry(gen, tasks, seed=seed) if kw["method"] == "d2nwg" else {}
            for data in tasks:
                out = work / f"samples-{data.replace(':', '_').replace('=', '')}"
                paths = sample(gen, data, n, out, seed=seed, overwrite=True, note=lambda m: None)
                rep = evaluate_samples(paths, data, zoo_dir=zoo_dir, finetune_epochs=(0, 1), seed=seed)
                nearest = [x["nearest_dataset"] for x in (rep.get("memorization") or {}).get("per_sample", [])]
                rows.append({"method": name, "data": data, "seen": data in SEEN, "seed": seed,
                             **_row(rep, baselines[data]),
                             "nearest training task": {t: nearest.count(t) for t in sorted(set(nearest))},
                             "condition": geometry.get(data)})
    return {"seeds": list(seeds), "n": n, "chance": 0.1, "rows": rows}


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per method and group (seen / held out): the mean over the group's tasks for every seed, then
    the mean and standard deviation of that over the seeds."""
    out = []
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    for method in methods:
        for seen in (True, False):
            mine = [r for r in result["rows"] if r["method"] == method and r["seen"] == seen]
            if not mine:
                continue
            cell: dict[str, Any] = {"method": method, "group": "seen (4 tasks)" if seen else "held out (2 flips)"}
            for c in COLUMNS:
                per_seed = []
                for s in result["seeds"]:
                    vals = [r[c] for r in mine if r["seed"] == s and r[c] is not None]
                    if vals:
                        per_seed.append(statistics.fmean(vals))
                cell[c] = (statistics.fmean(per_seed), statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0) \
                    if per_seed else None
            out.append(cell)
    return out


def format_tables(result: dict[str, Any]) -> str:
    summary = summarize(result)

    def table(cols: tuple[str, ...]) -> list[str]:
        lines = ["| method | tasks | " + " | ".join(cols) + " |", "| --- | --- | " + " | ".join("---:" for _ in cols) + " |"]
        for cell in summary:
            vals = ["-" if cell[c] is None else f"{cell[c][0]:.2f} ± {cell[c][1]:.2f}" for c in cols]
            lines.append(f"| {cell['method']} | {cell['group']} | " + " | ".join(vals) + " |")
        return lines

    return "\n".join(table(COLUMNS[:6]) + [""] + table(COLUMNS[6:]) + [""] + held_out_table(result))


def held_out_table(result: dict[str, Any]) -> list[str]:
    """d2nwg on the held-out flips, per task over the seeds: where the condition lands (distance to the
    nearest seen task's, over the median distance between two seen tasks' conditions: 0 is on a seen
    task, 1 as far as two seen tasks are apart) and which training task the samples' nearest training
    models come from (counts over all seeds' samples)."""
    lines = ["| method | held-out task | condition to nearest seen task | nearest seen task (seeds) | "
             "samples' nearest training model from |", "| --- | --- | ---: | --- | --- |"]
    for method in dict.fromkeys(r["method"] for r in result["rows"]):
        for data in HELD_OUT:
            mine = [r for r in result["rows"] if r["method"] == method and r["data"] == data and r["condition"]]
            if not mine:
                continue
            d = [r["condition"]["to_nearest_seen"] for r in mine]
            spread = statistics.stdev(d) if len(d) > 1 else 0.0
            seen_near = [r["condition"]["nearest_seen"] for r in mine]
            counts: dict[str, int] = {}
            for r in mine:
                for t, c in r["nearest training task"].items():
                    counts[t] = counts.get(t, 0) + c
            near = ", ".join(f"`{t}` {seen_near.count(t)}" for t in sorted(set(seen_near)))
            models = ", ".join(f"`{t}` {c}" for t, c in sorted(counts.items(), key=lambda x: -x[1]))
            lines.append(f"| {method} | `{data}` | {statistics.fmean(d):.2f} ± {spread:.2f} | {near} | {models} |")
    return lines


def plot(result: dict[str, Any], path: Path) -> None:
    from weightspace.extras import pyplot

    plt = pyplot()
    summary = summarize(result)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, group in zip(axes, ("seen (4 tasks)", "held out (2 flips)")):
        cells = [c for c in summary if c["group"] == group]
        x = range(len(cells))
        for off, col, label in ((-0.2, "gen 0 ep", "zero-shot"), (0.2, "gen 1 ep", "after 1 epoch")):
            ax.bar([i + off for i in x], [c[col][0] for c in cells], 0.4, yerr=[c[col][1] for c in cells],
                   label=label, capsize=3)
        for col, style, label in (("random 1 ep", "--", "random init, 1 epoch"),
                                  ("train models 0 ep", ":", "training models, zero-shot"),
                                  ("train models 1 ep", "-.", "training models, 1 epoch")):
            ax.axhline(cells[0][col][0], color="k", linestyle=style, linewidth=1, label=label)
        ax.axhline(result["chance"], color="grey", linewidth=0.8, label="chance")
        ax.set_xticks(list(x), [c["method"].replace(", ", "\n") for c in cells], fontsize=8)
        ax.set_title(group)
    axes[0].set_ylabel(f"test accuracy (mean ± sd, {len(result['seeds'])} seeds)")
    axes[1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    import argparse
    import json
    import time

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/generate-digits-work"))
    ap.add_argument("-n", type=int, default=10, help="samples per task")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--from-json", type=Path, default=None, metavar="JSON",
                    help="print the tables (and --plot) of a results JSON this script wrote; no training")
    args = ap.parse_args()
    if args.from_json:
        res = json.loads(args.from_json.read_text())
        print(format_tables(res))
        if args.plot:
            plot(res, args.plot)
        return
    if args.plot:
        from weightspace.extras import pyplot

        pyplot()                          # a missing matplotlib is reported before the work
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    res = generate_digits(args.work, n=args.n, seeds=tuple(args.seeds))
    res["seconds"] = time.perf_counter() - t0
    res["summary"] = summarize(res)
    print(format_tables(res))
    print(f"\n{res['seconds']:.0f} s in all (zoo build, {len(CONFIGS)} generators x {len(args.seeds)} seeds, "
          f"sampling, evaluation)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    if args.plot:
        plot(res, args.plot)


if __name__ == "__main__":
    main()

"""Robust weight signatures in miniature: a digits CNN and the zoo's corruptions, several seeds.

    python examples/rws_digits.py                                   # seeds 0-4, tables; work in runs/rws-digits-work/
    python examples/rws_digits.py --plot docs/rws-alpha.png --json benchmarks/results/rws_digits.json
    python examples/rws_digits.py --prepare runs/rws --seeds 0      # only seed 0's checkpoints

Per seed, zoo CNNs (width 32, depth 4: conv layers.0-3, then a linear head) on the digits
train split cut into three disjoint parts:

    pre              trained from scratch on part 1/3, clean                       theta_pre
    std              pre fine-tuned on part 2/3, clean                             theta_std
    robust-<c>       pre fine-tuned on part 2/3 corrupted by c                     theta_c
    other-data       pre fine-tuned on part 3/3, clean: a clean model the signatures never saw
    std-further      std fine-tuned further on part 3/3, clean: the clean model, updated

for the corruptions c = contrast@3, blur@5, pixelate@5 and contrast@5 (NAME@SEVERITY of
the zoo's table, `weightspace.zoo.data.SEVERITY`; 5 is the authors' default severity).
Fine-tunes follow the authors' train_corruption.py where it fits 8x8 digits: SGD, lr 0.01,
momentum 0.9, weight decay 5e-4, the learning rate x0.1 at 50% and 75% of training
(theirs: at epochs 20 and 40 of 50), 10 epochs, batch 32 (theirs 128, on 45,000 images).
Signatures keep layers first:2 (the first half of the conv layers, as the authors'
keep_num 7 keeps about half of VGG-16's 13) unless a table says otherwise. TA is clean
test accuracy; RA is test accuracy under the corruption a signature is for.

Measured, each as mean and sample standard deviation over the seeds:
  patch      std + RWS_c at alpha 1: RA and TA against std and against the robust model
  transfer   RWS_c added to other-data and std-further
  alpha      RA_c and TA against alpha (one signature)
  compose    the three signatures for contrast@3, blur@5 and pixelate@5 together, with the
             authors' scaling (alpha / n)^2 per signature, swept over alpha
  layers     where the signatures live: the share of ||RWS||^2 per layer, and RA with
             first:1, first:2, auto (share 0.5) and all layers kept
  size       signature file against checkpoint file, float32 and 8..2 bits (uniform and
             the authors' minmax), with RA
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Any

import torch

from weightspace.ir import WeightSpace

ARCH = {"arch": "cnn", "width": 32, "depth": 4}
CORRUPTIONS = ("contrast@3", "blur@5", "pixelate@5", "contrast@5")
COMPOSED = ("contrast@3", "blur@5", "pixelate@5")
LAYERS = "first:2"
LAYER_CHOICES = ("first:1", "first:2", "auto", "all")
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
AUTHORS_ALPHAS = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5)  # (alpha / 3)^2 = 0.11 .. 1.36 per signature
BITS = (None, 8, 4, 3, 2)
SCHEMES = ("uniform", "minmax")
SEEDS = (0, 1, 2, 3, 4)
PARTS = ("digits:part=1/3", "digits:part=2/3", "digits:part=3/3")
FINETUNE = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "step",
            "epochs": 10, "batch_size": 32}
PRETRAIN = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine",
            "epochs": 40, "batch_size": 32}


def folder(c: str) -> str:
    """robust-contrast3 for contrast@3."""
    return "robust-" + c.replace("@", "")


def _train(work: Path, name: str, dataset: str, seed: int, init: Path | None, recipe: dict[str, Any]) -> Path:
    from weightspace.zoo.build import checkpoint_config
    from weightspace.zoo.data import load_task
    from weightspace.zoo.train import ModelRun, TrainConfig, train

    task = load_task(dataset)
    run = ModelRun(dataset=dataset, arch=ARCH, seed=seed, init=str(init) if init else None,
                   train=TrainConfig(**recipe))
    ck = train(run, task=task).checkpoints[-1]
    out = work / name
    WeightSpace.from_tensors(ck.tensors).save(
        out, config=checkpoint_config(run, ck.epoch, task.input_shape, task.num_classes), overwrite=True)
    return out


def prepare_models(workdir: str | Path, seed: int = 0) -> dict[str, Path]:
    """The miniature's checkpoints in `workdir`: pre, std, robust-<c> for every corruption,
    other-data and std-further (see the module docstring)."""
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    first, second, third = PARTS
    models = {"pre": _train(work, "pre", first, seed, None, PRETRAIN)}
    models["std"] = _train(work, "std", second, seed, models["pre"], FINETUNE)
    for c in CORRUPTIONS:
        models[folder(c)] = _train(work, folder(c), f"{second}:corrupt={c}", seed, models["pre"], FINETUNE)
    models["other-data"] = _train(work, "other-data", third, seed, models["pre"], FINETUNE)
    models["std-further"] = _train(work, "std-further", third, seed + 100, models["std"], FINETUNE)
    return models


def _cos(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Cosine of two signatures over the tensors both keep, flattened together."""
    names = [n for n in a if n in b]
    x = torch.cat([a[n].reshape(-1).double() for n in names])
    y = torch.cat([b[n].reshape(-1).double() for n in names])
    return float(x @ y / (x.norm() * y.norm()))


def _layer_label(name: str) -> str:
    m = re.match(r"layers\.(\d+)\.", name)
    return f"layer {m.group(1)}" if m else "head"


def rws_digits(workdir: str | Path, seed: int = 0, *, alphas: tuple[float, ...] = ALPHAS,
               authors_alphas: tuple[float, ...] = AUTHORS_ALPHAS, bits: tuple[int | None, ...] = BITS,
               layer_choices: tuple[str, ...] = LAYER_CHOICES) -> dict[str, Any]:
    """One seed of the miniature: every measurement of the module docstring, as plain numbers."""
    from weightspace.merges.signatures import (
        checkpoint_file_bytes,
        extract_signature,
        layer_summary,
        patch,
        save_signature,
        signature_size_report,
    )
    from weightspace.sources import load_space
    from weightspace.zoo.bind import open_batches, open_model

    work = Path(workdir)
    paths = prepare_models(work, seed)
    sp = {k: load_space(v) for k, v in paths.items()}
    adapter = open_model(paths["pre"])
    data = {"TA": open_batches("digits", adapter, split="test", batch_size=512)}
    for c in CORRUPTIONS:
        data[c] = open_batches(f"digits:corrupt={c}", adapter, split="test", batch_size=512)

    def acc(space: WeightSpace) -> dict[str, float]:
        params = {n: space[n].load() for n in adapter.params()}
        out = {}
        with torch.no_grad():
            for key, batches in data.items():
                hit = tot = 0
                for b in batches:
                    hit += int((adapter.logits(params, b)[:, 0].argmax(-1) == b["y"]).sum())
                    tot += len(b["y"])
                out[key] = hit / tot
        return out

    def sig(c: str, layers: str = LAYERS, **kw: Any):
        return extract_signature(sp["pre"], sp["std"], sp[folder(c)], layers=layers, **kw)

    base = {k: acc(sp[k]) for k in ("pre", "std", "other-data", "std-further")}
    robust = {c: acc(sp[folder(c)]) for c in CORRUPTIONS}
    sigs = {c: sig(c) for c in CORRUPTIONS}

    patch_rows, transfer_rows = [], []
    for c in CORRUPTIONS:
        p = acc(patch(sp["std"], [(sigs[c], 1.0)]))
        patch_rows.append({"corruption": c, "std RA": base["std"][c], "std + RWS RA": p[c],
                           "robust model RA": robust[c][c], "std TA": base["std"]["TA"],
                           "std + RWS TA": p["TA"], "robust model TA": robust[c]["TA"]})
        o = acc(patch(sp["other-data"], [(sigs[c], 1.0)]))
        f = acc(patch(sp["std-further"], [(sigs[c], 1.0)]))
        transfer_rows.append({"corruption": c, "other-data RA": base["other-data"][c], "other-data + RWS RA": o[c],
                              "std-further RA": base["std-further"][c], "std-further + RWS RA": f[c],
                              "other-data + RWS TA": o["TA"], "std-further + RWS TA": f["TA"]})

    alpha_rows = []
    for a in alphas:
        row: dict[str, Any] = {"alpha": a}
        for c in CORRUPTIONS:
            s = acc(patch(sp["std"], [(sigs[c], a)]))
            row[f"RA {c}"], row[f"TA ({c})"] = s[c], s["TA"]
        alpha_rows.append(row)

    def composed_row(label: str, space: WeightSpace, coefficient: float) -> dict[str, Any]:
        s = acc(space)
        return {"patch": label, "coefficient": coefficient, "TA": s["TA"],
                **{f"RA {c}": s[c] for c in COMPOSED},
                "mean RA": statistics.fmean(s[c] for c in COMPOSED)}

    n = len(COMPOSED)
    compose_rows = [composed_row("std", sp["std"], 0.0)]
    for a in authors_alphas:
        pairs = [(sigs[c], a) for c in COMPOSED]
        compose_rows.append(composed_row(f"authors, alpha {a:g}", patch(sp["std"], pairs, scaling="authors"),
                                         (a / n) ** 2))
    compose_rows.append(composed_row("linear, alpha 1 each", patch(sp["std"], [(sigs[c], 1.0) for c in COMPOSED]),
                                     1.0))
    compose_rows.append({"patch": "each signature alone, alpha 1", "coefficient": 1.0, "TA": None,
                         **{f"RA {c}": r["std + RWS RA"] for c, r in zip(CORRUPTIONS, patch_rows) if c in COMPOSED},
                         "mean RA": statistics.fmean(r["std + RWS RA"] for c, r in zip(CORRUPTIONS, patch_rows)
                                                     if c in COMPOSED)})
    cosines = {f"{a} / {b}": _cos(sigs[a].tensors, sigs[b].tensors)
               for i, a in enumerate(COMPOSED) for b in COMPOSED[i + 1:]}

    # where they live: the share of ||RWS||^2 per layer (all layers extracted), and RA by layers kept
    share_rows, kept_auto, layer_rows = [], {}, []
    for c in CORRUPTIONS:
        full = sig(c, "all")
        summary = {u["label"]: u["rws_fraction"] for u in layer_summary(full.meta["report"])}
        share_rows.append({"corruption": c, **summary})
        for choice in layer_choices:
            s_ = sigs[c] if choice == LAYERS else (full if choice == "all" else sig(c, choice))
            if choice == "auto":
                kept_auto[c] = sorted({_layer_label(k) for k in s_.kept})
            f = save_signature(s_, work / f"{folder(c)}-{choice.replace(':', '')}.rws.safetensors")
            s = acc(patch(sp["std"], [(s_, 1.0)]))
            layer_rows.append({"corruption": c, "layers": choice, "RA": s[c], "TA": s["TA"],
                               "file bytes": f.stat().st_size})

    # size: file against file (the robust checkpoint's model.safetensors, header included)
    c = CORRUPTIONS[0]
    ck_bytes = checkpoint_file_bytes(sp[folder(c)])
    size_rows = []
    for b in bits:
        for scheme in (SCHEMES if b else SCHEMES[:1]):
            s_ = sig(c, bits=b, scheme=scheme)
            f = save_signature(s_, work / f"bits-{b or 32}-{scheme}.rws.safetensors")
            rep = signature_size_report(f)
            assert rep["model_bytes"] == ck_bytes and rep["model_bytes_are"] == "file"
            s = acc(patch(sp["std"], [(s_, 1.0)]))
            size_rows.append({"bits": b or 32, "scheme": scheme if b else "float32", "file bytes": rep["bytes"],
                              "header bytes": rep["header_bytes"], "x smaller (file / file)": rep["times_smaller"],
                              f"RA {c}": s[c], "TA": s["TA"]})

    return {"seed": seed, "models": {k: str(v) for k, v in paths.items()}, "accuracy": {**base, **{
        folder(c): robust[c] for c in CORRUPTIONS}}, "patch": patch_rows, "transfer": transfer_rows,
        "alpha": alpha_rows, "compose": compose_rows, "signature cosines": cosines,
        "layer share": share_rows, "kept by auto": kept_auto, "layers": layer_rows, "size": size_rows,
        "checkpoint file bytes": ck_bytes, "kept": {c: sigs[c].kept for c in CORRUPTIONS}}


# ---------------------------------------------------------------------------------------------
# tables: mean and sample standard deviation over seeds


def _spread(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def aggregate(rows_per_seed: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows of equal position across seeds: numbers become {"mean", "sd"}, the rest is kept
    from the first seed (labels)."""
    out = []
    for i, first in enumerate(rows_per_seed[0]):
        row: dict[str, Any] = {}
        for k, v in first.items():
            vals = [r[i][k] for r in rows_per_seed]
            if isinstance(v, (int, float)) and not isinstance(v, bool) and all(x is not None for x in vals):
                row[k] = {"mean": statistics.fmean(vals), "sd": _spread(vals)}
            else:
                row[k] = v
        out.append(row)
    return out


def _cell(v: Any, key: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict) and "mean" in v:
        m, sd = v["mean"], v["sd"]
        if "bytes" in key:
            return f"{m:,.0f}" if sd < 0.5 else f"{m:,.0f} ± {sd:,.0f}"
        if "x smaller" in key:
            return f"{m:.1f} ± {sd:.1f}"
        if key in ("alpha", "bits"):
            return f"{m:g}"
        if key == "coefficient":
            return f"{m:.3g}"
        return f"{m:.3f} ± {sd:.3f}"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def table(rows: list[dict[str, Any]], cols: list[str] | None = None) -> str:
    """A Markdown table of aggregated rows (first column left-aligned, the rest right)."""
    cols = cols or list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "| --- | " + " | ".join("---:" for _ in cols[1:]) + " |"]
    for r in rows:
        out.append("| " + " | ".join(_cell(r.get(c), c) for c in cols) + " |")
    return "\n".join(out)


def tables(results: list[dict[str, Any]]) -> dict[str, str]:
    """Every table of the README section, from the per-seed results (the JSON file)."""
    agg = {k: aggregate([r[k] for r in results]) for k in ("patch", "transfer", "alpha", "compose", "layer share",
                                                           "layers", "size")}
    alpha_cols = ["alpha"] + [f"RA {c}" for c in CORRUPTIONS] + [f"TA ({c})" for c in COMPOSED[:2]]
    cos = [{"pair": k, "cosine": {"mean": statistics.fmean(r["signature cosines"][k] for r in results),
                                  "sd": _spread([r["signature cosines"][k] for r in results])}}
           for k in results[0]["signature cosines"]]
    kept = [{"corruption": c, **{f"seed {r['seed']}": ", ".join(r["kept by auto"][c]) for r in results}}
            for c in CORRUPTIONS]
    return {
        "patch": table(agg["patch"]),
        "transfer": table(agg["transfer"]),
        "alpha": table(agg["alpha"], alpha_cols),
        "compose": table(agg["compose"]),
        "cosines": table(cos),
        "layer share": table(agg["layer share"]),
        "kept by auto": table(kept),
        "layers": table(agg["layers"]),
        "size": table(agg["size"]),
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """RA and TA against alpha (one signature), and the composed sweep against the coefficient."""
    from weightspace.extras import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    alpha = aggregate([r["alpha"] for r in results])
    xs = [r["alpha"]["mean"] for r in alpha]
    for i, c in enumerate(CORRUPTIONS):
        ys = [r[f"RA {c}"]["mean"] for r in alpha]
        sd = [r[f"RA {c}"]["sd"] for r in alpha]
        axes[0].errorbar(xs, ys, yerr=sd, fmt="o-", color=f"C{i}", capsize=2, label=f"RA {c}")
        ta = [r[f"TA ({c})"]["mean"] for r in alpha]
        axes[0].plot(xs, ta, "--", color=f"C{i}", alpha=0.5)
    axes[0].set_xlabel("alpha (one signature, std + alpha RWS)")
    axes[0].set_ylabel("test accuracy (dashed: TA)")
    axes[0].legend(fontsize=7)
    comp = [r for r in aggregate([r["compose"] for r in results]) if str(r["patch"]).startswith("authors")]
    ks = [r["coefficient"]["mean"] for r in comp]
    for i, c in enumerate(COMPOSED):
        axes[1].errorbar(ks, [r[f"RA {c}"]["mean"] for r in comp], yerr=[r[f"RA {c}"]["sd"] for r in comp],
                         fmt="o-", color=f"C{i}", capsize=2, label=f"RA {c}")
    axes[1].plot(ks, [r["TA"]["mean"] for r in comp], "k--", label="TA")
    n = len(COMPOSED)
    axes[1].set_xlabel(f"coefficient per signature, (alpha / {n})^2 (authors' scaling)")
    top = axes[1].secondary_xaxis("top", functions=(lambda k: n * k.clip(0) ** 0.5, lambda a: (a / n) ** 2))
    top.set_xlabel("alpha", fontsize=8)
    axes[1].set_title("three signatures together", fontsize=9)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"robust weight signatures on digits, mean ± sd over {len(results)} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    import argparse
    import json
    import time

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--work", type=Path, default=Path("runs/rws-digits-work"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--prepare", type=Path, default=None,
                    help="only train the checkpoints of the first seed into this folder, then stop")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.prepare is not None:
        for name, path in prepare_models(args.prepare, args.seeds[0]).items():
            print(f"{name:18} {path}")
        return
    t0 = time.perf_counter()
    results = []
    for s in args.seeds:
        results.append(rws_digits(args.work / f"seed{s}", s))
        print(f"seed {s} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    for name, text in tables(results).items():
        print(f"\n{name} (mean ± sd over seeds {', '.join(map(str, args.seeds))})\n{text}")
    print(f"\n{time.perf_counter() - t0:.0f} s for {len(args.seeds)} seeds")
    if args.plot:
        plot(results, args.plot)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        clean = [{k: v for k, v in r.items() if k != "models"} for r in results]
        args.json.write_text(json.dumps(clean, indent=1, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()

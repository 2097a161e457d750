"""Robust weight signatures in miniature, on digits and the zoo's corruptions.

    python examples/rws_digits.py                       # seeds 0-2; tables; work files in runs/rws-digits-work/
    python examples/rws_digits.py --seeds 0 --plot docs/rws-alpha.png
    python examples/rws_digits.py --prepare runs/rws --seeds 0   # only the models: pre, std, robust-*

A pretrained MLP (theta_pre, clean part 1/2 of the digits train split), a
clean fine-tune (theta_std) and one robust fine-tune per corruption
(theta_c, the same part corrupted at severity 5) give the signatures
RWS_c = d_c - (<d_c, d_s>/<d_s, d_s>) d_s on the auto-selected shallow layers.
Measured: clean accuracy (TA) and robust accuracy (RA, the corrupted test
split) of the clean, robust and patched models; RA against alpha; two
signatures composed; transfer to a clean model fine-tuned on the other half of
the data and to the clean model fine-tuned further; bits against size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from weightspace.ir import WeightSpace

ARCH = {"arch": "mlp", "width": 64, "depth": 3}
CORRUPTIONS = ("contrast@3", "blur@5")
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
BITS = (None, 8, 4, 3, 2)


def _train(work: Path, name: str, dataset: str, seed: int, epochs: int, init: Path | None, lr: float) -> Path:
    from weightspace.zoo.build import checkpoint_config
    from weightspace.zoo.data import load_task
    from weightspace.zoo.train import ModelRun, TrainConfig, train

    task = load_task(dataset)
    run = ModelRun(dataset=dataset, arch=ARCH, seed=seed, init=str(init) if init else None,
                   train=TrainConfig(epochs=epochs, lr=lr, batch_size=32))
    ck = train(run, task=task).checkpoints[-1]
    out = work / name
    WeightSpace.from_tensors(ck.tensors).save(
        out, config=checkpoint_config(run, ck.epoch, task.input_shape, task.num_classes), overwrite=True)
    return out


def prepare_models(workdir: str | Path, seed: int = 0) -> dict[str, Path]:
    """The miniature's checkpoints in `workdir`: pre (theta_pre), std (the clean fine-tune),
    robust-contrast and robust-blur (the robust fine-tunes), std-other-half, std-further."""
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    models = {"pre": _train(work, "pre", "digits:part=1/2", seed, 8, None, 0.05)}
    models["std"] = _train(work, "std", "digits:part=1/2", seed, 5, models["pre"], 0.02)
    for c in CORRUPTIONS:
        name = f"robust-{c.split('@')[0]}"
        models[name] = _train(work, name, f"digits:part=1/2:corrupt={c}", seed, 5, models["pre"], 0.02)
    models["std-other-half"] = _train(work, "std-other-half", "digits:part=2/2", seed, 5, models["pre"], 0.02)
    models["std-further"] = _train(work, "std-further", "digits:part=1/2", seed + 100, 5, models["std"], 0.01)
    return models


def rws_digits(workdir: str | Path, seed: int = 0, *, alphas: tuple[float, ...] = ALPHAS,
               bits: tuple[int | None, ...] = BITS, layers: str = "auto", share: float = 0.5) -> dict[str, Any]:
    from weightspace.merges.signatures import extract_signature, patch, save_signature
    from weightspace.sources import load_space
    from weightspace.zoo.bind import open_batches, open_model

    work = Path(workdir)
    models = prepare_models(work, seed)
    pre, std, std_b, std_more = models["pre"], models["std"], models["std-other-half"], models["std-further"]
    robust = {c: models[f"robust-{c.split('@')[0]}"] for c in CORRUPTIONS}

    adapter = open_model(pre)
    data = {"TA": open_batches("digits", adapter, split="test", batch_size=512)}
    for c in CORRUPTIONS:
        data[f"RA {c}"] = open_batches(f"digits:corrupt={c}", adapter, split="test", batch_size=512)

    def scores(space: WeightSpace) -> dict[str, float]:
        params = {n: space[n].load() for n in adapter.params()}
        out = {}
        with torch.no_grad():
            for key, batches in data.items():
                hit = tot = 0
                for b in batches:
                    pred = adapter.logits(params, b)[:, 0].argmax(-1)
                    hit += int((pred == b["y"]).sum())
                    tot += len(b["y"])
                out[key] = hit / tot
        return out

    spaces = {"pre": load_space(pre), "std": load_space(std), "std_b": load_space(std_b),
              "std_more": load_space(std_more)}
    sigs, sig_files = {}, {}
    for c, path in robust.items():
        sigs[c] = extract_signature(spaces["pre"], spaces["std"], load_space(path), layers=layers, share=share)
        sig_files[c] = save_signature(sigs[c], work / f"{c.split('@')[0]}.rws.safetensors")

    rows: list[dict[str, Any]] = [{"model": "pretrained", **scores(spaces["pre"])},
                                  {"model": "clean fine-tune (std)", **scores(spaces["std"])}]
    for c, path in robust.items():
        rows.append({"model": f"robust fine-tune ({c})", **scores(load_space(path))})
    for c in CORRUPTIONS:
        rows.append({"model": f"std + RWS {c} (alpha 1)", **scores(patch(spaces["std"], [(sigs[c], 1.0)]))})
    both = [(sigs[c], 1.0) for c in CORRUPTIONS]
    rows.append({"model": "std + both RWS (alpha 1 each)", **scores(patch(spaces["std"], both))})
    for c in CORRUPTIONS:
        rows.append({"model": f"other-half clean model + RWS {c}", **scores(patch(spaces["std_b"], [(sigs[c], 1.0)]))})
    rows.insert(len(rows) - len(CORRUPTIONS), {"model": "other-half clean model", **scores(spaces["std_b"])})
    rows.append({"model": "clean model fine-tuned further", **scores(spaces["std_more"])})
    for c in CORRUPTIONS:
        rows.append({"model": f"further-tuned + RWS {c}", **scores(patch(spaces["std_more"], [(sigs[c], 1.0)]))})

    curve = {c: [{"alpha": a, **scores(patch(spaces["std"], [(sigs[c], a)]))} for a in alphas] for c in CORRUPTIONS}
    model_bytes = sum((Path(std) / "model.safetensors").stat().st_size for _ in [0])
    size_rows = []
    for b in bits:
        for c in CORRUPTIONS[:1]:
            sig = extract_signature(spaces["pre"], spaces["std"], load_space(robust[c]), layers=layers,
                                    share=share, bits=b)
            f = save_signature(sig, work / f"bits-{b}.rws.safetensors")
            size_rows.append({"bits": b or 32, "file bytes": f.stat().st_size,
                              "tensor bytes": sig.nbytes_stored,
                              "x smaller (tensors)": model_bytes / sig.nbytes_stored,
                              **scores(patch(spaces["std"], [(sig, 1.0)]))})
    kept = sigs[CORRUPTIONS[0]].meta.get("kept", [])
    return {"seed": seed, "rows": rows, "alpha": curve, "bits": size_rows, "kept": kept,
            "model_bytes": model_bytes}


def format_rows(rows: list[dict[str, Any]], first: str) -> str:
    cols = [c for c in rows[0] if c != first]
    out = [f"| {first} | " + " | ".join(cols) + " |", "| --- | " + " | ".join("---:" for _ in cols) + " |"]
    for r in rows:
        out.append(f"| {r[first]} | " + " | ".join(
            (f"{r[c]:.0f}" if "bytes" in c else f"{r[c]:.3f}") if isinstance(r[c], float) else str(r[c])
            for c in cols) + " |")
    return "\n".join(out)


def _mean_rows(results: list[list[dict[str, Any]]], key: str) -> list[dict[str, Any]]:
    out = []
    for i, row in enumerate(results[0]):
        m = {key: row[key]}
        for c in row:
            if c != key and isinstance(row[c], (int, float)):
                m[c] = sum(r[i][c] for r in results) / len(results)
        out.append(m)
    return out


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for i, c in enumerate(CORRUPTIONS):
        alphas = [p["alpha"] for p in results[0]["alpha"][c]]
        ra = [sum(r["alpha"][c][j][f"RA {c}"] for r in results) / len(results) for j in range(len(alphas))]
        ta = [sum(r["alpha"][c][j]["TA"] for r in results) / len(results) for j in range(len(alphas))]
        axes[0].plot(alphas, ra, "o-", color=f"C{i}", label=f"RA {c}")
        axes[0].plot(alphas, ta, "s--", color=f"C{i}", alpha=0.6, label=f"TA (patched with {c.split('@')[0]})")
    axes[0].set_xlabel("alpha")
    axes[0].set_ylabel("test accuracy")
    axes[0].set_title("clean model + alpha * RWS", fontsize=10)
    axes[0].legend(fontsize=7)
    c = CORRUPTIONS[0]
    rows = _mean_rows([r["bits"] for r in results], "bits")
    axes[1].plot([r["x smaller (tensors)"] for r in rows], [r[f"RA {c}"] for r in rows], "o-")
    for r in rows:
        axes[1].annotate(f"{int(r['bits'])} bits", (r["x smaller (tensors)"], r[f"RA {c}"]), fontsize=7,
                         textcoords="offset points", xytext=(4, -10))
    axes[1].set_xlabel("checkpoint bytes / signature tensor bytes")
    axes[1].set_ylabel(f"RA {c} (alpha 1)")
    axes[1].set_title("compression", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", type=Path, default=Path("runs/rws-digits-work"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--prepare", type=Path, default=None,
                    help="only train the checkpoints of the first seed into this folder, then stop")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.prepare is not None:
        for name, path in prepare_models(args.prepare, args.seeds[0]).items():
            print(f"{name:16} {path}")
        return
    results = []
    for s in args.seeds:
        r = rws_digits(args.work / f"seed{s}", s)
        results.append(r)
        print(f"seed {s} (kept: {', '.join(r['kept'])})\n{format_rows(r['rows'], 'model')}\n", flush=True)
    print(f"mean over seeds {args.seeds}\n{format_rows(_mean_rows([r['rows'] for r in results], 'model'), 'model')}\n")
    for c in CORRUPTIONS:
        print(f"alpha sweep, {c}\n{format_rows(_mean_rows([r['alpha'][c] for r in results], 'alpha'), 'alpha')}\n")
    print(f"bits\n{format_rows(_mean_rows([r['bits'] for r in results], 'bits'), 'bits')}")
    if args.plot:
        plot(results, args.plot)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

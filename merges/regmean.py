"""RegMean: merge linear layers by solving the regression their inputs define.

    grams = gram_matrices(ClassifierAdapter(model), batches)    # one forward pass over some data
    save_gram(grams, "ft_a.gram.safetensors")

    merge_method: regmean
    models:
      - {model: ./ft_a, parameters: {gram: ./ft_a.gram.safetensors}}
      - {model: ./ft_b, parameters: {gram: ./ft_b.gram.safetensors}}
    parameters: {alpha: 0.1}

For a linear layer y = x W^T + b with weights W_i (out, in) in model i and the
inputs X_i that layer saw on model i's data, RegMean picks the W that best
reproduces every model's outputs on its own inputs,

    W* = argmin_W  sum_i w_i ||X_i W^T - X_i W_i^T||^2 / N_i
       = (sum_i w_i G~_i)^-1  sum_i w_i G~_i W_i^T           (transposed back to (out, in))

with G_i = X_i^T X_i / N_i the layer's input Gram matrix (a mean over tokens,
padding excluded) and G~_i = alpha G_i + (1 - alpha) diag(G_i) the Gram with
its off-diagonal entries shrunk. alpha = 1 is the exact regression; alpha = 0
is a per-input-feature weighted average (feature j of model i weighted by
w_i G_i[j, j]). Every other tensor (biases, norms, embeddings) is the
`weight`-weighted average.

Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language
Models" (ICLR 2023, arXiv:2212.09849).

Authors' code: github.com/bloomberg/dataless-model-merging. `alpha` is their
`regmean_reduce_nondiag` (src/model_merge/avg_merger.py, `reduce_non_diag`: off-diagonal
entries times alpha, the diagonal kept), 0.1 in their emotion and NER configs (0.9 in
DeBERTa NER; unset, i.e. 1, in the GLUE ones); the Grams are their `compute_grams`
(src/model_merge/local_trainer.py), a running X^T X / N over every token the layer sees,
padding included, which `padding="include"` reproduces (the default leaves padding out).

Limitations: only `torch.nn.Linear` layers get a Gram. A layer shared by several module
paths (tied weights), transformers' GPT-2 `Conv1D` (weight stored (in, out): a Gram is
matched to a weight by its shape (in, in) = (shape[1], shape[1]) alone, which for a square
Conv1D would silently merge the transposed problem) and convolutions (`nn.Conv1d/2d/3d`,
which the authors' code covers) get none, and their weights are the weighted average.
`gram_matrices` warns naming them, lists them in the Gram file's metadata, `wsmerge gram`
prints them, and a RegMean merge names them in its notes.
"""

from __future__ import annotations

import fnmatch
import json
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightspace.binding import Adapter, tensors_for
from weightspace.errors import InputError, SpecError
from weightspace.files import save_safetensors_atomic
from weightspace.ir import WeightSpace
from weightspace.methods import MergeMethod, Param, TensorParams, register
from weightspace.safetensors_io import read_header

GRAM_KIND = "gram"
# eigenvalues of the summed Gram below n_inputs * this times the largest count as 0 (rank-deficient)
RCOND_PER_INPUT = 1e-13
# relative asymmetry |G - G^T|_max / |G|_max a Gram companion may have (float32 rounding)
SYMMETRY_TOL = 1e-4


# ---------------------------------------------------------------- Gram statistics


def _is_conv1d(m: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D (weight (in, out)); matched by name so transformers stays optional
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers")


# why a layer of a linear kind got no Gram, as recorded in `meta["skipped"]`
FALLBACK_REASONS = {
    "conv1d": "GPT-2 Conv1D, weight stored (in, out): not supported yet",
    "convolution": "a convolution: not supported yet",
    "tied": "its weight is tied to another module's",
    "unused": "the forward never reached it",
}


def describe_skipped(skipped: Mapping[str, str]) -> list[str]:
    """One line per reason: which layers got no Gram and so are averaged by a RegMean merge.

    >>> describe_skipped({"h.0.attn.c_attn": "conv1d", "h.0.mlp.c_fc": "conv1d"})
    ['2 layers (GPT-2 Conv1D, weight stored (in, out): not supported yet): h.0.attn.c_attn, h.0.mlp.c_fc']
    """
    by_reason: dict[str, list[str]] = {}
    for layer, why in skipped.items():
        by_reason.setdefault(why, []).append(layer)
    lines = []
    for why, layers in by_reason.items():
        shown = ", ".join(layers[:8]) + (f", ... ({len(layers) - 8} more)" if len(layers) > 8 else "")
        n = f"{len(layers)} layer{'s' if len(layers) > 1 else ''}"
        lines.append(f"{n} ({FALLBACK_REASONS.get(why, why)}): {shown}")
    return lines


def _head(batch: Mapping[str, Any], k: int) -> dict[str, Any]:
    return {key: v[:k] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for key, v in batch.items()}


def _batch_size(batch: Mapping[str, Any]) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise InputError("gram_matrices: a batch holds no tensor with a batch dimension")


def _rows(x: torch.Tensor, mask: torch.Tensor | None, layer: str) -> torch.Tensor:
    """The layer's input as (tokens, in): padding positions dropped when a token mask is given."""
    if mask is not None:
        if x.dim() >= 3:
            if tuple(x.shape[:2]) != tuple(mask.shape):
                raise InputError(
                    f"gram_matrices: layer {layer!r} got input {list(x.shape)}, which does not line up "
                    f"with the (batch, tokens) mask {list(mask.shape)}; its padding cannot be excluded. "
                    f"Leave the layer out with `modules=` or pass batches without padding")
            x = x[mask.bool()]
        elif x.dim() == 2 and x.shape[0] == mask.numel() and mask.dim() == 2 and mask.shape[1] > 1:
            x = x[mask.reshape(-1).bool()]  # tokens flattened to (batch * tokens, in) before the layer
        # a 2-D (batch, in) input (pooler, classifier head) has one row per example: nothing to drop
    return x.reshape(-1, x.shape[-1])


def gram_matrices(
    adapter: Adapter,
    batches: Iterable[Mapping[str, Any]],
    *,
    params: Mapping[str, torch.Tensor] | WeightSpace | None = None,
    n_examples: int | None = None,
    modules: str | Iterable[str] | None = None,
    padding: str = "exclude",
    progress: bool = False,
) -> WeightSpace:
    """Input Gram matrices G = X^T X / N of every `nn.Linear` in `adapter.module`, as a WeightSpace.

        grams = gram_matrices(ClassifierAdapter(model), [{"x": x, "y": y}], n_examples=1000)
        grams["layers.0.weight"].load()         # (in_features, in_features), float32

    Each Gram is named after its layer's weight (`<module path>.weight`) and averages x x^T over
    every token the layer saw, running `adapter.forward(params, batch)` under `torch.no_grad()`
    with the module in eval mode (no dropout, BatchNorm's running statistics read, never
    updated; its mode is restored after) for each batch. Inputs (B, T, in) drop the positions
    where `adapter.token_mask(batch)` is 0 (`padding="include"` keeps them, as the authors'
    `compute_grams` does). `params` (default: `adapter.params()`) are swapped in with
    `functional_call`; `n_examples` stops after that many examples (the last batch is cut);
    `modules` keeps only the layers whose module path matches one of these fnmatch patterns.
    `meta` records the examples, batches, the token count of each Gram (`tokens`) and the layers
    of a linear kind that got none (`skipped`: layer -> conv1d, convolution, tied or unused;
    see FALLBACK_REASONS), which a RegMean merge averages; a warning names them.
    """
    module = adapter.module
    if n_examples is not None and n_examples < 1:
        raise SpecError(f"gram_matrices: n_examples must be at least 1, got {n_examples}")
    if padding not in ("exclude", "include"):
        raise SpecError(f"gram_matrices: padding must be 'exclude' or 'include', got {padding!r}")
    if params is None:
        tensors = dict(adapter.params())
    elif isinstance(params, WeightSpace):
        first = next(iter(module.parameters()), None)
        tensors = tensors_for(module, params, device=first.device if first is not None else "cpu")
    else:
        tensors = dict(params)
    device = next((t.device for t in tensors.values()), torch.device("cpu"))

    weight_names = {n for n, _ in module.named_parameters()}
    patterns = [modules] if isinstance(modules, str) else (list(modules) if modules is not None else None)
    layers: dict[str, tuple[nn.Module, int]] = {}  # weight name -> (layer, in_features)
    skipped: dict[str, str] = {}
    matched: set[str] = set()
    for path, m in module.named_modules():
        linear = isinstance(m, nn.Linear)
        conv = isinstance(m, nn.modules.conv._ConvNd)
        if not (linear or conv or _is_conv1d(m)):
            continue
        if patterns is not None:
            hits = [p for p in patterns if fnmatch.fnmatchcase(path, p)]
            if not hits:
                continue
            matched.update(hits)
        wname = f"{path}.weight" if path else "weight"
        if conv:
            skipped[path] = "convolution"
        elif not linear:
            skipped[path] = "conv1d"
        elif wname not in weight_names:
            skipped[path] = "tied"  # its weight is registered under another module's name
        else:
            layers[wname] = (m, int(m.in_features))
    if patterns is not None:
        unmatched = [p for p in patterns if p not in matched]
        if unmatched:
            known = [p for p, m in module.named_modules() if isinstance(m, nn.Linear)][:5]
            raise SpecError(f"gram_matrices: modules pattern {unmatched[0]!r} matches no linear layer "
                            f"of {type(module).__name__} (its linear layers: {', '.join(known) or 'none'})")
    if not layers:
        raise InputError(f"gram_matrices: {type(module).__name__} has no torch.nn.Linear layer to take "
                         f"a Gram matrix of" + (f" (skipped: {skipped})" if skipped else ""))

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def hook_for(wname: str, in_features: int):
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            if x.shape[-1] != in_features:
                raise InputError(f"gram_matrices: layer {wname[:-7]!r} got input {list(x.shape)}, "
                                 f"expected last dim {in_features}")
            rows = _rows(x.detach(), current["mask"], wname[:-7]).float()
            if rows.shape[0] == 0:
                return
            xtx = (rows.T @ rows).double()  # products in float32, the running sum in float64
            if wname in sums:
                sums[wname] += xtx
            else:
                sums[wname] = xtx
            counts[wname] = counts.get(wname, 0) + int(rows.shape[0])

        return hook

    handles = [m.register_forward_pre_hook(hook_for(w, n_in), with_kwargs=True)
               for w, (m, n_in) in layers.items()]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_examples, unit="ex", desc="gram", leave=False, dynamic_ncols=True)
    seen = n_batches = 0
    was_training = module.training
    module.eval()  # the layers' inputs as the model predicts; BatchNorm statistics untouched
    try:
        with torch.no_grad():
            for batch in batches:
                b = _batch_size(batch)
                if n_examples is not None and seen + b > n_examples:
                    batch, b = _head(batch, n_examples - seen), n_examples - seen
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                mask = adapter.token_mask(batch) if padding == "exclude" else None
                current["mask"] = mask.to(device) if mask is not None else None
                adapter.forward(tensors, batch)
                seen += b
                n_batches += 1
                if bar is not None:
                    bar.update(b)
                if n_examples is not None and seen >= n_examples:
                    break
    finally:
        module.train(was_training)
        for h in handles:
            h.remove()
        if bar is not None:
            bar.close()
    if seen == 0:
        raise InputError("gram_matrices: no batches were given, so there is nothing to take Grams of")

    grams: dict[str, torch.Tensor] = {}
    for wname in layers:
        if wname not in sums:
            skipped[wname[:-7]] = "unused"  # the forward never reached it (or saw only padding)
            continue
        g = sums[wname] / counts[wname]
        grams[wname] = ((g + g.T) / 2).float().cpu()
    if skipped:
        warnings.warn("gram_matrices: no Gram for " + "; ".join(describe_skipped(skipped))
                      + ". A RegMean merge averages their weights.", stacklevel=2)
    meta = {
        "source": f"gram_matrices({type(module).__name__})",
        "format": "memory",
        "kind": GRAM_KIND,
        "examples": seen,
        "batches": n_batches,
        "tokens": {n: counts[n] for n in grams},
        "skipped": skipped,
        "padding": padding,
    }
    return WeightSpace.from_tensors(grams, meta)


def save_gram(space: WeightSpace, path: str | Path) -> Path:
    """Write Grams (from `gram_matrices`) to one `.safetensors` file, atomically.

        save_gram(gram_matrices(adapter, batches), "ft_a.gram.safetensors")

    The safetensors `__metadata__` holds `{"format": "pt", "weightspace_kind": "gram",
    "weightspace_gram": JSON {examples, batches, tokens: {name: count}, skipped, padding}}`.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise SpecError(f"save_gram: {path} should end in .safetensors (that is how it is opened again)")
    info = {k: space.meta.get(k) for k in ("examples", "batches", "tokens", "skipped", "padding")}
    metadata = {"format": "pt", "weightspace_kind": GRAM_KIND, "weightspace_gram": json.dumps(info)}
    tensors = {n: space[n].load("cpu", torch.float32) for n in space}
    return save_safetensors_atomic(tensors, path, metadata)


# ---------------------------------------------------------------- the merge


def shrink_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * G + (1 - alpha) * diag(G): off-diagonal entries scaled by alpha, diagonal kept.

    >>> shrink_off_diagonal(torch.tensor([[4.0, 2.0], [2.0, 1.0]]), 0.5)
    tensor([[4., 1.],
            [1., 1.]])
    """
    out = gram * alpha
    out.diagonal().copy_(gram.diagonal())
    return out


def regmean_solve(
    weights_: list[torch.Tensor], grams: list[torch.Tensor], coeffs: list[float], alpha: float
) -> torch.Tensor:
    """(sum_i c_i G~_i)^-1 sum_i c_i G~_i W_i^T, transposed back to W's (out, in); in float64.

    Solved as a correction to the weighted average W_avg: A D = sum_i c_i G~_i (W_i - W_avg)^T,
    W* = W_avg + D^T. When A is singular (an input direction none of the models' data reaches),
    the least-squares D of least norm keeps W_avg in that direction.

    >>> g = torch.eye(2)
    >>> regmean_solve([torch.ones(1, 2), torch.zeros(1, 2)], [g, g], [1.0, 1.0], 1.0)
    tensor([[0.5000, 0.5000]])
    """
    total = float(sum(coeffs))
    ws = [w.double() for w in weights_]
    avg = sum(c * w for c, w in zip(coeffs, ws)) / total
    a = torch.zeros_like(grams[0], dtype=torch.float64)
    rhs = torch.zeros_like(ws[0].T)
    for c, g, w in zip(coeffs, grams, ws):
        gt = shrink_off_diagonal(g.double(), alpha)
        a += c * gt
        rhs += c * (gt @ (w - avg).T)
    scale = float(a.diagonal().abs().max())
    chol, info = torch.linalg.cholesky_ex(a)
    d = chol.diagonal()
    rcond = a.shape[0] * RCOND_PER_INPUT
    well_posed = scale > 0 and int(info) == 0 and float((d.min() / d.max()) ** 2) > rcond
    if well_posed:
        delta = torch.cholesky_solve(rhs, chol)
    elif scale == 0:
        delta = torch.zeros_like(rhs)  # no data reached this layer in any model
    else:
        # rank-deficient: gelsd (SVD) exists on CPU only. Directions whose eigenvalue is below
        # rcond * the largest are rounding, not data (the same boundary as the Cholesky test
        # above); with lstsq's own rcond (eps * n) a duplicated input's Gram, whose entries
        # differ by the summation order's rounding, came out rank 2 or 1 from run to run.
        delta = torch.linalg.lstsq(a.cpu(), rhs.cpu(), rcond=rcond, driver="gelsd").solution.to(a.device)
    return (avg + delta.T).to(weights_[0].dtype)


def _check_gram(g: torch.Tensor, name: str, path: str) -> None:
    if not bool(torch.isfinite(g).all()):
        raise InputError(f"regmean: Gram matrix for tensor {name!r} in {path!r} has NaN/Inf values; "
                         f"recompute it")
    scale = float(g.abs().max())
    if scale > 0 and float((g - g.T).abs().max()) > SYMMETRY_TOL * scale:
        raise InputError(f"regmean: Gram matrix for tensor {name!r} in {path!r} is not symmetric, "
                         f"so it is not X^T X; is it a Gram file?")
    if bool((g.diagonal() < 0).any()):
        raise InputError(f"regmean: Gram matrix for tensor {name!r} in {path!r} has negative diagonal "
                         f"entries, so it is not X^T X; is it a Gram file?")


@register
class RegMean(MergeMethod):
    name = "regmean"
    pretty_name = "RegMean"
    paper = "Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models"
    reference_url = "https://arxiv.org/abs/2212.09849"
    uses_base = "none"
    companions = ("gram",)
    companion_optional = True
    global_params = (
        Param("alpha", default=0.1, ge=0.0, le=1.0,
              doc="off-diagonal scale of each Gram: alpha*G + (1-alpha)*diag(G); 1 = exact regression, "
                  "0 = per-feature weighted average (default 0.1, the authors' emotion and NER configs; "
                  "their code's default and GLUE configs: 1)"),
    )
    model_params = (
        Param("weight", default=1.0, ge=0.0,
              doc="this model's weight: scales its Grams in the regression and its tensors in the "
                  "average used for tensors without Grams"),
        Param("gram", required=True, kind=str,
              doc="path of this model's Gram matrices (gram_matrices + save_gram)"),
    )

    def companion_shape(self, companion: str, name: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        # a 2-D weight (out, in) may have an (in, in) Gram; whether it does is the Gram file's say
        if companion == "gram" and len(shape) == 2 and name.endswith("weight"):
            return (shape[1], shape[1])
        return None

    def check_params(self, params: TensorParams, where: list[str]) -> None:
        if sum(params.model_values("weight")) == 0:
            raise SpecError("regmean: the weights sum to 0; give at least one model a positive weight")

    def plan_notes(self, companions: dict[str, WeightSpace]) -> list[str]:
        """Name the layers each Gram file records as skipped (Conv1D, convolutions, tied,
        unused): the merge averages their weights."""
        by_skipped: dict[str, list[str]] = {}
        for key, space in companions.items():
            path = Path(space.meta.get("location") or key)
            if not path.is_file():
                continue
            try:
                info = json.loads(read_header(path)[1].get("weightspace_gram", "{}"))
            except (ValueError, OSError, RecursionError):
                continue
            skipped = info.get("skipped") if isinstance(info, dict) else None
            # a note only: metadata of another shape says nothing (the Grams are checked when merged)
            if isinstance(skipped, dict) and skipped and all(
                    isinstance(k, str) and isinstance(v, str) for k, v in skipped.items()):
                by_skipped.setdefault(json.dumps(skipped, sort_keys=True), []).append(path.name)
        return [f"regmean: {', '.join(files)} hold no Gram for " + "; ".join(describe_skipped(json.loads(k)))
                + "; those weights are the weighted average" for k, files in by_skipped.items()]

    def merge(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: list[torch.Tensor],
        params: TensorParams,
        companions: dict[str, list[torch.Tensor]],
    ) -> torch.Tensor:
        coeffs = [float(w) for w in params.model_values("weight")]
        for i, c in enumerate(coeffs):
            if c < 0:
                raise SpecError(f"regmean: models[{i}] weight is {c:g}; weights must be >= 0")
        if sum(coeffs) <= 0:
            raise SpecError("regmean: the weights sum to 0; give at least one model a positive weight")
        alpha = float(params["alpha"])
        if not 0.0 <= alpha <= 1.0:
            raise SpecError(f"regmean: alpha must be in [0, 1], got {alpha:g}")
        grams = companions.get("gram") or [None] * len(tensors)
        paths = params.model_values("gram")
        have = [g is not None for g in grams]
        if not any(have):
            total = sum(coeffs)
            out = tensors[0] * (coeffs[0] / total)
            for t, c in zip(tensors[1:], coeffs[1:]):
                out.add_(t, alpha=c / total)
            return out
        if not all(have):
            missing = [p for p, h in zip(paths, have) if not h]
            found = [p for p, h in zip(paths, have) if h]
            raise InputError(f"regmean: tensor {name!r} has a Gram matrix in {found[0]!r} but none in "
                             f"{missing[0]!r}; take every model's Grams over the same layers")
        for g, p in zip(grams, paths):
            _check_gram(g, name, p)
        return regmean_solve(tensors, grams, coeffs, alpha)


__all__ = ["FALLBACK_REASONS", "RegMean", "describe_skipped", "gram_matrices", "regmean_solve",
           "save_gram", "shrink_off_diagonal"]

"""Applying a LoRA adapter to a base model, lazily, as peft's `merge_and_unload()` would.

    space = apply_adapter(base, adapter)    # checked from headers; nothing is read

Each module the adapter holds becomes a term of a `LoraRef` on its base tensor: its weight's
delta (B @ A, or (B @ A)^T for embeddings and Conv1D layers, scaled as its config says) and its
`lora_B` bias's. Tensors the adapter stores whole replace the base's; an output layer tied to the
input embeddings adds its delta to the embedding tensor.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from pathlib import Path

from weightspace.errors import InputError
from weightspace.ir import TensorRef, WeightSpace
from weightspace.lora.adapter import Adapter, LoraConfig, Module, classify, pattern_key
from weightspace.lora.refs import Factor, LoraRef, Transposed, replacement

# Architectures whose attention/MLP layers are transformers' Conv1D, which stores its weight as
# (in, out): peft sets fan_in_fan_out for them whatever the config says, and clears it for
# nn.Linear. Non-square layers show their layout in their shapes; square ones follow this list.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})

_OUTPUT_LAYERS = ("lm_head", "embed_out")
_INPUT_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings|shared)"
                              r"\.weight$")


def apply_adapter(base: WeightSpace, adapter: Adapter, *, source: str | None = None) -> WeightSpace:
    """`base` with `adapter` applied, lazily: LoRA-touched tensors become `LoraRef`s, tensors the
    adapter stores whole replace the base's, the rest are the base's own refs. Checked from
    headers only; nothing is read."""
    modules, whole = classify(adapter)
    if not modules and not whole:
        raise InputError(f"{adapter.weights}: the adapter holds no LoRA weights")
    refs: dict[str, TensorRef] = dict(base.items())
    replaced = _replace_whole(whole, base, refs, adapter.path)
    _add_lora_terms(modules, adapter, base, refs)
    meta = {**base.meta, "source": source or f"{base.source}+{adapter.path}",
            "lora": {"adapter": str(adapter.path.resolve()), "weights": str(adapter.weights.resolve()),
                     "modules": len(modules), "replaced": sorted(replaced)}}
    return WeightSpace(refs, meta)


def _replace_whole(whole: dict[str, tuple[str, TensorRef]], base: WeightSpace,
                   refs: dict[str, TensorRef], where: Path) -> set[str]:
    """Put the tensors the adapter stores whole in place of the base's (in `refs`); returns the
    names replaced."""
    replaced: set[str] = set()
    # a tied output layer's saved copy (`lm_head.base_layer.weight`) is the embedding's weight
    for name, (key, ref) in sorted(whole.items(), key=lambda kv: kv[0].split(".")[0] in _OUTPUT_LAYERS):
        if name not in refs:
            mod = name.rsplit(".", 1)[0]
            tied = _tied_embedding(mod, base, tuple(ref.shape)) if name.endswith(".weight") else None
            if tied is not None and ".base_layer." in key:
                if tied in replaced:
                    continue
                name = tied
            else:
                raise InputError(
                    f"{where}: the adapter stores tensor {key!r}, but the base model {base.source} "
                    f"has no tensor {name!r}"
                    + ("; the base ties its output layer to the input embeddings, and an adapter "
                       "that trains them apart (modules_to_save) is not supported" if tied
                       else _closest(name, refs)))
        b = refs[name]
        if tuple(ref.shape) != tuple(b.shape):
            raise InputError(f"{where}: the adapter's {key!r} is {list(ref.shape)} but the base's "
                             f"{name!r} is {list(b.shape)}"
                             + ("; the adapter was trained with a resized vocabulary, which is not "
                                "supported" if "embed" in name or "lm_head" in name else ""))
        refs[name] = replacement(name, ref, b.dtype)
        replaced.add(name)
    return replaced


def _add_lora_terms(modules: dict[str, Module], adapter: Adapter, base: WeightSpace,
                    refs: dict[str, TensorRef]) -> None:
    """Make every tensor the adapter's modules touch a `LoraRef` (in `refs`)."""
    terms: dict[str, list[tuple]] = {}
    touched: dict[str, list[str]] = {}
    model_type = (base.meta.get("config") or {}).get("model_type")
    for mod, m in modules.items():
        for name, term in _module_terms(mod, m, adapter, base, refs, model_type):
            terms.setdefault(name, []).append(term)
            touched.setdefault(name, []).append(mod)
    for name, ts in terms.items():
        # peft merges module by module in the model's order: the embedding before the output layer
        order = sorted(range(len(ts)), key=lambda i: touched[name][i] in _OUTPUT_LAYERS)
        refs[name] = LoraRef(name, refs[name], [ts[i] for i in order], [touched[name][i] for i in order])


# ---------------------------------------------------------------- one module's terms


def _module_terms(mod: str, m: Module, adapter: Adapter, base: WeightSpace,
                  refs: dict[str, TensorRef], model_type: str | None) -> Iterator[tuple[str, tuple]]:
    """The (tensor name, term) pairs one module adds: its weight's delta, and its bias's."""
    where, cfg = adapter.path, adapter.config
    embedding, a, b = _factors(mod, m, where)
    if not cfg.targets(mod):
        raise InputError(f"{where}: module {mod!r} has LoRA weights, but adapter_config.json's "
                         f"target_modules {cfg.target_modules!r} does not name it (peft would not "
                         f"apply them)")
    wname = _target_tensor(mod, a, b, base, refs, where)
    w = refs[wname]
    _check_factors(mod, a, b, w, wname, where)
    scale = _scale(mod, a, cfg, where)
    yield wname, _weight_term(mod, a, b, w, wname, scale, embedding, cfg, model_type, where)
    if "bias" in m.parts:  # lora_bias: the base bias += scale * lora_B.bias
        bias_name, (bb_key, bb) = f"{mod}.bias", m.parts["bias"]
        if bias_name not in refs:
            raise InputError(f"{where}: module {mod!r} has a lora_B bias ({bb_key!r}) but the base "
                             f"layer has no bias {bias_name!r}; peft cannot merge it either")
        if tuple(bb.shape) != tuple(refs[bias_name].shape):
            raise InputError(f"{where}: module {mod!r}: lora_B bias is {list(bb.shape)} but the base "
                             f"bias {bias_name!r} is {list(refs[bias_name].shape)}")
        yield bias_name, (bb, None, scale, False)


def _factors(mod: str, m: Module, where: Path) -> tuple[bool, TensorRef, TensorRef]:
    """Whether the module is an embedding's (lora_embedding_A/B), and its A and B."""
    p = m.parts
    embedding = "EA" in p or "EB" in p
    a_role, b_role = ("EA", "EB") if embedding else ("A", "B")
    if embedding and ("A" in p or "B" in p):
        raise InputError(f"{where}: module {mod!r} has both lora_A/B and lora_embedding_A/B weights")
    for role, label in ((a_role, "lora_A"), (b_role, "lora_B")):
        if role not in p:
            other = p.get(b_role if role == a_role else a_role, ("?",))[0]
            raise InputError(f"{where}: module {mod!r} has {other!r} but no {label}"
                             f"{'' if not embedding else ' (embedding)'} weight")
    (_, a), (_, b) = p[a_role], p[b_role]
    return embedding, a, b


def _target_tensor(mod: str, a: TensorRef, b: TensorRef, base: WeightSpace,
                   refs: dict[str, TensorRef], where: Path) -> str:
    """The base tensor the module's delta goes to: its weight, or the embedding a tied output
    layer shares."""
    wname = f"{mod}.weight"
    if wname not in refs and len(a.shape) == len(b.shape) == 2:
        # an output layer tied to the input embeddings is not stored: peft's merge changes the
        # shared weight, so the delta goes to the embedding tensor
        wname = _tied_embedding(mod, base, (b.shape[0], a.shape[1])) or wname
    if wname not in refs:
        raise InputError(f"{where}: target module {mod!r} does not exist in the base model "
                         f"{base.source}: it has no tensor {wname!r}{_closest(wname, refs)}")
    return wname


def _check_factors(mod: str, a: TensorRef, b: TensorRef, w: TensorRef, wname: str,
                   where: Path) -> None:
    """A and B make a low-rank product that the float tensor `w` can take."""
    if len(a.shape) > 2 or len(w.shape) > 2:
        raise InputError(f"{where}: module {mod!r}: LoRA on convolution layers (lora_A "
                         f"{list(a.shape)}, base {list(w.shape)}) is not supported")
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
        raise InputError(f"{where}: module {mod!r}: lora_A {list(a.shape)} and lora_B "
                         f"{list(b.shape)} do not make a low-rank product (A must be [r, in] and "
                         f"B [out, r])")
    if not w.dtype.is_floating_point:
        raise InputError(f"{where}: module {mod!r}: the base tensor {wname!r} has dtype "
                         f"{str(w.dtype)[6:]}, which LoRA cannot be added to")


def _scale(mod: str, a: TensorRef, cfg: LoraConfig, where: Path) -> float:
    """The module's scale, its weights' rank checked against the config's."""
    r, scale = cfg.rank_and_scale(mod)
    if a.shape[0] != r:
        source = ("rank_pattern" if pattern_key(cfg.rank_pattern, mod) in cfg.rank_pattern else "r")
        raise InputError(f"{where}: module {mod!r}: the weights have rank {a.shape[0]} but "
                         f"adapter_config.json's {source} gives {r}")
    return scale


def _weight_term(mod: str, a: TensorRef, b: TensorRef, w: TensorRef, wname: str, scale: float,
                 embedding: bool, cfg: LoraConfig, model_type: str | None, where: Path) -> tuple:
    """The weight's term (row factor, column factor, scale, round first), in the base's layout."""
    out_f, in_f = b.shape[0], a.shape[1]
    if embedding:
        # peft: weight [num_embeddings, dim] += ((B @ A)^T).to(weight dtype); A [r, num], B [dim, r]
        if tuple(w.shape) != (in_f, out_f):
            raise _shape_error(where, mod, a, b, (in_f, out_f), w, wname, "(B @ A)^T")
        transposed, round_first = True, True
    else:
        transposed = _transposed(mod, tuple(w.shape), out_f, in_f, cfg, model_type)
        if transposed is None:
            raise _shape_error(where, mod, a, b, (out_f, in_f), w, wname, "B @ A")
        round_first = False
    if transposed:  # rows of (B @ A)^T are rows of A^T
        return (Transposed(a), Factor(b, transpose=True), scale, round_first)
    return (b, Factor(a, transpose=False), scale, round_first)


def _transposed(mod: str, shape: tuple[int, ...], out_f: int, in_f: int, cfg: LoraConfig,
                model_type: str | None) -> bool | None:
    """Whether the base stores this layer as (in, out) (Conv1D), None if neither layout fits.
    peft decides by the module's type, overriding fan_in_fan_out: here the shapes decide, and for
    a square layer the architecture (or, without a config, the adapter's flag)."""
    plain, flipped = shape == (out_f, in_f), shape == (in_f, out_f)
    if plain and flipped:
        return model_type in CONV1D_MODEL_TYPES if model_type else cfg.fan_in_fan_out
    return False if plain else True if flipped else None


def _shape_error(where: Path, mod: str, a: TensorRef, b: TensorRef, delta: tuple[int, int],
                 w: TensorRef, wname: str, what: str) -> InputError:
    return InputError(f"{where}: module {mod!r}: the LoRA delta {what} is {list(delta)} (lora_A "
                      f"{list(a.shape)}, lora_B {list(b.shape)}) but the base tensor {wname!r} is "
                      f"{list(w.shape)}; is the adapter for another model?")


def _closest(name: str, refs: dict[str, TensorRef]) -> str:
    close = difflib.get_close_matches(name, list(refs), n=1, cutoff=0.75)
    return f" (closest: {close[0]!r})" if close else ""


def _tied_embedding(mod: str, base: WeightSpace, shape: tuple[int, int]) -> str | None:
    """The input embedding an unstored output layer `mod` is tied to, if there is exactly one
    of the layer's shape (and config.json does not say the two are untied)."""
    if mod not in _OUTPUT_LAYERS or (base.meta.get("config") or {}).get("tie_word_embeddings") is False:
        return None
    found = [n for n, r in base.items() if _INPUT_EMBEDDING.search(n) and tuple(r.shape) == shape]
    return found[0] if len(found) == 1 else None

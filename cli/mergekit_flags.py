"""mergekit-yaml's command-line flags, as `wsmerge run` takes them.

    @run_command
    @mergekit_flags
    def run(...):
        flags = MergekitFlags.of(click.get_current_context())

A mergekit user's command line works unchanged: a flag for something wsmerge
has means what it means in mergekit 0.1.5 (`--cuda`, `--out-shard-size 1B` =
10^9 bytes, `--no-copy-tokenizer`, `--random-seed`, `--allow-crimes`, ...); a
flag for something wsmerge always does (streaming, lazy reads, asynchronous
writes) is accepted and changes nothing; a flag for something wsmerge
deliberately does not do is refused with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import click

_META = "mergekit_flags"

# accepted, and nothing to do: wsmerge already behaves this way
NO_OPS = {
    "lazy_unpickle": "reads are always lazy (safetensors headers, then one tensor at a time)",
    "low_cpu_memory": "memory is always bounded by a few tensors, wherever the math runs",
    "read_to_gpu": "inputs are read on the CPU and moved to the device tensor by tensor",
    "async_write": "results are always written by a background thread",
    "write_threads": "one background writer thread streams every shard",
    "clone_tensors": "every output tensor is its own copy",
    "lora_merge_cache": "LoRA inputs are applied tensor by tensor; no merged model is cached",
    "lora_merge_dtype": "LoRA deltas are applied in float32 and cast to the base's dtype",
    "multi_gpu": "a merge runs on one device (--device); the flag is ignored",
}

# refused, with the sentence why
REFUSED = {
    "trust_remote_code": "--trust-remote-code: wsmerge never runs code from a model repository; "
                         "merges need only the weights and config.json",
    "no_safe_serialization": "--no-safe-serialization: wsmerge writes only safetensors (a pickled "
                             "checkpoint can run code when it is loaded)",
    "unsafe_truncate_embeddings": "--unsafe-truncate-embeddings: not supported; give the models' "
                                  "vocabularies a common tokenizer with tokenizer_source instead",
}


@dataclass
class MergekitFlags:
    """What the mergekit flags of one `wsmerge run` asked for (None: not given)."""

    cuda: bool | None = None
    out_shard_size: int | None = None
    copy_tokenizer: bool = True
    write_model_card: bool = True
    random_seed: int | None = None
    allow_crimes: bool = False
    quiet: bool = False
    num_threads: int | None = None
    transformers_cache: str | None = None
    ignored: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, ctx: click.Context) -> MergekitFlags:
        return ctx.meta.setdefault(_META, cls())


def parse_kmb(value: str) -> int:
    """mergekit's sizes: a whole number, or with K, M or B (thousand, million, billion)."""
    text = value.strip()
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit() or int(digits) <= 0:
        raise click.BadParameter(f"{value!r}: a whole number with K, M or B (mergekit's thousand, "
                                 f"million, billion), e.g. 5B")
    return int(digits) * scale


def _store(name: str, convert: Callable | None = None) -> Callable:
    def callback(ctx: click.Context, param: click.Parameter, value):
        if value is None or ctx.get_parameter_source(param.name) != click.core.ParameterSource.COMMANDLINE:
            return value
        flags = MergekitFlags.of(ctx)
        if name in REFUSED:
            raise click.UsageError(REFUSED[name])
        if name in NO_OPS:
            flags.ignored.append(f"--{param.name.replace('_', '-')}: {NO_OPS[name]}")
            return value
        setattr(flags, name, convert(value) if convert else value)
        return value

    return callback


def _flag(*decls: str, name: str, help: str | None = None, hidden: bool = False, **kw) -> Callable:
    return click.option(*decls, name, expose_value=False, callback=_store(name, kw.pop("convert", None)),
                        help=help, hidden=hidden, **kw)


def _refused(decl: str, name: str) -> Callable:
    return click.option(decl, name, is_flag=True, default=None, expose_value=False, hidden=True,
                        callback=_store(name))


def mergekit_flags(f: Callable) -> Callable:
    """Add mergekit-yaml's flags to a command (see the module docstring)."""
    decorators = [
        _flag("--cuda/--no-cuda", name="cuda", default=None,
              help="mergekit's --cuda: the same as --device cuda."),
        _flag("--out-shard-size", name="out_shard_size", default=None, metavar="SIZE", convert=parse_kmb,
              help="mergekit's shard size: K/M/B are thousand/million/billion bytes (5B = 5G here)."),
        _flag("--copy-tokenizer/--no-copy-tokenizer", name="copy_tokenizer", default=None,
              help="Copy the tokenizer files into OUT (default yes, as mergekit)."),
        _flag("--write-model-card/--no-write-model-card", name="write_model_card", default=None,
              help="Write README.md, the model card (default yes, as mergekit)."),
        _flag("--random-seed", name="random_seed", type=int, default=None,
              help="Seed of the randomized methods (DARE, DELLA): the spec's `seed` parameter."),
        _flag("--allow-crimes", name="allow_crimes", is_flag=True, default=None,
              help="Allow merging models of different architectures (their tensors must still line up)."),
        _flag("--quiet/--no-quiet", name="quiet", default=None,
              help="No progress bar and no summary line (errors are still printed)."),
        _flag("-j", "--num-threads", name="num_threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for the math (torch.set_num_threads; an elementwise merge such as "
                   "linear computes with 1 by default, or with OMP_NUM_THREADS where it is set)."),
        _flag("--transformers-cache", name="transformers_cache", default=None, metavar="DIR",
              help="Hub cache for models given by id (HF_HUB_CACHE for this run)."),
        _flag("--gpu-rich", name="cuda", is_flag=True, default=None, hidden=True),
        *[_flag(f"--{n.replace('_', '-')}/--no-{n.replace('_', '-')}", name=n, default=None, hidden=True)
          for n in ("lazy_unpickle", "low_cpu_memory", "read_to_gpu", "async_write", "clone_tensors",
                    "multi_gpu")],
        _flag("--write-threads", name="write_threads", type=int, default=None, hidden=True),
        _flag("--lora-merge-cache", name="lora_merge_cache", default=None, hidden=True),
        _flag("--lora-merge-dtype", name="lora_merge_dtype", default=None, hidden=True),
        _refused("--trust-remote-code", "trust_remote_code"),
        _refused("--no-safe-serialization", "no_safe_serialization"),
        _refused("--unsafe-truncate-embeddings", "unsafe_truncate_embeddings"),
        click.option("--safe-serialization", "safe_serialization", is_flag=True, expose_value=False,
                     hidden=True, help="Accepted: the output is always safetensors."),
    ]
    for d in reversed(decorators):
        f = d(f)
    return f


__all__ = ["NO_OPS", "REFUSED", "MergekitFlags", "mergekit_flags", "parse_kmb"]

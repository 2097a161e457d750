"""The `wsmerge moe` spec: mergekit-moe's YAML schema, validated before anything is read.

    base_model: ./base
    gate_mode: cheap_embed          # hidden (default) | hidden_avg | cheap_embed | random | uniform_random
    dtype: bfloat16
    experts_per_token: 2
    experts:
      - source_model: ./code
        positive_prompts: ["def fibonacci(n):"]
      - source_model: ./math
        positive_prompts: ["Solve for x:"]
        negative_prompts: ["Write a poem"]

Every key of mergekit 0.1.5's `MoEMergeConfig` and `Expert` is read with its meaning
(mergekit/moe/config.py); `tokenizer_source` is ours (where the prompts' tokenizer lives when
the base model has none; mergekit always uses the base's). A misspelled key is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, StrictStr, field_validator

from weightspace.errors import SpecError
from weightspace.spec import parse_dtype, parse_yaml_model, read_yaml_file

GateMode = Literal["hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random"]
# gate modes that read prompts, and those that run the base model
PROMPT_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed")
HIDDEN_MODES = ("hidden", "hidden_avg", "hidden_last")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Expert(_Strict):
    """One dense model whose MLPs become expert E of every layer."""

    source_model: StrictStr
    positive_prompts: list[StrictStr] | None = None
    negative_prompts: list[StrictStr] | None = None
    noise_scale: StrictFloat | StrictInt | None = None     # Gaussian noise added to its MLP weights
    residual_scale: StrictFloat | StrictInt | None = None  # its down_proj scaled by this

    def prompts(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return tuple(self.positive_prompts or ()), tuple(self.negative_prompts or ())


class MoESpec(_Strict):
    base_model: StrictStr
    experts: list[Expert]
    gate_mode: GateMode = "hidden"
    dtype: StrictStr | None = None
    experts_per_token: StrictInt = 2
    shared_experts: list[Expert] | None = None
    architecture: StrictStr | None = None
    tokenizer_source: StrictStr | None = None

    @field_validator("experts")
    @classmethod
    def _some(cls, v: list[Expert]) -> list[Expert]:
        if not v:
            raise ValueError("list at least one expert (source_model: a dense fine-tune of base_model)")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        try:
            parse_dtype(v)
        except SpecError as e:
            raise ValueError(str(e).split(": ", 1)[1]) from None
        return v


def load_moe_spec(path: str | Path) -> MoESpec:
    """Read and validate a mergekit-moe YAML config; errors name the file, field and line."""
    return parse_moe_spec(read_yaml_file(path), str(path))


def parse_moe_spec(text: str, source: str = "<moe spec>") -> MoESpec:
    spec = parse_yaml_model(text, source, MoESpec, what="MoE spec",
                            hint="a MoE spec must be a YAML mapping with base_model and experts",
                            fields_at=_fields_at)
    return spec


def _fields_at(loc: tuple) -> list[str]:
    """The keys allowed at a field path (for 'did you mean')."""
    if not loc:
        return list(MoESpec.model_fields)
    if loc[0] in ("experts", "shared_experts"):
        return list(Expert.model_fields)
    return []


def check_spec(spec: MoESpec, source: str, *, allow_all_same: bool = False) -> None:
    """mergekit's `is_bad_config`, as one SpecError naming the field instead of a log line."""
    n = len(spec.experts)
    if spec.experts_per_token < 1:
        raise SpecError(f"{source}: experts_per_token is {spec.experts_per_token}; it must be at least 1")
    if spec.experts_per_token > n:
        raise SpecError(f"{source}: experts_per_token is {spec.experts_per_token} but there "
                        f"{'is' if n == 1 else 'are'} only {n} expert{'s' * (n != 1)}; "
                        f"list more experts or lower experts_per_token")
    if spec.gate_mode == "random":
        return  # mergekit checks nothing more for random gates
    if spec.gate_mode in PROMPT_MODES:
        for k, e in enumerate(spec.experts):
            if not e.positive_prompts:
                raise SpecError(f"{source}: experts.{k} ({e.source_model}): gate_mode "
                                f"{spec.gate_mode} needs positive_prompts for every expert (or use "
                                f"gate_mode: random)")
        first = spec.experts[0].prompts()
        if n > 1 and all(e.prompts() == first for e in spec.experts[1:]):
            raise SpecError(f"{source}: every expert has the same positive and negative prompts, so "
                            f"the router cannot tell them apart; give each expert prompts for what "
                            f"should be routed to it")
    if spec.shared_experts:
        has = [bool(e.positive_prompts) for e in spec.shared_experts]
        if any(has) and not all(has):
            raise SpecError(f"{source}: shared_experts: give prompts for every shared expert or none")
    if not allow_all_same and n > 1 and all(e.source_model == spec.experts[0].source_model
                                            for e in spec.experts[1:]):
        raise SpecError(f"{source}: every expert is {spec.experts[0].source_model}: the MoE would "
                        f"compute what that model computes, at more cost; pass "
                        f"--i-understand-this-is-not-useful-without-training to build it anyway "
                        f"(to train it after)")


__all__ = ["HIDDEN_MODES", "PROMPT_MODES", "Expert", "MoESpec", "check_spec", "load_moe_spec",
           "parse_moe_spec"]

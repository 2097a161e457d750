"""Mixtures of experts from dense models (mergekit-moe): a command, not a per-tensor merge method.

    plan = plan_moe(load_moe_spec("examples/moe.yaml"), spec_dir="examples")
    run_moe(plan, "runs/moe")

config.py is the spec (mergekit-moe's schema), router.py the router initialisations (random,
uniform_random, cheap_embed, hidden, hidden_avg), build.py the plan and the streaming writer.
"""

from weightspace.merges.moe.build import MoEPlan, compute_gates, plan_moe, run_moe
from weightspace.merges.moe.config import Expert, MoESpec, check_spec, load_moe_spec, parse_moe_spec

__all__ = ["Expert", "MoEPlan", "MoESpec", "check_spec", "compute_gates", "load_moe_spec",
           "parse_moe_spec", "plan_moe", "run_moe"]

"""Evolutionary merge search (`wsmerge evolve`): CMA-ES or random search over a merge spec's
values, each candidate merged and scored by a worker (Ray, local processes or this process).

    from weightspace.zoo.evolve import load_search_spec, run_search
    result = run_search(load_search_spec("examples/evolve_digits.yaml"), "runs/evolve", budget=64)

Modules: spec (the search spec), optimizer (CMA-ES via `cma`, random search), candidate (merge
and score one candidate), fanout (Ray / processes), log (the output directory), search (the
loop), show (what a search found).
"""

from weightspace.zoo.evolve.search import run_search
from weightspace.zoo.evolve.spec import SearchSpec, load_search_spec, parse_search_spec

__all__ = ["SearchSpec", "load_search_spec", "parse_search_spec", "run_search"]

"""The optimisers of `wsmerge evolve`: CMA-ES (the `cma` package) and random search.

    opt = make_optimizer("cma", dims=3, popsize=8, sigma=0.25, seed=0, x0=[0.5, 0.5, 0.5])
    xs = opt.ask()              # one generation: popsize points in [0, 1]^dims
    opt.tell(xs, losses)        # lower is better; a failed candidate gets FAILED_LOSS

Every searched value is scaled to [0, 1] (weightspace.zoo.evolve.spec.Dim), so one `sigma`
(a fraction of each range) and the bounds [0, 1] hold for all of them. CMA-ES is Hansen's
`cma` (pip install cma), bounded with its own boundary handling, never a hand-written
evolution strategy.

Determinism and resuming: `cma` draws from numpy's global random state, which anything else
in the process may also draw from; each optimiser keeps its own copy of that state and puts
it in place only while `cma` runs. The same seed therefore gives the same generations, and a
search resumes by replaying its log: a fresh optimiser with the same seed is asked for each
logged generation and told the logged losses, which rebuilds CMA-ES's state exactly (mean,
step size, covariance, evolution paths) without unpickling anything. `state()` is what the
search writes to optimizer.json after every generation (for `evolve show` and for checks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

from weightspace.errors import SpecError

# the loss told to CMA-ES for a candidate that failed: worse than any accuracy or -accuracy,
# and finite (CMA-ES ranks the losses; it refuses NaN)
FAILED_LOSS = 1.0e12


def _cma_seed(seed: int) -> int:
    # cma reads seed 0 (and None) as "from the clock"; every user seed maps to a fixed positive one
    return int(np.random.SeedSequence(seed).generate_state(1)[0] % (2**31 - 2)) + 1


class CMAOptimizer:
    name = "cma"

    def __init__(self, dims: int, *, popsize: int | None, sigma: float, seed: int, x0: list[float]):
        try:
            import cma
        except ImportError:
            from weightspace.extras import require

            require("cma", "evolve", "search.optimizer cma (CMA-ES) needs the cma package")
            raise
        if dims < 2:
            raise SpecError("CMA-ES needs at least two searched values; use optimizer: random")
        opts = {"bounds": [0.0, 1.0], "seed": _cma_seed(seed), "verbose": -9, "verb_log": 0,
                "verb_disp": 0, "maxiter": 10**9, "tolx": 0, "tolfun": 0, "tolfunhist": 0,
                "tolstagnation": 10**9, "tolflatfitness": 10**9}
        if popsize is not None:
            opts["popsize"] = popsize
        saved = np.random.get_state()
        try:
            self.es = cma.CMAEvolutionStrategy(list(x0), sigma, opts)
            self._rng = np.random.get_state()
        finally:
            np.random.set_state(saved)
        self.popsize = int(self.es.popsize)
        self.generation = 0

    @contextlib.contextmanager
    def _own_random_state(self) -> Iterator[None]:
        saved = np.random.get_state()
        np.random.set_state(self._rng)
        try:
            yield
        finally:
            self._rng = np.random.get_state()
            np.random.set_state(saved)

    def ask(self) -> list[list[float]]:
        with self._own_random_state():
            return [np.asarray(x, dtype=float).tolist() for x in self.es.ask()]

    def tell(self, xs: list[list[float]], losses: list[float]) -> None:
        with self._own_random_state():
            self.es.tell([np.asarray(x) for x in xs], [float(v) for v in losses])
        self.generation += 1

    def state(self) -> dict:
        return {"optimizer": "cma", "generation": self.generation, "popsize": self.popsize,
                "mean": np.asarray(self.es.mean).tolist(), "sigma": float(self.es.sigma),
                "covariance_diagonal": np.asarray(self.es.C).diagonal().tolist()
                if np.ndim(self.es.C) == 2 else np.asarray(self.es.C).tolist()}


class RandomOptimizer:
    """Uniform random points in [0, 1]^dims, `popsize` at a time (the baseline). Point i of
    generation g comes from its own stream (seed, g, i), so it never depends on what was told."""

    name = "random"

    def __init__(self, dims: int, *, popsize: int | None, sigma: float, seed: int, x0: list[float]):
        self.dims = dims
        self.popsize = popsize or (4 + int(3 * np.log(max(1, dims))))
        self.seed = seed
        self.generation = 0

    def ask(self) -> list[list[float]]:
        return [np.random.default_rng([self.seed, self.generation, i]).random(self.dims).tolist()
                for i in range(self.popsize)]

    def tell(self, xs: list[list[float]], losses: list[float]) -> None:
        self.generation += 1

    def state(self) -> dict:
        return {"optimizer": "random", "generation": self.generation, "popsize": self.popsize}


OPTIMIZERS = {"cma": CMAOptimizer, "random": RandomOptimizer}


def make_optimizer(name: str, dims: int, *, popsize: int | None, sigma: float, seed: int,
                   x0: list[float]):
    if name not in OPTIMIZERS:
        raise SpecError(f"search.optimizer: unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](dims, popsize=popsize, sigma=sigma, seed=seed, x0=x0)


__all__ = ["FAILED_LOSS", "CMAOptimizer", "RandomOptimizer", "make_optimizer"]

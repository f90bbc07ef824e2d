"""`evomerge_ps`: Sakana's Evolutionary Model Merge in parameter space (Akiba et al., 2024) as an ask/tell strategy.

CMA-ES (the `cma` package) over a vector of merge-method parameters in [0, 1] (TIES/DARE weight and density per
seed and per layer group, see `hf_m2n2.method_genome`), with the paper's settings: every coordinate starts at
0.5, sigma0 = 1/6 (so +/- 3 sigma spans [0, 1]), and `popsize = 4 + floor(3 ln n)` samples per generation.

Bounds (repair and penalize): CMA-ES samples an unconstrained y; the candidate evaluated (and exported) is its
projection clip(y, 0, 1), and `cma` is told `-mean score + ||y - clip(y, 0, 1)||^2`. The penalty keeps the search
distribution from drifting on the flat plateau outside the box; it never enters the logged scores.

Checkpoints hold no pickle. The state of a `cma.CMAEvolutionStrategy` is a deterministic function of its options,
its random generator's initial state and the function values it was told, so the checkpoint stores those (one
row of f-values per finished generation, plus the current generation's samples and values); `load_state_dict`
builds a fresh `cma.CMAEvolutionStrategy` and replays the generations through the public ask/tell API
(milliseconds: one generation costs `popsize` forward passes to run but microseconds to replay). The checkpoint
also stores the resulting state explicitly (mean, sigma, covariance C, evolution paths pc and ps, counters,
generator state), which the replay must reproduce bit for bit: a different `cma` version that would silently
diverge raises instead.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from hf_m2n2.errors import HfM2n2Error
from hf_m2n2.evolve.cma_es import BestSample, GeneratorRandn
from hf_m2n2.evolve.strategy import Candidate, Lineage, make_rng, restore_rng, rng_state

DEFAULT_SIGMA0 = 1.0 / 6.0
DEFAULT_X0 = 0.5
STATE_FORMAT = 1


def default_popsize(n: int) -> int:
    """CMA-ES's default population size for `n` dimensions, `4 + floor(3 ln n)` (the paper's setting).

    Example:
        >>> default_popsize(8), default_popsize(100)
        (10, 17)
    """
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    return 4 + math.floor(3 * math.log(n))


class EvomergePS(BestSample):
    """CMA-ES over a bounded vector genome of merge-method parameters.

    Args:
        ops: genome operations with `size` (n) and `from_array` (a vector in [0, 1]^n to a genome).
        popsize: samples per generation (None: `default_popsize(n)`).
        sigma0: initial step size (1/6).
        x0: initial value of every coordinate (0.5).
        seed: seed of the sampling generator.
    """

    name = "evomerge_ps"

    def __init__(
        self,
        ops: Any,
        *,
        popsize: int | None = None,
        sigma0: float = DEFAULT_SIGMA0,
        x0: float = DEFAULT_X0,
        seed: int | np.random.SeedSequence = 0,
    ):
        self.ops = ops
        self.n = int(ops.size)
        self.popsize = int(popsize) if popsize is not None else default_popsize(self.n)
        if self.popsize < 2:
            raise ValueError(f"popsize must be at least 2, got {self.popsize}")
        if not 0.0 <= x0 <= 1.0:
            raise ValueError(f"x0 must lie in [0, 1], got {x0}")
        if not sigma0 > 0:
            raise ValueError(f"sigma0 must be positive, got {sigma0}")
        self.sigma0 = float(sigma0)
        self.x0 = float(x0)
        self.initial_rng = rng_state(make_rng(seed))
        self.es, self.rng = self._fresh_es()
        self.told: list[list[float]] = []  # f-values told to cma, one row per finished generation
        self.solutions: np.ndarray | None = None  # the current generation's samples (genotypes)
        self.fvalues: list[float] = []
        self.means: list[float] = []
        self.last_means: list[float] = []
        self.next_id = 0
        self.best_genome: Any = None
        self.best_scores: np.ndarray | None = None
        self.best_lineage: Lineage | None = None

    def _fresh_es(self) -> tuple[Any, np.random.Generator]:
        import cma

        rng = restore_rng(self.initial_rng)
        options = {
            "popsize": self.popsize,
            "randn": GeneratorRandn(rng),
            "seed": float("nan"),  # never touch numpy's global generator
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
            "tolflatfitness": float("inf"),  # exact-match scores are often flat; keep searching
        }
        return cma.CMAEvolutionStrategy(np.full(self.n, self.x0), self.sigma0, options), rng

    @property
    def generation(self) -> int:
        """Generations started so far (the current one included)."""
        return len(self.told) + (self.solutions is not None)

    def ask(self) -> Candidate:
        """The next sample of the current generation, projected onto [0, 1]^n (a generation starts when all of
        the previous one are told)."""
        if self.solutions is None:
            self.solutions = np.array(self.es.ask(), dtype=np.float64)
            self.fvalues, self.means = [], []
        cid, self.next_id = self.next_id, self.next_id + 1
        genome = self.ops.from_array(np.clip(self.solutions[len(self.fvalues)], 0.0, 1.0))
        return Candidate(genome, Lineage(cid, "cma", (), None, None, None))

    def tell(self, candidate: Candidate, scores: np.ndarray) -> None:
        if self.solutions is None:
            raise HfM2n2Error("tell without ask")
        mean = float(np.mean(scores))
        y = self.solutions[len(self.fvalues)]
        penalty = float(np.sum((y - np.clip(y, 0.0, 1.0)) ** 2))
        self.fvalues.append(-mean + penalty)
        self.means.append(mean)
        if self.best_scores is None or mean > float(self.best_scores.mean()):
            self.best_genome = candidate.genome
            self.best_scores = np.asarray(scores, dtype=np.float64).copy()
            self.best_lineage = candidate.lineage
        if len(self.fvalues) == self.popsize:
            self.es.tell(list(self.solutions), list(self.fvalues))
            self.told.append(list(self.fvalues))
            self.last_means = list(self.means)
            self.solutions = None

    def stats(self) -> dict[str, float]:
        best = 0.0 if self.best_scores is None else float(self.best_scores.mean())
        last = self.last_means or self.means or [0.0]
        return {"best": best, "mean": float(np.mean(last))}

    def cma_state(self) -> dict[str, Any]:
        """The CMA-ES state, explicitly: mean, step size, covariance, evolution paths, counters, generator."""
        es = self.es
        return {
            "mean": np.array(es.mean, dtype=np.float64),
            "sigma": float(es.sigma),
            "C": np.array(es.sm.C, dtype=np.float64),
            "pc": np.array(es.pc, dtype=np.float64),
            "ps": np.array(es.adapt_sigma.ps, dtype=np.float64),
            "countiter": int(es.countiter),
            "countevals": int(es.countevals),
            "rng": rng_state(self.rng),
        }

    def state_dict(self) -> dict[str, Any]:
        to_state = self.ops.to_state
        return {
            "format": STATE_FORMAT,
            "n": self.n,
            "popsize": self.popsize,
            "sigma0": self.sigma0,
            "x0": self.x0,
            "initial_rng": self.initial_rng,
            "told": np.array(self.told, dtype=np.float64).reshape(len(self.told), self.popsize),
            "solutions": self.solutions,
            "fvalues": list(self.fvalues),
            "means": list(self.means),
            "last_means": list(self.last_means),
            "cma": self.cma_state(),
            "next_id": self.next_id,
            "best_genome": None if self.best_genome is None else to_state(self.best_genome),
            "best_scores": self.best_scores,
            "best_lineage": None if self.best_lineage is None else self.best_lineage.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild the CMA-ES by replaying the told generations into a fresh `cma.CMAEvolutionStrategy`.

        Raises:
            HfM2n2Error: other settings, or the replay does not reproduce the stored state (another `cma`).
        """
        if state.get("format") != STATE_FORMAT:
            raise HfM2n2Error(f"unsupported evomerge_ps state format {state.get('format')!r}")
        mine = (self.n, self.popsize, self.sigma0, self.x0)
        theirs = (int(state["n"]), int(state["popsize"]), float(state["sigma0"]), float(state["x0"]))
        if mine != theirs or state["initial_rng"] != self.initial_rng:
            raise HfM2n2Error("the checkpoint was written with other evomerge_ps settings or another seed")
        self.es, self.rng = self._fresh_es()
        told = np.asarray(state["told"], dtype=np.float64).reshape(-1, self.popsize)
        for fvalues in told:
            self.es.tell(self.es.ask(), [float(f) for f in fvalues])
        self.told = [[float(f) for f in row] for row in told]
        self.solutions = None
        if state["solutions"] is not None:
            self.solutions = np.array(self.es.ask(), dtype=np.float64)
            if not np.array_equal(self.solutions, np.asarray(state["solutions"])):
                raise HfM2n2Error(_DIVERGED + " (samples of the current generation)")
        self._check_replay(state["cma"])
        self.fvalues = [float(f) for f in state["fvalues"]]
        self.means = [float(m) for m in state["means"]]
        self.last_means = [float(m) for m in state["last_means"]]
        self.next_id = int(state["next_id"])
        genome = state["best_genome"]
        self.best_genome = None if genome is None else self.ops.from_state(genome)
        self.best_scores = None if state["best_scores"] is None else np.array(state["best_scores"])
        lineage = state["best_lineage"]
        self.best_lineage = None if lineage is None else Lineage.from_dict(lineage)

    def _check_replay(self, saved: dict[str, Any]) -> None:
        now = self.cma_state()
        for key in ("mean", "sigma", "C", "pc", "ps", "countiter", "countevals"):
            if not np.array_equal(np.asarray(now[key]), np.asarray(saved[key])):
                raise HfM2n2Error(f"{_DIVERGED} ({key})")
        if now["rng"] != saved["rng"]:
            raise HfM2n2Error(f"{_DIVERGED} (generator state)")


_DIVERGED = (
    "replaying the checkpoint's CMA-ES generations did not reproduce its state (was it written with another "
    "version of the `cma` package?)"
)

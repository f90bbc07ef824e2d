"""CMA-ES baseline (the `cma` package) as a one-candidate-at-a-time ask/tell strategy.

Each generation of `popsize` samples is asked one by one; when all are told, `cma` is told their fitness
(minus the mean per-example score). Full covariance on 19,210 dimensions holds two N x N float64 matrices
(~6 GB) and decomposes them every few generations, which is very slow; `diagonal: true` is the separable
variant (`CMA_diagonal=True`), linear in time and memory. The `cma` object and its random generator are
pickled together into the checkpoint.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np

from hf_m2n2.evolve.genome import DenseVectorOps
from hf_m2n2.evolve.strategy import Candidate, Lineage, Member, make_rng


class GeneratorRandn:
    """`randn(*shape)` for `cma`, drawing from our generator instead of numpy's global one (picklable)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


class BestSample:
    """The archive of a sampling strategy (CMA-ES): the best sample evaluated so far (as the reference logs
    `xbest`), from `best_genome`, `best_scores`, `best_lineage` and `generation`."""

    def best(self) -> Member | None:
        if self.best_genome is None:
            return None
        return Member(self.best_genome, self.best_scores, self.best_lineage, {"generation": self.generation})

    def members(self) -> list[Member]:
        best = self.best()
        return [] if best is None else [best]


class CMAES(BestSample):
    """CMA-ES over a dense genome.

    Args:
        ops: dense-vector genome operations (CMA-ES needs a real vector).
        x0: the initial mean (e.g. a random N(0, 0.01^2) seed).
        popsize: samples per generation.
        sigma0: initial step size.
        diagonal: separable CMA-ES (diagonal covariance).
        seed: seed of the sampling generator.
    """

    name = "cma_es"

    def __init__(
        self,
        ops: DenseVectorOps,
        x0: Any,
        *,
        popsize: int = 20,
        sigma0: float = 0.01,
        diagonal: bool = False,
        seed: int | np.random.SeedSequence = 0,
    ):
        import cma

        if not isinstance(ops, DenseVectorOps):
            raise TypeError("CMA-ES needs dense-vector genomes")
        self.ops = ops
        self.popsize = popsize
        self.diagonal = diagonal
        self.rng = make_rng(seed)
        options = {
            "popsize": popsize,
            "randn": GeneratorRandn(self.rng),
            "seed": float("nan"),  # never touch numpy's global generator
            "CMA_diagonal": diagonal,
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
            "tolflatfitness": float("inf"),
        }
        mean = np.asarray(ops.to_state(x0), dtype=np.float64)
        self.es = cma.CMAEvolutionStrategy(mean, sigma0, options)
        self.solutions: np.ndarray | None = None
        self.fvalues: list[float] = []
        self.next_id = 0
        self.generation = 0
        self.best_genome: Any = None
        self.best_scores: np.ndarray | None = None
        self.best_lineage: Lineage | None = None
        self.last_means: list[float] = []

    def ask(self) -> Candidate:
        """The next sample of the current generation (a new generation starts when all are told)."""
        if self.solutions is None:
            self.solutions = np.asarray(self.es.ask())
            self.fvalues = []
            self.generation += 1
        cid, self.next_id = self.next_id, self.next_id + 1
        genome = self.ops.from_array(self.solutions[len(self.fvalues)])
        return Candidate(genome, Lineage(cid, "cma", (), None, None, None))

    def tell(self, candidate: Candidate, scores: np.ndarray) -> None:
        mean = float(np.mean(scores))
        self.fvalues.append(-mean)
        if self.best_scores is None or mean > float(self.best_scores.mean()):
            self.best_genome = candidate.genome
            self.best_scores = np.asarray(scores, dtype=np.float64).copy()
            self.best_lineage = candidate.lineage
        if len(self.fvalues) == self.popsize:
            self.es.tell(list(self.solutions), self.fvalues)
            self.last_means = [-f for f in self.fvalues]
            self.solutions = None

    def stats(self) -> dict[str, float]:
        best = 0.0 if self.best_scores is None else float(self.best_scores.mean())
        last = self.last_means or [-f for f in self.fvalues] or [0.0]
        return {"best": best, "mean": float(np.mean(last))}

    def state_dict(self) -> dict[str, Any]:
        to_state = self.ops.to_state
        return {
            "popsize": self.popsize,
            "diagonal": self.diagonal,
            # es and rng in one pickle: es samples through `GeneratorRandn`, which shares our generator
            "cma": np.frombuffer(pickle.dumps((self.es, self.rng), protocol=5), dtype=np.uint8),
            "solutions": self.solutions,
            "fvalues": list(self.fvalues),
            "next_id": self.next_id,
            "generation": self.generation,
            "best_genome": None if self.best_genome is None else to_state(self.best_genome),
            "best_scores": self.best_scores,
            "best_lineage": None if self.best_lineage is None else self.best_lineage.to_dict(),
            "last_means": list(self.last_means),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["popsize"] != self.popsize or state["diagonal"] != self.diagonal:
            raise ValueError("the checkpoint was written with different CMA-ES settings")
        self.es, self.rng = pickle.loads(np.asarray(state["cma"], dtype=np.uint8).tobytes())
        self.solutions = None if state["solutions"] is None else np.array(state["solutions"])
        self.fvalues = [float(f) for f in state["fvalues"]]
        self.next_id = int(state["next_id"])
        self.generation = int(state["generation"])
        genome = state["best_genome"]
        self.best_genome = None if genome is None else self.ops.from_state(genome)
        self.best_scores = None if state["best_scores"] is None else np.array(state["best_scores"])
        lineage = state["best_lineage"]
        self.best_lineage = None if lineage is None else Lineage.from_dict(lineage)
        self.last_means = [float(m) for m in state["last_means"]]

"""CMA-ES (the `cma` package) as one-candidate-at-a-time ask/tell strategies, checkpointed without pickle.

`ReplayedCMA` asks a generation of `popsize` samples one by one and, when all are told, tells `cma` their
f-values (lower is better). `CMAES` is the digits baseline over a dense genome: f = minus the mean per-example
score. Full covariance on 19,210 dimensions holds two N x N float64 matrices (~6 GB) and decomposes them every
few generations, which is very slow; `diagonal: true` is the separable variant (`CMA_diagonal=True`), linear in
time and memory. `evomerge_ps` is the bounded variant over merge-method parameters.

Checkpoints hold no pickle. The state of a `cma.CMAEvolutionStrategy` is a deterministic function of its x0,
sigma0, options, its random generator's initial state and the f-values it was told, so the checkpoint stores
those (one row of f-values per finished generation, plus the current generation's samples and values);
`load_state_dict` builds a fresh `cma.CMAEvolutionStrategy` and replays the generations through the public
ask/tell API (no evaluations: milliseconds a generation for the diagonal variant, the strategy's own compute for
full covariance). The checkpoint also stores the resulting state explicitly (mean, step size, covariance or its
diagonal scaling, evolution paths, counters, generator state), which the replay must reproduce bit for bit: a
different `cma` version that would silently diverge raises instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hf_m2n2.errors import ContractError, HfM2n2Error
from hf_m2n2.evolve.strategy import BestSample, Candidate, Lineage, make_rng, restore_rng, rng_state

STATE_FORMAT = 2  # 1: cma_es pickled its `cma` object; evomerge_ps had its own layout


class GeneratorRandn:
    """`randn(*shape)` for `cma`, drawing from our generator instead of numpy's global one."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


class ReplayedCMA(BestSample):
    """A `cma.CMAEvolutionStrategy` asked and told one sample at a time, checkpointed by replay.

    Subclasses set `name` and may override `genome_of` (the genome evaluated for a sample) and `fvalue` (what
    `cma` is told for a sample of a given mean score; default: minus the mean).

    Args:
        ops: genome operations with `from_array` and `to_state`/`from_state`.
        x0: the initial mean.
        sigma0: initial step size.
        popsize: samples per generation.
        rng_seed: seed of the sampling generator.
        options: further `cma` options (e.g. `CMA_diagonal`).
    """

    name = "cma"
    told_in_order = (
        True  # the loop tells a generation's samples in ask order whatever the executor's ordering
    )

    def best_extra(self) -> dict[str, Any]:
        return {"generation": self.generation}

    def __init__(
        self,
        ops: Any,
        x0: np.ndarray,
        *,
        sigma0: float,
        popsize: int,
        rng_seed: int | np.random.SeedSequence,
        options: dict[str, Any] | None = None,
    ):
        if popsize < 2:
            raise ValueError(f"popsize must be at least 2, got {popsize}")
        if not sigma0 > 0:
            raise ValueError(f"sigma0 must be positive, got {sigma0}")
        self.ops = ops
        self.x0 = np.array(x0, dtype=np.float64).reshape(-1)
        self.sigma0 = float(sigma0)
        self.popsize = int(popsize)
        self.options = dict(options or {})
        self.initial_rng = rng_state(make_rng(rng_seed))
        self.es, self.rng = self._fresh_es()
        self.told: list[list[float]] = []  # f-values told to cma, one row per finished generation
        self.solutions: np.ndarray | None = None  # the current generation's samples
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
            **self.options,
        }
        return cma.CMAEvolutionStrategy(self.x0.copy(), self.sigma0, options), rng

    @property
    def generation(self) -> int:
        """Generations started so far (the current one included)."""
        return len(self.told) + (self.solutions is not None)

    def genome_of(self, sample: np.ndarray) -> Any:
        """The genome evaluated for a `cma` sample."""
        return self.ops.from_array(sample)

    def fvalue(self, sample: np.ndarray, mean_score: float) -> float:
        """What `cma` (a minimizer) is told for a sample whose mean score is `mean_score`."""
        return -mean_score

    def ask(self) -> Candidate | None:
        """The next sample of the current generation (a generation starts when the previous one is all told);
        None while the whole generation is asked and not all told yet."""
        if self.solutions is None:
            self.solutions = np.array(self.es.ask(), dtype=np.float64)
            self.fvalues, self.means = [], []
        asked = self.next_id - len(self.told) * self.popsize  # samples of this generation asked so far
        if asked >= self.popsize:
            return None
        cid, self.next_id = self.next_id, self.next_id + 1
        genome = self.genome_of(self.solutions[asked])
        return Candidate(genome, Lineage(cid, "cma", (), None, None, None))

    def tell(self, candidate: Candidate, scores: np.ndarray) -> None:
        """Tell a sample's scores; samples are told in the order they were asked."""
        if self.solutions is None or len(self.fvalues) >= self.next_id - len(self.told) * self.popsize:
            raise ContractError("tell without ask")
        mean = float(np.mean(scores))
        self.fvalues.append(self.fvalue(self.solutions[len(self.fvalues)], mean))
        self.means.append(mean)
        self.keep_if_best(candidate, scores, mean)
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
        """The CMA-ES state, explicitly: mean, step size, covariance (full) or its scaling (diagonal), evolution
        paths, counters, generator."""
        es = self.es
        covariance = es.sm.C if hasattr(es.sm, "C") else es.sigma_vec.scaling
        return {
            "mean": np.array(es.mean, dtype=np.float64),
            "sigma": float(es.sigma),
            "C": np.asarray(covariance, dtype=np.float64),  # no copy: 2.95 GB at full covariance on digits
            "pc": np.array(es.pc, dtype=np.float64),
            "ps": np.array(es.adapt_sigma.ps, dtype=np.float64),
            "countiter": int(es.countiter),
            "countevals": int(es.countevals),
            "rng": rng_state(self.rng),
        }

    def _settings(self) -> dict[str, Any]:
        return {"name": self.name, "popsize": self.popsize, "sigma0": self.sigma0, "options": self.options}

    def state_dict(self) -> dict[str, Any]:
        to_state = self.ops.to_state
        return {
            "format": STATE_FORMAT,
            "settings": self._settings(),
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
            HfM2n2Error: an older format, other settings, or the replay does not reproduce the stored state.
        """
        if state.get("format") != STATE_FORMAT:
            raise HfM2n2Error(
                f"unsupported {self.name} checkpoint format {state.get('format')!r}: written by an older "
                "hf-m2n2 (whose CMA-ES checkpoints held a pickle, never loaded); start the run again"
            )
        same_x0 = np.array_equal(np.asarray(state["x0"], dtype=np.float64), self.x0)
        if state["settings"] != self._settings() or not same_x0 or state["initial_rng"] != self.initial_rng:
            raise HfM2n2Error(f"the checkpoint was written with other {self.name} settings or another seed")
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


class CMAES(ReplayedCMA):
    """CMA-ES over a dense genome (the digits baseline); `cma` minimizes minus the mean per-example score.

    Args:
        ops: dense-vector genome operations (CMA-ES needs a real vector).
        x0: the initial mean (e.g. a random N(0, 0.01^2) seed).
        popsize: samples per generation.
        sigma0: initial step size.
        diagonal: separable CMA-ES (diagonal covariance).
        rng_seed: seed of the sampling generator.
    """

    name = "cma_es"

    def __init__(
        self,
        ops: Any,
        x0: Any,
        *,
        popsize: int = 20,
        sigma0: float = 0.01,
        diagonal: bool = False,
        rng_seed: int | np.random.SeedSequence = 0,
    ):
        super().__init__(
            ops,
            np.asarray(ops.to_state(x0), dtype=np.float64),
            sigma0=sigma0,
            popsize=popsize,
            rng_seed=rng_seed,
            options={"CMA_diagonal": bool(diagonal)},
        )

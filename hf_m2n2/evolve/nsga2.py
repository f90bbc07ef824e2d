"""NSGA-II (pymoo) as a one-candidate-at-a-time ask/tell strategy over a bounded vector genome.

Multi-objective: one objective per example group (`groups`, one id 0..G-1 per score-vector entry), the mean
score of that group's examples, maximized (pymoo minimizes: it is told their negatives). pymoo's own NSGA-II does
the work (random sampling, SBX crossover, polynomial mutation, duplicate elimination, rank-and-crowding
survival); this class asks it a generation, hands the samples out one by one, and tells it the generation once
all of it is scored. The archive is the Pareto front of everything evaluated (not only pymoo's population), one member per distinct
objective vector (the first evaluated).

Randomness: pymoo 0.6.2 draws every number from `algorithm.random_state`, a `numpy.random.Generator` that
`setup` makes with `default_rng(seed)`; it never touches numpy's global generator. We replace that generator,
right after `setup`, with a PCG64 generator from `rng_seed`.

Checkpoints hold no pickle: pymoo's state is a deterministic function of its settings, its generator's initial
state and the objective values it was told, so the checkpoint stores each told generation's X and F and
`load_state_dict` replays them into a fresh algorithm through pymoo's public ask/tell API, checking that every
replayed ask gives the stored samples and that the resulting population and generator match the stored ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hf_m2n2.errors import ContractError, HfM2n2Error
from hf_m2n2.evolve.strategy import Candidate, Lineage, Member, make_rng, restore_rng, rng_state

STATE_FORMAT = 1
_EMPTY_ASKS = 20  # pymoo asks retried when duplicate elimination leaves no offspring (a collapsed population)


def _dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether objectives `a` Pareto-dominate `b` (maximized: no worse anywhere, better somewhere)."""
    return bool(np.all(a >= b) and np.any(a > b))


class NSGA2:
    """pymoo's NSGA-II over a bounded float vector genome, one objective per example group.

    Args:
        ops: genome operations with `from_array` (a vector in [lower, upper] to a genome) and
            `to_state`/`from_state`.
        groups: per-example group ids 0..G-1 (shape (n,), every id present): G objectives.
        lower: lower bounds (shape (ops.size,)).
        upper: upper bounds (shape (ops.size,)), above `lower` everywhere.
        popsize: individuals per generation (>= 2).
        x0: optional first individual of the initial population (within the bounds).
        rng_seed: seed of pymoo's generator (an int or a `numpy.random.SeedSequence`).
        objective_names: optional names of the G objectives (default `group_0`, ...).

    Raises:
        ValueError: bad sizes, bounds, x0, groups or names.
    """

    name = "nsga2"
    told_in_order = (
        True  # the loop tells a generation's samples in ask order whatever the executor's ordering
    )

    def __init__(
        self,
        ops: Any,
        groups: np.ndarray,
        *,
        lower: Any,
        upper: Any,
        popsize: int,
        x0: Any = None,
        rng_seed: int | np.random.SeedSequence = 0,
        objective_names: list[str] | None = None,
    ):
        n = int(ops.size)
        if not popsize >= 2:
            raise ValueError(f"popsize must be at least 2, got {popsize}")
        for what, value in (("lower", lower), ("upper", upper), ("x0", x0)):
            if value is not None and np.shape(value) not in ((), (n,)):
                raise ValueError(f"{what} must be a number or a vector of the genome's {n} values")
        lower, upper = (np.array(np.broadcast_to(b, n), dtype=np.float64) for b in (lower, upper))
        if not np.all(lower < upper):
            raise ValueError("lower must be below upper everywhere")
        groups = np.asarray(groups)
        integers = np.issubdtype(groups.dtype, np.integer)
        if groups.ndim != 1 or not groups.size or not integers or groups.min() < 0:
            raise ValueError("groups must be a non-empty 1-D integer array of ids 0..G-1")
        self.n_groups = int(groups.max()) + 1
        counts = np.bincount(groups, minlength=self.n_groups)
        if not np.all(counts > 0):
            raise ValueError(f"every group id in 0..{self.n_groups - 1} needs at least one example")
        names = list(objective_names) if objective_names is not None else None
        if names is not None and len(names) != self.n_groups:
            raise ValueError(f"objective_names must name the {self.n_groups} groups, got {len(names)} names")
        self.x0 = None if x0 is None else np.array(np.broadcast_to(x0, n), dtype=np.float64)
        if self.x0 is not None and not np.all((lower <= self.x0) & (self.x0 <= upper)):
            raise ValueError("x0 must lie within [lower, upper]")
        self.ops, self.lower, self.upper, self.popsize = ops, lower, upper, int(popsize)
        self.groups, self.counts = groups.astype(np.int64), counts
        self.objective_names = names or [f"group_{g}" for g in range(self.n_groups)]
        self.initial_rng = rng_state(make_rng(rng_seed))
        self.algorithm = self._fresh_algorithm()
        self.told: list[tuple[np.ndarray, np.ndarray]] = []  # (X, F) of every finished generation
        self.pop: Any = None  # pymoo's Population of the current generation (None between generations)
        self.fvalues: list[np.ndarray] = []  # F rows of the current generation told so far
        self.means: list[float] = []
        self.last_means: list[float] = []
        self.next_id = 0
        self.gen_start = 0  # id of the current generation's first sample
        self.archive: list[Member] = []  # the Pareto front of everything evaluated, in tell order

    def _fresh_algorithm(self) -> Any:
        from pymoo.algorithms.moo.nsga2 import NSGA2 as PymooNSGA2
        from pymoo.core.problem import Problem
        from pymoo.core.termination import NoTermination
        from pymoo.operators.sampling.rnd import FloatRandomSampling

        x0 = self.x0

        class Sampling(FloatRandomSampling):  # pymoo's random sampling, x0 first when given
            def _do(self, problem, n_samples, *args, random_state=None, **kwargs):
                rest = super()._do(problem, n_samples - (x0 is not None), random_state=random_state)
                return rest if x0 is None else np.vstack([x0[None], rest])

        problem = Problem(n_var=self.lower.size, n_obj=self.n_groups, xl=self.lower, xu=self.upper)
        algorithm = PymooNSGA2(pop_size=self.popsize, sampling=Sampling(), output=None)
        algorithm.setup(problem, termination=NoTermination())
        algorithm.random_state = restore_rng(self.initial_rng)  # every pymoo draw comes from it
        return algorithm

    def _pymoo_ask(self) -> Any:
        for _ in range(_EMPTY_ASKS):
            pop = self.algorithm.ask()
            if pop is not None and len(pop):
                return pop
            self.algorithm.termination.force_termination = False  # pymoo gives up on an empty mating
        raise HfM2n2Error(
            "NSGA-II could produce no new offspring: its population has collapsed to duplicates"
        )

    def _pymoo_tell(self, pop: Any, F: np.ndarray) -> None:
        from pymoo.core.evaluator import Evaluator
        from pymoo.problems.static import StaticProblem

        Evaluator().eval(StaticProblem(self.algorithm.problem, F=F), pop)
        self.algorithm.tell(infills=pop)

    def objectives(self, scores: np.ndarray) -> np.ndarray:
        """The per-group mean scores (shape (G,)) of a per-example score vector."""
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != self.groups.shape:
            raise ValueError(f"scores must have shape {self.groups.shape}, got {scores.shape}")
        return np.bincount(self.groups, weights=scores, minlength=self.n_groups) / self.counts

    def ask(self) -> Candidate | None:
        """The next sample of the current generation (a generation starts when the previous one is all told);
        None while the whole generation is asked and not all told yet."""
        if self.pop is None:
            self.pop, self.fvalues, self.means, self.gen_start = self._pymoo_ask(), [], [], self.next_id
        asked = self.next_id - self.gen_start
        if asked >= len(self.pop):
            return None
        cid, self.next_id = self.next_id, self.next_id + 1
        x = np.array(self.pop[asked].X, dtype=np.float64)
        return Candidate(self.ops.from_array(x), Lineage(cid, "nsga2", (), None, None, None))

    def tell(self, candidate: Candidate, scores: np.ndarray) -> None:
        """Tell a sample's per-example scores, in ask order; the last of a generation tells pymoo.

        Raises:
            ContractError: a candidate told out of order or never asked.
        """
        expected = self.gen_start + len(self.fvalues)
        if self.pop is None or expected >= self.next_id or candidate.lineage.id != expected:
            raise ContractError(f"nsga2 told candidate {candidate.lineage.id} out of ask order")
        objectives = self.objectives(scores)
        self.fvalues.append(-objectives)
        self.means.append(float(np.mean(scores)))
        scores = np.array(scores, dtype=np.float64)
        self._add_to_front(Member(candidate.genome, scores, candidate.lineage, {"objectives": objectives}))
        if len(self.fvalues) == len(self.pop):
            F = np.array(self.fvalues, dtype=np.float64)
            self.told.append((np.array(self.pop.get("X"), dtype=np.float64), F))
            self._pymoo_tell(self.pop, F)
            self.last_means, self.pop = list(self.means), None

    def _add_to_front(self, member: Member) -> None:
        """Keep `member` unless an earlier one dominates it or has the same objectives (a front of distinct trade-offs:
        exact-match fitnesses often tie); remove those it dominates."""
        new = member.extra["objectives"]
        if any(
            _dominates(m.extra["objectives"], new) or np.array_equal(m.extra["objectives"], new)
            for m in self.archive
        ):
            return
        self.archive = [m for m in self.archive if not _dominates(new, m.extra["objectives"])] + [member]

    def front(self) -> list[Member]:
        """The Pareto front of everything evaluated, by objective 0 descending then id; `extra` holds
        `objectives` (the group means, a list) and `front_index` (the position in this list)."""
        order = sorted(self.archive, key=lambda m: (-m.extra["objectives"][0], m.lineage.id))
        extras = [
            {"objectives": m.extra["objectives"].tolist(), "front_index": i} for i, m in enumerate(order)
        ]
        return [Member(m.genome, m.scores, m.lineage, extra) for m, extra in zip(order, extras, strict=True)]

    def members(self) -> list[Member]:
        return self.front()

    def best(self) -> Member | None:
        """The front member with the best mean score (of equals, the first asked); also the best evaluated."""
        front = self.front()
        return max(front, key=lambda m: (m.mean_score, -m.lineage.id)) if front else None

    def stats(self) -> dict[str, float]:
        best = self.best()
        last = self.last_means or self.means or [0.0]
        return {"best": 0.0 if best is None else best.mean_score, "mean": float(np.mean(last))}

    def _settings(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "popsize": self.popsize,
            "lower": self.lower.tolist(),
            "upper": self.upper.tolist(),
            "x0": None if self.x0 is None else self.x0.tolist(),
            "groups": self.groups.tolist(),
            "objective_names": list(self.objective_names),
        }

    def _pymoo_state(self) -> dict[str, Any]:
        pop = self.algorithm.pop
        X, F = (None, None) if pop is None else (np.array(pop.get("X")), np.array(pop.get("F")))
        return {"X": X, "F": F, "rng": rng_state(self.algorithm.random_state)}

    def state_dict(self) -> dict[str, Any]:
        to_state = self.ops.to_state
        return {
            "format": STATE_FORMAT,
            "settings": self._settings(),
            "initial_rng": self.initial_rng,
            "told": [{"X": X, "F": F} for X, F in self.told],
            "current": None if self.pop is None else np.array(self.pop.get("X"), dtype=np.float64),
            "fvalues": [f.tolist() for f in self.fvalues],
            "means": list(self.means),
            "last_means": list(self.last_means),
            "next_id": self.next_id,
            "gen_start": self.gen_start,
            "front": [
                {"genome": to_state(m.genome), "scores": m.scores, "lineage": m.lineage.to_dict()}
                for m in self.archive
            ],
            "pymoo": self._pymoo_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild pymoo's NSGA-II by replaying the told generations into a fresh algorithm.

        Raises:
            HfM2n2Error: another format, other settings or seed, or the replay does not reproduce the state.
        """
        if state.get("format") != STATE_FORMAT:
            raise HfM2n2Error(f"unsupported nsga2 checkpoint format {state.get('format')!r}")
        if state["settings"] != self._settings() or state["initial_rng"] != self.initial_rng:
            raise HfM2n2Error("the checkpoint was written with other nsga2 settings or another seed")
        self.algorithm = self._fresh_algorithm()
        self.told, self.pop = [], None
        for generation in state["told"]:
            X, F = (np.asarray(generation[k], dtype=np.float64) for k in ("X", "F"))
            pop = self._replayed_ask(X, "a told generation")
            self._pymoo_tell(pop, F)
            self.told.append((X, F))
        if state["current"] is not None:
            self.pop = self._replayed_ask(
                np.asarray(state["current"], dtype=np.float64), "the current generation"
            )
        now, saved = self._pymoo_state(), state["pymoo"]
        for key in ("X", "F"):
            if (now[key] is None) != (saved[key] is None) or (
                now[key] is not None and not np.array_equal(now[key], np.asarray(saved[key]))
            ):
                raise HfM2n2Error(f"{_DIVERGED} (population {key})")
        if now["rng"] != saved["rng"]:
            raise HfM2n2Error(f"{_DIVERGED} (generator state)")
        self.fvalues = [np.asarray(f, dtype=np.float64) for f in state["fvalues"]]
        self.means = [float(m) for m in state["means"]]
        self.last_means = [float(m) for m in state["last_means"]]
        self.next_id, self.gen_start = int(state["next_id"]), int(state["gen_start"])
        self.archive = []
        for m in state["front"]:
            scores, genome = np.asarray(m["scores"], dtype=np.float64), self.ops.from_state(m["genome"])
            extra = {"objectives": self.objectives(scores)}
            self.archive.append(Member(genome, scores, Lineage.from_dict(m["lineage"]), extra))

    def _replayed_ask(self, X: np.ndarray, what: str) -> Any:
        pop = self._pymoo_ask()
        if not np.array_equal(np.asarray(pop.get("X"), dtype=np.float64), X):
            raise HfM2n2Error(f"{_DIVERGED} (samples of {what})")
        return pop


_DIVERGED = (
    "replaying the checkpoint's NSGA-II generations did not reproduce its state (was it written with another "
    "version of pymoo?)"
)

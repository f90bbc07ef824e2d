"""Dense genomes: one flat float32 vector per candidate (small models evolved from scratch, e.g. the digits MLP).

Strategies see genomes only through `GenomeOps` (`hf_m2n2.genomes.base`): split-point SLERP crossover, Gaussian
mutation, random initialisation, the flattened size N (split points are positions in [0, N], N meaning "no
split"), and conversion to/from checkpoint arrays.

M2N2's crossover is, per segment, `child = a * x + b * y` where the scalars (a, b) come from the SLERP formula
with t = w before the split point and 1 - w after it, and the angle from inner products of the parents
(`slerp_coefficients`). The angle is measured over the two full vectors (`slerp_scope="global"`, the reference
code) or separately over each segment (`"segment"`, the paper). `DenseVectorOps` implements this on one flat
float32 numpy vector; a Blend genome implements the same contract from Gram prefix sums.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from hf_m2n2.blend import slerp_coefficients  # the one M2N2 SLERP rule, shared with Blend genomes
from hf_m2n2.errors import SpecError
from hf_m2n2.evaluate.python import check_callable_reference, resolve_callable
from hf_m2n2.genomes.base import GenomeKind, GenomeRun, SlerpScope
from hf_m2n2.spec import StrictModel

DEFAULT_MUTATION_STD = 0.01
DENSE_ALGORITHMS = ("m2n2", "ga", "cma_es", "map_elites", "sweep")


class RandomSeeds(StrictModel):
    """`count` initial vectors drawn from N(0, std^2) with the run's seed (from-scratch runs)."""

    kind: Literal["random"]
    count: int = Field(2, ge=1)
    std: float = Field(0.01, gt=0)


class PythonSeeds(StrictModel):
    """Initial vectors returned by a Python function `callable(**kwargs) -> list of 1-D arrays`."""

    kind: Literal["python"]
    callable: str
    kwargs: dict[str, Any] = Field(default_factory=dict)

    _callable = field_validator("callable")(check_callable_reference)


SeedsConfig = Annotated[RandomSeeds | PythonSeeds, Field(discriminator="kind")]


class DenseGenomeConfig(StrictModel):
    """A genome that is one flat float32 vector (models evolved from scratch, e.g. the digits MLP).

    Attributes:
        size: number of parameters N.
        seeds: where the initial genomes come from.
        slerp_scope: SLERP angle from the full vectors (`global`, reference code) or per segment (`segment`).
    """

    kind: Literal["dense"] = "dense"
    size: int = Field(gt=0)
    seeds: SeedsConfig = RandomSeeds(kind="random")
    slerp_scope: Literal["global", "segment"] = "global"


class DenseVectorOps:
    """GenomeOps over one flat float32 numpy vector of `size` parameters (models evolved from scratch).

    Genomes are never modified in place; `DenseTarget` hands the evaluator a torch view of the vector.

    Args:
        size: number of parameters.
        slerp_scope: `global` (one angle from the full vectors, the reference code) or `segment` (one angle per
            segment, the paper).

    Example:
        >>> ops = DenseVectorOps(4)
        >>> x, y = np.array([1, 0, 0, 0], np.float32), np.array([0, 1, 0, 0], np.float32)
        >>> ops.crossover(x, y, 0.5, 4).round(4)  # no split: t = 0.5 everywhere, a = b = sin(pi/4) / sin(pi/2)
        array([0.7071, 0.7071, 0.    , 0.    ], dtype=float32)
    """

    kind = "dense"

    def __init__(self, size: int, slerp_scope: SlerpScope = "global"):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        if slerp_scope not in ("global", "segment"):
            raise ValueError(f"slerp_scope must be 'global' or 'segment', got {slerp_scope!r}")
        self._size = size
        self.slerp_scope: SlerpScope = slerp_scope
        # torch draws normals ~2.5x faster than numpy; reseeded from the caller's rng at every use: no state
        self._generator = torch.Generator()

    @property
    def size(self) -> int:
        return self._size

    def crossover(self, x: np.ndarray, y: np.ndarray, w: float, split: int) -> np.ndarray:
        """Split-point SLERP of x and y (see the module docstring).

        Args:
            x: first parent.
            y: second parent.
            w: mixing ratio in [0, 1].
            split: split point in [0, N]; N means no split (t = w everywhere).

        Returns:
            A new vector.
        """
        if not 0 <= split <= self._size:
            raise ValueError(f"split point {split} outside [0, {self._size}]")
        out = np.empty_like(x)
        whole = None
        if self.slerp_scope == "global":
            whole = (float(x @ x), float(y @ y), float(x @ y))
        for lo, hi, t in ((0, split, w), (split, self._size, 1.0 - w)):
            if hi <= lo:
                continue
            xs, ys, segment = x[lo:hi], y[lo:hi], out[lo:hi]
            a, b = slerp_coefficients(t, *(whole or (float(xs @ xs), float(ys @ ys), float(xs @ ys))))
            np.multiply(xs, np.float32(a), out=segment)
            segment += np.float32(b) * ys
        return out

    def mutate(self, x: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
        noise = self._normal(rng)
        noise *= np.float32(std)
        noise += x
        return noise

    def random(self, std: float, rng: np.random.Generator) -> np.ndarray:
        noise = self._normal(rng)
        noise *= np.float32(std)
        return noise

    def _normal(self, rng: np.random.Generator) -> np.ndarray:
        self._generator.manual_seed(int(rng.integers(2**63)))
        return torch.randn(self._size, generator=self._generator).numpy()

    def to_state(self, x: np.ndarray) -> np.ndarray:
        return x

    def from_state(self, state: Any) -> np.ndarray:
        return self.from_array(state)

    def from_array(self, values: Any) -> np.ndarray:
        """A genome from any array-like of `size` numbers (seed vectors, CMA-ES samples, torch tensors).

        Raises:
            ValueError: wrong length or non-finite values.
        """
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().numpy()
        vector = np.array(values, dtype=np.float32).reshape(-1)
        if vector.size != self._size:
            raise ValueError(f"expected {self._size} values, got {vector.size}")
        if not np.isfinite(vector).all():
            raise ValueError("the vector has non-finite values")
        return vector


class DenseTarget:
    """The dense genome's target: the evaluator receives the vector itself, as a float32 torch tensor."""

    def write(self, genome: np.ndarray) -> torch.Tensor:
        """A float32 torch tensor sharing the genome's memory (the evaluator must not modify it)."""
        return torch.from_numpy(genome)


def initial_vectors(genome: DenseGenomeConfig, ops: DenseVectorOps, rng: np.random.Generator) -> list[Any]:
    """The initial genomes: random N(0, std^2) vectors from `rng`, or the vectors a Python function returns.

    Raises:
        SpecError: the function fails or returns vectors of the wrong size (naming `genome.seeds`).
    """
    seeds = genome.seeds
    if isinstance(seeds, RandomSeeds):
        return [ops.random(seeds.std, rng) for _ in range(seeds.count)]
    fn = resolve_callable(seeds.callable, "genome.seeds.callable")
    try:
        vectors = list(fn(**seeds.kwargs))
    except Exception as exc:
        raise SpecError(
            "genome.seeds.callable", f"{seeds.callable} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not vectors:
        raise SpecError("genome.seeds.callable", f"{seeds.callable} returned no seeds")
    try:
        return [ops.from_array(v) for v in vectors]
    except ValueError as exc:
        raise SpecError("genome.seeds.callable", f"{seeds.callable} returned a bad seed: {exc}") from None


class DenseKind(GenomeKind):
    """`genome: {kind: dense, ...}`: from-scratch vectors, every algorithm but evomerge_ps, no `models:`."""

    name = "dense"
    config = DenseGenomeConfig
    algorithms = DENSE_ALGORITHMS
    uses_models = False

    def check(self, spec: Any) -> None:
        seeds = spec.genome.seeds
        if spec.evolve.algorithm == "sweep" and isinstance(seeds, RandomSeeds) and seeds.count != 2:
            raise SpecError("genome.seeds.count", "the sweep needs exactly two seeds")

    def preflight(self, spec: Any, spec_dir: Path | None, resolve: bool = True) -> None:
        seeds = spec.genome.seeds
        if isinstance(seeds, PythonSeeds):
            resolve_callable(seeds.callable, "genome.seeds.callable")

    def build(
        self, spec: Any, rng: np.random.Generator, run_dir: Path, spec_dir: Path | None, live: bool = True
    ) -> GenomeRun:
        ops = DenseVectorOps(spec.genome.size, spec.genome.slerp_scope)
        initial = initial_vectors(spec.genome, ops, rng)
        return GenomeRun(ops, DenseTarget(), initial, mutation_std=self.mutation_std(spec))

    @staticmethod
    def mutation_std(spec: Any) -> float:
        """`evolve.mutation_std`, or 0.01 for from-scratch runs (random seeds) and 0 otherwise (the reference)."""
        if spec.evolve.mutation_std is not None:
            return spec.evolve.mutation_std
        return DEFAULT_MUTATION_STD if isinstance(spec.genome.seeds, RandomSeeds) else 0.0

"""Route genomes: Evolutionary Model Merge in data-flow space (Akiba et al., 2025), evolved by `evomerge_dfs`.

The seeds' transformer layers are laid out in order (model A's, then B's, ...: M layers in all) and repeated r
times: T = M x r slots. A genome is the paper's two arrays, flattened into one vector:
- the indicator I in R^T: slot k is on when I_k > 0, and visits layer k mod M;
- the scaling matrix W in R^{M x M} (row-major, left out with `scales: false`): W_ij multiplies the hidden state
  handed from layer i to layer j.
The path always starts with A's first layer (slot 0 is on whatever I_0 says) and ends with A's last (appended when
the last slot on is another layer); the first hop's input is A's embedding, unscaled. Model A gives the tokenizer,
embeddings, final norm and head. The initial genome turns A's first repetition on and everything else off, with
W = 1: the routed model is then model A, bit for bit.

A candidate is a routed forward over the seeds' resident layers (`hf_m2n2.models.routed`): nothing is copied per
candidate. The export stores the layers the best path uses, the path and the scales, with the modeling code
(`trust_remote_code=True` to load); when every scale on the path is 1, `merge_config.yaml` next to it is the same
model as a plain passthrough frankenmerge (`hf-m2n2 merge merge_config.yaml OUT`, no remote code).

Example (`examples/specialists/compare/evomerge_dfs.yaml`):

```yaml
models:
  - model: ../build/add      # model A: tokenizer, embeddings, head, first and last layer
  - model: ../build/rev
genome: {kind: route, repeats: 3}
evolve: {algorithm: evomerge_dfs, budget: 60, evomerge_dfs: {popsize: 12}}
```
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from hf_m2n2.errors import HfM2n2Error
from hf_m2n2.evaluate.base import EvaluationContext
from hf_m2n2.genomes.base import GenomeKind, GenomeRun, check_distinct_seeds
from hf_m2n2.genomes.method import SeedPick
from hf_m2n2.route_recipe import (
    ROUTE_RECIPE,
    RouteRecipe,
    rebuild_route,
    route_notes,
    upstream_recipes,
    write_route,
)
from hf_m2n2.spec import StrictModel

DFS_PAPER = (
    "Evolutionary Optimization of Model Merging Recipes (https://arxiv.org/abs/2403.13187), data-flow space"
)
INDICATOR_BOUNDS = (-1.0, 1.0)
SCALE_BOUNDS = (0.0, 2.0)


class RouteGenomeConfig(StrictModel):
    """`genome: {kind: route, ...}`: a path through the seeds' layers with a scale per hop.

    Attributes:
        repeats: r, how many times the seeds' layers are laid out (T = M x r slots; the paper used 3).
        scales: evolve the scaling matrix W (false: W = 1, the paper's ablation; the result is then always a
            plain passthrough frankenmerge too).
        dtype: dtype of the live model and of the exported weights.
        device: where the live model lives.
    """

    kind: Literal["route"]
    repeats: int = Field(3, ge=1)
    scales: bool = True
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"


@dataclass(frozen=True)
class RouteLayout:
    """The slots and the genome's layout: `layers[k]` layers of seed k, `repeats` repetitions, W or not."""

    layers: tuple[int, ...]
    repeats: int
    scales: bool = True

    @property
    def num_layers(self) -> int:
        """M: the seeds' layers in all."""
        return sum(self.layers)

    @property
    def slots(self) -> int:
        """T = M x r."""
        return self.num_layers * self.repeats

    @property
    def scale_count(self) -> int:
        """M x M when W evolves, else 0."""
        return self.num_layers**2 if self.scales else 0

    @property
    def size(self) -> int:
        """T, plus W's entries."""
        return self.slots + self.scale_count

    @property
    def last(self) -> int:
        """A's last layer (a stored-layer index)."""
        return self.layers[0] - 1

    def stored(self, index: int) -> tuple[int, int]:
        """(seed, layer) of stored layer `index` in 0..M-1."""
        for seed, count in enumerate(self.layers):
            if index < count:
                return seed, index
            index -= count
        raise IndexError(index)

    def initial(self) -> np.ndarray:
        """A's first repetition on, everything else off (indicator 1 / -1), W = 1."""
        indicator = np.full(self.slots, -1.0)
        indicator[: self.layers[0]] = 1.0
        return np.concatenate([indicator, np.ones(self.scale_count)])

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Box bounds for searches that need them (NSGA-II): indicators in [-1, 1], scales in [0, 2]."""
        lower = np.concatenate(
            [np.full(self.slots, INDICATOR_BOUNDS[0]), np.full(self.scale_count, SCALE_BOUNDS[0])]
        )
        upper = np.concatenate(
            [np.full(self.slots, INDICATOR_BOUNDS[1]), np.full(self.scale_count, SCALE_BOUNDS[1])]
        )
        return lower, upper

    def decode(self, x: np.ndarray) -> tuple[list[int], list[float]]:
        """The path (stored-layer indices) and the scale of each hop of genome x."""
        m = self.num_layers
        indicator = x[: self.slots]
        path = [0] + [k % m for k in range(1, self.slots) if indicator[k] > 0]
        if path[-1] != self.last:
            path.append(self.last)
        if not self.scales:
            return path, [1.0] * len(path)
        w = x[self.slots :].reshape(m, m)
        return path, [1.0] + [float(w[i, j]) for i, j in zip(path[:-1], path[1:])]


class RouteOps:
    """GenomeOps over route genomes (float64 vectors: the indicator, then W); evolved by CMA-ES or NSGA-II.

    Args:
        layout: the slots and the genome's layout.
        num_seeds: the seeds (`seed_genomes` has one `SeedPick` each).
    """

    kind = "route"
    slerp_scope = None

    def __init__(self, layout: RouteLayout, num_seeds: int):
        self.layout = layout
        self.num_seeds = num_seeds

    @property
    def size(self) -> int:
        return self.layout.size

    def from_array(self, values: Any) -> np.ndarray:
        """A genome from `size` finite numbers.

        Raises:
            ValueError: wrong length or non-finite values.
        """
        x = np.array(values, dtype=np.float64).reshape(-1)
        if x.size != self.size:
            raise ValueError(f"expected {self.size} values, got {x.size}")
        if not np.isfinite(x).all():
            raise ValueError("route genome values must be finite")
        return x

    def initial_array(self) -> np.ndarray:
        return self.layout.initial()

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.layout.bounds()

    def decode(self, x: np.ndarray) -> tuple[list[int], list[float]]:
        return self.layout.decode(x)

    def to_state(self, x: Any) -> Any:
        return x

    def from_state(self, state: Any) -> np.ndarray:
        return self.from_array(state)

    def crossover(self, x: Any, y: Any, w: float, split: int) -> Any:
        raise HfM2n2Error("route genomes are evolved by evomerge_dfs or nsga2, not by crossover")

    def mutate(self, x: Any, std: float, rng: np.random.Generator) -> Any:
        raise HfM2n2Error("route genomes are evolved by evomerge_dfs or nsga2, not by mutation")

    def random(self, std: float, rng: np.random.Generator) -> Any:
        raise HfM2n2Error("route genomes start from model A's own path, not from random vectors")

    def hash(self, x: Any) -> str:
        """The recipe hash: of the decoded path and scales (two genomes routing alike are scored once)."""
        if isinstance(x, SeedPick):
            return f"seed-{x.index}"
        path, scales = self.decode(x)
        data = json.dumps([path, [float(s).hex() for s in scales]]).encode()
        return hashlib.sha256(data).hexdigest()[:20]

    def seed_genomes(self) -> list[SeedPick]:
        return [SeedPick(k) for k in range(self.num_seeds)]


class RouteTarget:
    """Sets a candidate's path and scales on the live routed model; a seed pick is that seed itself (model A is
    its own path; another seed is loaded whole, once, for the held-out report)."""

    def __init__(self, ops: RouteOps, live: Any, seeds: list[Any], trust_remote_code: bool = False):
        self.ops = ops
        self.live = live
        self.seeds = seeds
        self.trust_remote_code = trust_remote_code
        self._others: dict[int, Any] = {}

    def write(self, x: Any) -> Any:
        if isinstance(x, SeedPick):
            if x.index == 0:
                n = self.ops.layout.layers[0]
                return self.live.route(list(range(n)), [1.0] * n)
            if x.index not in self._others:
                from hf_m2n2.models import model_kind

                seed = self.seeds[x.index]
                self._others[x.index] = model_kind(seed.kind).live_target(
                    seed,
                    dtype=self.live.dtype,
                    device=str(self.live.device),
                    trust_remote_code=self.trust_remote_code,
                )
            return self._others[x.index].model
        return self.live.route(*self.ops.decode(x))


def route_of(layout: RouteLayout, x: np.ndarray) -> tuple[list[list[int]], list[int], list[float]]:
    """The stored layers (as [seed, layer], in seed then layer order) a genome's path uses, its path over them,
    and its scales."""
    path, scales = layout.decode(x)
    used = sorted(set(path))
    index = {layer: i for i, layer in enumerate(used)}
    return [list(layout.stored(i)) for i in used], [index[p] for p in path], scales


class RouteKind(GenomeKind):
    """`genome: {kind: route, ...}`: evomerge_dfs (or nsga2) over paths through the seeds' layers; exported as a
    routed model with its modeling code and `route.json`."""

    name = "route"
    config = RouteGenomeConfig
    algorithms = ("evomerge_dfs", "nsga2")
    uses_models = True

    def check(self, spec: Any) -> None:
        check_distinct_seeds(spec)

    def preflight(self, spec: Any, spec_dir: Path | None, resolve: bool = True) -> None:
        if resolve:
            from hf_m2n2.seeds import close_seeds

            close_seeds(self._open(spec, spec_dir)[0])

    def _open(self, spec: Any, spec_dir: Path | None) -> tuple[list[Any], RouteLayout]:
        from hf_m2n2.models.routed import check_layer_shapes, check_routable
        from hf_m2n2.seeds import close_seeds, open_seeds

        seeds = open_seeds(spec.seed_refs(), base_dir=spec_dir, trust_remote_code=spec.trust_remote_code)
        try:
            check_routable(seeds)
            check_layer_shapes(seeds)
        except BaseException:
            close_seeds(seeds)
            raise
        genome: RouteGenomeConfig = spec.genome
        return seeds, RouteLayout(tuple(s.num_layers for s in seeds), genome.repeats, genome.scales)

    def build(
        self, spec: Any, rng: np.random.Generator, run_dir: Path, spec_dir: Path | None, live: bool = True
    ) -> GenomeRun:
        """Open the seeds (checked to chain), build the live routed model (unless `live` is False) and the ops."""
        from hf_m2n2.models.routed import RoutedLive
        from hf_m2n2.plan import torch_dtype

        genome: RouteGenomeConfig = spec.genome
        seeds, layout = self._open(spec, spec_dir)
        ops = RouteOps(layout, len(seeds))
        if not live:
            return GenomeRun(ops, None, [], seeds=seeds, cache_scores=True)
        routed = RoutedLive(seeds, torch_dtype(genome.dtype), genome.device)
        context = EvaluationContext.of_seed(
            routed.model, seeds[0], spec_dir, genome.device, spec.trust_remote_code
        )
        target = RouteTarget(ops, routed, seeds, spec.trust_remote_code)
        return GenomeRun(ops, target, [], context=context, seeds=seeds, cache_scores=True)

    def export(self, run: GenomeRun, spec: Any, outcome: Any, model_dir: Path) -> None:
        """`model_dir`: the routed model of the best genome, `route.json`, the seeds' own recipes (PS+DFS), the
        passthrough spec when every scale is 1, the lineage card and the fitness plot (all or nothing)."""
        from hf_m2n2.blend_ops import seed_record

        genome: RouteGenomeConfig = spec.genome
        layout: RouteLayout = run.ops.layout
        stored, path, scales = route_of(layout, outcome.best.genome)
        recipe = RouteRecipe(
            seeds=[seed_record(s) for s in run.seeds],
            layers=list(layout.layers),
            repeats=layout.repeats,
            scales=layout.scales,
            dtype=genome.dtype,
            genome=[float(v) for v in outcome.best.genome],
            stored=stored,
            path=path,
            hop_scales=scales,
            upstream=upstream_recipes(run.seeds),
        )

        def card(out: Path) -> None:
            outcome.write_card(
                out,
                recipe_file=ROUTE_RECIPE,
                rebuild_command=f"hf-m2n2 rebuild {ROUTE_RECIPE} OUT_DIR",
                paper=DFS_PAPER,
                notes=route_notes(recipe, run.seeds),
                custom_code=True,
            )

        write_route(recipe, run.seeds, model_dir, overwrite=True, extras=card)

    def export_again(
        self, model_dir: Path, out_dir: Path, overwrite: bool, *, trust_remote_code: bool = False
    ) -> Path | None:  # the seeds' tensors are read, no seed code runs
        from hf_m2n2.card import copy_card

        if not (model_dir / ROUTE_RECIPE).is_file():
            return None
        return rebuild_route(
            model_dir / ROUTE_RECIPE,
            out_dir,
            overwrite=overwrite,
            extras=lambda out: copy_card(model_dir, out),
        )

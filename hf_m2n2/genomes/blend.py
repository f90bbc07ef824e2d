"""Blend genomes (M2N2 over pretrained seeds): piecewise-constant seed coefficients over the flattened tensors.

The seeds are the spec's `models:`; one live model holds the candidate being scored; the best Blend is exported
as a safetensors directory with its `recipe.json`, from which `hf-m2n2 rebuild` makes the same bytes again.

Example (`examples/specialists/spec.yaml`):

```yaml
models:
  - model: build/add
  - model: build/rev
genome: {kind: blend, block_size: 4096, slerp_scope: global}
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from hf_m2n2.errors import SpecError
from hf_m2n2.evaluate.base import EvaluationContext
from hf_m2n2.genomes.base import GenomeKind, GenomeRun, check_distinct_seeds
from hf_m2n2.spec import StrictModel

RECIPE = "recipe.json"


class BlendGenomeConfig(StrictModel):
    """The `genome:` section of a model evolution: Blend genomes over the seeds, and the live model.

    Attributes:
        block_size: elements per block (granularity of split points and Gram sums).
        slerp_scope: SLERP angle from the full vectors (`global`, reference), per segment (`segment`, paper) or
            per tensor (`tensor`).
        include, exclude: glob patterns of the tensors that evolve; the others come from `fixed_from`. Without
            `include`, the seeds' model kind decides: every tensor of a causal LM, a pipeline's denoiser (`unet/*`).
        fixed_from: the seed (as written in `models`) whose config, tokenizer and non-evolved tensors are used.
        dtype: dtype of the live model and of the blending arithmetic (and of the exported weights).
        device: where the live model and the resident seeds live (`cpu`, `cuda`, ...).
        resident: keep the seeds' evolved tensors in memory on `device` (else read them per candidate).
        device_map, max_memory, offload_folder: accelerate dispatch of the live model (CPU/disk offload).
    """

    kind: Literal["blend"] = "blend"
    block_size: int = Field(65536, ge=1)
    slerp_scope: Literal["global", "segment", "tensor"] = "global"
    include: list[str] | None = None
    exclude: list[str] = Field(default_factory=list)
    fixed_from: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    resident: bool = True
    device_map: str | dict[str, Any] | None = None
    max_memory: dict[str, int | str] | None = None
    offload_folder: str | None = None


class BlendKind(GenomeKind):
    """`genome: {kind: blend, ...}`: M2N2 and its baselines over pretrained seeds, exported with a recipe."""

    name = "blend"
    config = BlendGenomeConfig
    algorithms = ("m2n2", "ga", "map_elites", "sweep")
    uses_models = True

    def check(self, spec: Any) -> None:
        if spec.evolve.mutation_std:
            raise SpecError("evolve.mutation_std", "Blend genomes of pretrained seeds are not mutated")
        if spec.evolve.algorithm == "sweep" and len(spec.models) != 2:
            raise SpecError("models", "the sweep needs exactly two seeds")
        check_distinct_seeds(spec)
        if spec.genome.fixed_from is not None and spec.genome.fixed_from not in spec.seed_refs():
            raise SpecError("genome.fixed_from", f"{spec.genome.fixed_from!r} is not one of the models")

    def preflight(self, spec: Any, spec_dir: Path | None, resolve: bool = True) -> None:
        if resolve:
            seeds = self._open(spec, spec_dir)[0]
            for seed in seeds:
                seed.checkpoint.close()

    def _open(self, spec: Any, spec_dir: Path | None) -> tuple[list[Any], int, list[str], Any]:
        """The opened seeds, the fixed seed's index, the evolved tensor names and their layout (checked to fit)."""
        from hf_m2n2.blend import select_tensors
        from hf_m2n2.blend_ops import evolved_layout
        from hf_m2n2.models import model_kind
        from hf_m2n2.seeds import close_seeds, open_seeds

        refs = spec.seed_refs()
        seeds = open_seeds(refs, base_dir=spec_dir, trust_remote_code=spec.trust_remote_code)
        genome = spec.genome
        fixed = refs.index(genome.fixed_from) if genome.fixed_from else 0
        kind = model_kind(seeds[fixed].kind)
        try:
            kind.check_reference(
                seeds[fixed], "genome.fixed_from", "fix a seed that has them (genome.fixed_from)"
            )
            floating = [
                n
                for n in seeds[fixed].checkpoint.names
                if seeds[fixed].checkpoint.info(n).dtype.is_floating_point
            ]
            include = genome.include if genome.include is not None else kind.default_evolved(seeds[fixed])
            names = select_tensors(floating, include, genome.exclude)
            if not names:
                raise SpecError("genome.include", "no tensor matches the include/exclude patterns")
            return seeds, fixed, names, evolved_layout(seeds, names, genome.block_size)
        except BaseException:
            close_seeds(seeds)
            raise

    def build(
        self, spec: Any, rng: np.random.Generator, run_dir: Path, spec_dir: Path | None, live: bool = True
    ) -> GenomeRun:
        """Open the seeds, build the live model (unless `live` is False), the Gram sums (cached in the run
        directory) and the ops."""
        from hf_m2n2.blend_ops import BlendOps, BlendTarget, SeedTensors, seed_gram
        from hf_m2n2.models import model_kind
        from hf_m2n2.plan import torch_dtype

        seeds, fixed, names, layout = self._open(spec, spec_dir)
        genome = spec.genome
        dtype = torch_dtype(genome.dtype)
        export = {"fixed": fixed, "tensors": names}
        if not live:  # the Gram sums stream the seeds from disk; no live model, nothing resident
            gram = seed_gram(layout, SeedTensors(seeds, names, dtype, "cpu", False), run_dir / "gram.npz")
            ops = BlendOps(layout, gram, len(seeds), genome.slerp_scope)
            return GenomeRun(
                ops, None, ops.seed_genomes(), seeds=seeds, cache_scores=True, timed=True, export=export
            )
        offload = None
        if genome.offload_folder is not None:
            offload = Path(genome.offload_folder)
            offload = offload if offload.is_absolute() else run_dir / offload
        live = model_kind(seeds[fixed].kind).live_target(
            seeds[fixed],
            dtype=dtype,
            device=genome.device,
            device_map=genome.device_map,
            max_memory=genome.max_memory,
            offload_folder=offload,
            trust_remote_code=spec.trust_remote_code,
        )
        tensors = SeedTensors(
            seeds, names, dtype, live.device if genome.device_map is None else "cpu", genome.resident
        )
        gram = seed_gram(layout, tensors, run_dir / "gram.npz")
        ops = BlendOps(layout, gram, len(seeds), genome.slerp_scope)
        context = EvaluationContext.of_seed(
            live.model, seeds[fixed], spec_dir, genome.device, spec.trust_remote_code, evolved=tuple(names)
        )
        return GenomeRun(
            ops,
            BlendTarget(layout, tensors, live),
            ops.seed_genomes(),
            context=context,
            seeds=seeds,
            cache_scores=True,
            timed=True,
            export=export,
        )

    def export(self, run: GenomeRun, spec: Any, outcome: Any, model_dir: Path) -> None:
        """Stream the best Blend into `model_dir` with its recipe, card and plot (all or nothing)."""
        from hf_m2n2.blend_ops import BlendRecipe, export_blend, seed_record

        genome = spec.genome
        recipe = BlendRecipe(
            [seed_record(s) for s in run.seeds],
            run.export["tensors"],
            genome.block_size,
            run.export["fixed"],
            genome.dtype,
            outcome.best.genome,
            outcome.lineage,
        )
        export_blend(
            recipe,
            run.seeds,
            model_dir,
            overwrite=True,
            write_card=lambda tmp: outcome.write_card(
                tmp, recipe_file=RECIPE, fixed=run.export["fixed"], evolved=run.export["tensors"]
            ),
        )

    def export_again(
        self, model_dir: Path, out_dir: Path, overwrite: bool, *, trust_remote_code: bool = False
    ) -> Path | None:  # a rebuild reads tensors only: no seed code to trust
        from hf_m2n2.blend_ops import BlendRecipe, rebuild
        from hf_m2n2.card import copy_card

        if not (model_dir / RECIPE).is_file():
            return None
        BlendRecipe.load(model_dir / RECIPE)
        return rebuild(
            model_dir / RECIPE, out_dir, overwrite=overwrite, write_card=lambda tmp: copy_card(model_dir, tmp)
        )

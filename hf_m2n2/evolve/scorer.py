"""What scores candidates in one process: the genome kind's parts with the live target, the evaluator, and the
local executor around them. The local executor is this; each Ray worker builds the same (`ray_executor`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from hf_m2n2.evaluate import build_evaluator
from hf_m2n2.evolve.executor import LocalExecutor
from hf_m2n2.evolve.strategy import make_rng
from hf_m2n2.genomes.base import GenomeRun


def build_scorer(
    spec: Any, seed: int, run_dir: Path, spec_dir: Path | None, evaluation_dir: Path | None
) -> tuple[GenomeRun, LocalExecutor]:
    """The genome kind's parts with the live target, and a local executor scoring candidates in this process.

    Args:
        spec: the validated evolve spec.
        seed: the run's seed.
        run_dir: where the kind caches what it computes once (Gram sums).
        spec_dir: the spec's folder.
        evaluation_dir: the evaluators' run directory (previews), None for none.
    """
    seeds_stream, _ = np.random.SeedSequence(seed).spawn(2)
    genome = spec.kind.build(spec, make_rng(seeds_stream), run_dir, spec_dir)
    evaluator = build_evaluator(spec.evaluate, replace(genome.context, run_dir=evaluation_dir))
    executor = LocalExecutor(
        genome.ops, genome.target, evaluator, cache_scores=genome.cache_scores, timed=genome.timed
    )
    return genome, executor


def local_executor(spec: Any, seed: int, run_dir: Path | None, spec_dir: Path | None):
    """The local executor's builder (`executor: {kind: local}`): everything in this process."""
    return build_scorer(spec, seed, run_dir or Path("."), spec_dir, evaluation_dir=run_dir)

"""Evolution of genomes with M2N2 and its baselines (ask/tell strategies), the run loop and run directories.

Public interface:
- genomes: `GenomeOps` (protocol), `DenseVectorOps`, `slerp_coefficients`;
- strategies: `Strategy` (protocol), `Candidate`, `Lineage`, `Member`, `M2N2`/`M2N2Config`, `CMAES`,
  `MapElites`, `Sweep`, built from a spec by `build_run`/`build_strategy`;
- competition: `competition_weights`, `fitness`, `attraction`;
- loop: `run_loop`, `LoopSettings`, `load_archive`; run directories: `start_runs`, `resume_runs`;
- spec sections: `EvolveSpec`, `EvolveConfig`, `DenseGenomeConfig`, `PythonEvaluateConfig`, `load_evolve_spec`.
"""

from hf_m2n2.evolve.build import RunParts, build_run, build_strategy
from hf_m2n2.evolve.competition import attraction, competition_weights, fitness
from hf_m2n2.evolve.config import (
    DenseGenomeConfig,
    EvolveConfig,
    EvolveSpec,
    PythonEvaluateConfig,
    load_evolve_spec,
    parse_evolve_spec,
)
from hf_m2n2.evolve.genome import DenseVectorOps, GenomeOps, slerp_coefficients
from hf_m2n2.evolve.loop import LoopSettings, load_archive, run_loop
from hf_m2n2.evolve.m2n2 import M2N2, M2N2Config
from hf_m2n2.evolve.runs import resume_runs, start_runs
from hf_m2n2.evolve.strategy import Candidate, Lineage, Member, Strategy

__all__ = [
    "M2N2",
    "Candidate",
    "DenseGenomeConfig",
    "DenseVectorOps",
    "EvolveConfig",
    "EvolveSpec",
    "GenomeOps",
    "Lineage",
    "LoopSettings",
    "M2N2Config",
    "Member",
    "PythonEvaluateConfig",
    "RunParts",
    "Strategy",
    "attraction",
    "build_run",
    "build_strategy",
    "competition_weights",
    "fitness",
    "load_archive",
    "load_evolve_spec",
    "parse_evolve_spec",
    "resume_runs",
    "run_loop",
    "slerp_coefficients",
    "start_runs",
]

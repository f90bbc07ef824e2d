"""Evolution of genomes with M2N2 and its baselines (ask/tell strategies), the run loop and run directories.

Public interface (imported on first use, so that importing a submodule stays cheap):
- strategies: `Strategy` (protocol), `Candidate`, `Lineage`, `Member`, `M2N2`/`M2N2Config`, built from a spec by
  `build_run`/`build_strategy`;
- competition: `competition_weights`, `fitness`, `attraction`;
- executor and loop: `LocalExecutor`, `run_loop`, `LoopSettings`, `load_archive`; run directories: `start_runs`,
  `resume_runs`;
- the spec: `EvolveSpec`, `EvolveConfig`, `load_evolve_spec`, `parse_evolve_spec`.
Genome kinds (dense vectors, Blends, method genomes) are `hf_m2n2.genomes`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RunParts": "build",
    "build_run": "build",
    "build_strategy": "build",
    "attraction": "competition",
    "competition_weights": "competition",
    "fitness": "competition",
    "EvolveConfig": "config",
    "LocalExecutor": "executor",
    "LoopSettings": "loop",
    "load_archive": "loop",
    "run_loop": "loop",
    "M2N2": "m2n2",
    "M2N2Config": "m2n2",
    "resume_runs": "runs",
    "start_runs": "runs",
    "EvolveSpec": "spec",
    "load_evolve_spec": "spec",
    "parse_evolve_spec": "spec",
    "Candidate": "strategy",
    "Lineage": "strategy",
    "Member": "strategy",
    "Strategy": "strategy",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


__all__ = sorted(_EXPORTS)

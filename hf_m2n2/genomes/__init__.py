"""Genome kinds, one registry: what a run evolves (see `hf_m2n2.genomes.base`).

Registered here, one line each: `dense` (vectors evolved from scratch), `blend` (M2N2 over pretrained seeds),
`method` (evomerge_ps over merge-method parameters), `route` (evomerge_dfs over paths through the seeds'
layers). The first kind without `models:` (dense) and the first with them (blend) are the defaults of a `genome:`
section without `kind:`.
"""

from hf_m2n2.genomes.base import (
    GenomeKind,
    GenomeOps,
    GenomeRun,
    SlerpScope,
    Target,
    check_algorithm,
    default_genome_kind,
    genome_kind,
    genome_kinds,
    register_genome_kind,
)
from hf_m2n2.genomes.blend import BlendGenomeConfig, BlendKind
from hf_m2n2.genomes.dense import DenseGenomeConfig, DenseKind, DenseVectorOps
from hf_m2n2.genomes.method import MethodGenomeConfig, MethodKind
from hf_m2n2.genomes.route import RouteGenomeConfig, RouteKind

register_genome_kind(DenseKind())
register_genome_kind(BlendKind())
register_genome_kind(MethodKind())
register_genome_kind(RouteKind())

__all__ = [
    "BlendGenomeConfig",
    "DenseGenomeConfig",
    "DenseVectorOps",
    "GenomeKind",
    "GenomeOps",
    "GenomeRun",
    "MethodGenomeConfig",
    "RouteGenomeConfig",
    "SlerpScope",
    "Target",
    "check_algorithm",
    "default_genome_kind",
    "genome_kind",
    "genome_kinds",
    "register_genome_kind",
]

"""Model kinds, one registry: what a seed is and what a live target is (see `hf_m2n2.models.base`).

Registered here, one line each: `pipeline` (a diffusers text-to-image pipeline folder or single file) and
`routed` (an exported data-flow merge, recognized so that it is refused as a seed) and `causal_lm` (a Hugging Face
causal LM directory, one resident model).
"""

from hf_m2n2.models.base import (
    LiveTarget,
    ModelKind,
    kind_of_directory,
    model_kind,
    model_kinds,
    register_model_kind,
)
from hf_m2n2.models.causal_lm import CausalLMKind
from hf_m2n2.models.pipeline import PipelineKind
from hf_m2n2.models.routed import RoutedKind

register_model_kind(PipelineKind())  # before causal_lm, which takes any directory that is not a pipeline
register_model_kind(RoutedKind())  # an exported routed model: refused as a seed with one line
register_model_kind(CausalLMKind())

__all__ = [
    "CausalLMKind",
    "LiveTarget",
    "ModelKind",
    "PipelineKind",
    "RoutedKind",
    "kind_of_directory",
    "model_kind",
    "model_kinds",
    "register_model_kind",
]

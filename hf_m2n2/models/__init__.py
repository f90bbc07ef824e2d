"""Model kinds, one registry: what a seed is and what a live target is (see `hf_m2n2.models.base`).

Registered here, one line each: `causal_lm` (a Hugging Face causal LM directory, one resident model).
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

register_model_kind(CausalLMKind())

__all__ = [
    "CausalLMKind",
    "LiveTarget",
    "ModelKind",
    "kind_of_directory",
    "model_kind",
    "model_kinds",
    "register_model_kind",
]

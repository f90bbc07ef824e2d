"""Multi-SLERP: a weighted barycentre of several models (or task vectors) on the hypersphere.

Whole-tensor: the norms, the spherical mean and the tangent vectors are taken over each whole flattened tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hf_m2n2.errors import MethodParameterError
from hf_m2n2.methods._common import RandomStream, per_model
from hf_m2n2.methods.base import REQUIRED, MergeMethod, Param, Scalar, register


def multislerp(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params: Mapping[str, Scalar],
    model_params: Sequence[Mapping[str, Scalar]],
    stream: RandomStream | None,
) -> torch.Tensor:
    """Project the (task) vectors onto the unit sphere, take their weighted mean direction m, map the weighted
    mean of their tangent components at m back with the exponential map, and scale by the weighted mean norm.

    One input is returned as is. In the inputs' dtype, as mergekit computes it. When the weighted mean of the
    unit vectors is ~0 (e.g. v and -v with equal weights), two inputs are interpolated linearly; more raise
    MethodParameterError.
    """
    if len(tensors) == 1:
        return tensors[0]
    eps = float(params["eps"])
    stacked = torch.stack(list(tensors))
    if base is not None:
        stacked -= base
    flat = stacked.reshape(len(tensors), -1)
    weights = torch.tensor(per_model(model_params, "weight"), dtype=flat.dtype, device=flat.device)
    if params["normalize_weights"]:
        weights = weights / weights.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(tensors) != 2:
            raise MethodParameterError(
                "multislerp: the weighted mean of the models' directions is zero (opposite models with "
                "balancing weights); change the weights"
            )
        out = (stacked[0] * weights[0] + stacked[1] * weights[1]).reshape(tensors[0].shape)
        return out if base is None else out + base
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * weights.view(-1, 1)).sum(0)
    angle = torch.linalg.vector_norm(tangent) + eps
    out = mean * torch.cos(angle) + tangent * (torch.sin(angle) / angle)
    out = (out * (norms.squeeze(-1) * weights).sum()).reshape(tensors[0].shape)
    return out if base is None else out + base


register(
    MergeMethod(
        name="multislerp",
        fn=multislerp,
        params=(
            Param("weight", REQUIRED, per_model=True),
            Param("normalize_weights", True, kind="bool"),
            Param("eps", 1e-8),
        ),
        uses_base="optional",
        min_models=1,
        paper="Multi-SLERP (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea)",
        description=(
            "Spherical weighted average of any number of models (with a base, of their task vectors added back "
            "to the base): tangent-space mean at the weighted mean direction, scaled by the weighted mean norm."
        ),
    )
)

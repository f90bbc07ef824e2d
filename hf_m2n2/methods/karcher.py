"""Karcher mean: the Riemannian barycentre of the models' directions on the unit sphere, scaled by their mean norm.

Whole-tensor and iterative: every step takes dot products over the whole flattened tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hf_m2n2.methods._common import RandomStream, wide_dtype
from hf_m2n2.methods.base import MergeMethod, Param, Scalar, register


def karcher_mean(tensors: Sequence[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """Equal-weight Karcher mean of the unit directions (fixed-point iteration from their normalized average,
    at most `max_iter` steps, stopping when the tangent step's norm falls below `tol`), times the mean norm.

    Norms are taken in float32 (float64 for float64); the directions and iterates stay in the inputs' dtype, as
    in mergekit. Inputs of norm <= tol count in the mean norm but not in the direction.
    """
    if len(tensors) == 1:
        return tensors[0]
    alpha = 1.0 / len(tensors)
    work = wide_dtype(tensors[0].dtype)
    norms = [torch.linalg.vector_norm(x.to(work)) for x in tensors]
    valid = [(x / n).to(x.dtype) for x, n in zip(tensors, norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    share = alpha / sum(
        [alpha] * len(valid)
    )  # the equal weights renormalized over the valid inputs (as summed)
    mean = torch.zeros_like(valid[0])
    for unit in valid:
        mean += share * unit
    mean_norm = torch.linalg.vector_norm(mean.to(work))
    mean = valid[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for unit in valid:
            dot = torch.dot(mean.flatten(), unit.flatten()).clamp(-1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += share * (theta / torch.sin(theta)) * (unit - dot * mean)
        step = torch.linalg.vector_norm(tangent.to(work))
        if step.item() < tol:
            break
        mean = (torch.cos(step) * mean + torch.sin(step) * (tangent / step)).to(mean.dtype)
        length = torch.linalg.vector_norm(mean.to(work))
        if length.item() > tol:
            mean = (mean / length).to(mean.dtype)
    return sum(alpha * n for n in norms) * mean


def karcher(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params: Mapping[str, Scalar],
    model_params: Sequence[Mapping[str, Scalar]],
    stream: RandomStream | None,
) -> torch.Tensor:
    """The Karcher mean of the models, returned in their dtype."""
    return karcher_mean(tensors, int(params["max_iter"]), float(params["tol"])).to(tensors[0].dtype)


register(
    MergeMethod(
        name="karcher",
        fn=karcher,
        params=(Param("max_iter", 10, kind="int"), Param("tol", 1e-5)),
        uses_base="never",
        min_models=1,
        paper="Functionality-Oriented LLM Merging on the Fisher-Rao Manifold (https://arxiv.org/abs/2603.04972)",
        description=(
            "Riemannian (Karcher) mean of the models' directions on the unit sphere, iterated up to max_iter "
            "times (tolerance tol), scaled by the models' mean norm."
        ),
    )
)

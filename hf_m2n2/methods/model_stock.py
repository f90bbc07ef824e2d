"""Model Stock: interpolate between the base and the models' average by the angle between task vectors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hf_m2n2.methods._common import RandomStream
from hf_m2n2.methods.base import MergeMethod, Param, Scalar, register

_NORM_EPS = 1e-6
_SINGULAR_EPS = 1e-6


def _mean_cosine(offsets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean pairwise cosine of the offsets along the last dim, keepdim'd."""
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=_NORM_EPS)).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0).unsqueeze(-1)


def model_stock(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params: Mapping[str, Scalar],
    model_params: Sequence[Mapping[str, Scalar]],
    stream: RandomStream | None,
) -> torch.Tensor:
    """t * mean(models) + (1 - t) * base, with t = N cos / (1 + (N - 1) cos).

    cos is the mean pairwise cosine of the task vectors, over the whole tensor or, with `filter_wise`, per
    row (last dim). Where 1 + (N - 1) cos ~ 0 the base is kept (t = 0).
    """
    if base is None:
        raise ValueError("model_stock needs a base tensor")
    shape = base.shape
    if params["filter_wise"]:
        views = [x.unsqueeze(0) if x.dim() == 1 else x for x in (base, *tensors)]
    else:
        views = [x.reshape(-1) for x in (base, *tensors)]
    w0, models = views[0], views[1:]
    cos = _mean_cosine([x - w0 for x in models])
    count = len(models)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < _SINGULAR_EPS
    t = torch.where(singular, 0, count * cos / torch.where(singular, 1, denominator))
    average = models[0].clone()
    for x in models[1:]:
        average.add_(x)
    out = average.div_(count).mul_(t)
    return out.add_((1 - t) * w0).reshape(shape)


register(
    MergeMethod(
        name="model_stock",
        fn=model_stock,
        params=(Param("filter_wise", False, kind="bool"),),
        uses_base="required",
        min_models=2,
        paper="Model Stock: All we need is just a few fine-tuned models (https://arxiv.org/abs/2403.19522)",
        description=(
            "Moves from the base toward the models' average by a ratio set by the angle between their task "
            "vectors (per tensor, or per row with filter_wise)."
        ),
    )
)

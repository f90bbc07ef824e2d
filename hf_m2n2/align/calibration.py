"""Calibration: running statistics of the models' concatenated features per space, over unlabeled data.

For each space, the N models' features are stacked (model 0's units, then model 1's, ...) and every position
counts as one row (a token of a sequence, a pixel of a conv map). The sums and the sums of outer products are kept
in float64; their size is known from the graph alone and checked against a budget before anything is allocated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from hf_m2n2.align.spaces import SpaceGraph
from hf_m2n2.errors import HfM2n2Error


class FeatureStats:
    """Running count, sum and sum of outer products of (rows x d) feature batches, float64."""

    def __init__(self, d: int):
        self.count = 0
        self.sum = np.zeros(d)
        self.outer = np.zeros((d, d))

    def update(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64)
        self.count += rows.shape[0]
        self.sum += rows.sum(axis=0)
        self.outer += rows.T @ rows

    def means(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    def covariance(self) -> np.ndarray:
        """The population covariance (divided by the count)."""
        mean = self.means()
        return self.outer / max(self.count, 1) - np.outer(mean, mean)

    def correlation(self, eps: float = 1e-12) -> np.ndarray:
        """Pearson correlation; a unit of (near) zero variance correlates 0 with the others, 1 with itself."""
        cov = self.covariance()
        std = np.sqrt(np.clip(np.diag(cov), 0, None))
        live = std > np.sqrt(eps)
        denom = np.outer(np.where(live, std, 1.0), np.where(live, std, 1.0))
        corr = np.where(np.outer(live, live), cov / denom, 0.0)
        np.fill_diagonal(corr, 1.0)
        return np.clip(corr, -1.0, 1.0)


def statistics_bytes(graph: SpaceGraph, n_models: int, spaces: Sequence[str] | None = None) -> int:
    """The memory the statistics of `spaces` (default: all with a feature) take: (N n)^2 + N n float64 each."""
    chosen = [s for s in graph.spaces if s.feature is not None and (spaces is None or s.name in spaces)]
    return sum(8 * ((n_models * s.size) ** 2 + n_models * s.size) for s in chosen)


def _rows(value: torch.Tensor, module: torch.nn.Module) -> np.ndarray:
    """A feature tensor as (positions x units): conv maps have their units on axis 1, everything else last."""
    value = value.detach().to(torch.float64)
    if isinstance(module, torch.nn.Conv2d) or (value.dim() == 4 and not isinstance(module, torch.nn.Linear)):
        value = value.movedim(1, -1)
    return value.reshape(-1, value.shape[-1]).numpy()


def collect(
    models: Sequence[torch.nn.Module],
    graph: SpaceGraph,
    batches: Iterable[Any],
    *,
    forward: Callable[[torch.nn.Module, Any], Any] | None = None,
    spaces: Sequence[str] | None = None,
    budget_bytes: int = 4 * 1024**3,
) -> dict[str, FeatureStats]:
    """Run every batch through every model and gather each space's statistics from its feature hook.

    Args:
        models: the N models (same architecture).
        graph: their spaces; `feature` is `"<module>:input"` (that module's first positional input).
        batches: unlabeled inputs (images, token ids).
        forward: how a model is run on a batch (default `model(batch)`).
        spaces: the spaces to gather (default: all with a feature).
        budget_bytes: refuse before allocating when the statistics would take more.

    Raises:
        HfM2n2Error: over budget (with the size), or a batch the models cannot run (naming its index).
    """
    size = statistics_bytes(graph, len(models), spaces)
    if size > budget_bytes:
        raise HfM2n2Error(
            f"the calibration statistics would take {size / 2**20:.1f} MiB, over the budget of "
            f"{budget_bytes / 2**20:.1f} MiB: calibrate fewer spaces or raise the budget"
        )
    chosen = [s for s in graph.spaces if s.feature is not None and (spaces is None or s.name in spaces)]
    stats = {s.name: FeatureStats(len(models) * s.size) for s in chosen}
    seen: dict[tuple[int, str], np.ndarray] = {}
    run = forward or (lambda model, batch: model(batch))
    with contextlib.ExitStack() as hooks:
        for k, model in enumerate(models):
            named = dict(model.named_modules())
            for space in chosen:
                module_name = space.feature.removesuffix(":input")
                if module_name not in named:
                    raise HfM2n2Error(f"space {space.name!r}: the model has no module {module_name!r}")
                module = named[module_name]

                def hook(mod, args, k=k, name=space.name, module=module):
                    seen[(k, name)] = _rows(args[0], module)

                hooks.callback(module.register_forward_pre_hook(hook).remove)
        with torch.no_grad():
            for index, batch in enumerate(batches):
                seen.clear()
                for model in models:
                    try:
                        run(model, batch)
                    except Exception as exc:  # a batch that does not fit the model: one line, naming it
                        raise HfM2n2Error(
                            f"calibration batch {index} does not fit the model: {exc}"
                        ) from None
                for space in chosen:
                    parts = [seen[(k, space.name)] for k in range(len(models))]
                    stats[space.name].update(np.concatenate(parts, axis=1))
    return stats

"""Where units may be permuted or merged, as data: spaces of units and the tensor axes that carry them.

A space is a set of interchangeable units (an MLP's hidden neurons, a conv's channels, a decoder layer's FFN
intermediate units, attention heads, the residual stream): permuting its units consistently in every tensor
that produces them (`out`: weight rows, biases, norm scales and shifts, BatchNorm statistics) and every tensor
that consumes them (`in`: weight columns) leaves the model's function unchanged. Merging N models unit by unit
is then linear algebra per space: a merge matrix M (k x N*n) maps the N models' stacked units to k merged
units, an unmerge matrix U (N*n x k) maps them back; a weight W_i of model i with output space S_o and input
space S_i becomes sum_i M_o[:, i] W_i U_i[i, :] (ZipIt!'s `M_out W U_in`). Axes that belong to no space (a
classifier's classes, an embedding's vocabulary) are shared: the models' tensors are averaged along them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class Use:
    """One tensor axis whose entries are a space's units.

    Attributes:
        tensor: the state-dict key.
        axis: the axis (Linear weight: 0 = outputs, 1 = inputs; Conv2d weight: 0 = out channels, 1 = in channels).
        role: `out` when the tensor produces the units (weight rows, bias, norm scale/shift, BatchNorm running
            statistics), `in` when it consumes them (weight columns).
    """

    tensor: str
    axis: int
    role: Literal["out", "in"]


@dataclass(frozen=True)
class Space:
    """A set of interchangeable units.

    Attributes:
        name: unique within its graph (e.g. `layers.3.mlp`, `fc1`, `layer1.0.residual`).
        size: the number of units n (the axis length divided by `unit`).
        uses: every tensor axis that carries the units.
        unit: entries per unit along each use's axis (1; an attention head: head_dim; a kv group under GQA).
        feature: the module whose forward output carries the units, for calibration (its last axis for
            Linear-like outputs, axis 1 for conv feature maps), or None when the units are not observable there.
        depth: the layer the space belongs to (0 = first), for partial zips (merge the spaces of depth < L).
    """

    name: str
    size: int
    uses: tuple[Use, ...]
    unit: int = 1
    feature: str | None = None
    depth: int = 0


@dataclass
class SpaceGraph:
    """Every space of one architecture (identical for all the models merged).

    Attributes:
        spaces: the spaces, ordered by depth.
        batchnorms: BatchNorm modules whose running statistics are re-estimated on calibration data after merging.
        depth: the number of layers a partial zip may stop after (its stop points are 0..depth).
    """

    spaces: tuple[Space, ...]
    batchnorms: tuple[str, ...] = ()
    depth: int = 0
    _by_axis: dict[tuple[str, int], tuple[Space, Use]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        names = [s.name for s in self.spaces]
        if len(set(names)) != len(names):
            raise ValueError("space names must be unique")
        for space in self.spaces:
            for use in space.uses:
                key = (use.tensor, use.axis)
                if key in self._by_axis:
                    raise ValueError(f"{use.tensor} axis {use.axis} is in two spaces")
                self._by_axis[key] = (space, use)

    def use_of(self, tensor: str, axis: int) -> tuple[Space, Use] | None:
        """The space carried by `tensor`'s `axis` and how the tensor uses it, None when that axis is shared."""
        return self._by_axis.get((tensor, axis))

    def space_of(self, tensor: str, axis: int) -> Space | None:
        """The space carried by `tensor`'s `axis`, None when that axis is shared (no space)."""
        found = self._by_axis.get((tensor, axis))
        return None if found is None else found[0]

    def space(self, name: str) -> Space:
        return next(s for s in self.spaces if s.name == name)


def entries(units: np.ndarray, unit: int) -> np.ndarray:
    """Unit indices as entry indices along an axis where each unit is `unit` consecutive entries."""
    return (np.asarray(units)[:, None] * unit + np.arange(unit)[None, :]).reshape(-1)

"""Carrying permutations and merges through every tensor of a space graph.

`permute_state` reorders one model's units (aligning it to another is exact: its function does not change);
`merge_states` applies one (M, U) pair per space to N models (ZipIt!'s `M_out W U_in`); `validate_graph`
permutes every space at random and checks the outputs stay the same, which catches a wrong graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from hf_m2n2.align.spaces import Space, SpaceGraph, entries
from hf_m2n2.errors import HfM2n2Error

Match = tuple[np.ndarray, np.ndarray]  # (merge M: k x N*n, unmerge U: N*n x k)


def permute_state(
    graph: SpaceGraph, state: Mapping[str, torch.Tensor], perms: Mapping[str, np.ndarray]
) -> dict[str, torch.Tensor]:
    """`state` with the units of each space in `perms` reordered: new unit u is old unit `perms[space][u]`.

    Example:
        >>> aligned = permute_state(graph, state_b, {"fc1": np.array([2, 0, 1])})  # doctest: +SKIP
    """
    out = dict(state)
    for space in graph.spaces:
        perm = perms.get(space.name)
        if perm is None:
            continue
        if sorted(np.asarray(perm).tolist()) != list(range(space.size)):
            raise HfM2n2Error(
                f"the permutation of space {space.name!r} is not a permutation of {space.size} units"
            )
        index = torch.as_tensor(entries(perm, space.unit), dtype=torch.long)
        for use in space.uses:
            out[use.tensor] = out[use.tensor].index_select(use.axis, index)
    return out


def _along(tensor: torch.Tensor, axis: int, matrix: torch.Tensor) -> torch.Tensor:
    """`matrix @ tensor` along `axis` (matrix: new x old entries)."""
    moved = tensor.movedim(axis, 0)
    result = (matrix @ moved.reshape(moved.shape[0], -1)).reshape(matrix.shape[0], *moved.shape[1:])
    return result.movedim(0, axis)


def _blocks(space: Space, match: Match, n_models: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per model i: (M_i, U_i^T) expanded to entries, float64."""
    merge, unmerge = (np.asarray(m, dtype=np.float64) for m in match)
    n = space.size
    if (
        merge.shape[1] != n_models * n
        or unmerge.shape[0] != n_models * n
        or merge.shape[0] != unmerge.shape[1]
    ):
        raise HfM2n2Error(
            f"space {space.name!r}: the match has shapes {merge.shape} / {unmerge.shape}, expected (k, {n_models * n})"
            f" / ({n_models * n}, k)"
        )
    eye = np.eye(space.unit)
    out = []
    for i in range(n_models):
        m_i = np.kron(merge[:, i * n : (i + 1) * n], eye)
        u_i = np.kron(unmerge[i * n : (i + 1) * n, :], eye)
        out.append((torch.from_numpy(m_i), torch.from_numpy(u_i.T.copy())))
    return out


def merge_states(
    graph: SpaceGraph,
    states: Sequence[Mapping[str, torch.Tensor]],
    matches: Mapping[str, Match],
    *,
    spaces: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """One state from N models: along every axis of a merged space, model i's tensor is multiplied by its block of
    M (axes that produce the units) or of U (axes that consume them), and the models are summed; a tensor with no
    producing axis in a merged space is averaged (M's rows already average). Computed in float64, stored in each
    tensor's dtype.

    Args:
        graph: the models' spaces.
        states: the N models' state dicts (same names and shapes).
        matches: (M, U) per space name; a space without one is merged by averaging (the identity match).
        spaces: the spaces to merge (default: all of them).

    Raises:
        HfM2n2Error: the states differ in names or shapes, or a match does not fit its space.
    """
    n_models = len(states)
    names = list(states[0])
    for k, state in enumerate(states[1:], 1):
        if set(state) != set(names):
            raise HfM2n2Error(f"model {k} has other tensors than model 0")
        for name in names:
            if state[name].shape != states[0][name].shape:
                raise HfM2n2Error(
                    f"tensor {name!r} has shape {list(state[name].shape)} in model {k}, "
                    f"{list(states[0][name].shape)} in model 0: the spaces differ in size"
                )
    blocks = _all_blocks(graph, matches, n_models, spaces)
    merged: dict[str, torch.Tensor] = {}
    for name in names:
        first = states[0][name]
        if not first.is_floating_point():
            merged[name] = first.clone()  # counters (BatchNorm's num_batches_tracked): the first model's
            continue
        axes = _merged_axes(graph, name, first.dim(), blocks)
        total = None
        for i, state in enumerate(states):
            tensor = state[name].to(torch.float64)
            for axis, space, role in axes:
                m_i, u_i_t = blocks[space.name][i]
                tensor = _along(tensor, axis, m_i if role == "out" else u_i_t)
            total = tensor if total is None else total + tensor
        produces = any(role == "out" for _, _, role in axes)
        merged[name] = (total if produces else total / n_models).to(first.dtype)
    return merged


def _all_blocks(
    graph: SpaceGraph, matches: Mapping[str, Match], n_models: int, spaces: Sequence[str] | None
) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each merged space's per-model (M_i, U_i^T); a space without a match is merged by averaging."""
    from hf_m2n2.align.matchers import identity

    chosen = {s.name for s in graph.spaces} if spaces is None else set(spaces)
    return {
        s.name: _blocks(
            s, matches[s.name] if s.name in matches else identity(s.size, n_models).pair(), n_models
        )
        for s in graph.spaces
        if s.name in chosen
    }


def _merged_axes(
    graph: SpaceGraph, name: str, ndim: int, blocks: Mapping[str, Any]
) -> list[tuple[int, Space, str]]:
    """(axis, space, role) of each axis of tensor `name` whose space is merged."""
    found = [(axis, graph.use_of(name, axis)) for axis in range(ndim)]
    return [(axis, use[0], use[1].role) for axis, use in found if use is not None and use[0].name in blocks]


def partial_zip(
    graph: SpaceGraph,
    states: Sequence[Mapping[str, torch.Tensor]],
    matches: Mapping[str, Match],
    stop: int,
) -> list[dict[str, torch.Tensor]]:
    """ZipIt!'s partial zip: the spaces of depth < `stop` merged into a shared trunk, the rest left to each model,
    whose first layers after the trunk take the merged units through their unmerge (U_i folded into the tensors
    that consume a merged space). Returns N ordinary checkpoints of the original architecture; their trunk tensors
    are the same objects (byte-identical when saved). `stop` 0 gives back the N models (the ensemble); `stop` >=
    the graph's depth gives N copies of the full merge (`merge_states`).
    """
    if stop >= graph.depth:
        full = merge_states(graph, states, matches)
        return [dict(full) for _ in states]
    merged = [s.name for s in graph.spaces if s.depth < stop]
    trunk = merge_states(graph, states, matches, spaces=merged) if merged else {}
    blocks = _all_blocks(graph, matches, len(states), merged)
    out = []
    for i, state in enumerate(states):
        own: dict[str, torch.Tensor] = {}
        for name, tensor in state.items():
            axes = _merged_axes(graph, name, tensor.dim(), blocks)
            if any(role == "out" for _, _, role in axes):
                for axis in range(tensor.dim()):
                    space = graph.space_of(name, axis)
                    if space is not None and space.name not in blocks:
                        raise HfM2n2Error(
                            f"stop {stop} cuts through {name}: it writes a merged space but reads {space.name!r}, "
                            "which stays each model's own (a residual stream); choose another stop"
                        )
                own[name] = trunk[name]
                continue
            folded = tensor.to(torch.float64) if axes else tensor
            for axis, space, _ in axes:
                folded = _along(folded, axis, blocks[space.name][i][1])
            own[name] = folded.to(tensor.dtype) if axes else tensor
        out.append(own)
    return out


def validate_graph(
    model: torch.nn.Module,
    graph: SpaceGraph,
    run: Callable[[torch.nn.Module], torch.Tensor],
    *,
    seed: int = 0,
    rtol: float = 1e-4,
) -> None:
    """Permute every space of `model` at random, one space at a time, and check `run(model)` is unchanged.

    Raises:
        HfM2n2Error: naming the first space whose permutation changes the outputs (the graph is wrong there).
    """
    import copy

    rng = np.random.default_rng(seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = run(model)
        probe = copy.deepcopy(model)
        for space in graph.spaces:
            perm = rng.permutation(space.size)
            if space.size > 1 and np.array_equal(
                perm, np.arange(space.size)
            ):  # the identity would prove nothing
                perm = np.roll(perm, 1)
            probe.load_state_dict(permute_state(graph, state, {space.name: perm}))
            got = run(probe)
            scale = float(expected.abs().max()) or 1.0
            if not torch.allclose(got, expected, rtol=0, atol=rtol * scale):
                raise HfM2n2Error(
                    f"permuting space {space.name!r} changes the model's outputs: the space graph is wrong there"
                )


def as_numpy_state(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A state dict as float64 numpy arrays (for the data-free matchers)."""
    return {k: v.detach().to(torch.float64).numpy() for k, v in state.items() if v.is_floating_point()}

"""Tell whether a TIES output differs from mergekit's only where a magnitude ties with the selection cut-off.

TIES keeps the `density` fraction of each task vector's elements with the largest magnitudes. When several
elements share the magnitude at the cut-off (common with 16-bit checkpoints, whose deltas take few distinct
values), which of them are kept is an implementation detail: mergekit's full sort and hf-m2n2's partial
selection may keep different ones. The README states this difference; this check confirms that a difference is
of that kind and nothing else. Written for the bench (no library resolves mergekit parameters for us).

SCE keeps the `select_topk` fraction of positions with the largest variance across the task vectors; ties at
that cut-off are kept in index order here and by `torch.topk`'s choice in mergekit, and the choice moves SCE's
whole-tensor energy weights: `sce_differs_only_at_variance_ties` reproduces mergekit's tensor from topk's choice.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

LAYER = re.compile(r"\.layers\.(\d+)\.")


def _load(directory: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            if name in handle.keys():  # noqa: SIM118 (safe_open handles are not containers)
                return handle.get_tensor(name)
    raise KeyError(f"{name} not in {directory}")


def _num_layers(directory: Path) -> int:
    import json

    return int(json.loads((directory / "config.json").read_text())["num_hidden_layers"])


def _at(value: Any, t: float) -> float:
    """A scalar, or a gradient (anchors spread evenly over t in [0, 1]) evaluated at t."""
    if not isinstance(value, list):
        return float(value)
    if len(value) == 1:
        return float(value[0])
    position = t * (len(value) - 1)
    low = min(int(position), len(value) - 2)
    frac = position - low
    return float(value[low]) * (1 - frac) + float(value[low + 1]) * frac


def _setting(value: Any, tensor: str, t: float) -> float | None:
    """A parameter value for one tensor: scalar, gradient, or a list of {filter, value} (first match wins)."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        for rule in value:
            if rule.get("filter") in (None, "*") or rule["filter"] in tensor:
                return _at(rule["value"], t)
        return None
    return _at(value, t)


def density_for(config: dict[str, Any], model: dict[str, Any], tensor: str, t: float) -> float:
    for source in (model.get("parameters") or {}, config.get("parameters") or {}):
        if "density" in source:
            found = _setting(source["density"], tensor, t)
            if found is not None:
                return found
    return 1.0


def differs_only_at_ties(config: dict[str, Any], differing: dict[str, torch.Tensor]) -> bool:
    """Whether every differing element (masks per tensor name) sits where some model's delta magnitude equals
    its cut-off. `config` is the rendered `ties` config (local paths); tensors outside the layers take t = 0,
    as mergekit evaluates them."""
    if config.get("merge_method") != "ties" or "models" not in config or not differing:
        return False
    base = Path(config["base_model"])
    models = [m for m in config["models"] if Path(m["model"]) != base]
    layers = _num_layers(base)
    dtype = getattr(torch, config.get("dtype") or "float32")
    for name, mask in differing.items():
        match = LAYER.search(name)
        t = int(match.group(1)) / max(1, layers - 1) if match else 0.0
        base_tensor = _load(base, name).to(dtype)
        tied = torch.zeros_like(mask)
        for model in models:
            density = density_for(config, model, name, t)
            if density >= 1:
                continue
            magnitude = (_load(Path(model["model"]), name).to(dtype) - base_tensor).abs().float()
            keep = int(density * magnitude.numel())
            if keep < 1:
                continue
            cut = magnitude.reshape(-1).kthvalue(magnitude.numel() - keep + 1).values
            tied |= magnitude == cut
        if bool((mask & ~tied).any()):
            return False
    return True


def _global_setting(config: dict[str, Any], key: str, tensor: str, t: float, default: float) -> float:
    found = _setting((config.get("parameters") or {}).get(key, default), tensor, t)
    return default if found is None else found


def _topk_selection(variance: torch.Tensor, k: int) -> torch.Tensor:
    """The positions `torch.topk` returns for the k largest variances (what mergekit 0.1.5's sce keeps)."""
    mask = torch.zeros(variance.numel(), dtype=variance.dtype)
    mask[torch.topk(variance.reshape(-1), k=k, largest=True).indices] = 1
    return mask.reshape(variance.shape)


def sce_differs_only_at_variance_ties(
    config: dict[str, Any], ref_dir: Path, differing: dict[str, torch.Tensor]
) -> bool:
    """Whether each differing tensor of an `sce` output is explained by which tied variances are kept.

    Keeping another position among those whose variance equals the cut-off changes SCE's energy weights, hence
    elements far from the tied ones: a per-element check (as for TIES) cannot tell. So, per differing tensor,
    recompute the variances in the config's dtype and check that (1) our selection and torch.topk's (mergekit's)
    keep the same count and differ only at positions whose variance equals the cut-off, and (2) SCE's remaining
    steps (hf-m2n2's `merge_selected`) applied with torch.topk's selection give mergekit's tensor bit for bit."""
    from hf_m2n2.methods.sce import merge_selected, select_by_variance

    if config.get("merge_method") != "sce" or "models" not in config or not differing:
        return False
    base_dir = Path(config["base_model"])
    models = [Path(m["model"]) for m in config["models"] if Path(m["model"]) != base_dir]
    layers = _num_layers(base_dir)
    dtype = getattr(torch, config.get("dtype") or "float32")
    for name in differing:
        match = LAYER.search(name)
        t = int(match.group(1)) / max(1, layers - 1) if match else 0.0
        fraction = _global_setting(config, "select_topk", name, t, 1.0)
        if not 0 < fraction < 1:
            return False
        base = _load(base_dir, name).to(dtype)
        deltas = torch.stack([_load(model, name).to(dtype) - base for model in models])
        variance = torch.var(deltas, dim=0, unbiased=False)
        k = int(torch.count_nonzero(variance) * fraction)
        if k < 1:
            return False
        ours, theirs = select_by_variance(deltas, fraction), _topk_selection(variance, k)
        cut = variance.reshape(-1).kthvalue(variance.numel() - k + 1).values
        moved = ours != theirs
        if int(ours.sum()) != int(theirs.sum()) or not bool((variance[moved] == cut).all()):
            return False
        reference = _load(ref_dir, name)
        if not torch.equal(merge_selected(base, deltas * theirs.unsqueeze(0)).to(reference.dtype), reference):
            return False
    return True

"""Routed-model recipes (`route.json`): what an exported data-flow merge is, and how it is written again.

A recipe names its seeds (pinned), the layers the model stores, the path over them and each hop's scale. From it
`write_route` streams the routed model (`hf_m2n2.models.routed.write_routed`), adds the passthrough spec when every
scale is 1 and copies the seeds' own recipes (PS+DFS); `rebuild_route` is `hf-m2n2 rebuild route.json OUT`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_m2n2.errors import HfM2n2Error, SpecError

ROUTE_RECIPE = "route.json"
PASSTHROUGH = "passthrough.yaml"
SEED_RECIPES = "seed_recipes"
RECIPE_FILES = ("merge_config.yaml", "recipe.json", "route.json")  # what makes a seed itself a merge


@dataclass
class RouteRecipe:
    """`route.json`: what an exported routed model is, from which `hf-m2n2 export` writes it again.

    Attributes:
        seeds: `seed_record` of each seed (model A first).
        layers: each seed's layer count when the route was found.
        repeats, scales: the genome's layout.
        dtype: the weights' dtype.
        genome: the best genome (the indicator, then W).
        stored: the layers the model stores, as [seed, layer].
        path: the stored layer of each hop.
        hop_scales: the scale of each hop.
    """

    seeds: list[dict[str, Any]]
    layers: list[int]
    repeats: int
    scales: bool
    dtype: str
    genome: list[float]
    stored: list[list[int]]
    path: list[int]
    hop_scales: list[float]
    upstream: list[dict[str, Any]] = field(default_factory=list)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"format": 1, **self.__dict__}, indent=1) + "\n")

    @staticmethod
    def load(path: Path) -> RouteRecipe:
        try:
            data = json.loads(Path(path).read_text())
            if data.pop("format", None) != 1:
                raise ValueError("not a route recipe of format 1")
            return RouteRecipe(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise HfM2n2Error(f"{path}: cannot read the route ({exc})") from None


def passthrough_config(recipe: RouteRecipe, refs: list[str]) -> dict[str, Any] | None:
    """The mergekit passthrough spec of a route whose scales are all 1 (runs of consecutive layers of one seed
    become one slice), or None when a scale is not 1."""
    if any(s != 1.0 for s in recipe.hop_scales):
        return None
    hops = [recipe.stored[p] for p in recipe.path]
    slices: list[list[int]] = []  # [seed, start, end]
    for seed, layer in hops:
        if slices and slices[-1][0] == seed and slices[-1][2] == layer:
            slices[-1][2] = layer + 1
        else:
            slices.append([seed, layer, layer + 1])
    return {
        "merge_method": "passthrough",
        "dtype": recipe.dtype,
        "slices": [{"sources": [{"model": refs[s], "layer_range": [a, b]}]} for s, a, b in slices],
    }


def upstream_recipes(seeds: list[Any]) -> list[dict[str, Any]]:
    """The seeds that are themselves merges (PS+DFS: model A from an evomerge_ps run): which recipe file each has."""
    found = []
    for k, seed in enumerate(seeds):
        for name in RECIPE_FILES:
            if (seed.model.path / name).is_file():
                found.append(
                    {"seed": seed.name, "index": k, "file": name, "copy": f"{SEED_RECIPES}/{k}-{name}"}
                )
                break
    return found


def rebuild_route(recipe_path: Path, out_dir: Path, *, overwrite: bool = False, extras: Any = None) -> Path:
    """`hf-m2n2 rebuild route.json OUT`: the routed model of a route recipe, from its (pinned) seeds, bit for bit.

    Raises:
        HfM2n2Error: the recipe cannot be read, or its seeds no longer match it.
    """
    from hf_m2n2.blend_ops import recipe_refs
    from hf_m2n2.seeds import close_seeds, open_seeds

    recipe_path = Path(recipe_path)
    recipe = RouteRecipe.load(recipe_path)
    seeds = open_seeds(recipe_refs(recipe), base_dir=recipe_path.resolve().parent)
    try:
        check_recipe_seeds(recipe, seeds, recipe_path)
        return write_route(recipe, seeds, out_dir, overwrite=overwrite, extras=extras)
    finally:
        close_seeds(seeds)


def check_recipe_seeds(recipe: RouteRecipe, seeds: list[Any], where: Path) -> None:
    """Refuse a route whose seeds no longer match it (another layer count, a stored layer they lack).

    Raises:
        HfM2n2Error: naming the file and the seed.
    """
    from hf_m2n2.models.routed import check_layer_shapes, check_routable
    from hf_m2n2.routed_modeling import check_route

    if len(seeds) != len(recipe.layers):
        raise HfM2n2Error(f"{where}: the route has {len(recipe.layers)} seeds, {len(seeds)} were opened")
    for seed, layers in zip(seeds, recipe.layers):
        if seed.num_layers != layers:
            raise HfM2n2Error(
                f"{where}: seed {seed.name} has {seed.num_layers} layers but the route was found for {layers}"
            )
    for seed_index, layer in recipe.stored:
        if not (0 <= seed_index < len(seeds) and 0 <= layer < seeds[seed_index].num_layers):
            raise HfM2n2Error(f"{where}: stored layer [{seed_index}, {layer}] is not a layer of the seeds")
    try:
        check_route(list(recipe.path), list(recipe.hop_scales), len(recipe.stored))
    except ValueError as exc:
        raise HfM2n2Error(f"{where}: {exc}") from None
    try:
        check_routable(seeds)
        check_layer_shapes(seeds)
    except SpecError as exc:
        raise HfM2n2Error(f"{where}: {exc.message}") from None


def route_notes(recipe: RouteRecipe, seeds: list[Any]) -> list[str]:
    """The card's notes: how to load it, what the path is, and the seeds' own recipes (PS+DFS)."""
    hops = len(recipe.path)
    notes = [
        f"A routed model (data-flow space merge): {len(recipe.stored)} stored layers visited in {hops} hops along "
        f"the path in `{ROUTE_RECIPE}`; model {seeds[0].name} gives the tokenizer, embeddings and head. Its modeling "
        "code ships in this repository: load it with `trust_remote_code=True`.",
    ]
    if all(s == 1.0 for s in recipe.hop_scales):
        notes.append(
            f"Every scale is 1: `hf-m2n2 merge {PASSTHROUGH} OUT_DIR` writes the same model as a plain passthrough "
            "frankenmerge, loadable without remote code."
        )
    for up in recipe.upstream:
        notes.append(
            f"Seed {up['seed']} is itself a merge: its recipe (`{up['file']}`) is kept as `{up['copy']}` (PS+DFS: "
            "both recipes are part of this model's lineage)."
        )
    return notes


def write_route(
    recipe: RouteRecipe, seeds: list[Any], out_dir: Path, *, overwrite: bool, extras: Any
) -> Path:
    """The routed model of `recipe` with `route.json`, the seeds' recipes and the passthrough spec, then
    `extras(dir)` (card, plot), renamed into `out_dir` at the end."""
    import yaml

    from hf_m2n2.blend_ops import recipe_refs
    from hf_m2n2.models.routed import StoredLayer, write_routed
    from hf_m2n2.outdir import atomic_output_dir
    from hf_m2n2.plan import torch_dtype

    out = Path(out_dir)
    with atomic_output_dir(out, overwrite) as tmp:
        stored = [StoredLayer(s, i) for s, i in recipe.stored]
        write_routed(tmp, seeds, stored, recipe.path, recipe.hop_scales, torch_dtype(recipe.dtype))
        recipe.save(tmp / ROUTE_RECIPE)
        for up in recipe.upstream:
            (tmp / up["copy"]).parent.mkdir(exist_ok=True)
            (tmp / up["copy"]).write_bytes((seeds[up["index"]].model.path / up["file"]).read_bytes())
        config = passthrough_config(recipe, recipe_refs(recipe))
        if config is not None:
            header = "# The same model as this directory's routed one, as a plain passthrough frankenmerge:\n"
            text = (
                header + f"# hf-m2n2 merge {PASSTHROUGH} OUT_DIR\n" + yaml.safe_dump(config, sort_keys=False)
            )
            (tmp / PASSTHROUGH).write_text(text)
        if extras is not None:
            extras(tmp)
    return out

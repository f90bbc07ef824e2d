"""Blend genomes over real checkpoints: GenomeOps for the strategies, writing a Blend into a LiveModel, and
streaming export of a Blend recipe to a safetensors directory."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_m2n2.blend import Blend, SeedLayout, blend_tensor, crossover, gram_prefix, load_or_compute_gram
from hf_m2n2.errors import HfM2n2Error, SpecError
from hf_m2n2.live import LiveModel
from hf_m2n2.models import model_kind
from hf_m2n2.plan import torch_dtype
from hf_m2n2.seeds import Seed


@dataclass
class BlendRecipe:
    """Everything needed to rebuild a Blend's weights bit for bit: seeds (pinned), layout, genome, dtype.

    Attributes:
        seeds: one `{ref, name, repo_id, commit}` per seed, in genome column order.
        tensors: evolved tensor names in canonical order (with `block_size`, this fixes the layout).
        block_size: elements per block.
        fixed_from: seed index whose tensors are copied for everything not evolved.
        dtype: dtype of the arithmetic and of the written weights (the live model's dtype).
        blend: the genome.
        lineage: the ancestors (id, origin, parents, w, split), oldest first.
    """

    seeds: list[dict[str, Any]]
    tensors: list[str]
    block_size: int
    fixed_from: int
    dtype: str
    blend: Blend
    lineage: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "blend",
            "seeds": self.seeds,
            "tensors": self.tensors,
            "block_size": self.block_size,
            "fixed_from": self.fixed_from,
            "dtype": self.dtype,
            "blend": self.blend.to_json(),
            "lineage": self.lineage,
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> BlendRecipe:
        if data.get("kind") != "blend":
            raise SpecError("kind", "not a blend recipe")
        try:
            return BlendRecipe(
                seeds=list(data["seeds"]),
                tensors=list(data["tensors"]),
                block_size=int(data["block_size"]),
                fixed_from=int(data["fixed_from"]),
                dtype=str(data["dtype"]),
                blend=Blend.from_json(data["blend"]),
                lineage=list(data.get("lineage", [])),
            )
        except KeyError as exc:
            raise SpecError(str(exc.args[0]), "required in a blend recipe") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @staticmethod
    def load(path: str | os.PathLike[str]) -> BlendRecipe:
        try:
            return BlendRecipe.from_json(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            raise SpecError("", f"{path}: cannot read the recipe ({exc})") from None


def seed_record(seed: Seed) -> dict[str, Any]:
    m = seed.model
    record = {"ref": m.ref, "name": m.name, "repo_id": m.repo_id, "commit": m.commit}
    if m.repo_id is None:
        record["path"] = str(m.path.resolve())  # local seeds: where a rebuild finds them
    if m.adapter is not None:
        record["locator"] = m.locator  # a `base+adapter` seed: both parts, pinned
    if getattr(seed, "variant", None):
        record["variant"] = seed.variant  # a pipeline's weights variant (`fp16`): the files that were read
    return record


def recipe_refs(recipe: BlendRecipe) -> list[str]:
    """How to find each seed again: `repo_id@commit` for Hub seeds, the recorded directory for local ones."""
    return [
        s.get("locator")
        or (
            f"{s['repo_id']}@{s['commit']}"
            if s.get("repo_id") and s.get("commit")
            else s.get("path") or s["ref"]
        )
        for s in recipe.seeds
    ]


def rebuild(
    recipe_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    shard_size: int = 5_000_000_000,
    write_card=None,
) -> Path:
    """`hf-m2n2 rebuild`: the weights of a Blend recipe, bit for bit, from its (pinned) seeds (`write_card(tmp)`
    adds a card before the output is renamed into place, as in `export_blend`)."""
    from hf_m2n2.seeds import open_seeds

    recipe = BlendRecipe.load(recipe_path)
    variants = {s.get("variant") for s in recipe.seeds}
    if len(variants) > 1:
        raise SpecError("seeds", f"the recipe's seeds were read in different weight variants ({variants})")
    seeds = open_seeds(
        recipe_refs(recipe),
        base_dir=Path(recipe_path).resolve().parent,
        variant=variants.pop() if variants else None,
    )
    try:
        return export_blend(
            recipe, seeds, out_dir, overwrite=overwrite, shard_size=shard_size, write_card=write_card
        )
    finally:
        for seed in seeds:
            seed.checkpoint.close()


class SeedTensors:
    """The seeds' evolved tensors, resident on a device in one dtype, or read from the checkpoints on demand."""

    def __init__(
        self,
        seeds: Sequence[Seed],
        names: Sequence[str],
        dtype: torch.dtype,
        device: str | torch.device,
        resident: bool = True,
    ):
        self.seeds = list(seeds)
        self.dtype = dtype
        self.device = torch.device(device)
        self._resident: list[dict[str, torch.Tensor]] | None = None
        if resident:
            self._resident = [{n: self._read(k, n) for n in names} for k in range(len(self.seeds))]

    def _read(self, k: int, name: str) -> torch.Tensor:
        return self.seeds[k].checkpoint.get(name).to(device=self.device, dtype=self.dtype)

    def get(self, k: int, name: str) -> torch.Tensor:
        return self._resident[k][name] if self._resident is not None else self._read(k, name)

    def __len__(self) -> int:
        return len(self.seeds)


def evolved_layout(seeds: Sequence[Seed], names: Sequence[str], block_size: int) -> SeedLayout:
    """The canonical layout of the evolved tensors; every seed must hold each of them with the same shape."""
    return SeedLayout(model_kind(seeds[0].kind).check_fit(seeds, names), block_size)


def seed_gram(layout: SeedLayout, tensors: SeedTensors, cache: Path | None) -> np.ndarray:
    """Gram prefix sums of the seeds (float64), cached in `cache` keyed by the seeds and the layout."""
    key = json.dumps(
        [layout.fingerprint(), [seed_record(s) | {"path": str(s.model.path)} for s in tensors.seeds]]
    )

    def compute() -> np.ndarray:
        return gram_prefix(layout, lambda k, name: tensors.get(k, name).cpu(), len(tensors))

    return compute() if cache is None else load_or_compute_gram(cache, key, compute)


class BlendOps:
    """GenomeOps over Blend genomes of real seeds: algebra on the driver (layout, Gram sums, crossover, hash,
    state), no tensors. `BlendTarget` writes a Blend into the live model.

    Args:
        layout: evolved tensors and blocks.
        gram: the seeds' Gram prefix sums.
        num_seeds: K, the number of seeds (columns of every Blend).
        slerp_scope: `global`, `segment` or `tensor` (where SLERP angles are measured).
    """

    kind = "blend"

    def __init__(self, layout: SeedLayout, gram: np.ndarray, num_seeds: int, slerp_scope: str = "global"):
        self.layout = layout
        self.gram = gram
        self.num_seeds = num_seeds
        self.slerp_scope = slerp_scope

    @property
    def size(self) -> int:
        return self.layout.num_params

    def seed_genomes(self) -> list[Blend]:
        return [Blend.seed(k, self.num_seeds, self.layout.num_blocks) for k in range(self.num_seeds)]

    def crossover(self, x: Blend, y: Blend, w: float, split: int) -> Blend:
        use_split = split < self.size
        return crossover(
            x, y, w, self.layout.snap(split), self.gram, self.layout, self.slerp_scope, use_split
        )

    def mutate(self, x: Blend, std: float, rng: np.random.Generator) -> Blend:
        raise HfM2n2Error("Blend genomes are not mutated (pretrained seeds): leave evolve.mutation_std out")

    def random(self, std: float, rng: np.random.Generator) -> Blend:
        raise HfM2n2Error("Blend genomes start from seeds, not from random vectors")

    def hash(self, x: Blend) -> str:
        """The recipe hash (the score cache's key)."""
        return blend_hash(x)

    def to_state(self, x: Blend) -> dict[str, Any]:
        return {"breakpoints": x.breakpoints, "coefs": x.coefs}

    def from_state(self, state: Any) -> Blend:
        return Blend(
            np.asarray(state["breakpoints"], dtype=np.int64), np.asarray(state["coefs"], dtype=np.float64)
        )


def blend_hash(x: Blend) -> str:
    """A Blend's recipe hash: its breakpoints and coefficients."""
    digest = hashlib.sha256(np.ascontiguousarray(x.breakpoints).tobytes())
    digest.update(np.ascontiguousarray(x.coefs).tobytes())
    return digest.hexdigest()[:20]


class BlendTarget:
    """Writes Blend genomes into the live model in place, tensor by tensor, through `materialize()`.

    Args:
        layout: evolved tensors and blocks.
        tensors: seed tensors (resident or on demand) in the live model's dtype and device.
        live: the resident model.
    """

    def __init__(self, layout: SeedLayout, tensors: SeedTensors, live: LiveModel):
        self.layout = layout
        self.tensors = tensors
        self.live = live
        self._last_written: Blend | None = None

    def write(self, x: Blend) -> Any:
        """Write the Blend's tensors into the live model (skipped if it already holds x); return the model."""
        from hf_m2n2.materialize import materialize

        if self._last_written is not None and _same(self._last_written, x):
            return self.live.model

        def compute(t: Any) -> torch.Tensor | None:
            seeds = [self.tensors.get(k, t.name) for k in range(len(self.tensors))]
            target = self.live.tensor(t.name)
            if target is not None and target.device.type != "meta" and target.dtype == seeds[0].dtype:
                blend_tensor(x, t, self.layout, seeds, out=target)  # in place: nothing left to write
                return None
            return blend_tensor(x, t, self.layout, seeds)

        self._last_written = None
        with torch.no_grad():
            materialize(self.layout.tensors, compute, self.live, workers=1, recycle_heap=False)
        self._last_written = x
        return self.live.model


def _same(a: Blend, b: Blend) -> bool:
    return a is b or (np.array_equal(a.breakpoints, b.breakpoints) and np.array_equal(a.coefs, b.coefs))


@dataclass(frozen=True)
class _ExportTask:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    evolved: bool


def export_blend(
    recipe: BlendRecipe,
    seeds: Sequence[Seed],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    shard_size: int = 5_000_000_000,
    workers: int = 2,
    write_card=None,
) -> Path:
    """Stream a Blend recipe's weights (plus config and tokenizer of the fixed seed) into `out_dir`, atomically.

    The arithmetic is the live model's: seed tensors cast to `recipe.dtype`, then blended, so the exported
    weights are bit for bit those that were evaluated, and `hf-m2n2 rebuild` reproduces them.

    Args:
        seeds: the opened seeds, in recipe order.
        write_card: optional `write_card(tmp_dir)` adding README.md and friends before the rename.
    """
    from hf_m2n2.materialize import materialize
    from hf_m2n2.outdir import atomic_output_dir
    from hf_m2n2.writer import PlannedTensor

    dtype = torch_dtype(recipe.dtype)
    layout = evolved_layout(seeds, recipe.tensors, recipe.block_size)
    by_name = {t.name: t for t in layout.tensors}
    reference = seeds[recipe.fixed_from]
    kind = model_kind(reference.kind)
    tasks = []
    for name in kind.output_names(reference, by_name):
        info = reference.checkpoint.info(name)
        out_dtype = dtype if info.dtype.is_floating_point else info.dtype
        tasks.append(_ExportTask(name, info.shape, out_dtype, name in by_name))
    missing = set(by_name) - {t.name for t in tasks}
    if missing:
        raise HfM2n2Error(f"seed {reference.name} lacks evolved tensor {sorted(missing)[0]!r}")

    def compute(task: _ExportTask) -> torch.Tensor:
        if not task.evolved:
            return reference.checkpoint.get(task.name).to(task.dtype)
        parts = [s.checkpoint.get(task.name).to(dtype) for s in seeds]
        return blend_tensor(recipe.blend, by_name[task.name], layout, parts)

    with atomic_output_dir(out_dir, overwrite) as tmp:
        writer = kind.open_output(
            reference, tmp, [PlannedTensor(t.name, t.shape, t.dtype) for t in tasks], shard_size
        )
        try:
            materialize(tasks, compute, writer, workers=workers)
            writer.finish()
        finally:
            writer.abort()
        kind.save_configs(reference, tmp, dtype)
        recipe.save(tmp / "recipe.json")
        if write_card is not None:
            write_card(tmp)
    return Path(out_dir)

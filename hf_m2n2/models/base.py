"""Model kinds: what a seed is and what a live target is, behind one registry.

A model kind knows how to open a seed directory (tensor names, shapes, lazy reads, config, architecture family),
check that seeds fit together, build the live target from a seed's configs without random init, write tensors
into it in place (the target is a `materialize()` sink), and save the configs and tokenizer next to exported
weights. The causal LM is the first kind; a diffusers pipeline or a routed model is one new file plus one
`register_model_kind` line in `hf_m2n2/models/__init__.py`.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from hf_m2n2.architectures import Architecture
from hf_m2n2.checkpoint import Checkpoint
from hf_m2n2.errors import CheckpointError
from hf_m2n2.hub import ResolvedModel
from hf_m2n2.registry import Registry


@dataclass
class Seed:
    """An opened input model.

    Attributes:
        model: the resolved reference (local directory, Hub repo and pinned commit).
        checkpoint: lazy access to its tensors.
        config: its `config.json`.
        arch: its architecture family.
        num_layers: its number of layers.
        kind: the model kind that opened it (`hf_m2n2.models`).
    """

    model: ResolvedModel
    checkpoint: Checkpoint
    config: dict[str, Any]
    arch: Architecture
    num_layers: int
    kind: str = "causal_lm"

    @property
    def name(self) -> str:
        return self.model.name


def load_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.exists():
        return {}
    try:
        return json.loads(file.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{file}: invalid JSON ({exc})") from exc


class LiveTarget(Protocol):
    """A resident model whose tensors are overwritten in place per candidate (a `materialize()` sink)."""

    model: Any
    dtype: torch.dtype
    device: torch.device

    @property
    def names(self) -> list[str]: ...

    def tensor(self, name: str) -> torch.Tensor | None: ...

    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None: ...


class ModelKind:
    """One kind of model. Subclasses set `name` and implement the methods.

    Attributes:
        name: the kind's name (recorded with the seeds it opened).
    """

    name: str = ""

    def recognizes(self, directory: Path) -> bool:
        """Whether a seed directory holds a model of this kind."""
        raise NotImplementedError

    def open_seed(self, model: Any) -> Any:
        """A `Seed` over a resolved model's directory: lazy tensors, config, architecture."""
        raise NotImplementedError

    def check_fit(self, seeds: Sequence[Any], names: Sequence[str]) -> list[tuple[str, tuple[int, ...]]]:
        """The shapes of `names`, checked to be the same in every seed.

        Raises:
            HfM2n2Error: a tensor is missing from a seed or has another shape there.
        """
        raise NotImplementedError

    def check_reference(self, seed: Any, field: str, fix: str) -> None:
        """Refuse a seed that cannot be the reference (the seed whose configs and non-evolved parts the live target
        and the output take), naming the spec's `field` and ending with `fix`; any seed can by default.

        Raises:
            SpecError: the seed lacks what a reference gives.
        """

    def live_target(self, reference: Any, **options: Any) -> LiveTarget:
        """The resident model built from `reference`'s configs (no random init) and filled with its weights."""
        raise NotImplementedError

    def save_configs(self, reference: Any, out_dir: Path, dtype: torch.dtype) -> None:
        """Write what makes `out_dir`'s weights loadable (configs, tokenizer), taken from `reference`; called after
        `open_output`'s sink finished (what it left out is completed here)."""
        raise NotImplementedError

    def default_evolved(self, reference: Any) -> list[str]:
        """The glob patterns of the tensors a Blend evolves when `genome.include` is not given: all of them."""
        return ["*"]

    def evolve_card(
        self, info: Any, seeds: Sequence[Any], fixed: int | None, evolved: Collection[str] | None
    ) -> Any:
        """The lineage card of a model evolved from seeds of this kind: `info` (the `evolve_card_info` card) as it
        is, or in this kind's flavour (a pipeline's is a diffusers card).

        Args:
            seeds: the opened seeds, in the card's order.
            fixed: the index of the seed the non-evolved tensors and files come from, None when not one seed's.
            evolved: the evolved tensor names, None when the genome does not say.
        """
        return info

    def output_names(self, reference: Any, evolved: Collection[str]) -> list[str]:
        """The tensors an export writes through `open_output`, named as `reference` names them: by default all of
        them; a kind may leave out what `save_configs` copies whole (a pipeline's components without any tensor
        in `evolved`)."""
        return list(reference.checkpoint.names)

    def open_output(self, reference: Any, out_dir: Path, planned: Sequence[Any], shard_size: int) -> Any:
        """The sink an export's tensors (`planned`, `hf_m2n2.writer.PlannedTensor`s) are streamed into under
        `out_dir`: `write(name, tensor, row_start)`, then `finish()`; `abort()` in any case (a no-op once
        finished). By default one sharded safetensors directory."""
        from hf_m2n2.writer import ShardedSafetensorsWriter

        return ShardedSafetensorsWriter(out_dir, list(planned), shard_size)

    def plan(self, spec: Any, seeds: Sequence[Any], refs: Sequence[str], options: Any) -> Any:
        """Every check of a static merge of `seeds` (`hf-m2n2 validate`), reading no tensor and writing nothing."""
        raise NotImplementedError

    def recipe(self, spec: Any, seeds: Sequence[Any], seed_index: dict[str, int], options: Any) -> Any:
        """The `MethodRecipe` (one task per merged tensor, names as the live target's) that `merge` computes for
        `spec` with `options` (a `MergeOptions`): what a method genome writes into the live target. Every check of
        `plan` is done; nothing is read or written.

        Raises:
            SpecError, CheckpointError: as `plan`.
        """
        raise NotImplementedError

    def merge(
        self,
        spec: Any,
        seeds: Sequence[Any],
        refs: Sequence[str],
        out_dir: Path,
        options: Any,
        spec_text,
        target,
    ) -> Any:
        """`hf-m2n2 merge`: plan and write the merged model to `out_dir` atomically; returns a `MergeResult`."""
        raise NotImplementedError


MODEL_KINDS = Registry[ModelKind]("model kind", "kind")


def register_model_kind(kind: ModelKind) -> ModelKind:
    """Register a model kind (replacing one of the same name); kinds are tried in registration order."""
    return MODEL_KINDS.add(kind.name, kind)


def model_kinds() -> dict[str, ModelKind]:
    """Every registered kind, by name, in registration order."""
    return MODEL_KINDS.all()


def model_kind(name: str) -> ModelKind:
    """The registered kind called `name`."""
    return MODEL_KINDS.get(name)


def kind_of_directory(directory: Path) -> ModelKind:
    """The first registered kind that recognizes a seed directory.

    Raises:
        CheckpointError: no kind does.
    """
    for kind in MODEL_KINDS.all().values():
        if kind.recognizes(directory):
            return kind
    raise CheckpointError(f"{directory}: not a model of a known kind ({', '.join(MODEL_KINDS.all())})")

"""Seeds: the input models of a run, resolved and opened by the model kind that recognizes them (`Seed` itself is
`hf_m2n2.models.base.Seed`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hf_m2n2.hub import ResolvedModel, resolve_model
from hf_m2n2.models import kind_of_directory
from hf_m2n2.models.base import Seed, load_config

__all__ = ["Seed", "close_seeds", "load_config", "open_seed", "open_seeds"]


def open_seed(model: ResolvedModel) -> Seed:
    """Open a resolved model with the model kind that recognizes its directory."""
    return kind_of_directory(Path(model.path)).open_seed(model)


def open_seeds(
    refs: Sequence[str], *, base_dir: Path | None = None, token=None, trust_remote_code: bool | None = None
) -> list[Seed]:
    """Resolve and open every reference (in order, each once).

    `trust_remote_code`: False refuses seeds that transformers can only load by running their own code
    (`hf_m2n2.custom_code`); None skips the check, for callers that load no config or tokenizer with transformers.
    """
    seeds: list[Seed] = []
    try:
        for ref in refs:
            seeds.append(open_seed(resolve_model(ref, base_dir=base_dir, token=token)))
        if trust_remote_code is not None:
            from hf_m2n2.custom_code import check_custom_code

            for seed in seeds:
                check_custom_code(seed.model.path, seed.name, trust_remote_code)
    except BaseException:  # a refused seed or a later ref that fails: close what was opened
        close_seeds(seeds)
        raise
    return seeds


def close_seeds(seeds: Sequence[Seed]) -> None:
    """Close the seeds' checkpoints (and LoRA adapters)."""
    for seed in seeds:
        seed.checkpoint.close()

"""Seeds: the input models of a run, resolved and opened by the model kind that recognizes them (`Seed` itself is
`hf_m2n2.models.base.Seed`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hf_m2n2.hub import ResolvedModel, resolve_model
from hf_m2n2.models import kind_of_directory
from hf_m2n2.models.base import Seed, load_config

__all__ = ["Seed", "close_seeds", "load_config", "open_seed", "open_seeds"]


def open_seed(model: ResolvedModel, **options) -> Seed:
    """Open a resolved model with the model kind that recognizes its directory (options: the kind's, e.g. a
    pipeline's `variant`)."""
    kind = kind_of_directory(Path(model.path))
    return kind.open_seed(model, **options) if options else kind.open_seed(model)


def open_seeds(
    refs: Sequence[str],
    *,
    base_dir: Path | None = None,
    token=None,
    trust_remote_code: bool | None = None,
    variant: str | None = None,
    single_file_config: str | None = None,
) -> list[Seed]:
    """Resolve and open every reference (in order, each once).

    `trust_remote_code`: False refuses seeds that transformers can only load by running their own code
    (`hf_m2n2.custom_code`); None skips the check, for callers that load no config or tokenizer with transformers.
    `variant` (pipelines): read that variant's weights only. A single-file pipeline seed takes its configs from
    `single_file_config` (a diffusers folder or repo), else from the first diffusers-folder seed.
    """
    seeds: list[Seed] = []
    config_seed = None
    try:
        models = [resolve_model(ref, base_dir=base_dir, token=token, variant=variant) for ref in refs]
        files = [m for m in models if Path(m.path).is_file()]
        if files and single_file_config is not None:
            config_seed = open_seed(
                resolve_model(single_file_config, base_dir=base_dir, token=token, variant=variant),
                variant=variant,
            )
        for model in sorted(models, key=lambda m: Path(m.path).is_file()):  # folders first: configs for files
            if Path(model.path).is_file():
                if config_seed is None:
                    config_seed = next((s for s in seeds if getattr(s, "folder", None) is not None), None)
                seeds.append(open_seed(model, config_seed=config_seed))
            else:
                seeds.append(open_seed(model, variant=variant) if variant else open_seed(model))
        seeds.sort(key=lambda s: models.index(s.model))
        if trust_remote_code is not None:
            from hf_m2n2.custom_code import check_custom_code

            for seed in seeds:
                check_custom_code(seed.model.path, seed.name, trust_remote_code)
    except BaseException:  # a refused seed or a later ref that fails: close what was opened
        close_seeds(seeds)
        raise
    finally:
        if config_seed is not None and all(config_seed is not s for s in seeds):
            config_seed.checkpoint.close()
    return seeds


def close_seeds(seeds: Sequence[Seed]) -> None:
    """Close the seeds' checkpoints (and LoRA adapters)."""
    for seed in seeds:
        seed.checkpoint.close()

"""The Space's bundled text-to-image world: the seeds, CLIP judge and prompts behind its "bundled tiny
text-to-image specialists" choice, built on first use and cached. No Gradio here.

`bundled_t2i` is the one function the Space calls for it: the trained tiny world of `make demo-t2i`
(`hf_m2n2.demo.t2i_world`: a tiny CLIP judge, two specialists `en` and `ja` fine-tuned from one base on English
and Japanese prompts, and prompts in groups `en`/`ja`), about 4 minutes on one core the first time.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG = ".hf_m2n2_t2i.json"  # the WorldConfig the folder was built with (a later call without one reuses it)


@dataclass(frozen=True)
class BundledT2I:
    """The bundled world's paths.

    Attributes:
        root: the build folder.
        seeds: the seed pipelines (diffusers folders), by name (`en`, `ja`): the names the run, report and card use.
        judge: the CLIP judge (transformers' CLIPModel + CLIPProcessor folder).
        prompts: the fitness prompts (JSONL with groups `en`, `ja`).
        test_prompts: the held-out prompts (same format).
    """

    root: Path
    seeds: dict[str, Path]
    judge: Path
    prompts: Path
    test_prompts: Path


def bundled_t2i(root: str | os.PathLike[str], config: Any = None) -> BundledT2I:
    """Build (or reuse) the bundled text-to-image world under `root`.

    Args:
        root: the cache folder.
        config: the world's `hf_m2n2.demo.t2i_world.WorldConfig`; None: the one `root` was last built with, else
            the default (the `make demo-t2i` world).

    Returns:
        The paths of the seeds, judge and prompts.

    Example:
        >>> world = bundled_t2i(Path.home() / ".cache/hf_m2n2/t2i")  # doctest: +SKIP
        >>> sorted(world.seeds)  # doctest: +SKIP
        ['en', 'ja']
    """
    from hf_m2n2.demo.t2i_world import WorldConfig, build_world

    root = Path(root).expanduser().resolve()
    if config is None:
        try:
            recorded = json.loads((root / CONFIG).read_text())
            config = WorldConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()})
        except (OSError, ValueError, TypeError):
            config = WorldConfig()
    world = build_world(root, config, report=False)
    (root / CONFIG).write_text(json.dumps(dataclasses.asdict(config)) + "\n")
    return BundledT2I(root, dict(world.models), world.judge, world.fit_prompts, world.test_prompts)

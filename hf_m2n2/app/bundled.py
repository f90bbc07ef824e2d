"""The Space's bundled text-to-image world: the seeds, CLIP judge and prompts behind its "bundled tiny
text-to-image specialists" choice, built on first use and cached. No Gradio here.

`bundled_t2i` is the one function the Space calls for it. For now it builds tiny RANDOM pipelines (two UNet
"fine-tunes" `en` and `ja` of one random base, `hf_m2n2.demo.tiny_pipelines`), a tiny random CLIP judge and a
handful of English and Japanese prompts in groups `en`/`ja`: the page, the run and its gallery, score table and
card all work, but the scores mean nothing. When the trained tiny world lands (a module of `hf_m2n2/demo/` that
writes OUT/{judge,base,en,ja,prompts/}), replace the body of `bundled_t2i` with a call to its builder and return
its paths; nothing else in the app changes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

MARKER = ".hf_m2n2_t2i.json"
BUILD = "random-tiny-1"  # what the marker records: a different value rebuilds the cache

# (English prompt, Japanese prompt) of coloured shapes; a Japanese prompt is scored against its English caption
_FIT = [
    ("a red circle", "赤い丸"),
    ("a blue square", "青い四角"),
    ("a green triangle", "緑の三角"),
    ("a yellow circle", "黄色い丸"),
]
_TEST = [("a red triangle", "赤い三角"), ("a blue circle", "青い丸")]


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


def bundled_t2i(root: str | os.PathLike[str]) -> BundledT2I:
    """Build (or reuse) the bundled text-to-image world under `root`.

    For now: tiny random pipelines, a tiny random judge and a handful of prompts (a few seconds on one core, the
    same bytes on every build). To be pointed at the trained tiny world's builder when it lands (see the module
    docstring): this function is the only place that knows what the bundled world is.

    Args:
        root: the cache folder (replaced whole when it holds another build).

    Returns:
        The paths of the seeds, judge and prompts.

    Example:
        >>> world = bundled_t2i(Path.home() / ".cache/hf_m2n2/t2i")  # doctest: +SKIP
        >>> sorted(world.seeds)  # doctest: +SKIP
        ['en', 'ja']
    """
    root = Path(root).expanduser().resolve()
    world = BundledT2I(
        root,
        {"en": root / "en", "ja": root / "ja"},
        root / "judge",
        root / "prompts" / "fit.jsonl",
        root / "prompts" / "test.jsonl",
    )
    try:
        if json.loads((root / MARKER).read_text())["build"] == BUILD:
            return world
    except (OSError, ValueError, KeyError, TypeError):
        pass
    import torch

    from hf_m2n2.demo.tiny_pipelines import build_tiny_judge, build_tiny_pipeline
    from hf_m2n2.outdir import atomic_output_dir

    root.parent.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and gives the same bytes every build
    try:
        with atomic_output_dir(root, overwrite=True) as tmp:
            for seed, name in enumerate(world.seeds, start=1):
                build_tiny_pipeline(tmp / name, "sd1", seed=seed, base_seed=0)
            build_tiny_judge(tmp / "judge", seed=0)
            (tmp / "prompts").mkdir()
            _write_prompts(tmp / "prompts" / "fit.jsonl", _FIT)
            _write_prompts(tmp / "prompts" / "test.jsonl", _TEST)
            (tmp / MARKER).write_text(json.dumps({"build": BUILD}) + "\n")
    finally:
        torch.set_num_threads(threads)
    return world


def _write_prompts(path: Path, pairs: list[tuple[str, str]]) -> None:
    rows = [{"id": f"en-{i}", "prompt": en, "group": "en"} for i, (en, _) in enumerate(pairs)]
    rows += [
        {"id": f"ja-{i}", "prompt": ja, "scoring_text": en, "group": "ja"} for i, (en, ja) in enumerate(pairs)
    ]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))

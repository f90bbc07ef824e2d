"""Previews of the best candidate so far: images an evaluator drew while scoring it, kept in the run directory
while the run goes (`RUN/preview/`), for whoever watches the run (the Space's gallery polls them).

Nothing is drawn for them: the evaluator hands over the images it has just scored (the CLIP evaluator's
`last_images`, through the executor's `candidate_scored` hook). They are replaced only when a candidate's mean
score beats every earlier one (the first of equals stays): the preview shows the best-so-far candidate, the one
whose score the fitness plot's "best candidate" line follows (the maximum of `lineage.jsonl`). Writing them reads
no random number and changes no score. A resumed run starts from the preview on disk: a candidate redone after
the checkpoint scores what it scored before and does not replace it, so a resumed run ends with the preview of an
uninterrupted one.

Layout (each candidate's folder is written whole in a temporary sibling and renamed into place, then `best.json`
is replaced atomically; the previous candidate's folder stays one more round, so a reader holding the previous
`best.json` still finds its files):

    preview/best.json               {"candidate": 7, "score": 31.2, "images": [{"file": "candidate-7/0-0.png",
                                     "prompt_id": "en-0", "prompt": "a red circle", "group": "en", "score": 33.1}]}
    preview/candidate-7/0-0.png     image 0 of the first previewed prompt

Example:
    >>> previews = BestPreviews(Path("run/preview"), prompts=8)  # doctest: +SKIP
    >>> previews.offer(3, scores, evaluator.last_images)  # doctest: +SKIP
    True
    >>> read_previews(Path("run"))["candidate"]  # doctest: +SKIP
    3
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hf_m2n2.errors import HfM2n2Error, first_line
from hf_m2n2.outdir import atomic_output_dir, atomic_write_text, sweep_killed

logger = logging.getLogger(__name__)

PREVIEW_DIR = "preview"
BEST = "best.json"
_FOLDER = "candidate-{}"


def pick_prompts(groups: Sequence[str | None], limit: int) -> list[int]:
    """The indices of at most `limit` prompts to preview, taken in turn from each group (in file order), so that
    every group shows even when the first ones fill the limit.

    Example:
        >>> pick_prompts(["en", "en", "en", "ja", "ja"], 3)
        [0, 3, 1]
    """
    by_group: dict[str | None, list[int]] = {}
    for index, group in enumerate(groups):
        by_group.setdefault(group, []).append(index)
    queues = list(by_group.values())
    picked: list[int] = []
    for turn in range(max((len(q) for q in queues), default=0)):
        for queue in queues:
            if turn < len(queue) and len(picked) < limit:
                picked.append(queue[turn])
    return picked


class BestPreviews:
    """Keeps `directory` holding the images of the best candidate offered so far.

    Args:
        directory: the preview folder (`RUN/preview`), created on the first write. A `best.json` already there
            (a resumed run) sets the score to beat.
        prompts: how many prompts' images to keep (`pick_prompts`).
    """

    def __init__(self, directory: Path, prompts: int):
        self.directory = Path(directory)
        self.prompts = int(prompts)
        self.best: float | None = None
        self._kept: str | None = None  # the current candidate's folder name
        if self.directory.is_dir():
            sweep_killed(self.directory)  # temporaries of a killed run
            shown = _read_best(self.directory)
            if shown is not None:
                self.best, self._kept = float(shown["score"]), _FOLDER.format(shown["candidate"])

    def offer(self, candidate_id: int, scores: Any, drawn: Sequence[tuple[Any, Sequence[Any]]]) -> bool:
        """Keep the candidate's images if its mean score beats every earlier offer.

        Args:
            candidate_id: the candidate's lineage id.
            scores: its per-prompt scores (one per entry of `drawn`).
            drawn: `(row, images)` per prompt, in score order; a row has `id`, `prompt` and `group`, an image is a
                uint8 HxWx3 array.

        Returns:
            Whether the preview now shows this candidate. A write the disk refuses is logged and skipped (a
            preview is a view of the run, never a reason to stop it).
        """
        scores = np.asarray(scores, dtype=np.float64)
        mean = float(scores.mean()) if scores.size else math.nan
        if not math.isfinite(mean) or (self.best is not None and mean <= self.best):
            return False
        if len(drawn) != scores.size:
            raise ValueError(f"{len(drawn)} prompts drawn for {scores.size} scores")
        try:
            self._write(int(candidate_id), mean, scores, drawn)
        except (OSError, HfM2n2Error) as exc:
            logger.warning("previews of candidate %d not written: %s", candidate_id, first_line(exc))
            return False
        self.best = mean
        return True

    def _write(self, candidate_id: int, mean: float, scores: np.ndarray, drawn: Sequence[Any]) -> None:
        from PIL import Image

        self.directory.mkdir(parents=True, exist_ok=True)
        folder = _FOLDER.format(candidate_id)
        groups = [getattr(row, "group", None) for row, _ in drawn]
        entries = []
        with atomic_output_dir(self.directory / folder, overwrite=True) as tmp:
            for index in pick_prompts(groups, self.prompts):
                row, images = drawn[index]
                for k, pixels in enumerate(images):
                    name = f"{index}-{k}.png"
                    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(tmp / name, format="PNG")
                    entries.append(
                        {
                            "file": f"{folder}/{name}",
                            "prompt_id": str(row.id),
                            "prompt": row.prompt,
                            "group": getattr(row, "group", None),
                            "score": float(scores[index]),
                        }
                    )
        record = {"candidate": candidate_id, "score": mean, "images": entries}
        atomic_write_text(self.directory / BEST, json.dumps(record, ensure_ascii=False, indent=1) + "\n")
        previous, self._kept = self._kept, folder
        for old in self.directory.glob(_FOLDER.format("*")):
            if old.name not in (folder, previous):
                shutil.rmtree(old, ignore_errors=True)


def read_previews(run_dir: Path) -> dict[str, Any] | None:
    """The preview of a (running) run directory: `best.json` with each image's absolute `path` added; images whose
    file is gone (replaced meanwhile) are left out. None when there is none yet.

    Example:
        >>> read_previews(Path("run"))  # doctest: +SKIP
        {'candidate': 7, 'score': 31.2, 'images': [{'file': 'candidate-7/0-0.png', 'path': '/.../0-0.png', ...}]}
    """
    directory = Path(run_dir) / PREVIEW_DIR
    record = _read_best(directory)
    if record is None:
        return None
    images = []
    for entry in record.get("images", []):
        path = directory / entry["file"]
        if path.is_file():
            images.append({**entry, "path": str(path)})
    return {**record, "images": images}


def _read_best(directory: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((directory / BEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "candidate" in record and "score" in record else None

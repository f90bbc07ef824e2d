"""The image grid of an evolved text-to-image model's card: one row per model (the seeds, then the merge: the rows
of report.json), one column per prompt (the first few the report scores), each cell the first image the evaluator
draws for that prompt. The evaluator seeds every image from the prompt, not from the model, so a column starts from
the same noise in every row: the rows differ by their weights only.

Drawn with PIL (diffusers' `make_image_grid` leaves no gap between cells and draws no labels): the cells with a thin
white gap between them, the prompt of each column above it, the model of each row at its left, in PIL's default font.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

GRID = "grid.png"
COLUMNS = 4  # prompts shown (fewer when there are fewer)

_MIN_CELL = 128  # smaller images are enlarged by a whole factor (each pixel a square block) to be visible
_MAX_CELL = 512  # larger ones are shrunk to this (the card stays light)
_FONT_SIZE = 12
_MARGIN = 6
_GAP = 4  # white pixels between two cells
_HEADER_LINES = 3  # a column label wraps to at most this many lines
_MAX_LABEL_WIDTH = 200  # row labels wrap within this many pixels


@dataclass(frozen=True)
class GridLayout:
    """Where the cells lie in a grid image: `rows` x `columns` cells of `cell` (width, height) pixels, `gap` pixels
    apart, from `origin` (x, y), the top-left corner of the first cell.

    Attributes:
        scale: how each image was resized into its cell (an integer > 1: each pixel became a `scale` x `scale`
            block; 1: as drawn; below 1: shrunk).
    """

    rows: int
    columns: int
    cell: tuple[int, int]
    origin: tuple[int, int]
    scale: float
    gap: int = _GAP

    @property
    def size(self) -> tuple[int, int]:
        """The grid image's (width, height)."""
        return self.box(self.rows - 1, self.columns - 1)[2:]

    def box(self, row: int, column: int) -> tuple[int, int, int, int]:
        """The (left, top, right, bottom) pixel box of a cell, as `PIL.Image.crop` takes it."""
        left = self.origin[0] + column * (self.cell[0] + self.gap)
        top = self.origin[1] + row * (self.cell[1] + self.gap)
        return left, top, left + self.cell[0], top + self.cell[1]


def prompt_label(prompt_id: str, prompt: str, scoring_text: str) -> str:
    """A column's label: `id: prompt`; where the prompt has characters PIL's default font lacks (e.g. Japanese),
    `id: scoring text` with that said; the id alone when neither can be drawn.

    Example:
        >>> prompt_label("ja-0", "赤い丸", "a red circle")
        'ja-0 (scored as): a red circle'
    """
    if _drawable(prompt):
        return f"{prompt_id}: {prompt}"
    if scoring_text != prompt and _drawable(scoring_text):
        return f"{prompt_id} (scored as): {scoring_text}"
    return prompt_id if _drawable(prompt_id) else "?"


def _drawable(text: str) -> bool:
    """Whether the default font draws every character: printable Latin-1 only."""
    return all(" " <= c <= "~" or "\xa0" <= c <= "\xff" for c in text)


def cell_scale(size: tuple[int, int]) -> float:
    """How an image of `size` (width, height) is resized into its cell (see `GridLayout.scale`)."""
    longest = max(size)
    if longest < _MIN_CELL:
        return float(math.ceil(_MIN_CELL / longest))
    if longest > _MAX_CELL:
        return _MAX_CELL / longest
    return 1.0


def draw_grid(models: Sequence[tuple[str, Sequence[Any]]], labels: Sequence[str]) -> tuple[Any, GridLayout]:
    """The labelled grid: one row per model, one column per label.

    Args:
        models: (row label, one PIL image per column), in row order; every image of one size.
        labels: the column labels (`prompt_label`).

    Returns:
        (the RGB grid image, its layout).

    Raises:
        ValueError: a row has not one image per label, the images differ in size, or there is nothing to draw.

    Example:
        >>> grid, layout = draw_grid([("seed-a", [img1, img2]), ("merge", [img3, img4])], ["0: a cat", "1: a dog"])  # doctest: +SKIP
    """
    from PIL import Image, ImageDraw

    if not models or not labels or any(len(images) != len(labels) for _, images in models):
        raise ValueError("an image grid needs at least one row, and one image per column label in every row")
    sizes = {image.size for _, images in models for image in images}
    if len(sizes) != 1:
        raise ValueError(f"the grid's images differ in size ({sorted(sizes)})")
    size = sizes.pop()
    scale = cell_scale(size)
    cell = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
    # whole factors enlarge by repeating pixels (a cell is its image exactly); shrinking filters
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    row_lines = [
        _wrap(measure, name if _drawable(name) else "?", font, _MAX_LABEL_WIDTH) for name, _ in models
    ]
    column_lines = [_at_most(_wrap(measure, label, font, cell[0] - 2), _HEADER_LINES) for label in labels]
    line = _line_height(measure, font)
    label_width = max(measure.textlength(text, font=font) for lines in row_lines for text in lines)
    origin = (
        int(math.ceil(label_width)) + 2 * _MARGIN,
        max(len(lines) for lines in column_lines) * line + 2 * _MARGIN,
    )
    layout = GridLayout(len(models), len(labels), cell, origin, scale)
    grid = Image.new("RGB", layout.size, "white")
    for row, (_, images) in enumerate(models):
        for column, image in enumerate(images):
            grid.paste(image.convert("RGB").resize(cell, resample), layout.box(row, column)[:2])
    draw = ImageDraw.Draw(grid)
    for column, lines in enumerate(column_lines):
        left = layout.box(0, column)[0] + 1
        for i, text in enumerate(lines):
            draw.text((left, _MARGIN + i * line), text, fill="black", font=font)
    for row, lines in enumerate(row_lines):
        top = layout.box(row, 0)[1] + (cell[1] - len(lines) * line) // 2
        for i, text in enumerate(lines):
            draw.text((_MARGIN, top + i * line), text, fill="black", font=font)
    return grid, layout


def write_grid(path: str | os.PathLike[str], grid: Any) -> None:
    """Save a grid as PNG atomically (a temporary sibling renamed onto `path`); the same grid gives the same
    bytes."""
    from hf_m2n2.outdir import atomic_write_bytes

    atomic_write_bytes(path, lambda handle: grid.save(handle, format="PNG"))


def _font() -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=_FONT_SIZE)  # a scalable font where PIL has FreeType
    except (TypeError, OSError):  # an older PIL, or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _line_height(draw: Any, font: Any) -> int:
    left, top, right, bottom = draw.textbbox((0, 0), "Ag|", font=font)
    return bottom - min(top, 0) + 3


def _at_most(lines: list[str], count: int) -> list[str]:
    return lines if len(lines) <= count else [*lines[: count - 1], lines[count - 1][:-3] + "..."]


def _wrap(draw: Any, text: str, font: Any, width: float) -> list[str]:
    """Greedy word wrap to `width` pixels; a word wider than a line is cut where it must be."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if draw.textlength(candidate, font=font) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = ""
        for char in word:
            if current and draw.textlength(current + char, font=font) > width:
                lines.append(current)
                current = ""
            current += char
    if current:
        lines.append(current)
    return lines or [""]

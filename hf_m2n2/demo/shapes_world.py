"""A procedural world of small captioned images: one coloured shape on a plain dark background.

Each scene is a colour, a shape and a position; every scene has an English caption ("a red circle on the left"),
a Japanese one ("左の赤い丸") and an attribute code ("A E H": one capital letter per attribute value, words of
neither language). Rendering jitters the centre, the size, the colour and the background from a seeded numpy
Generator, so one scene yields many distinct images. The text-to-image world (`hf_m2n2.demo.t2i_world`) trains its
judge, its pipelines and its prompts on these images.

Example:
    >>> import numpy as np
    >>> scene = SCENES[0]
    >>> scene.english, scene.japanese
    ('a red circle on the left', '左の赤い丸')
    >>> render(scene, np.random.default_rng(0)).shape
    (16, 16, 3)
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np

IMAGE_SIZE = 16

# name -> (RGB, English word, Japanese adjective, code)
COLOURS: dict[str, tuple[tuple[int, int, int], str, str, str]] = {
    "red": ((220, 40, 40), "red", "赤い", "A"),
    "green": ((40, 175, 60), "green", "緑の", "B"),
    "blue": ((50, 90, 235), "blue", "青い", "C"),
    "yellow": ((235, 210, 40), "yellow", "黄色い", "D"),
}
# name -> (English noun, Japanese noun, code)
SHAPES: dict[str, tuple[str, str, str]] = {
    "circle": ("circle", "丸", "E"),
    "square": ("square", "四角", "F"),
    "triangle": ("triangle", "三角", "G"),
}
# name -> (centre (x, y) as fractions of the image, English phrase, Japanese prefix, code)
POSITIONS: dict[str, tuple[tuple[float, float], str, str, str]] = {
    "left": ((0.3, 0.5), "on the left", "左の", "H"),
    "right": ((0.7, 0.5), "on the right", "右の", "J"),
    "top": ((0.5, 0.3), "at the top", "上の", "K"),
    "bottom": ((0.5, 0.7), "at the bottom", "下の", "M"),
}


@dataclass(frozen=True)
class Scene:
    """What an image shows: one shape of one colour at one position.

    Attributes:
        colour: a key of `COLOURS`.
        shape: a key of `SHAPES`.
        position: a key of `POSITIONS`.
    """

    colour: str
    shape: str
    position: str

    @property
    def english(self) -> str:
        """The English caption, e.g. `a red circle on the left`."""
        return f"a {COLOURS[self.colour][1]} {SHAPES[self.shape][0]} {POSITIONS[self.position][1]}"

    @property
    def japanese(self) -> str:
        """The Japanese caption, e.g. `左の赤い丸` (the position first, as Japanese word order has it)."""
        return f"{POSITIONS[self.position][2]}{COLOURS[self.colour][2]}{SHAPES[self.shape][1]}"

    @property
    def code(self) -> str:
        """The attribute code, e.g. `A E H`: colour, shape and position letters (in neither language)."""
        return f"{COLOURS[self.colour][3]} {SHAPES[self.shape][2]} {POSITIONS[self.position][3]}"

    def caption(self, language: str) -> str:
        """The caption in `language`: `en`, `ja` or `code`."""
        captions = {"en": self.english, "ja": self.japanese, "code": self.code}
        if language not in captions:
            raise ValueError(f"unknown language {language!r} (use en, ja or code)")
        return captions[language]


SCENES: tuple[Scene, ...] = tuple(Scene(c, s, p) for c, s, p in product(COLOURS, SHAPES, POSITIONS))
LANGUAGES = ("en", "ja")


def _coverage(shape: str, cx: np.ndarray, cy: np.ndarray, radius: np.ndarray, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of `shape` centred at (cx, cy) with half-width `radius` (pixels), one
    image per row of the arguments: an `(n, size, size)` float32 array. A pixel is covered by `0.5 - d` clipped to
    [0, 1], where d is its centre's signed distance to the shape's outline (negative inside)."""
    axis = np.arange(size, dtype=np.float32) + 0.5
    cx, cy, radius = (v.astype(np.float32)[:, None, None] for v in (cx, cy, radius))
    dx, dy = axis[None, None, :] - cx, axis[None, :, None] - cy  # (n, 1, size) and (n, size, 1)
    if shape == "circle":
        distance = np.sqrt(dx * dx + dy * dy) - radius
    elif shape == "square":  # half-width 0.85 r: about the circle's visual weight
        distance = np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * radius
    elif shape == "triangle":  # pointing up: apex (0, -r), base corners (+-r, 0.8 r)
        side = (1.8 * np.abs(dx) - (dy + radius)) / np.float32(np.hypot(1.8, 1.0))
        distance = np.maximum(side, dy - 0.8 * radius)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.clip(0.5 - distance, 0.0, 1.0)


def render_many(scenes: list[Scene], rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw one image per scene with random jitter (centre, size, colour, background).

    Args:
        scenes: what to draw.
        rng: the source of the jitter (the same generator state gives the same images).
        size: the images' width and height in pixels.

    Returns:
        An `(len(scenes), size, size, 3)` uint8 RGB array.
    """
    n = len(scenes)
    centre = np.array([POSITIONS[s.position][0] for s in scenes], dtype=np.float64).reshape(n, 2)
    centre = centre + rng.uniform(-0.04, 0.04, size=(n, 2))
    radius = size * rng.uniform(0.19, 0.24, size=n)
    base_colour = np.array([COLOURS[s.colour][0] for s in scenes], dtype=np.float64).reshape(n, 3)
    colour = np.clip(base_colour + rng.uniform(-20, 20, size=(n, 3)), 0, 255)
    background = rng.uniform(15, 55, size=(n, 1)) + rng.uniform(-6, 6, size=(n, 3))
    coverage = np.empty((n, size, size), dtype=np.float32)
    for shape in SHAPES:
        rows = np.array([i for i, s in enumerate(scenes) if s.shape == shape], dtype=np.int64)
        coverage[rows] = _coverage(shape, centre[rows, 0] * size, centre[rows, 1] * size, radius[rows], size)
    image = (
        coverage[..., None] * colour[:, None, None] + (1 - coverage[..., None]) * background[:, None, None]
    )
    return np.round(image).astype(np.uint8)


def render(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw one image of `scene` (`render_many` of one scene): a `(size, size, 3)` uint8 RGB array."""
    return render_many([scene], rng, size)[0]


def sample_images(
    count: int, rng: np.random.Generator, size: int = IMAGE_SIZE, scenes: tuple[Scene, ...] = SCENES
) -> tuple[np.ndarray, np.ndarray]:
    """`count` images of scenes drawn in balanced rounds (every scene once per round, in random order).

    Args:
        count: how many images.
        rng: the source of the scene order and of the jitter.
        size: image size in pixels.
        scenes: the scenes to draw from.

    Returns:
        `(images, indices)`: a `(count, size, size, 3)` uint8 array and the index into `scenes` of each image.
    """
    rounds = -(-count // len(scenes))
    indices = np.concatenate([rng.permutation(len(scenes)) for _ in range(rounds)])[:count]
    return render_many([scenes[i] for i in indices], rng, size), indices

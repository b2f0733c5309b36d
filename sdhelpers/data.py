"""The shapes world: TinySD's synthetic, deterministic training data.

Every image is 64×64 RGB: one shape (circle, square or triangle) of a plain named colour on a
plain named background, at a random size and position. Images are drawn with Pillow from a seed,
so no data files exist: the same seed gives the same bytes on every machine.

Why a synthetic world? It is small enough to train a real Stable Diffusion (same classes, scaled
down) on a laptop CPU, and every caption is exactly true, so a pixel-level judge
(:mod:`sdhelpers.judge`) can score whether a generated image obeys its prompt.

Rules of the world:

* Captions follow one template, ``"a {colour} {shape} on a {background} background"``
  (e.g. ``"a red circle on a blue background"``); :func:`caption` writes them and
  :func:`parse_caption` reads them back.
* A shape never has its background's colour (no blue shape on a blue background).
* The colour×shape pairs in :data:`HELD_OUT` never appear in the training split, so the book can
  ask honestly whether the model composes "purple" and "square" without ever having seen a
  purple square. Every colour and every shape still appears in training with other partners.
* Geometry: every shape fits a ``size``×``size`` box (``size`` from 22 to 44 px, in 0.5 px steps),
  centred at ``centre`` and kept fully inside the image with a 1 px margin, no rotation. Big
  enough for an 8×-downsampling VAE to keep, and for the judge to tell the shapes apart by how
  much of that box they fill (square 1, circle π/4 ≈ 0.785, triangle 1/2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from sdhelpers import checks
from sdhelpers.drawing import SUPERSAMPLE, draw_shape

IMAGE_SIZE = 64
"""Side of every image, in pixels."""

MIN_SIZE = 22.0
MAX_SIZE = 44.0
SIZE_STEP = 0.5
MARGIN = 1.0
"""Shapes stay this many pixels away from the image border, so the border shows only background."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "orange": (255, 128, 0),
    "yellow": (255, 235, 0),
    "green": (30, 200, 60),
    "blue": (30, 80, 230),
    "purple": (150, 50, 210),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
"""Shape colours, chosen at least 100 RGB units apart from each other and from every background,
so a blurred or slightly off-colour generated shape still has an unambiguous nearest name."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": COLOURS["black"],
    "white": COLOURS["white"],
    "gray": (128, 128, 128),
    "blue": COLOURS["blue"],
}
"""Background colours. A name shared with :data:`COLOURS` means the very same RGB value."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""The shapes TinySD was trained on: :func:`sample_scene` draws only these."""

NEW_SHAPES: tuple[str, ...] = ("star", "cross")
"""Shapes that can be drawn, captioned and judged but that no training split ever contains: the
new concepts of the fine-tuning chapter (:mod:`sdhelpers.concepts`). A five-pointed star, apex up,
and a cross (a plus sign) whose arms are a third of its width."""

ALL_SHAPES: tuple[str, ...] = SHAPES + NEW_SHAPES

HELD_OUT: tuple[tuple[str, str], ...] = (
    ("orange", "circle"),
    ("green", "triangle"),
    ("purple", "square"),
)
"""Colour×shape pairs that never appear in training: 3 of the 24 pairs (12.5%).

Each uses a different colour and a different shape, so every colour keeps two shapes and every
shape keeps seven colours in training, and colour-then-shape sampling stays exactly balanced.
None of these colours is also a background, so every held-out pair can be shown on all four.
"""

SPLITS: tuple[str, ...] = ("train", "held_out")

CAPTION_TEMPLATE = "a {colour} {shape} on a {background} background"

OPEN_ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "background")
"""What an open caption may leave unsaid, one at a time (see :func:`open_caption`)."""

_OPEN_RE = re.compile(r"an? (?:(?P<colour>[a-z]+) )?(?P<shape>[a-z]+)(?: on an? (?P<background>[a-z]+) background)?")
_CAPTION_RE = re.compile(r"an? (?P<colour>[a-z]+) (?P<shape>[a-z]+) on an? (?P<background>[a-z]+) background")


def _check_split(split: Any) -> str:
    return checks.choice(split, SPLITS, "split")


@dataclass(frozen=True)
class Scene:
    """Everything that decides one image: what is drawn (three words) and where (geometry).

    ``centre`` is ``(x, y)`` in pixels from the top-left corner and ``size`` the side of the box the
    shape fills; the defaults draw a medium shape in the middle, which is what
    :func:`parse_caption` returns since a caption says nothing about geometry.
    """

    colour: str
    shape: str
    background: str
    centre: tuple[float, float] = (IMAGE_SIZE / 2, IMAGE_SIZE / 2)
    size: float = 32.0

    def __post_init__(self) -> None:
        checks.choice(self.colour, tuple(COLOURS), "colour")
        checks.choice(self.shape, ALL_SHAPES, "shape")
        checks.choice(self.background, tuple(BACKGROUNDS), "background")
        if self.colour == self.background:
            raise ValueError(
                f"background: {self.background!r} equals colour {self.colour!r}; a shape never has its background's colour"
            )
        centre = self.centre
        if not (isinstance(centre, tuple) and len(centre) == 2 and all(isinstance(v, (int, float)) for v in centre)):
            raise ValueError(f"centre: {self.centre!r} is not allowed; use an (x, y) tuple of pixel coordinates")
        if not isinstance(self.size, (int, float)) or not MIN_SIZE / 2 <= self.size <= IMAGE_SIZE:
            raise ValueError(f"size: {self.size!r} is out of range; allowed: {MIN_SIZE / 2} to {IMAGE_SIZE} pixels")

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.background)

    @property
    def held_out(self) -> bool:
        return is_held_out(self.colour, self.shape)


def caption(colour: str, shape: str, background: str) -> str:
    """The one caption template of the world, e.g. ``"a red circle on a blue background"``."""
    checks.choice(colour, tuple(COLOURS), "colour")
    checks.choice(shape, ALL_SHAPES, "shape")
    checks.choice(background, tuple(BACKGROUNDS), "background")
    return CAPTION_TEMPLATE.format(colour=colour, shape=shape, background=background)


def open_caption(colour: str | None = None, shape: str | None = None, background: str | None = None) -> str:
    """A caption that may leave attributes unsaid, as people write prompts.

    ``open_caption(shape="circle", background="white")`` is ``"a circle on a white background"``,
    ``open_caption("red", "square")`` is ``"a red square"`` and an unsaid shape is the word "shape":
    ``"a green shape on a black background"``. With all three it is :func:`caption`. Trained on
    such captions, a model learns to fill in what a prompt leaves open, and a negative prompt has
    something to push against.
    """
    if colour is None and shape is None and background is None:
        raise ValueError("open_caption: say at least one of colour, shape and background")
    if colour is not None:
        checks.choice(colour, tuple(COLOURS), "colour")
    if shape is not None:
        checks.choice(shape, tuple(SHAPES), "shape")
    if background is not None:
        checks.choice(background, tuple(BACKGROUNDS), "background")
    head = " ".join(w for w in ("a", colour, shape or "shape") if w)
    return f"{head} on a {background} background" if background else head


def parse_open_caption(text: str) -> dict[str, str | None] | None:
    """The attributes a caption states (``None`` for an unsaid one); ``None`` if it is not the world's.

    Reads everything :func:`open_caption` writes, full captions included, with the same forgiveness
    as :func:`parse_caption`.
    """
    if not isinstance(text, str):
        raise TypeError(f"text: expected a caption string, got {type(text).__name__}")
    match = _OPEN_RE.fullmatch(" ".join(text.lower().split()).rstrip("."))
    if match is None:
        return None
    said = {"colour": match["colour"], "shape": None if match["shape"] == "shape" else match["shape"],
            "background": match["background"]}
    known = {"colour": COLOURS, "shape": SHAPES, "background": BACKGROUNDS}
    if any(v is not None and v not in known[k] for k, v in said.items()) or not any(said.values()):
        return None
    if said["colour"] is not None and said["colour"] == said["background"]:
        return None
    return said


def parse_caption(text: str) -> Scene | None:
    """Recover the three words of a caption; ``None`` if it is not a valid scene of the world.

    Case, surrounding spaces, a final full stop and "an" for "a" are forgiven, so a prompt typed by
    hand ("An orange square on a gray background.") parses too. Unknown words, or a shape with its
    background's colour, give ``None``: the judge cannot score such a prompt.
    """
    if not isinstance(text, str):
        raise TypeError(f"text: expected a caption string, got {type(text).__name__}")
    cleaned = " ".join(text.lower().split()).rstrip(".")
    match = _CAPTION_RE.fullmatch(cleaned)
    if match is None:
        return None
    try:
        return Scene(match["colour"], match["shape"], match["background"])
    except ValueError:
        return None


def is_held_out(colour: str, shape: str) -> bool:
    """Whether this colour×shape pair is kept out of training (see :data:`HELD_OUT`).

    A :data:`NEW_SHAPES` shape is in no split at all, so none of its pairs is "held out".
    """
    checks.choice(colour, tuple(COLOURS), "colour")
    checks.choice(shape, ALL_SHAPES, "shape")
    return (colour, shape) in HELD_OUT


def _backgrounds_for(colour: str) -> list[str]:
    return [b for b in BACKGROUNDS if b != colour]


def _scenes(split: str) -> list[Scene]:
    want_held_out = _check_split(split) == "held_out"
    return [
        Scene(colour, shape, background)
        for colour in COLOURS
        for shape in SHAPES
        if is_held_out(colour, shape) == want_held_out
        for background in _backgrounds_for(colour)
    ]


def training_scenes() -> list[Scene]:
    """Every colour×shape×background the training split can show (default geometry)."""
    return _scenes("train")


def held_out_scenes() -> list[Scene]:
    """Every colour×shape×background of the held-out split: the :data:`HELD_OUT` pairs on each allowed background."""
    return _scenes("held_out")


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    # rng.integers is one of NumPy's stream-stable draws, so a seed gives the same scene everywhere.
    return options[int(rng.integers(len(options)))]


def _grid_uniform(rng: np.random.Generator, low: float, high: float, step: float) -> float:
    return low + step * int(rng.integers(int(round((high - low) / step)) + 1))


def sample_scene(rng: np.random.Generator, split: str = "train") -> Scene:
    """Draw one scene: colour, then shape, then background, each uniform among what the split allows.

    Colours and shapes come out exactly balanced (that is why :data:`HELD_OUT` uses each colour and
    shape once). Backgrounds are nearly so: gray, the one background that is no shape's colour,
    is allowed with every colour and comes up about 28% of the time against 24% for the others.
    Size and centre lie on a 0.5/0.25 px grid so the 4× drawing uses whole pixels.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    want_held_out = _check_split(split) == "held_out"
    pairs = [(c, s) for c in COLOURS for s in SHAPES if is_held_out(c, s) == want_held_out]
    colour = _pick(rng, list(dict.fromkeys(c for c, _ in pairs)))
    shape = _pick(rng, [s for c, s in pairs if c == colour])
    background = _pick(rng, _backgrounds_for(colour))
    centre, size = sample_geometry(rng)
    return Scene(colour, shape, background, centre=centre, size=size)


def sample_geometry(rng: np.random.Generator, min_size: float = MIN_SIZE) -> tuple[tuple[float, float], float]:
    """A size from ``min_size`` to :data:`MAX_SIZE`, then a centre that keeps the shape inside the margin."""
    size = _grid_uniform(rng, min_size, MAX_SIZE, SIZE_STEP)
    low, high = size / 2 + MARGIN, IMAGE_SIZE - size / 2 - MARGIN
    step = 1 / SUPERSAMPLE
    return (_grid_uniform(rng, low, high, step), _grid_uniform(rng, low, high, step)), size


def render(scene: Scene) -> Image.Image:
    """Draw a scene as a 64×64 RGB image, anti-aliased by exact coverage (:mod:`sdhelpers.drawing`)."""
    if not isinstance(scene, Scene):
        raise TypeError(f"scene: expected a Scene, got {type(scene).__name__}")
    return draw_shape(scene.shape, COLOURS[scene.colour], BACKGROUNDS[scene.background], scene.centre, scene.size,
                      IMAGE_SIZE)


def make_image(seed: int, split: str = "train") -> Image.Image:
    """The image of scene ``sample_scene(np.random.default_rng(seed), split)``: one seed, one image."""
    checks.seed(seed)
    return render(sample_scene(np.random.default_rng(seed), split))


def __getattr__(name: str):
    """``sdhelpers.data.ShapesDataset``, the name the chapters use, resolved on first use.

    The class lives in :mod:`sdhelpers.shapes_dataset`, which imports this module; importing it
    lazily here lets either module be imported first.
    """
    if name == "ShapesDataset":
        from sdhelpers.shapes_dataset import ShapesDataset

        return ShapesDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

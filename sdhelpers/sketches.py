"""Crude "hand-drawn" sketches: the input image-to-image cleans up."""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
from PIL import ImageDraw

from sdhelpers import checks
from sdhelpers.pixels import Image, _check_background

def blob_sketch(
    size: tuple[int, int] = (64, 64),
    colour: tuple[int, int, int] = (230, 30, 30),
    background: tuple[int, int, int] = (30, 80, 230),
    centre: tuple[float, float] | None = None,
    radius: float | None = None,
    wobble: float = 0.35,
    corners: int = 9,
    seed: int = 0,
) -> Image:
    """A crude "hand-drawn" colour-block sketch: one irregular blob of ``colour`` on a plain ``background``.

    The kind of input image-to-image (SDEdit) cleans up: the layout and the colours are right, the
    shape is not. The blob is a polygon of ``corners`` points around ``centre`` (default: the image's
    middle); point ``k`` sits at angle ``2*pi*k/corners`` (plus a jitter of up to a third of the
    spacing) and at distance ``radius * (1 + wobble * u)`` with ``u`` uniform in [-1, 1]. ``radius``
    defaults to a quarter of the shorter side. Drawn without anti-aliasing, so every pixel is exactly
    ``colour`` or ``background``. The same ``seed`` gives the same blob.
    """
    width, height = checks.image_size(size)
    colour, background = _check_colour(colour, "colour"), _check_colour(background, "background")
    cx, cy = (width / 2, height / 2) if centre is None else _check_point(centre)
    radius = min(width, height) / 4 if radius is None else radius
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not radius > 0:
        raise ValueError(f"radius: expected a positive number of pixels, got {radius!r}")
    if isinstance(wobble, bool) or not isinstance(wobble, (int, float)) or not 0 <= wobble < 1:
        raise ValueError(f"wobble: expected a number in [0, 1), got {wobble!r}")
    if isinstance(corners, bool) or not isinstance(corners, int) or corners < 3:
        raise ValueError(f"corners: expected an integer >= 3, got {corners!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an integer, got {seed!r}")
    rng = np.random.default_rng(seed)
    step = 2 * math.pi / corners
    angles = step * np.arange(corners) + rng.uniform(-step / 3, step / 3, corners)
    radii = radius * (1 + wobble * rng.uniform(-1, 1, corners))
    points = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a, r in zip(angles, radii)]
    sketch = PIL.Image.new("RGB", (width, height), background)
    ImageDraw.Draw(sketch).polygon(points, fill=colour)
    return sketch


def _check_colour(value: object, name: str) -> tuple[int, int, int]:
    try:
        return _check_background(value)
    except ValueError:
        raise ValueError(f"{name}: expected 3 integers in [0, 255] (an RGB colour), got {value!r}") from None


def _check_point(point: object) -> tuple[float, float]:
    ok = isinstance(point, (tuple, list)) and len(point) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in point
    )
    if not ok:
        raise ValueError(f"centre: expected (x, y) as two numbers of pixels, got {point!r}")
    return float(point[0]), float(point[1])

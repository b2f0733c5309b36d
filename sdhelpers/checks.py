"""Argument checks shared by the public entrances of :mod:`sdhelpers`.

Why one module: a reader who passes a bad value should get the same kind of message wherever
they pass it: the argument's name, the value, and what is allowed. Each public function checks
its arguments once, here, and the code behind it trusts them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def positive_int(value: Any, name: str) -> int:
    """``value`` as an int, if it is an integer ≥ 1."""
    if not _is_int(value) or value <= 0:
        raise ValueError(f"{name}: {value!r} is not allowed; use a positive integer")
    return int(value)


def int_at_least(value: Any, name: str, minimum: int) -> int:
    """``value`` as an int, if it is an integer ≥ ``minimum``."""
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name}: {value!r} is not allowed; use an integer >= {minimum}")
    return int(value)


def seed(value: Any, name: str = "seed") -> int:
    """A seed: a non-negative integer."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name}: {value!r} is not allowed; use a non-negative integer")
    return int(value)


def probability(value: Any, name: str) -> float:
    """A number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: {value!r} is not allowed; use a number in [0, 1]")
    return float(value)


def positive_number(value: Any, name: str, example: str = "1e-4") -> float:
    """A finite number > 0 (a learning rate, a scale)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise ValueError(f"{name}: {value!r} is not allowed; use a finite number > 0 (e.g. {example})")
    return float(value)


def choice(value: Any, allowed, name: str) -> Any:
    """One of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}: {value!r} is not allowed; use one of {', '.join(map(str, allowed))}")
    return value


def pil_image(value: Any, name: str = "image"):
    """A PIL image."""
    import PIL.Image

    if not isinstance(value, PIL.Image.Image):
        raise TypeError(f"{name}: expected a PIL.Image.Image, got {type(value).__name__}")
    return value


def image_size(size: object) -> tuple[int, int]:
    """An image size ``(width, height)``: two positive integers."""
    ok = isinstance(size, (tuple, list)) and len(size) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size
    )
    if not ok:
        raise ValueError(f"size: expected (width, height) as two positive integers, got {size!r}")
    return tuple(size)  # type: ignore[return-value]


def box(box: object) -> tuple[int, int, int, int]:
    """A box ``(left, top, right, bottom)`` of integers, right and bottom exclusive, as in Pillow."""
    ok = isinstance(box, (tuple, list)) and len(box) == 4 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in box
    )
    if not ok or not (box[0] < box[2] and box[1] < box[3]):
        raise ValueError(
            f"box: expected (left, top, right, bottom) integers with left < right and top < bottom, got {box!r}"
        )
    return tuple(box)  # type: ignore[return-value]


def generator(value: Any, name: str = "generator") -> torch.Generator:
    """A ``torch.Generator``: every random draw of a training step comes from one."""
    if not isinstance(value, torch.Generator):
        raise TypeError(f"{name}: expected a torch.Generator (make_generator(seed)), got {type(value).__name__}")
    return value


def dataset(value: Any, name: str = "dataset", needs: str = "image") -> Any:
    """A non-empty map-style dataset whose items are dicts holding a ``needs`` tensor.

    The shapes world's :class:`~sdhelpers.data.ShapesDataset` and the file-based
    :class:`~sdhelpers.loop.ImageTextDataset` both qualify.
    """
    if not (hasattr(value, "__len__") and hasattr(value, "__getitem__")):
        raise TypeError(
            f"{name}: expected a map-style dataset (len() and [i]) yielding {{'{needs}': tensor}}, "
            f"got {type(value).__name__}"
        )
    if len(value) == 0:
        raise ValueError(f"{name}: is empty (0 items); training needs at least one image-caption pair")
    item = value[0]
    if not isinstance(item, dict) or not isinstance(item.get(needs), torch.Tensor):
        raise TypeError(
            f"{name}: items must be dicts with an '{needs}' tensor (3, H, W) in [-1, 1], like ShapesDataset's"
        )
    return value

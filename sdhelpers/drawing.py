"""Drawing one shape with Pillow: the pixels of the shapes world, apart from what the words mean.

Why a module of its own: the world's rules (:mod:`sdhelpers.data`: which colours, shapes and
backgrounds exist, which pairs are held out) and the geometry of drawing them change for different
reasons. The judge (:mod:`sdhelpers.judge`) fits the same star and cross corners that are drawn
here, so it imports them from this one place.

Shapes are drawn at :data:`SUPERSAMPLE`× on whole pixels, then box-averaged down
(``Image.reduce``): every pixel gets the exact fraction of it the shape covers. That gives smooth,
halo-free edges (a Lanczos filter would ring), which is easier on the VAE and keeps colours pure
for the judge.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4
"""Shapes are drawn at 4× and box-averaged down: each pixel gets its exact coverage, edges are smooth."""

STAR_INNER_RATIO = 0.381966
"""Inner over outer radius of a regular five-pointed star (a pentagram's outline): 1/φ²."""

CROSS_ARM = 1 / 3
"""Width of a cross's arms over the cross's width."""

DRAWABLE = ("circle", "square", "triangle", "star", "cross")
"""Every shape :func:`draw_shape` can draw."""

RGB = tuple[int, int, int]


def draw_shape(shape: str, fill: RGB, background: RGB, centre: tuple[float, float], size: float,
               image_size: int) -> Image.Image:
    """An ``image_size``-pixel square RGB image of one ``shape`` filling a ``size``×``size`` box at ``centre``.

    ``centre`` is ``(x, y)`` in pixels from the top-left corner. The caller has checked the
    arguments (:class:`sdhelpers.data.Scene` does); an unknown shape is still refused here.
    """
    if shape not in DRAWABLE:
        raise ValueError(f"shape: {shape!r} is not allowed; choose one of {', '.join(DRAWABLE)}")
    k = SUPERSAMPLE
    big = Image.new("RGB", (image_size * k, image_size * k), background)
    draw = ImageDraw.Draw(big)
    side = round(size * k)
    left = round((centre[0] - size / 2) * k)
    top = round((centre[1] - size / 2) * k)
    right, bottom = left + side - 1, top + side - 1  # Pillow boxes include their last pixel
    if shape == "square":
        draw.rectangle((left, top, right, bottom), fill=fill)
    elif shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif shape in NEW_SHAPE_CORNERS:
        draw.polygon(new_shape_outline(shape, ((left + right + 1) / 2, (top + bottom + 1) / 2), side), fill=fill)
    else:  # triangle: apex up, base at the bottom; a flat tip of ≤ 1 sub-pixel keeps it symmetric
        apex_l, apex_r = left + (side - 1) // 2, left + side // 2
        draw.polygon([(apex_l, top), (apex_r, top), (right, bottom), (left, bottom)], fill=fill)
    return big.reduce(k)


def new_shape_outline(shape: str, box_centre: tuple[float, float], side: float) -> list[tuple[float, float]]:
    """The corners of a star or a cross that fills a ``side``×``side`` box's width.

    A cross fills the box. A star is 2R·sin 72° ≈ 1.902 R wide and R(1 + cos 36°) ≈ 1.809 R
    tall for an outer radius R, so it is centred in the box vertically too; its own centre (the
    centre of its circle) sits R below its top.
    """
    if shape == "cross":
        return cross_corners(box_centre, side / 2)
    radius = side / (2 * np.sin(np.radians(72)))
    height = radius * (1 + np.cos(np.radians(36)))
    return star_corners((box_centre[0], box_centre[1] - height / 2 + radius), radius)


def star_corners(centre: tuple[float, float], radius: float) -> list[tuple[float, float]]:
    """The ten corners of a star of outer ``radius`` around ``centre``: outer, inner, outer, …"""
    angles = np.radians(-90 + 36 * np.arange(10))
    radii = np.where(np.arange(10) % 2 == 0, radius, radius * STAR_INNER_RATIO)
    return [(centre[0] + r * np.cos(a), centre[1] + r * np.sin(a)) for r, a in zip(radii, angles)]


def cross_corners(centre: tuple[float, float], radius: float) -> list[tuple[float, float]]:
    """The twelve corners of a cross reaching ``radius`` from ``centre``, arms :data:`CROSS_ARM` wide."""
    r, a = radius, radius * CROSS_ARM
    corners = [(-a, -r), (a, -r), (a, -a), (r, -a), (r, a), (a, a), (a, r), (-a, r), (-a, a), (-r, a), (-r, -a), (-a, -a)]
    return [(centre[0] + x, centre[1] + y) for x, y in corners]


NEW_SHAPE_CORNERS = {"star": star_corners, "cross": cross_corners}
"""Each new shape's corners from its centre and radius (the judge fits them by their moments)."""

"""Images for people to look at: grids, labelled figures, enlargements, differences, PSNR.

The conversions between Pillow images and tensors live in :mod:`sdhelpers.pixels`, the latent
viewers in :mod:`sdhelpers.latent_views` and the sketches in :mod:`sdhelpers.sketches`; all of
them are re-exported here, so ``from sdhelpers.images import ...`` is the one place to look.

Conventions used throughout:

* sizes are ``(width, height)`` and boxes ``(left, top, right, bottom)`` with
  ``right``/``bottom`` exclusive: Pillow's order, so ``image.crop(box)`` agrees;
* masks (:mod:`sdhelpers.masks`) are ``"L"`` images where 255 means *repaint* and
  0 means *keep*, the convention of the diffusers inpainting pipelines;
* a 64×64 image is shown enlarged with NEAREST, so its pixels stay visible squares.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
from diffusers.utils import make_image_grid

from sdhelpers import checks
from sdhelpers.latent_views import (
    SD15_LATENT_RGB_FACTORS,
    latent_channels_image,
    latents_to_rgb_preview,
)
from sdhelpers.pixels import (
    SUPPORTED_MODES,
    Image,
    load_image,
    pil_to_tensor,
    tensor_to_pil,
    to_rgb,
)
from sdhelpers.sketches import blob_sketch

__all__ = [
    "SUPPORTED_MODES",
    "SD15_LATENT_RGB_FACTORS",
    "pil_to_tensor",
    "tensor_to_pil",
    "to_rgb",
    "load_image",
    "image_grid",
    "labelled_grid",
    "difference_image",
    "latent_channels_image",
    "latents_to_rgb_preview",
    "psnr",
    "enlarge",
    "zoom",
    "blob_sketch",
]

# --------------------------------------------------------------------------- grids

def _grid_shape(count: int, rows: int | None, cols: int | None) -> tuple[int, int]:
    if rows is None and cols is None:
        return 1, count
    if rows is not None and cols is not None:
        rows, cols = checks.positive_int(rows, "rows"), checks.positive_int(cols, "cols")
        if rows * cols != count:
            raise ValueError(
                f"rows, cols: a {rows}x{cols} grid has {rows * cols} cells but {count} images were given"
            )
        return rows, cols
    if rows is not None:
        rows = checks.positive_int(rows, "rows")
        return rows, math.ceil(count / rows)
    cols = checks.positive_int(cols, "cols")
    return math.ceil(count / cols), cols


def image_grid(images: Sequence[Image], rows: int | None = None, cols: int | None = None) -> Image:
    """Lay images out in a grid, row by row, with ``diffusers.utils.make_image_grid``.

    Layout: by default one row. If you give both ``rows`` and ``cols`` you state the
    layout, so ``rows * cols`` must equal ``len(images)`` (a mismatch is a
    ValueError, as it is almost always a mistake). If you give only one, the other
    is ``ceil(len(images) / given)`` and the last row is padded with white tiles.

    Sizes: every cell has the first image's size; an image of another size is
    resized to it with LANCZOS (diffusers' default resampling), aspect ratio not
    kept, so mixing sizes never silently overlaps tiles. Every image goes through
    :func:`to_rgb`.
    """
    if isinstance(images, Image) or not isinstance(images, Sequence) or len(images) == 0:
        raise ValueError(f"images: expected a non-empty list of PIL images, got {images!r:.80}")
    for index, image in enumerate(images):
        checks.pil_image(image, f"images[{index}]")
    rows, cols = _grid_shape(len(images), rows, cols)
    size = images[0].size
    tiles = [to_rgb(image) for image in images]
    tiles = [tile if tile.size == size else tile.resize(size, PIL.Image.Resampling.LANCZOS) for tile in tiles]
    tiles += [PIL.Image.new("RGB", size, (255, 255, 255))] * (rows * cols - len(tiles))
    return make_image_grid(tiles, rows=rows, cols=cols)


def _check_labels(labels: Sequence[str], count: int, name: str, what: str) -> list[str]:
    labels = list(labels)
    if labels and len(labels) != count:
        raise ValueError(f"{name}: {len(labels)} labels for {count} {what}")
    return labels


def _wrap(label: str, width: int) -> str:
    """Each line of ``label`` wrapped to ``width`` characters; its own line breaks are kept."""
    return "\n".join(textwrap.fill(line, width=width) for line in str(label).split("\n"))


def _line_count(labels: Sequence[str]) -> int:
    return max((label.count("\n") + 1 for label in labels), default=0)


def labelled_grid(images: Sequence[Image], rows: int | None = None, cols: int | None = None, *,
                  labels: Sequence[str] = (), row_labels: Sequence[str] = (),
                  col_labels: Sequence[str] = (), title: str | None = None,
                  inches: float = 1.4):
    """A matplotlib figure of images in a grid, each tile ``inches`` wide, with gaps and labels.

    The book's figure for anything a reader compares: ``labels`` go under each tile (the
    prompt, or the setting that varies), ``row_labels`` left of each row and ``col_labels``
    above each column; any of them may be empty. Layout as :func:`image_grid`: one row by
    default, filled row by row. Pixels are drawn with nearest-neighbour, so a 64-px image
    shows what the model made, at 140 px with the default ``inches`` (100 dpi).

    The figure is closed and returned: as the last line of a notebook cell it is shown once,
    and ``.savefig`` still works.
    """
    import matplotlib.pyplot as plt

    if isinstance(images, Image) or not isinstance(images, Sequence) or len(images) == 0:
        raise ValueError(f"images: expected a non-empty list of PIL images, got {images!r:.80}")
    images = [checks.pil_image(image, f"images[{i}]") for i, image in enumerate(images)]
    rows, cols = _grid_shape(len(images), rows, cols)
    labels = _check_labels(labels, len(images), "labels", "images")
    row_labels = _check_labels(row_labels, rows, "row_labels", "rows")
    col_labels = _check_labels(col_labels, cols, "col_labels", "columns")
    if isinstance(inches, bool) or not isinstance(inches, (int, float)) or not inches > 0:
        raise ValueError(f"inches: {inches!r} is not allowed; use a number > 0")
    wrapped = [_wrap(label, int(inches * 15)) for label in labels]
    col_labels = [_wrap(label, int(inches * 14)) for label in col_labels]
    row_labels = [_wrap(label, 18) for label in row_labels]
    width = cols * inches * 1.08 + (1.3 if row_labels else 0.1)
    height = (rows * (inches * 1.08 + 0.16 * _line_count(wrapped))
              + 0.16 * _line_count(col_labels) + (0.35 if title else 0.1))
    fig, axes = plt.subplots(rows, cols, squeeze=False, figsize=(width, height))
    for index, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        row, col = divmod(index, cols)
        if row == 0 and col_labels:
            ax.set_title(col_labels[col], fontsize=9)
        if col == 0 and row_labels:
            ax.set_ylabel(row_labels[row], fontsize=9, rotation=0, ha="right", va="center")
        if index >= len(images):
            ax.axis("off")
            continue
        ax.imshow(to_rgb(images[index]), interpolation="nearest")
        if labels:  # wrapped to the tile's width, so long prompts never overlap
            ax.set_xlabel(wrapped[index], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    plt.close(fig)  # shown once, as the cell's result, rather than again by the inline backend
    return fig


def difference_image(a: Image, b: Image, gain: float = 10.0) -> Image:
    """``|a - b|`` per pixel and channel, times ``gain`` (clipped to 255): where two images differ.

    Differences of a few levels of 255 are invisible side by side; times 10 they show.
    """
    if a.size != b.size:
        raise ValueError(f"b: size {b.size} differs from a's {a.size}; compare images of one size")
    if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not gain > 0:
        raise ValueError(f"gain: {gain!r} is not allowed; use a number > 0")
    diff = np.abs(np.asarray(to_rgb(a), dtype=np.float32) - np.asarray(to_rgb(b), dtype=np.float32))
    return PIL.Image.fromarray(np.clip(diff * gain, 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------- metrics and detail

def _metric_array(value: object, name: str) -> tuple[np.ndarray, float | None]:
    """The array PSNR compares, and its natural data range (None when unknown)."""
    if isinstance(value, Image):
        return np.asarray(to_rgb(value), dtype=np.float64), 255.0
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu")
        value = value.float().numpy() if value.is_floating_point() else value.numpy()
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name}: expected a PIL image, numpy array or torch.Tensor, got {type(value).__name__}")
    if value.dtype == np.uint8:
        return value.astype(np.float64), 255.0
    if np.issubdtype(value.dtype, np.floating):
        return value.astype(np.float64), 2.0
    return value.astype(np.float64), None


def psnr(a: object, b: object, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB: ``10 * log10(data_range**2 / MSE)``.

    Higher means closer; identical inputs give ``float('inf')``. Used to put a
    number on how lossy the VAE's round trip is. ``data_range`` is the span of
    possible values: by default 255 for PIL images (compared as RGB) and uint8
    arrays/tensors, 2.0 for float arrays/tensors (taken as [-1, 1], the VAE's
    range). Both inputs must have the same shape and, unless ``data_range`` is
    given, the same default range, so a PIL image is never compared with a
    [-1, 1] tensor by accident.
    """
    array_a, range_a = _metric_array(a, "a")
    array_b, range_b = _metric_array(b, "b")
    if array_a.shape != array_b.shape:
        raise ValueError(f"a, b: shapes differ: {array_a.shape} vs {array_b.shape}")
    if data_range is None:
        if range_a is None or range_b is None:
            raise ValueError("data_range: can't be inferred for dtypes other than uint8 and float; pass it")
        if range_a != range_b:
            raise ValueError(
                f"a, b: different scales (data range {range_a:g} vs {range_b:g}); "
                "convert one (pil_to_tensor / tensor_to_pil) or pass data_range"
            )
        data_range = range_a
    elif isinstance(data_range, bool) or not isinstance(data_range, (int, float)) or not data_range > 0:
        raise ValueError(f"data_range: expected a positive number, got {data_range!r}")
    mse = float(np.mean((array_a - array_b) ** 2))
    if mse == 0.0:
        return float("inf")
    return 10.0 * math.log10(data_range**2 / mse)


def enlarge(image: Image, scale: int = 2) -> Image:
    """The whole image ``scale`` times larger with NEAREST: 64×64 pixels stay visible squares.

    The book's figures show TinySD's 64×64 images this way; a smoothing resize would hide exactly
    the pixel-level detail (edges, seams, decoder artefacts) the chapters point at.
    """
    checks.pil_image(image, "image")
    return zoom(image, (0, 0, image.width, image.height), scale)


def zoom(image: Image, box: tuple[int, int, int, int], scale: int = 4) -> Image:
    """Crop ``box`` out of ``image`` and enlarge it ``scale`` times with NEAREST.

    NEAREST shows the pixels as they are, as sharp squares, so reconstruction
    artefacts (smeared small text, ringing) are seen rather than smoothed over by
    the enlargement. ``box`` is ``(left, top, right, bottom)``, right/bottom
    exclusive, and must lie inside the image. The image keeps its mode.
    """
    checks.pil_image(image, "image")
    left, top, right, bottom = checks.box(box)
    scale = checks.positive_int(scale, "scale")
    if left < 0 or top < 0 or right > image.width or bottom > image.height:
        raise ValueError(f"box: {box!r} goes outside the {image.width}x{image.height} image")
    detail = image.crop((left, top, right, bottom))
    return detail.resize((detail.width * scale, detail.height * scale), PIL.Image.Resampling.NEAREST)

"""Labelled figures for the chapters: image grids whose rows and columns say what they show.

A 64×64 image is tiny on a page; these figures draw every image large, with nearest-neighbour
pixels (what the model made, not a smoothed version), and put the labels on the axes.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image


def labelled_grid(images: Sequence[Image.Image], rows: int, cols: int, *, row_labels: Sequence[str] = (),
                  col_labels: Sequence[str] = (), title: str | None = None, inches: float = 1.4):
    """A matplotlib figure of ``rows`` × ``cols`` images, filled row by row, each ``inches`` wide.

    ``row_labels`` go left of each row and ``col_labels`` above each column (either may be empty).
    The figure is closed and returned: as the last line of a notebook cell it is shown once, and
    ``.savefig`` still works.
    """
    import matplotlib.pyplot as plt

    images = list(images)
    if not isinstance(rows, int) or not isinstance(cols, int) or rows < 1 or cols < 1:
        raise ValueError(f"rows, cols: {rows!r}, {cols!r} are not allowed; use whole numbers ≥ 1")
    if len(images) != rows * cols:
        raise ValueError(f"images: {len(images)} images do not fill {rows} rows × {cols} columns")
    for name, labels, count in (("row_labels", row_labels, rows), ("col_labels", col_labels, cols)):
        if labels and len(labels) != count:
            raise ValueError(f"{name}: {len(labels)} labels for {count} {name.split('_')[0]}s")
    fig, axes = plt.subplots(rows, cols, figsize=(cols * inches + (1.2 if row_labels else 0), rows * inches + 0.4),
                             squeeze=False)
    for index, (ax, image) in enumerate(zip(axes.flat, images)):
        ax.imshow(image, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        row, col = divmod(index, cols)
        if row == 0 and col_labels:
            ax.set_title(col_labels[col], fontsize=9)
        if col == 0 and row_labels:
            ax.set_ylabel(row_labels[row], fontsize=9, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    plt.close(fig)  # shown once, as the cell's result, rather than again by the inline backend
    return fig


def difference_image(a: Image.Image, b: Image.Image, gain: float = 10.0) -> Image.Image:
    """``|a - b|`` per pixel and channel, times ``gain`` (clipped to 255): where two images differ.

    Differences of a few levels of 255 are invisible side by side; times 10 they show.
    """
    import numpy as np

    if a.size != b.size:
        raise ValueError(f"b: size {b.size} differs from a's {a.size}; compare images of one size")
    if not gain > 0:
        raise ValueError(f"gain: {gain!r} is not allowed; use a number > 0")
    diff = np.abs(np.asarray(a.convert("RGB"), dtype=np.float32) - np.asarray(b.convert("RGB"), dtype=np.float32))
    return Image.fromarray(np.clip(diff * gain, 0, 255).astype(np.uint8))

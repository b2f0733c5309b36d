"""Labelled grids: the right number of panels, labels where asked, clear errors otherwise."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from sdhelpers.images import labelled_grid  # noqa: E402


def _images(n):
    return [Image.new("RGB", (8, 8), (40 * i % 255, 0, 0)) for i in range(n)]


def test_grid_has_one_panel_per_image_and_the_labels():
    fig = labelled_grid(_images(6), 2, 3, row_labels=["plain", "negative"], col_labels=["a", "b", "c"], title="t")
    axes = fig.axes
    assert len(axes) == 6
    assert [ax.get_title() for ax in axes[:3]] == ["a", "b", "c"] and axes[3].get_ylabel() == "negative"
    assert axes[0].images[0].get_interpolation() == "nearest"
    plt.close(fig)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rows=2, cols=2), "images"),
    (dict(rows=0, cols=6), "rows"),
    (dict(rows=2, cols=3, row_labels=["x"]), "row_labels"),
    (dict(rows=2, cols=3, col_labels=["x"]), "col_labels"),
])
def test_grid_rejects_what_does_not_fit(kwargs, match):
    with pytest.raises(ValueError, match=match):
        labelled_grid(_images(6), **kwargs)


def test_difference_image_shows_small_differences_amplified():
    from sdhelpers.images import difference_image

    a, b = Image.new("RGB", (4, 4), (100, 100, 100)), Image.new("RGB", (4, 4), (103, 100, 90))
    assert difference_image(a, b).getpixel((0, 0)) == (30, 0, 100)
    assert difference_image(a, a).getpixel((1, 1)) == (0, 0, 0)
    with pytest.raises(ValueError, match="size"):
        difference_image(a, Image.new("RGB", (2, 2)))
    with pytest.raises(ValueError, match="gain"):
        difference_image(a, b, gain=0)


def test_tiles_carry_their_own_labels_and_are_large():
    fig = labelled_grid(_images(3), labels=["red", "green", "blue"])
    assert [ax.get_xlabel() for ax in fig.axes] == ["red", "green", "blue"]
    fig.canvas.draw()
    box = fig.axes[0].get_window_extent()
    assert box.width >= 128 and box.height >= 128  # a 64-px image is shown at >= 128 px
    plt.close(fig)


def test_an_unfilled_last_row_is_left_blank():
    fig = labelled_grid(_images(5), cols=3)
    assert len(fig.axes) == 6 and not fig.axes[5].axison and not fig.axes[5].images
    plt.close(fig)


def test_tile_labels_must_match_the_images():
    with pytest.raises(ValueError, match="labels: 2 labels for 3 images"):
        labelled_grid(_images(3), labels=["a", "b"])

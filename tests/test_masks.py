"""Tests of sdhelpers.masks: drawing, reading and resizing inpainting masks, and judging seams."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import ImageFilter

from sdhelpers import masks


WHITE = (255, 255, 255)


def random_rgb(width=16, height=8, seed=0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# --------------------------------------------------------------------------- masks


def test_box_mask():
    mask = masks.box_mask((6, 4), (1, 1, 4, 3))
    assert mask.mode == "L" and mask.size == (6, 4)
    expected = np.zeros((4, 6), np.uint8)
    expected[1:3, 1:4] = 255  # right/bottom exclusive, like crop
    assert np.array_equal(np.asarray(mask), expected)


def test_box_mask_clips_outside_parts():
    assert np.asarray(masks.box_mask((4, 4), (-2, -2, 2, 2))).sum() == 4 * 255


def test_ellipse_mask():
    mask = np.asarray(masks.ellipse_mask((20, 10), (0, 0, 20, 10)))
    assert mask[5, 10] == 255 and mask[0, 0] == 0 and mask[9, 19] == 0
    assert set(np.unique(mask)) == {0, 255}
    assert mask[:, :10].sum() == mask[:, 10:][:, ::-1].sum()  # symmetric


@pytest.mark.parametrize("box", [(3, 0, 3, 4), (0, 0, 2), (0.0, 0, 2, 2)])
def test_bad_box(box):
    with pytest.raises(ValueError, match="box"):
        masks.box_mask((4, 4), box)


def test_bad_size():
    with pytest.raises(ValueError, match=r"size: expected \(width, height\)"):
        masks.ellipse_mask((0, 4), (0, 0, 1, 1))


def test_binarize_mask_from_pil_numpy_tensor():
    values = np.array([[0, 127, 128, 255]], np.uint8)  # 127/255 < 0.5 <= 128/255
    expected = torch.tensor([[[[0.0, 0.0, 1.0, 1.0]]]])
    for mask in (PIL.Image.fromarray(values), values, torch.from_numpy(values), values[None, None]):
        out = masks.binarize_mask(mask)
        assert out.dtype == torch.float32 and out.shape == (1, 1, 1, 4)
        assert torch.equal(out, expected)


def test_binarize_mask_threshold_rule_is_greater_or_equal():
    floats = torch.tensor([[0.2, 0.3, 0.9]])
    assert masks.binarize_mask(floats, threshold=0.3).flatten().tolist() == [0.0, 1.0, 1.0]
    assert masks.binarize_mask(floats, threshold=0.0).flatten().tolist() == [1.0, 1.0, 1.0]
    assert masks.binarize_mask(np.array([[True, False]])).flatten().tolist() == [1.0, 0.0]


def test_binarize_mask_rgb_image():
    out = masks.binarize_mask(PIL.Image.new("RGB", (2, 2), WHITE))
    assert torch.equal(out, torch.ones(1, 1, 2, 2))


@pytest.mark.parametrize("threshold", [-0.1, 1.5, True, "0.5"])
def test_binarize_mask_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        masks.binarize_mask(np.zeros((2, 2), np.uint8), threshold=threshold)


def test_binarize_mask_bad_masks():
    with pytest.raises(ValueError, match=r"mask: float masks must hold values in \[0, 1\]"):
        masks.binarize_mask(np.full((2, 2), 255.0))
    with pytest.raises(ValueError, match=r"mask: expected shape"):
        masks.binarize_mask(np.zeros((3, 2, 2), np.uint8))
    with pytest.raises(TypeError, match="mask"):
        masks.binarize_mask([[0, 1]])


def test_resize_mask_keeps_values_binary():
    mask = masks.ellipse_mask((64, 64), (8, 8, 56, 56))
    small = masks.resize_mask(mask, (8, 8))
    assert small.size == (8, 8) and set(np.unique(np.asarray(small))) <= {0, 255}
    big = masks.resize_mask(small, (64, 64))
    assert set(np.unique(np.asarray(big))) == {0, 255}
    tensor_small = masks.resize_mask(masks.binarize_mask(mask), (8, 8))
    assert np.array_equal(np.asarray(tensor_small), np.asarray(small))


def test_blur_mask_softens_edges():
    mask = masks.box_mask((64, 64), (16, 16, 48, 48))
    blurred = np.asarray(masks.blur_mask(mask, 3))
    assert len(np.unique(blurred)) > 10  # gray levels appear at the border
    assert blurred[32, 32] == 255 and blurred[0, 0] == 0
    assert np.array_equal(np.asarray(masks.blur_mask(mask, 0)), np.asarray(mask))
    with pytest.raises(ValueError, match="radius"):
        masks.blur_mask(mask, -1)


def test_dilate_mask_grows_by_pixels():
    mask = masks.box_mask((32, 32), (10, 10, 20, 20))
    grown = masks.dilate_mask(mask, 3)
    assert grown.getbbox() == (7, 7, 23, 23)
    reference = mask.filter(ImageFilter.MaxFilter(7))
    assert np.array_equal(np.asarray(grown), np.asarray(reference))
    assert masks.dilate_mask(mask, 0).getbbox() == (10, 10, 20, 20)
    with pytest.raises(ValueError, match="pixels"):
        masks.dilate_mask(mask, 1.5)


# --------------------------------------------------------------------------- inpainting border: distance, paste-back, seam


def test_mask_distance_is_the_chessboard_distance_to_the_repaint_region():
    mask = masks.box_mask((10, 8), (3, 2, 5, 4))  # repaint columns 3-4, rows 2-3
    distance = masks.mask_distance(mask)
    assert distance.shape == (8, 10)
    rows, cols = np.mgrid[:8, :10]
    expected = np.maximum(np.maximum(3 - cols, cols - 4).clip(0), np.maximum(2 - rows, rows - 3).clip(0))
    assert np.array_equal(distance, expected)
    # one dilation step reaches exactly the pixels at distance <= 1
    grown = np.asarray(masks.dilate_mask(mask, 1)) > 127
    assert np.array_equal(grown, distance <= 1)


def test_mask_distance_needs_a_repaint_pixel():
    with pytest.raises(ValueError, match="^mask: has no repaint pixel"):
        masks.mask_distance(PIL.Image.new("L", (4, 4), 127))


def test_paste_back_hard_keeps_original_outside_and_generated_inside():
    original, generated = random_rgb(16, 16, seed=1), random_rgb(16, 16, seed=2)
    mask = masks.ellipse_mask((16, 16), (3, 3, 13, 13))
    out = np.asarray(masks.paste_back(original, generated, mask))
    repaint = np.asarray(mask) >= 128
    assert np.array_equal(out[~repaint], np.asarray(original)[~repaint])
    assert np.array_equal(out[repaint], np.asarray(generated)[repaint])
    # a binary mask gives what diffusers' apply_overlay gives
    overlay = VaeImageProcessor().apply_overlay(mask, original, generated)
    assert np.array_equal(out, np.asarray(overlay))


def test_paste_back_feather_ramps_inside_the_mask_only():
    original = PIL.Image.new("RGB", (32, 32), (0, 0, 0))
    generated = PIL.Image.new("RGB", (32, 32), (200, 200, 200))
    mask = masks.box_mask((32, 32), (8, 8, 24, 24))
    out = np.asarray(masks.paste_back(original, generated, mask, feather=2))[..., 0]
    repaint = np.asarray(mask) >= 128
    assert (out[~repaint] == 0).all()  # kept pixels untouched
    assert out[16, 16] == 200  # deep inside: fully generated
    row = out[16, 8:16]  # from the border towards the centre
    assert (np.diff(row.astype(int)) >= 0).all() and row[0] < 100  # a ramp, starting low


def test_paste_back_errors():
    a, b = random_rgb(8, 8), random_rgb(8, 8)
    mask = masks.box_mask((8, 8), (2, 2, 6, 6))
    with pytest.raises(ValueError, match="^generated: size 16x8 differs"):
        masks.paste_back(a, random_rgb(16, 8), mask)
    with pytest.raises(ValueError, match="^feather: expected a number >= 0, got -1"):
        masks.paste_back(a, b, mask, feather=-1)
    with pytest.raises(TypeError, match="^original: expected a PIL.Image.Image"):
        masks.paste_back(np.zeros((8, 8, 3)), b, mask)


def test_seam_energy_falls_when_a_step_is_feathered():
    original = PIL.Image.new("RGB", (32, 32), (0, 0, 0))
    generated = PIL.Image.new("RGB", (32, 32), (120, 60, 30))
    mask = masks.box_mask((32, 32), (8, 8, 24, 24))
    hard = masks.seam_energy(masks.paste_back(original, generated, mask), mask, width=4)
    soft = masks.seam_energy(masks.paste_back(original, generated, mask, feather=2), mask, width=4)
    flat = masks.seam_energy(generated, mask, width=4)
    assert flat == 0.0 and 0 < soft < hard / 2
    # the hard step: 16 pixels per side carry (120^2+60^2+30^2) each, over the 4-pixel band on both sides
    band = 32 * 32 - 16 * 16 + 16 * 16 - 8 * 8 - (32 * 32 - 24 * 24)  # kept ring (4 px) + repaint ring (4 px)
    step = 120**2 + 60**2 + 30**2
    assert hard == pytest.approx(4 * 16 * step / band)


def test_seam_energy_errors():
    image = random_rgb(8, 8)
    with pytest.raises(ValueError, match="^mask: needs both repaint"):
        masks.seam_energy(image, PIL.Image.new("L", (8, 8), 255))
    with pytest.raises(ValueError, match="^width: 0 is not allowed; use a positive integer"):
        masks.seam_energy(image, masks.box_mask((8, 8), (2, 2, 6, 6)), width=0)
    with pytest.raises(ValueError, match="^image: size 8x8 differs"):
        masks.seam_energy(image, masks.box_mask((16, 8), (2, 2, 6, 6)))


def test_enlarge_repeats_each_pixel_as_a_square():
    from sdhelpers.images import enlarge

    image = PIL.Image.new("RGB", (2, 1))
    image.putpixel((1, 0), (255, 0, 0))
    big = enlarge(image, 3)
    assert big.size == (6, 3)
    assert big.getpixel((2, 2)) == (0, 0, 0) and big.getpixel((3, 0)) == (255, 0, 0)
    with pytest.raises(ValueError, match="scale"):
        enlarge(image, 0)

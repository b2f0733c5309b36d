"""Tests for sdhelpers.images: each rule the docstrings state is checked on known pixels."""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor

from sdhelpers import images as im

WHITE = (255, 255, 255)


def pixel(image: PIL.Image.Image, xy=(0, 0)):
    return image.getpixel(xy)


def random_rgb(width=16, height=8, seed=0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# --------------------------------------------------------------------------- to_rgb


def composite(value, alpha, background):
    return tuple(round((v * alpha + b * (255 - alpha)) / 255) for v, b in zip(value, background))


def assert_close(got, expected, tol=1):
    assert len(got) == len(expected)
    assert all(abs(g - e) <= tol for g, e in zip(got, expected)), (got, expected)


def test_rgb_is_returned_unchanged_as_a_copy():
    source = random_rgb()
    out = im.to_rgb(source)
    assert out is not source
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(source))


@pytest.mark.parametrize("alpha", [0, 128, 255])
def test_rgba_is_composited_over_background(alpha):
    source = PIL.Image.new("RGBA", (2, 2), (200, 40, 0, alpha))
    out = im.to_rgb(source, background=(0, 0, 255))
    assert out.mode == "RGB"
    assert_close(pixel(out), composite((200, 40, 0), alpha, (0, 0, 255)))
    if alpha == 0:
        assert pixel(out) == (0, 0, 255)


def test_default_background_is_white():
    assert pixel(im.to_rgb(PIL.Image.new("RGBA", (1, 1), (0, 0, 0, 0)))) == WHITE


def test_la_and_premultiplied_modes():
    assert_close(pixel(im.to_rgb(PIL.Image.new("LA", (1, 1), (100, 128)))), composite((100,) * 3, 128, WHITE))
    # La stores 100 premultiplied by alpha 128: the true gray is 100*255/128 = 199
    assert_close(pixel(im.to_rgb(PIL.Image.new("La", (1, 1), (100, 128)))), composite((199,) * 3, 128, WHITE))
    assert_close(pixel(im.to_rgb(PIL.Image.new("RGBa", (1, 1), (50, 0, 0, 128)))), composite((99, 0, 0), 128, WHITE))


def test_l_and_1():
    assert pixel(im.to_rgb(PIL.Image.new("L", (1, 1), 77))) == (77, 77, 77)
    one = PIL.Image.new("1", (2, 1), 0)
    one.putpixel((1, 0), 1)
    out = im.to_rgb(one)
    assert pixel(out, (0, 0)) == (0, 0, 0) and pixel(out, (1, 0)) == WHITE


def palette_image(transparency=None):
    image = PIL.Image.new("P", (2, 1), 0)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    image.putpixel((1, 0), 1)
    if transparency is not None:
        image.info["transparency"] = transparency
    return image


def test_p_without_transparency_uses_palette_colours():
    out = im.to_rgb(palette_image())
    assert pixel(out, (0, 0)) == (10, 20, 30) and pixel(out, (1, 0)) == (200, 100, 50)


def test_p_with_transparency_shows_background():
    out = im.to_rgb(palette_image(transparency=0), background=(1, 2, 3))
    assert pixel(out, (0, 0)) == (1, 2, 3)  # transparent index, not its palette colour
    assert pixel(out, (1, 0)) == (200, 100, 50)


def test_pa():
    source = PIL.Image.new("PA", (1, 1), (1, 0))
    source.putpalette([0, 0, 0, 90, 180, 250] + [0] * (256 * 3 - 6))
    assert pixel(im.to_rgb(source, background=(0, 0, 0))) == (0, 0, 0)  # alpha 0 -> background


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_sixteen_bit_is_scaled_by_257(mode):
    source = PIL.Image.new(mode, (3, 1))
    for x, value in enumerate([65535, 1000, 128]):
        source.putpixel((x, 0), value)
    out = im.to_rgb(source)
    assert [pixel(out, (x, 0)) for x in range(3)] == [WHITE, (4, 4, 4), (0, 0, 0)]  # 1000/257=3.9, 128/257=0.498


def test_mode_i_uses_the_16_bit_range_and_clips():
    source = PIL.Image.new("I", (3, 1))
    for x, value in enumerate([-5, 25700, 70000]):
        source.putpixel((x, 0), value)
    out = im.to_rgb(source)
    assert [pixel(out, (x, 0)) for x in range(3)] == [(0, 0, 0), (100, 100, 100), WHITE]


def test_mode_f_is_clipped_to_unit_range():
    source = PIL.Image.fromarray(np.array([[0.5, -1.0, 3.0, np.nan]], dtype=np.float32))
    assert source.mode == "F"
    out = im.to_rgb(source)
    assert [pixel(out, (x, 0)) for x in range(4)] == [(128, 128, 128), (0, 0, 0), WHITE, (0, 0, 0)]


def test_cmyk_ycbcr_hsv_lab_use_pillow_convert():
    assert pixel(im.to_rgb(PIL.Image.new("CMYK", (1, 1), (0, 255, 255, 0)))) == (255, 0, 0)
    assert pixel(im.to_rgb(PIL.Image.new("YCbCr", (1, 1), (128, 128, 128)))) == (128, 128, 128)
    assert pixel(im.to_rgb(PIL.Image.new("HSV", (1, 1), (0, 255, 255)))) == (255, 0, 0)
    assert_close(pixel(im.to_rgb(PIL.Image.new("LAB", (1, 1), (128, 128, 128)))), (119, 119, 119), tol=2)


@pytest.mark.parametrize("mode", im.SUPPORTED_MODES)
def test_every_supported_mode_gives_rgb(mode):
    out = im.to_rgb(PIL.Image.new(mode, (3, 2)))
    assert out.mode == "RGB" and out.size == (3, 2)


def test_every_pillow_mode_is_supported():
    assert set(PIL.Image.MODES) <= set(im.SUPPORTED_MODES)


def test_unknown_mode_raises_value_error_naming_image_mode_and_allowed():
    fake = mock.Mock(spec=PIL.Image.Image)
    fake.mode = "BGR;24"  # a mode older Pillows had
    with pytest.raises(ValueError, match=r"image: mode 'BGR;24' .*allowed modes: .*RGBA"):
        im.to_rgb(fake)


def test_pillow_internal_error_becomes_value_error():
    source = PIL.Image.new("CMYK", (1, 1))
    with mock.patch.object(PIL.Image.Image, "convert", side_effect=ValueError("conversion not supported")):
        with pytest.raises(ValueError, match=r"image: Pillow could not convert mode 'CMYK'"):
            im.to_rgb(source)


def test_non_image_raises_type_error_naming_image():
    with pytest.raises(TypeError, match=r"image: expected a PIL.Image.Image, got ndarray"):
        im.to_rgb(np.zeros((2, 2, 3), np.uint8))


@pytest.mark.parametrize("background", [(0, 0), (0, 0, 256), "white", (0.5, 0, 0)])
def test_bad_background(background):
    with pytest.raises(ValueError, match="background"):
        im.to_rgb(PIL.Image.new("RGBA", (1, 1)), background=background)


# --------------------------------------------------------------------------- load_image


def test_load_image_from_files(tmp_path):
    path = tmp_path / "a.png"
    PIL.Image.new("RGBA", (4, 3), (10, 20, 30, 0)).save(path)
    out = im.load_image(path)
    assert out.mode == "RGB" and out.size == (4, 3) and pixel(out) == WHITE
    assert pixel(im.load_image(str(path))) == WHITE

    sixteen = tmp_path / "deep.png"
    PIL.Image.new("I;16", (2, 2), 65535).save(sixteen)
    assert pixel(im.load_image(sixteen)) == WHITE


def test_load_image_applies_exif_orientation(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    PIL.Image.new("RGB", (6, 2)).save(path, exif=exif)
    assert im.load_image(path).size == (2, 6)


def test_load_image_from_pil():
    out = im.load_image(PIL.Image.new("L", (2, 2), 9))
    assert out.mode == "RGB" and pixel(out) == (9, 9, 9)


def test_load_image_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"^image: '.*nope\.png' does not exist$"):
        im.load_image(tmp_path / "nope.png")


def test_load_image_directory(tmp_path):
    with pytest.raises(ValueError, match=r"^init_image: '.*' is a directory, not an image file$"):
        im.load_image(tmp_path, name="init_image")


def test_load_image_text_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not pixels\n")
    with pytest.raises(ValueError) as info:
        im.load_image("notes.txt")
    assert str(info.value) == "image: 'notes.txt' is not an image file Pillow can read"


def test_load_image_truncated_file(tmp_path):
    path = tmp_path / "cut.png"
    random_rgb(64, 64).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="is not an image file Pillow can read"):
        im.load_image(path)


def test_load_image_bad_type():
    with pytest.raises(TypeError, match=r"image: expected a file path"):
        im.load_image(42)


# --------------------------------------------------------------------------- tensors


def test_pil_to_tensor_shape_dtype_range():
    image = PIL.Image.new("RGB", (5, 3), (0, 255, 51))
    tensor = im.pil_to_tensor(image)
    assert tensor.shape == (1, 3, 3, 5) and tensor.dtype == torch.float32
    assert torch.allclose(tensor[0, :, 0, 0], torch.tensor([-1.0, 1.0, 51 / 255 * 2 - 1]))


def test_batches():
    batch = [random_rgb(seed=s) for s in range(3)]
    tensor = im.pil_to_tensor(batch)
    assert tensor.shape == (3, 3, 8, 16)
    back = im.tensor_to_pil(tensor)
    assert len(back) == 3
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(batch, back))


def test_round_trip_is_exact_for_every_uint8_value():
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = PIL.Image.fromarray(np.stack([values, values[::-1], values.T], axis=-1))
    (back,) = im.tensor_to_pil(im.pil_to_tensor(image))
    assert np.array_equal(np.asarray(back), np.asarray(image))


def test_pil_to_tensor_converts_modes():
    tensor = im.pil_to_tensor(PIL.Image.new("RGBA", (2, 2), (0, 0, 0, 0)))
    assert torch.equal(tensor, torch.ones(1, 3, 2, 2))


def test_batch_size_mismatch():
    with pytest.raises(ValueError, match=r"images\[1\] is 4x4"):
        im.pil_to_tensor([random_rgb(), PIL.Image.new("RGB", (4, 4))])


def test_pil_to_tensor_bad_input():
    with pytest.raises(ValueError, match="images"):
        im.pil_to_tensor([])
    with pytest.raises(TypeError, match=r"images\[1\]"):
        im.pil_to_tensor([random_rgb(), "x.png"])


def test_tensor_to_pil_accepts_3d_clamps_and_rounds():
    tensor = torch.tensor([-2.0, 2.0, 0.0]).view(3, 1, 1).expand(3, 2, 2)
    (image,) = im.tensor_to_pil(tensor)
    assert image.size == (2, 2) and pixel(image) == (0, 255, 128)  # 0.5*255 = 127.5 rounds to 128


def test_tensor_to_pil_half_precision():
    (image,) = im.tensor_to_pil(torch.zeros(1, 3, 2, 2, dtype=torch.float16))
    assert pixel(image) == (128, 128, 128)


def test_tensor_to_pil_errors():
    with pytest.raises(ValueError, match=r"tensor: expected shape .* got \(1, 4, 2, 2\)"):
        im.tensor_to_pil(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="NaN"):
        im.tensor_to_pil(torch.full((3, 2, 2), float("nan")))
    with pytest.raises(TypeError, match="tensor"):
        im.tensor_to_pil(np.zeros((3, 2, 2)))


def test_matches_diffusers_vae_image_processor():
    processor = VaeImageProcessor(do_resize=False)
    batch = [random_rgb(16, 8, seed=s) for s in range(2)]
    ours = im.pil_to_tensor(batch)
    theirs = processor.preprocess(batch)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= 1 / 255

    decoded = torch.randn(2, 3, 8, 16, generator=torch.Generator().manual_seed(0)) * 0.7
    ours_pil = im.tensor_to_pil(decoded)
    theirs_pil = processor.postprocess(decoded, output_type="pil")
    for a, b in zip(ours_pil, theirs_pil):
        diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
        assert diff.max() <= 1


# --------------------------------------------------------------------------- grids


def test_grid_defaults_to_one_row():
    grid = im.image_grid([PIL.Image.new("RGB", (4, 3))] * 5)
    assert grid.size == (20, 3)


def test_grid_with_rows_and_cols():
    tiles = [PIL.Image.new("RGB", (4, 3), (v, v, v)) for v in (10, 20, 30, 40, 50, 60)]
    grid = im.image_grid(tiles, rows=2, cols=3)
    assert grid.size == (12, 6)
    assert pixel(grid, (0, 3)) == (40, 40, 40)  # row-major: 4th image starts row 2


def test_grid_derives_the_missing_dimension_and_pads():
    tiles = [PIL.Image.new("RGB", (4, 3), (0, 0, 0))] * 5
    grid = im.image_grid(tiles, rows=2)
    assert grid.size == (12, 6)
    assert pixel(grid, (11, 5)) == WHITE  # the padding cell
    assert pixel(grid, (7, 5)) == (0, 0, 0)
    assert im.image_grid(tiles, cols=2).size == (8, 9)


def test_grid_count_mismatch():
    with pytest.raises(ValueError, match=r"a 2x2 grid has 4 cells but 5 images"):
        im.image_grid([PIL.Image.new("RGB", (2, 2))] * 5, rows=2, cols=2)


@pytest.mark.parametrize("kwargs", [{"rows": 0}, {"cols": -1}, {"rows": 1.5}])
def test_grid_bad_rows_cols(kwargs):
    with pytest.raises(ValueError, match="positive integer"):
        im.image_grid([PIL.Image.new("RGB", (2, 2))], **kwargs)


def test_grid_resizes_to_first_size_and_converts_modes():
    grid = im.image_grid([PIL.Image.new("RGB", (4, 4), (9, 9, 9)), PIL.Image.new("L", (8, 2), 200)])
    assert grid.size == (8, 4)
    assert pixel(grid, (6, 3)) == (200, 200, 200)


def test_grid_bad_input():
    with pytest.raises(ValueError, match="images"):
        im.image_grid([])
    with pytest.raises(TypeError, match=r"images\[0\]"):
        im.image_grid([np.zeros((2, 2))])


# --------------------------------------------------------------------------- latents


def test_latent_channels_image_normalises_each_channel():
    latents = torch.zeros(1, 4, 2, 3)
    latents[0, 0] = torch.tensor([[0.0, 1.0, 2.0], [2.0, 2.0, 2.0]])
    latents[0, 1] = torch.tensor([[-50.0, 0, 0], [0, 0, 50.0]])
    latents[0, 2] = 7.0  # constant: mid-gray
    latents[0, 3] = torch.tensor([[1.0, 0, 0], [0, 0, 0]])
    image = im.latent_channels_image(latents, scale=2)
    assert image.mode == "L" and image.size == (4 * 3 * 2, 2 * 2)
    values = np.asarray(image)[::2, ::2]  # undo the NEAREST enlargement
    assert values[0, :3].tolist() == [0, 128, 255]
    assert values[:, 3:6].tolist() == [[0, 128, 128], [128, 128, 255]]
    assert (values[:, 6:9] == 128).all()
    assert values[:, 9:12].tolist() == [[255, 0, 0], [0, 0, 0]]
    # NEAREST: every latent value is a 2x2 block
    assert np.array_equal(np.asarray(image), np.kron(values, np.ones((2, 2), np.uint8)))


def test_latent_channels_image_default_scale_and_numpy():
    image = im.latent_channels_image(np.random.default_rng(0).normal(size=(4, 8, 8)).astype(np.float32))
    assert image.size == (4 * 64, 64)


def test_latent_channels_image_errors():
    with pytest.raises(ValueError, match=r"latents\[i\]"):
        im.latent_channels_image(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="scale"):
        im.latent_channels_image(torch.zeros(4, 8, 8), scale=0)
    with pytest.raises(ValueError, match="NaN"):
        im.latent_channels_image(torch.full((4, 2, 2), float("nan")))


def test_latents_to_rgb_preview():
    latents = torch.zeros(1, 4, 2, 2)
    latents[0, 0, 0, 0] = 1.0  # channel 0 alone gives (0.298, 0.207, 0.208)
    image = im.latents_to_rgb_preview(latents, scale=1)
    assert image.size == (2, 2)
    expected = tuple(round((v / 2 + 0.5) * 255) for v in im.SD15_LATENT_RGB_FACTORS[0])
    assert pixel(image) == expected
    assert pixel(image, (1, 1)) == (128, 128, 128)
    assert im.latents_to_rgb_preview(latents).size == (16, 16)
    with pytest.raises(ValueError, match="4 channels"):
        im.latents_to_rgb_preview(torch.zeros(16, 2, 2))


# --------------------------------------------------------------------------- psnr and zoom


def test_psnr_constant_offset_uint8():
    a = np.full((8, 8, 3), 100, np.uint8)
    assert math.isclose(im.psnr(a, a + 10), 20 * math.log10(255 / 10), rel_tol=1e-12)


def test_psnr_pil_and_tensor():
    a = PIL.Image.new("RGB", (4, 4), (100, 100, 100))
    b = PIL.Image.new("RGB", (4, 4), (110, 100, 100))  # MSE = 100/3
    assert math.isclose(im.psnr(a, b), 10 * math.log10(255**2 / (100 / 3)))
    ta, tb = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.1)
    assert math.isclose(im.psnr(ta, tb), 20 * math.log10(2.0 / 0.1), rel_tol=1e-5)
    assert math.isclose(im.psnr(ta, tb, data_range=1.0), 20 * math.log10(1.0 / 0.1), rel_tol=1e-5)


def test_psnr_identical_is_inf():
    a = random_rgb()
    assert im.psnr(a, a.copy()) == float("inf")


def test_psnr_errors():
    with pytest.raises(ValueError, match=r"shapes differ"):
        im.psnr(np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match="different scales"):
        im.psnr(random_rgb(), im.pil_to_tensor(random_rgb())[0].permute(1, 2, 0))
    with pytest.raises(ValueError, match="data_range"):
        im.psnr(np.zeros(3, np.int32), np.ones(3, np.int32))
    with pytest.raises(ValueError, match="data_range"):
        im.psnr(np.zeros(3, np.uint8), np.ones(3, np.uint8), data_range=0)


def test_zoom():
    image = PIL.Image.new("RGB", (10, 10), (0, 0, 0))
    image.putpixel((3, 2), (255, 0, 0))
    detail = im.zoom(image, (2, 2, 5, 4), scale=4)
    assert detail.size == (12, 8)
    red = np.argwhere((np.asarray(detail) == (255, 0, 0)).all(axis=-1))
    assert red.min(axis=0).tolist() == [0, 4] and red.max(axis=0).tolist() == [3, 7]  # one sharp 4x4 block
    with pytest.raises(ValueError, match="goes outside"):
        im.zoom(image, (5, 5, 11, 8))
    with pytest.raises(ValueError, match="scale"):
        im.zoom(image, (0, 0, 2, 2), scale=0)


# --------------------------------------------------------------------------- blob_sketch


def test_blob_sketch_draws_one_blob_of_two_exact_colours():
    sketch = im.blob_sketch((64, 48), colour=(230, 30, 30), background=(30, 80, 230), seed=3)
    assert sketch.mode == "RGB" and sketch.size == (64, 48)
    colours = {c for _, c in sketch.getcolors(64 * 48)}
    assert colours == {(230, 30, 30), (30, 80, 230)}  # no anti-aliasing: a crude colour block
    assert pixel(sketch, (32, 24)) == (230, 30, 30)  # the centre is inside the blob
    assert pixel(sketch, (0, 0)) == (30, 80, 230)


def test_blob_sketch_follows_centre_radius_and_seed():
    sketch = im.blob_sketch(centre=(16, 48), radius=10, wobble=0.2, seed=1)
    red = np.all(np.asarray(sketch) == (230, 30, 30), axis=-1)
    ys, xs = np.nonzero(red)
    assert abs(xs.mean() - 16) < 3 and abs(ys.mean() - 48) < 3
    assert xs.max() - xs.min() <= 2 * 10 * 1.2 + 1  # no point further than radius * (1 + wobble)
    assert 0.4 * math.pi * 100 < red.sum() < 1.3 * math.pi * 144
    assert np.array_equal(np.asarray(im.blob_sketch(seed=5)), np.asarray(im.blob_sketch(seed=5)))
    assert not np.array_equal(np.asarray(im.blob_sketch(seed=5)), np.asarray(im.blob_sketch(seed=6)))
    round_blob = np.all(np.asarray(im.blob_sketch(radius=12, wobble=0)) == (230, 30, 30), axis=-1)
    assert abs(round_blob.sum() - math.pi * 144) < 0.15 * math.pi * 144  # wobble 0: a regular polygon


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(size=(0, 8)), "^size: "),
        (dict(colour=(300, 0, 0)), "^colour: "),
        (dict(background="blue"), "^background: "),
        (dict(centre=(1,)), "^centre: "),
        (dict(radius=0), "^radius: "),
        (dict(wobble=1.0), "^wobble: "),
        (dict(corners=2), "^corners: "),
        (dict(seed=1.5), "^seed: "),
    ],
)
def test_blob_sketch_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        im.blob_sketch(**kwargs)

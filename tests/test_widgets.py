"""The explorers build, render an image into widget state, and react to their controls."""

import io

import pytest
from PIL import Image

from sdhelpers.models import load_pipeline
from sdhelpers.widgets import img2img_explorer, txt2img_explorer


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return load_pipeline(tiny_pipeline_dir, device="cpu")


def parts(box):
    controls_box, picture = box.children
    return list(controls_box.children), picture


def test_txt2img_explorer_renders_and_updates(pipe):
    box = txt2img_explorer(pipe, prompt="a red circle")
    controls, picture = parts(box)
    first = picture.value
    assert Image.open(io.BytesIO(first)).size == (pipe.unet.config.sample_size * pipe.vae_scale_factor * 4,) * 2
    scheduler_before = type(pipe.scheduler)
    steps = next(c for c in controls if c.description == "steps")
    steps.value = 3
    seed = next(c for c in controls if c.description == "seed")
    seed.value = 7
    assert picture.value != first
    assert controls[-1].value.endswith(" s")  # the timing label
    next(c for c in controls if c.description == "scheduler").value = "ddim"
    assert type(pipe.scheduler) is scheduler_before  # the reader's pipeline is untouched


def test_img2img_explorer_has_a_strength_slider(pipe):
    source = Image.new("RGB", (16, 16), (200, 30, 30))
    box = img2img_explorer(pipe, source)
    controls, picture = parts(box)
    strength = next(c for c in controls if c.description == "strength")
    steps = next(c for c in controls if c.description == "steps")
    steps.value = 4
    before = picture.value
    strength.value = 0.05  # int(4 * 0.05) == 0 steps: the input image is shown unchanged
    assert picture.value != before
    assert Image.open(io.BytesIO(picture.value)).resize((16, 16), 0).getpixel((0, 0)) == (200, 30, 30)

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


def test_explorers_start_from_the_given_settings(pipe):
    box = txt2img_explorer(pipe, scheduler="ddim", steps=3)
    controls, picture = parts(box)
    values = {c.description: c.value for c in controls if hasattr(c, "description") and c.description}
    assert values["scheduler"] == "ddim" and values["steps"] == 3
    assert picture.value  # the first image is rendered on creation
    source = Image.new("RGB", (16, 16), (20, 200, 30))
    controls, _ = parts(img2img_explorer(pipe, source, scheduler="ddim", steps=4, strength=0.5))
    assert next(c for c in controls if c.description == "strength").value == 0.5


@pytest.mark.parametrize("kwargs, message", [
    (dict(scheduler="magic"), "^scheduler: 'magic'"),
    (dict(steps=0), "^steps: 0"),
    (dict(steps=51), "^steps: 51"),
])
def test_explorer_settings_are_checked(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        txt2img_explorer(pipe, **kwargs)


def test_img2img_explorer_strength_is_checked(pipe):
    with pytest.raises(ValueError, match="^strength: 0"):
        img2img_explorer(pipe, Image.new("RGB", (16, 16)), strength=0)


def test_explorers_print_nothing(pipe, capfd):
    """No progress bar and no load-time chatter from the working copy end up under the notebook cell."""
    capfd.readouterr()
    txt2img_explorer(pipe, steps=2)
    img2img_explorer(pipe, Image.new("RGB", (16, 16)), steps=2)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_explorer_guidance_starts_at_sd_default_and_is_checked(tiny_pipeline_dir):
    from sdhelpers.models import load_pipeline
    from sdhelpers.widgets import txt2img_explorer

    pipe = load_pipeline(str(tiny_pipeline_dir), device="cpu")
    box = txt2img_explorer(pipe, steps=1)
    sliders = [w for w in box.children[0].children if getattr(w, "description", "") == "guidance"]
    assert sliders and sliders[0].value == 7.5
    with pytest.raises(ValueError, match="guidance_scale"):
        txt2img_explorer(pipe, steps=1, guidance_scale=20.0)


def test_the_studio_opens_from_widgets(pipe):
    from sdhelpers.widgets import studio

    app = studio(pipe, steps=1, render=False)
    assert app.titles == ("text to image", "image to image", "inpainting")

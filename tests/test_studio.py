"""The studio: three tabs on the stock pipelines, settings in every caption, bad input named."""

import datetime
import io

import numpy as np
import pytest
from PIL import Image

from sdhelpers.device import make_generator
from sdhelpers.models import load_pipeline
from sdhelpers.studio import (MASK_PRESETS, SKETCHES, TASKS, Studio, StudioError, mask_preset,
                              sketch)
from sdhelpers.studio_app import studio

FAST = dict(steps=3, seed=0, scheduler="ddim")


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return load_pipeline(tiny_pipeline_dir, device="cpu")


@pytest.fixture(scope="module")
def session(pipe):
    return Studio(pipe)


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def upload(name, content):
    stamp = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    return ({"name": name, "type": "", "size": len(content), "content": memoryview(content),
             "last_modified": stamp},)


@pytest.mark.parametrize("task, extra, expected", [
    ("txt2img", {}, []),
    ("img2img", dict(image=SKETCHES[1], strength=0.7), [SKETCHES[1], "strength 0.7 (2 of 3 steps)"]),
    ("inpaint", dict(mask=MASK_PRESETS[1]), [f"image: {SKETCHES[0]}", f"mask: {MASK_PRESETS[1]}", "strength 1.0 (3 of 3 steps)"]),
])
def test_each_task_returns_an_image_with_its_settings(session, task, extra, expected):
    image, caption = session.generate(task, prompt="a red circle", guidance_scale=5.0, **FAST,
                                      **extra)
    assert image.size == (session.side, session.side) == (16, 16)
    assert caption.startswith(f'{task}: "a red circle"')
    for text in ["negative prompt: none", "steps 3, guidance 5.0", "seed 0, scheduler ddim",
                 *expected]:
        assert text in caption


def test_the_studio_is_the_stock_pipeline(pipe, session):
    """No loop of its own: txt2img gives StableDiffusionPipeline's image, pixel for pixel."""
    image, _ = session.txt2img("a blue square", negative_prompt="red", steps=3)
    plain = pipe("a blue square", negative_prompt="red", num_inference_steps=3,
                 guidance_scale=7.5, generator=make_generator(0, "cpu")).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(plain))
    assert [type(p).__name__ for p in session.pipelines.values()] == [
        "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline"]


def test_the_seed_changes_the_image_and_the_readers_pipeline_is_untouched(pipe, session):
    scheduler = pipe.scheduler
    first = np.asarray(session.img2img("a red circle", **FAST).image)
    again = np.asarray(session.img2img("a red circle", **FAST).image)
    other = np.asarray(session.img2img("a red circle", **{**FAST, "seed": 1}).image)
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert pipe.scheduler is scheduler


def test_uploads_and_images_are_fitted_to_the_model(session):
    photo = Image.new("RGB", (40, 30), (0, 200, 0))
    mask = Image.new("L", (40, 30), 0)
    mask.paste(255, (10, 0, 30, 30))
    image, caption = session.inpaint("a cat", image=("photo.png", png_bytes(photo)),
                                     mask=("mask.png", png_bytes(mask)), **FAST)
    assert image.size == (16, 16) and "image: photo.png\nmask: mask.png" in caption
    assert "your image (40x30)" in session.img2img("a cat", image=photo, **FAST).caption
    assert sketch(SKETCHES[2], 16).size == (16, 16)
    assert mask_preset("left half", 64).getpixel((31, 10)) == 255
    assert mask_preset("left half", 64).getpixel((32, 10)) == 0


@pytest.mark.parametrize("task, settings, message", [
    ("txt2img", dict(steps=0), "^steps: 0 is not allowed"),
    ("txt2img", dict(steps=2.5), "^steps: 2.5"),
    ("txt2img", dict(guidance_scale=30), "^guidance: 30"),
    ("txt2img", dict(seed=-1), "^seed: -1"),
    ("txt2img", dict(scheduler="magic"), "^scheduler: 'magic'"),
    ("txt2img", dict(prompt="  "), "^prompt: is empty"),
    ("img2img", dict(strength=0.1, steps=5), r"^strength: 0.1 x 5 steps runs no"),
    ("img2img", dict(image="a cat"), "^image: 'a cat' is not a sketch"),
    ("img2img", dict(image=("notes.txt", b"hello")), "^image: 'notes.txt' is not an image"),
    ("inpaint", dict(mask=("notes.txt", b"hello")), "^mask: 'notes.txt' is not an image"),
    ("inpaint", dict(mask=np.zeros((16, 16), np.uint8)), "^mask: has no white"),
    ("inpaint", dict(mask=np.full((16, 16), 2.0)), "^mask: float masks"),
    ("sketch", {}, "^task: 'sketch'"),
])
def test_bad_settings_name_their_field(session, task, settings, message):
    settings = {"prompt": "a red circle", **settings}
    with pytest.raises(StudioError, match=message) as caught:
        session.generate(task, **settings)
    assert str(caught.value).startswith(caught.value.field)


def test_the_app_has_three_tabs_with_a_result_each(pipe):
    app = studio(pipe, steps=2, scheduler="ddim")
    assert app.titles == ("text to image", "image to image", "inpainting")
    assert len(app.children) == 3 and list(app.tabs) == list(TASKS)
    for task, tab in app.tabs.items():
        assert tab.box in app.children and tab.result is not None
        assert Image.open(io.BytesIO(tab.picture.value)).width >= 128  # 16 px shown enlarged
        assert "steps 2" in tab.caption.value and task in tab.caption.value
    assert {"image", "strength"} <= set(app.tabs["img2img"].controls)
    assert {"image", "mask", "strength"} <= set(app.tabs["inpaint"].controls)
    assert app.tabs["txt2img"].controls["guidance_scale"].value == 7.5


def test_the_app_shows_errors_instead_of_raising(pipe):
    app = studio(pipe, steps=2, render=False)
    tab = app.tabs["txt2img"]
    tab.controls["seed"].value = -5
    tab.button.click()
    assert "seed: -5" in tab.message.value and tab.result is None
    tab.controls["seed"].value = 3
    tab.button.click()
    assert tab.result is not None and "seed 3" in tab.caption.value
    tab.button.click()  # the earlier result moves into the history row
    assert len(tab.history.children) == 1

    img2img = app.tabs["img2img"]
    img2img.uploads["image"].value = upload("notes.txt", b"not a picture")
    assert img2img.controls["image"].value == "(uploaded file)"
    assert "image: &#x27;notes.txt&#x27; is not an image" in img2img.message.value
    img2img.button.click()
    assert img2img.result is None and "image:" in img2img.message.value
    img2img.uploads["image"].value = upload("red.png", png_bytes(Image.new("RGB", (8, 8), "red")))
    img2img.button.click()
    assert "image: red.png" in img2img.result.caption


def test_the_app_asks_for_an_upload_when_none_is_chosen(pipe):
    app = studio(pipe, steps=2, render=False)
    inpaint = app.tabs["inpaint"]
    inpaint.controls["mask"].value = "(uploaded file)"
    inpaint.generate()
    assert "mask: choose a file with the upload button first" in inpaint.message.value


def test_bad_starting_settings_raise(pipe):
    with pytest.raises(StudioError, match="^steps: 0"):
        studio(pipe, steps=0, render=False)


def test_the_studio_prints_nothing(pipe, capfd):
    capfd.readouterr()
    studio(pipe, steps=2)
    assert capfd.readouterr() == ("", "")


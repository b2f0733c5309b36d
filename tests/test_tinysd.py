"""The shipped TinySD: plain diffusers loads it offline for all three tasks, within the size cap."""

import json

import numpy as np
import pytest
import torch

from sdhelpers.export import folder_megabytes
from sdhelpers.models import TINYSD_DIR

pytestmark = pytest.mark.skipif(not (TINYSD_DIR / "model_index.json").is_file(), reason="TinySD is not shipped")


def test_tinysd_fits_the_25_megabyte_cap():
    assert folder_megabytes(TINYSD_DIR) <= 25.0


@pytest.mark.parametrize("task", ["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                                  "StableDiffusionInpaintPipeline"])
def test_plain_diffusers_loads_tinysd_offline_in_fp32(task, monkeypatch):
    import diffusers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = getattr(diffusers, task).from_pretrained(TINYSD_DIR, local_files_only=True)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert all(p.dtype == torch.float32 for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
    assert len(pipe.tokenizer) == 49408 and pipe.vae.config.latent_channels == 4


def test_load_pipeline_default_is_tinysd_and_follows_a_prompt():
    from sdhelpers.judge import judge
    from sdhelpers.models import load_pipeline

    pipe = load_pipeline(device="cpu")
    images = pipe(["a red circle on a blue background", "a yellow square on a black background"],
                  num_inference_steps=25, guidance_scale=7.5,
                  generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images
    verdicts = [judge(image) for image in images]
    assert [(v.colour, v.shape) for v in verdicts] == [("red", "circle"), ("yellow", "square")]


def test_words_outside_the_world_still_generate_an_image():
    from sdhelpers.models import load_pipeline

    pipe = load_pipeline(device="cpu")
    image = pipe("a photograph of an astronaut riding a horse", num_inference_steps=5,
                 generator=torch.Generator().manual_seed(0)).images[0]
    pixels = np.asarray(image)
    assert image.size == (64, 64) and np.isfinite(pixels).all() and pixels.std() > 0


def test_model_card_and_quality_file_agree():
    quality = json.loads((TINYSD_DIR / "quality.json").read_text())
    card = (TINYSD_DIR / "README.md").read_text()
    assert f"{100 * quality['train']['colour']:.1f}%" in card
    assert quality["settings"]["guidance_scale"] == 7.5  # SD's default
    assert "words it never saw" in card


def test_readme_model_card_and_quality_file_quote_one_table():
    from sdhelpers.targets import quality_table

    training = json.loads((TINYSD_DIR / "training.json").read_text())
    quality = json.loads((TINYSD_DIR / "quality.json").read_text())
    table = quality_table(training, quality)
    assert table in (TINYSD_DIR / "README.md").read_text()
    assert table in (TINYSD_DIR.parents[1] / "README.md").read_text()


def test_levers_start_with_the_first_tinysd_and_end_with_the_shipped_one():
    """Chapter 5 reads the first row as the first TinySD and the last as the shipped model."""
    levers = json.loads((TINYSD_DIR / "levers.json").read_text())
    assert levers[0]["name"].startswith("the first TinySD") and levers[-1]["name"].startswith("TinySD 2 (shipped)")
    assert {"train_7.5", "held_out_7.5"} <= set(levers[-1]["interval_600"])

"""The prompt-adherence judge: accuracy on real, noisy and blurred images, score() and errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from sdhelpers.data import BACKGROUNDS, Scene, ShapesDataset, render, sample_scene
from sdhelpers.judge import Verdict, judge, score


def _scenes(n_per_split: int, seed: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split) for split in ("train", "held_out") for _ in range(n_per_split)]


def _noisy(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, sigma, (*image.size[::-1], 3))
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


def _accuracy(scenes: list[Scene], images: list) -> float:
    return float(np.mean([judge(image).matches(scene) for scene, image in zip(scenes, images)]))


def test_judge_is_right_on_at_least_99_percent_of_dataset_images():
    scenes = _scenes(250, seed=11)  # 500 scenes, both splits
    assert _accuracy(scenes, [render(s) for s in scenes]) >= 0.99


@pytest.mark.parametrize(
    "degrade",
    [
        pytest.param(lambda im, rng: _noisy(im, 10.0, rng), id="noise-10/255"),
        pytest.param(lambda im, rng: im.filter(ImageFilter.GaussianBlur(1.0)), id="blur-1px"),
        pytest.param(lambda im, rng: _noisy(im.filter(ImageFilter.GaussianBlur(1.0)), 10.0, rng), id="blur+noise"),
    ],
)
def test_judge_survives_noise_and_blur(degrade):
    # Generated images come out of a VAE decoder: slightly soft, slightly noisy.
    rng = np.random.default_rng(5)
    scenes = _scenes(150, seed=12)  # 300 scenes per kind of damage
    assert _accuracy(scenes, [degrade(render(s), rng) for s in scenes]) >= 0.99


def test_judge_reads_each_input_kind_the_same():
    dataset = ShapesDataset(size=6, seed=2)
    for i in range(len(dataset)):
        scene, tensor = dataset.scene(i), dataset[i]["image"]
        pil = render(scene)
        verdicts = [judge(pil), judge(np.asarray(pil)), judge(tensor)]
        assert all(v.matches(scene) for v in verdicts), (scene, verdicts)
        assert verdicts[0].caption == scene.caption


def test_judge_measurements_make_sense():
    for shape, fill in (("square", 1.0), ("circle", np.pi / 4), ("triangle", 0.5)):
        verdict = judge(render(Scene("yellow", shape, "gray", size=40.0)))
        assert verdict.shape == shape and verdict.fill_ratio == pytest.approx(fill, abs=0.06)
        assert verdict.shape_scores[shape] > 0.95 and max(verdict.shape_scores.values()) == verdict.shape_scores[shape]
        assert verdict.foreground_rgb == (255, 235, 0) and verdict.background_rgb == (128, 128, 128)
        assert 0.5 < verdict.confidence <= 1.0


def test_an_empty_image_has_no_shape():
    for name, rgb in BACKGROUNDS.items():
        verdict = judge(Image.new("RGB", (64, 64), rgb))
        assert verdict.background == name
        assert verdict.colour is None and verdict.shape is None and verdict.caption is None
        assert verdict.confidence == 0.0
    noisy = _noisy(Image.new("RGB", (64, 64), BACKGROUNDS["gray"]), 10.0, np.random.default_rng(0))
    assert judge(noisy).shape is None


def test_score_counts_each_attribute():
    image = render(Scene("red", "circle", "blue", centre=(30.0, 34.0), size=30.0))
    captions = [
        "a red circle on a blue background",  # all right
        "a green circle on a blue background",  # colour wrong
        "a red square on a blue background",  # shape wrong
        "a red circle on a white background",  # background wrong
        "a purple triangle on a gray background",  # all wrong
    ]
    result = score([image] * 5, captions)
    assert result == {"colour": 0.6, "shape": 0.6, "background": 0.6, "both": 0.4, "all": 0.2, "n": 5}
    batch = torch.stack([ShapesDataset(size=4)[i]["image"] for i in range(4)])
    texts = [ShapesDataset(size=4)[i]["text"] for i in range(4)]
    assert score(batch, texts)["all"] == 1.0


def test_judge_is_fast():
    import time

    images = [render(s) for s in _scenes(100, seed=13)]
    start = time.perf_counter()
    for image in images:
        judge(image)
    assert time.perf_counter() - start < 2.0  # about 0.2 s here; generous for a busy machine


def test_bad_input_is_a_clear_error():
    with pytest.raises(TypeError, match="image"):
        judge("a red circle.png")
    with pytest.raises(TypeError, match="image"):
        judge([[0, 0, 0]])
    with pytest.raises(ValueError, match="image.*uint8"):
        judge(np.zeros((64, 64, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="image.*shape"):
        judge(torch.zeros(1, 3, 64, 64))
    image = render(Scene("red", "circle", "blue"))
    with pytest.raises(ValueError, match="captions.*2.*1"):
        score([image], ["a red circle on a blue background"] * 2)
    with pytest.raises(ValueError, match=r"captions\[0\]"):
        score([image], ["a photograph of an astronaut riding a horse"])
    with pytest.raises(ValueError, match="images"):
        score([], [])
    with pytest.raises(TypeError, match="images"):
        score(image, ["a red circle on a blue background"])
    assert isinstance(judge(image), Verdict)


# --------------------------------------------------------------------------- grading a pipeline

def test_adherence_prompts_are_seeded_and_stay_in_their_split():
    from sdhelpers.data import is_held_out, parse_caption
    from sdhelpers.evaluate import adherence_prompts

    train = adherence_prompts("train", 60, seed=3)
    assert train == adherence_prompts("train", 60, seed=3) and train != adherence_prompts("train", 60, seed=4)
    held = adherence_prompts("held_out", 30, seed=3)
    assert not any(is_held_out(parse_caption(p).colour, parse_caption(p).shape) for p in train)
    assert all(is_held_out(parse_caption(p).colour, parse_caption(p).shape) for p in held)
    with pytest.raises(ValueError, match="count"):
        adherence_prompts("train", 0)


def test_grade_pipeline_scores_one_image_per_prompt_independently_of_batch_size(tiny_pipeline_dir):
    from sdhelpers.evaluate import grade_pipeline
    from sdhelpers.models import load_pipeline

    pipe = load_pipeline(str(tiny_pipeline_dir), device="cpu")
    prompts = ["a red circle on a blue background", "a white square on a black background", "a blue triangle on a white background"]
    # The tiny test pipeline's VAE halves the size: 64 px in, latents 32x32, images back at 64 px.
    one = grade_pipeline(pipe, prompts, steps=2, batch_size=1)
    three = grade_pipeline(pipe, prompts, steps=2, batch_size=3)
    assert one == three and one["n"] == 3
    with pytest.raises(ValueError, match="batch_size"):
        grade_pipeline(pipe, prompts, batch_size=0)


def test_guidance_sweep_and_other_schedulers_grade_the_same_prompts(tiny_pipeline_dir):
    from sdhelpers.evaluate import grade_pipeline, guidance_sweep, scheduler_report
    from sdhelpers.models import load_pipeline

    pipe = load_pipeline(str(tiny_pipeline_dir), device="cpu")
    prompts = ["a red circle on a blue background", "a white square on a black background"]
    sweep = guidance_sweep(pipe, prompts, (1.0, 7.5), steps=2)
    assert list(sweep) == ["1.0", "7.5"] and sweep["7.5"] == grade_pipeline(pipe, prompts, steps=2)
    original = pipe.scheduler
    report = scheduler_report(pipe, prompts, ("ddim", "dpm++"), steps=2)
    assert list(report) == ["ddim", "dpm++"] and all(r["n"] == 2 for r in report.values())
    assert pipe.scheduler is original  # put back


def test_negative_prompt_effect_counts_the_colours_with_and_without(tiny_pipeline_dir):
    from sdhelpers.evaluate import negative_prompt_effect
    from sdhelpers.models import load_pipeline

    pipe = load_pipeline(str(tiny_pipeline_dir), device="cpu")
    effect = negative_prompt_effect(pipe, count=3, steps=2)
    assert sum(effect["colours_without"].values()) == sum(effect["colours_with"].values()) == 3
    assert 0 <= effect["stated_right_with"] <= 1 and effect["negative_prompt"] == "a red circle on a white background"
    with pytest.raises(ValueError, match="prompt"):
        negative_prompt_effect(pipe, prompt="a teal blob", count=1)


def test_model_card_renders_measured_figures_and_flags_missed_targets(tmp_path):
    from sdhelpers.model_card import write_model_card
    from sdhelpers.targets import quality_table

    scores = {"colour": 0.97, "shape": 0.92, "background": 1.0, "both": 0.9, "all": 0.9, "n": 200}
    quality = {"settings": {"steps": 25, "guidance_scale": 7.5, "seed": 0, "scheduler": "PNDMScheduler", "size": 64,
                            "train_prompts": 200, "held_out_prompts": 100},
               "train": scores, "held_out": {**scores, "both": 0.5}, "vae_psnr": 31.2, "seconds_per_image": 0.42,
               "speed_repeats": 5, "hardware": "CPU", "threads": 2,
               "parameters": {"vae": ["AutoencoderKL", 10], "text_encoder": ["CLIPTextModel", 20], "unet": ["UNet2DConditionModel", 30]}}
    training = {"seed": 0, "preset": "tinysd", "total_seconds": 3000.0, "hardware": "CPU", "threads": 2,
                "stages": {"vae": {"steps": 1, "batch_size": 1, "seconds": 1.0, "psnr": {"train": 32.0, "held_out": 31.0}, "settings": {"learning_rate": 0.001}}}}
    table = quality_table(training, quality)
    assert "| colour, training compositions | ≥ 97.0% | 97.0% | yes |" in table
    assert "| shape, training compositions | ≥ 97.0% | 92.0% | **no** |" in table
    assert "| ≥ 90.0% | 50.0% | **no** |" in table  # held-out compositions
    assert "| ≤ 45.00 | 50.00 | **no** |" in table  # 50 minutes of training
    assert "| ≤ 0.04 | not measured | **no** |" in table  # no branch gap in this report
    with pytest.raises(FileNotFoundError, match="training.json"):
        write_model_card(tmp_path)
    (tmp_path / "training.json").write_text(json.dumps(training))
    (tmp_path / "quality.json").write_text(json.dumps(quality))
    card = write_model_card(tmp_path).read_text()
    assert "31.20" in card and "python -m sdhelpers.train all" in card and "UNet2DConditionModel" in card


def test_extended_report_has_everything_the_card_needs(tiny_pipeline_dir):
    from sdhelpers.evaluate import extended_report
    from sdhelpers.models import load_pipeline

    pipe = load_pipeline(str(tiny_pipeline_dir), device="cpu")
    report = extended_report(pipe, train_prompts=2, sweep_prompts=2, negative_count=2, gap_count=2, steps=2)
    assert list(report) == ["pndm_4_steps", "schedulers", "guidance_sweep", "branch_gap", "negative_prompt"]
    assert list(report["guidance_sweep"]) == ["1.0", "2.0", "3.0", "5.0", "7.5", "10.0", "12.0"]
    assert set(report["schedulers"]) == {"ddim", "dpm++"}
    assert set(report["branch_gap"]) == {"20", "200", "400", "600", "800"}
    json.dumps(report)  # what --write stores in quality.json


def test_model_card_shows_the_guidance_sweep_the_branch_gap_and_negatives_when_measured(tmp_path):
    from sdhelpers.model_card import render_model_card, write_sweep_plot

    score = {"colour": 1.0, "shape": 0.5, "background": 1.0, "both": 0.5, "all": 0.5, "n": 2}
    quality = {"settings": {"steps": 25, "guidance_scale": 7.5, "seed": 0, "scheduler": "PNDMScheduler", "size": 64,
                            "train_prompts": 2, "held_out_prompts": 2},
               "train": score, "held_out": score, "vae_psnr": 31.0, "seconds_per_image": 0.4, "speed_repeats": 1,
               "hardware": "CPU", "threads": 2, "parameters": {"unet": ["UNet2DConditionModel", 3]},
               "guidance_sweep": {"1.0": score, "7.5": score}, "pndm_50_steps": score,
               "schedulers": {"ddim": score, "dpm++": score},
               "branch_gap": {"200": {"prompted_mse": 0.02, "empty_mse": 0.021, "gap": 0.03}},
               "negative_prompt": {"prompt": "a circle on a white background", "count": 4,
                                   "negative_prompt": "a red circle on a white background",
                                   "colours_without": {"red": 3, "blue": 1}, "colours_with": {"blue": 4},
                                   "stated_right_with": 1.0, "stated_right_without": 0.75}}
    training = {"seed": 0, "preset": "tinysd", "total_seconds": 60.0, "hardware": "CPU", "threads": 2,
                "stages": {"unet": {"steps": 1, "batch_size": 1, "seconds": 1.0, "caption_dropout": 0.3,
                                    "open_captions": 0.25, "branch_consistency": 3.0,
                                    "consistency_below_timestep": 600, "consistency_swaps": 0.3,
                                    "settings": {"learning_rate": 0.001}}}}
    assert "guidance_sweep.png" not in render_model_card(training, quality)
    plot = write_sweep_plot(tmp_path, quality)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = render_model_card(training, {**quality, "sweep_plot": plot.name})
    assert "](guidance_sweep.png)" in card
    assert "25% of the captions leave the colour" in card and "below timestep 600" in card
    assert "for 30% of the other items" in card and "weight 3 " in card
    assert "How the recipe was chosen" not in card
    lever = {"name": "dropout 0.3", "unet_steps": 800, "gap_200": 0.064, "how": "UNet-only runs.",
             "train_7.5": {"colour": 0.7, "shape": 0.5, "both": 0.4, "n": 60}, "held_out_7.5": {"both": 0.3, "n": 30}}
    noted = render_model_card(training, quality, [lever])
    assert "## How the recipe was chosen\n\nUNet-only runs." in noted
    assert "| dropout 0.3 | 800 | 0.064 | 70.0% / 50.0% / 40.0% (n = 60) | 30.0% (n = 30) | — / — | — / — | — / — |" in noted
    measured = {**lever, "guidance_2": {"both": 0.88}, "guidance_12": {"both": 0.8}, "negative_stated_right": 0.5,
                "open_colours": 5, "held_out_1": {"both": 0.8}, "interval_600": {"held_out_7.5": {"both": 0.95}}}
    assert "| 30.0% (n = 30) | 80% / 95% | 88% / 80% | 5 / 50% |" in render_model_card(training, quality, [measured])
    refine = {"steps": 1200, "batch_size": 64, "seconds": 1.0, "open_captions": 0.25, "branch_consistency": 3.0,
              "consistency_below_timestep": 600, "consistency_swaps": 0.5, "settings": {"learning_rate": 2e-4}}
    refined = render_model_card({**training, "stages": {**training["stages"], "refine": refine}}, quality)
    assert "the refine stage trains that UNet on for 1,200 steps" in refined
    assert "for 50% of the items) with another item's caption" in refined and "extra_pass_consistency" in refined
    assert "standard deviation" not in refined
    wider = {**training, "stages": {**training["stages"], "unet": {**training["stages"]["unet"], "latent_std": 2.0}}}
    assert "scaled to a standard deviation of 2 instead of SD's 1" in render_model_card(wider, quality)
    assert "| PNDM, 25 steps, guidance 7.5 | 100.0% | 50.0% | 100.0% | 50.0% |" in card
    assert "| PNDM, 50 steps, guidance 7.5 |" in card and "| dpm++, 25 steps, guidance 7.5 |" in card
    assert "| 200 | 0.0200 | 0.0210 | 0.030 |" in card
    assert "Colours\ndrawn: red 3, blue 1." in card and "blue 4;" in card
    assert "captions dropped 30% of the time" in card  # read from the UNet stage's report


def test_targets_read_the_sweep_floor_the_negative_effect_and_what_is_missing():
    from sdhelpers.targets import TARGETS, measured_values, missed, red_kept, sweep_floor

    score = lambda both: {"colour": 1.0, "shape": both, "background": 1.0, "both": both}  # noqa: E731
    quality = {"guidance_sweep": {"1.0": score(0.2), "2.0": score(0.96), "7.5": score(0.99), "12.0": score(0.95),
                                  "15.0": score(0.1)},
               "negative_prompt": {"colours_without": {"red": 6, "blue": 2}, "colours_with": {"red": 2, "blue": 6},
                                   "stated_right_with": 0.95}}
    assert sweep_floor(quality) == 0.95  # scales 1 and 15 lie outside 2-12
    assert red_kept(quality) == 2 / 6
    values = measured_values({}, quality)
    assert values["open_colours"] == 2 and values["training_minutes"] is None
    gone = missed({}, quality)
    assert "open_colours" in gone and "sweep_floor" not in gone and "red_kept" not in gone
    assert "negative_stated" not in gone and "train_colour" in gone  # not measured counts as missed
    assert red_kept({"negative_prompt": {"colours_without": {"blue": 3}, "colours_with": {}}}) is None
    assert len({t.key for t in TARGETS}) == len(TARGETS)

"""The new concepts: drawing and judging the star and the cross, the example set, and what stays out of training."""

import numpy as np
import pytest
from PIL import ImageFilter

from sdhelpers import concepts
from sdhelpers.data import ALL_SHAPES, NEW_SHAPES, SHAPES, Scene, ShapesDataset, caption, render, sample_scene
from sdhelpers.judge import judge, score, score_scenes


def _scenes(count: int, seed: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    scenes = []
    for i in range(count):
        s = sample_scene(rng)
        scenes.append(Scene(s.colour, ALL_SHAPES[i % len(ALL_SHAPES)], s.background, centre=s.centre, size=s.size))
    return scenes


def _noisy(image, rng):
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 10.0, (*image.size[::-1], 3))
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("damage", ["none", "noise", "blur"])
def test_judge_reads_all_five_shapes_on_at_least_99_percent_of_real_images(damage):
    rng = np.random.default_rng(3)
    scenes = _scenes(300, seed=21)
    images = [render(s) for s in scenes]
    if damage == "noise":
        images = [_noisy(im, rng) for im in images]
    if damage == "blur":
        images = [im.filter(ImageFilter.GaussianBlur(1.0)) for im in images]
    right = [judge(im, ALL_SHAPES).matches(s) for im, s in zip(images, scenes)]
    assert np.mean(right) >= 0.99


def test_new_shapes_never_appear_in_training_data():
    data = ShapesDataset(3000, seed=4)
    assert {data.scene(i).shape for i in range(len(data))} == set(SHAPES)
    assert not set(NEW_SHAPES) & set(SHAPES)


def test_a_cross_fills_its_box_and_a_star_fits_it():
    for shape in NEW_SHAPES:
        pixels = np.asarray(render(Scene("white", shape, "black", size=40)))
        inside = pixels[..., 0] > 127  # more than half covered
        rows, cols = np.nonzero(inside.any(axis=1))[0], np.nonzero(inside.any(axis=0))[0]
        assert 39 <= cols[-1] - cols[0] + 1 <= 41
        assert rows[-1] - rows[0] + 1 <= 41
    assert caption("red", "cross", "white") == "a red cross on a white background"


def test_score_adds_the_new_shapes_only_when_a_caption_asks_for_one():
    cross = render(Scene("red", "cross", "white", size=40))
    assert score([cross], ["a red cross on a white background"])["both"] == 1.0
    assert judge(cross).shape in SHAPES  # the trained world's three candidates by default
    assert score_scenes([cross], [Scene("red", "square", "white")], ALL_SHAPES)["shape"] == 0.0


def test_example_set_is_few_seeded_and_only_in_some_colours():
    examples = concepts.example_set()
    again = concepts.example_set()
    assert len(examples) == concepts.EXAMPLE_COUNT == 12
    assert [np.asarray(a).tobytes() for a in examples.images] == [np.asarray(b).tobytes() for b in again.images]
    assert {s.colour for s in examples.scenes} == set(concepts.EXAMPLE_COLOURS)
    assert {s.background for s in examples.scenes} == set(concepts.EXAMPLE_BACKGROUNDS)
    assert min(s.size for s in examples.scenes) >= concepts.EXAMPLE_MIN_SIZE
    assert examples.prompts("<cross>")[0].startswith(f"a {examples.scenes[0].colour} <cross> on a ")
    assert all(judge(im, ALL_SHAPES).matches(s) for im, s in zip(examples.images, examples.scenes))


def test_unseen_scenes_share_no_colour_and_no_background_with_the_examples():
    unseen = concepts.unseen_scenes()
    assert len(unseen) == 10
    assert not {s.colour for s in unseen} & set(concepts.EXAMPLE_COLOURS)
    assert not {s.background for s in unseen} & set(concepts.EXAMPLE_BACKGROUNDS)
    assert {s.shape for s in unseen + concepts.seen_scenes()} == {"cross"}


def test_class_prompts_leave_the_shape_unsaid():
    prompts = concepts.class_prompts()
    assert "a red shape on a white background" in prompts
    assert len(prompts) == 29 and all("shape" in p for p in prompts)


@pytest.mark.parametrize(
    "kwargs, name",
    [({"count": 0}, "count"), ({"colours": []}, "colours"), ({"colours": ["pink"]}, "colours"),
     ({"shape": "circle"}, "shape"), ({"backgrounds": "white"}, "backgrounds")],
)
def test_bad_example_set_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        concepts.example_set(**kwargs)


def test_vae_round_trip_measures_a_ceiling(tiny_pipeline_dir):
    from sdhelpers.models import load_pipeline

    vae = load_pipeline(tiny_pipeline_dir, device="cpu").vae
    share = concepts.round_trip_report(vae, "cross", count=4)
    assert 0.0 <= share <= 1.0

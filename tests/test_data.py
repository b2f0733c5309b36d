"""The shapes world: determinism, the caption template, the held-out split and the dataset."""

import hashlib
import re
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from sdhelpers.data import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT,
    IMAGE_SIZE,
    MAX_SIZE,
    MIN_SIZE,
    SHAPES,
    SPLITS,
    Scene,
    ShapesDataset,
    caption,
    held_out_scenes,
    is_held_out,
    make_image,
    parse_caption,
    render,
    sample_scene,
    training_scenes,
)

TEMPLATE_RE = re.compile(
    rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) on a ({'|'.join(BACKGROUNDS)}) background"
)


def _samples(split: str, n: int, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split) for _ in range(n)]


@pytest.fixture(scope="module")
def train_samples() -> list[Scene]:
    return _samples("train", 5000)


@pytest.fixture(scope="module")
def held_out_samples() -> list[Scene]:
    return _samples("held_out", 1000)


# --- determinism -------------------------------------------------------------------------------


def test_same_seed_same_bytes_and_different_seeds_differ():
    assert make_image(7).tobytes() == make_image(7).tobytes()
    assert make_image(7, "held_out").tobytes() == make_image(7, "held_out").tobytes()
    assert len({make_image(s).tobytes() for s in range(20)}) == 20


PINNED_DIGEST = "d9a6067fc5a9ffa664981579020534eba999beed82d8c5a5afc1b9d23d505f7f"  # make_image(0..3)


def test_images_are_pinned_across_runs_and_machines():
    # If this fails, Pillow or NumPy changed how a seed becomes pixels: every trained
    # checkpoint and every stored notebook output was made from the old bytes.
    digest = hashlib.sha256(b"".join(make_image(s).tobytes() for s in range(4))).hexdigest()
    assert digest == PINNED_DIGEST, digest
    assert sample_scene(np.random.default_rng(0)).caption == "a white square on a gray background"


def test_dataset_item_depends_only_on_seed_split_and_index():
    a, b = ShapesDataset(size=50, seed=3), ShapesDataset(size=10, seed=3)
    late_first = [a[i] for i in (9, 2, 5)]
    for item, i in zip(late_first, (9, 2, 5)):
        assert torch.equal(item["image"], b[i]["image"]) and item["text"] == b[i]["text"]
    assert a[-1]["text"] == a[49]["text"]
    other_seed = ShapesDataset(size=10, seed=4)
    assert any(not torch.equal(b[i]["image"], other_seed[i]["image"]) for i in range(10))


# --- captions ----------------------------------------------------------------------------------


def test_captions_follow_the_template(train_samples, held_out_samples):
    for scene in train_samples[:1000] + held_out_samples[:200]:
        assert TEMPLATE_RE.fullmatch(scene.caption), scene.caption
    assert caption("red", "circle", "blue") == "a red circle on a blue background"


def test_parse_caption_round_trips_every_scene():
    for scene in training_scenes() + held_out_scenes():
        parsed = parse_caption(scene.caption)
        assert (parsed.colour, parsed.shape, parsed.background) == (scene.colour, scene.shape, scene.background)


def test_parse_caption_forgives_typing_and_rejects_outside_the_world():
    parsed = parse_caption("  An orange  square on a Gray background. ")
    assert (parsed.colour, parsed.shape, parsed.background) == ("orange", "square", "gray")
    assert parse_caption("a blue circle on a blue background") is None  # never in the world
    assert parse_caption("a pink circle on a blue background") is None
    assert parse_caption("a red hexagon on a blue background") is None
    assert parse_caption("a photograph of an astronaut riding a horse") is None
    with pytest.raises(TypeError, match="text"):
        parse_caption(None)


# --- the rules of the world --------------------------------------------------------------------


def test_shape_never_has_its_background_colour(train_samples, held_out_samples):
    assert all(s.colour != s.background for s in train_samples + held_out_samples)
    with pytest.raises(ValueError, match="background"):
        Scene("blue", "circle", "blue")


def test_held_out_pairs_never_in_training_and_only_in_held_out(train_samples, held_out_samples):
    train_pairs = {(s.colour, s.shape) for s in train_samples}
    assert not train_pairs & set(HELD_OUT)
    assert {(s.colour, s.shape) for s in held_out_samples} == set(HELD_OUT)
    assert all(not s.held_out for s in training_scenes())
    assert all(s.held_out for s in held_out_scenes())
    assert all(is_held_out(c, s) for c, s in HELD_OUT)
    assert not is_held_out("red", "circle")
    assert len(HELD_OUT) == len(set(HELD_OUT))


def test_held_out_is_about_ten_percent_and_leaves_every_word_in_training(train_samples):
    assert 0.08 <= len(HELD_OUT) / (len(COLOURS) * len(SHAPES)) <= 0.15
    assert {s.colour for s in train_samples} == set(COLOURS)
    assert {s.shape for s in train_samples} == set(SHAPES)
    assert {s.background for s in train_samples} == set(BACKGROUNDS)
    # Each held-out word keeps other partners in training: composition is learnable.
    for colour, shape in HELD_OUT:
        assert len({s.shape for s in train_samples if s.colour == colour}) >= 2
        assert len({s.colour for s in train_samples if s.shape == shape}) >= 2
    assert {(s.colour, s.shape, s.background) for s in train_samples} == {
        (s.colour, s.shape, s.background) for s in training_scenes()
    }


def test_sampling_is_balanced(train_samples):
    n = len(train_samples)
    tolerances = (("colour", COLOURS, 0.02), ("shape", SHAPES, 0.03), ("background", BACKGROUNDS, 0.05))
    for attribute, names, tolerance in tolerances:
        counts = Counter(getattr(s, attribute) for s in train_samples)
        for name in names:
            assert abs(counts[name] / n - 1 / len(names)) < tolerance, (attribute, name, counts)


def test_colours_are_well_separated():
    table = {**COLOURS, **BACKGROUNDS}
    names = list(table)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if table[a] != table[b]:
                assert np.linalg.norm(np.subtract(table[a], table[b])) >= 100, (a, b)


# --- rendering ---------------------------------------------------------------------------------


def test_render_draws_the_shape_inside_on_a_plain_background(train_samples):
    for scene in train_samples[:200]:
        pixels = np.asarray(render(scene))
        assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and pixels.dtype == np.uint8
        assert MIN_SIZE <= scene.size <= MAX_SIZE
        differs = np.any(pixels != BACKGROUNDS[scene.background], axis=2)
        # the 1-pixel frame is pure background: the shape is fully inside
        assert not differs[0].any() and not differs[-1].any() and not differs[:, 0].any() and not differs[:, -1].any()
        x, y = (int(v) for v in scene.centre)
        if scene.shape == "triangle":  # its centroid sits a sixth of the size below the box centre
            y = int(scene.centre[1] + scene.size / 6)
        assert tuple(pixels[y, x]) == COLOURS[scene.colour], scene


def test_render_fill_matches_the_shape():
    expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
    for shape, fill in expected.items():
        scene = Scene("red", shape, "white", centre=(32.0, 32.0), size=40.0)
        coverage = (255 - np.asarray(render(scene))[..., 1].astype(float)) / (255 - COLOURS["red"][1])
        assert coverage.sum() / 40.0**2 == pytest.approx(fill, abs=0.02), shape


def test_scene_rejects_unknown_words():
    with pytest.raises(ValueError, match="colour.*pink"):
        Scene("pink", "circle", "blue")
    with pytest.raises(ValueError, match="shape.*hexagon"):
        Scene("red", "hexagon", "blue")
    with pytest.raises(ValueError, match="background.*green.*allowed"):
        Scene("red", "circle", "green")
    with pytest.raises(TypeError, match="scene"):
        render("a red circle on a blue background")
    with pytest.raises(TypeError, match="rng"):
        sample_scene(0)


# --- the dataset -------------------------------------------------------------------------------


def test_dataset_items():
    dataset = ShapesDataset(size=12, seed=1, split="held_out")
    assert len(dataset) == 12
    item = dataset[0]
    assert set(item) == {"image", "text"}
    image = item["image"]
    assert image.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0 and image.min() < 0 < image.max()
    assert item["text"] == dataset.scene(0).caption and TEMPLATE_RE.fullmatch(item["text"])
    assert dataset.scene(0).held_out
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and len(batch["text"]) == 4


def test_dataset_transform_replaces_the_default():
    dataset = ShapesDataset(size=3, transform=lambda image: np.asarray(image))
    assert dataset[2]["image"].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)


def test_dataset_errors():
    for size in (0, -5):
        with pytest.raises(ValueError, match="size"):
            ShapesDataset(size=size)
    with pytest.raises(ValueError, match="split.*'test'.*train.*held_out"):
        ShapesDataset(size=4, split="test")
    with pytest.raises(ValueError, match="seed"):
        ShapesDataset(size=4, seed=-1)
    with pytest.raises(IndexError, match="idx"):
        ShapesDataset(size=4)[4]
    assert SPLITS == ("train", "held_out")


# --------------------------------------------------------------------------- open captions


def test_open_caption_leaves_attributes_unsaid():
    from sdhelpers.data import open_caption

    assert open_caption(shape="circle", background="white") == "a circle on a white background"
    assert open_caption("red", "square") == "a red square"
    assert open_caption("green", None, "black") == "a green shape on a black background"
    assert open_caption("red", "circle", "blue") == caption("red", "circle", "blue")
    with pytest.raises(ValueError, match="say at least one"):
        open_caption()
    with pytest.raises(ValueError, match="colour: 'teal'"):
        open_caption("teal", "circle")


def test_parse_open_caption_reads_what_is_said():
    from sdhelpers.data import parse_open_caption

    assert parse_open_caption("a circle on a white background") == {
        "colour": None, "shape": "circle", "background": "white"}
    assert parse_open_caption("A red square.") == {"colour": "red", "shape": "square", "background": None}
    assert parse_open_caption("a green shape on a black background")["shape"] is None
    for text in ("a red", "a shape", "a teal circle", "a red circle on a red background", "hello"):
        assert parse_open_caption(text) is None, text


def test_dataset_opens_the_asked_share_of_captions_deterministically():
    from sdhelpers.data import parse_open_caption

    data = ShapesDataset(400, seed=5, open_captions=0.25)
    texts = [data[i]["text"] for i in range(len(data))]
    open_share = sum(text != data.scene(i).caption for i, text in enumerate(texts)) / len(texts)
    assert 0.19 < open_share < 0.31
    for i, text in enumerate(texts):  # what an open caption says is true of its image
        scene = data.scene(i)
        said = parse_open_caption(text)
        assert sum(v is None for v in said.values()) <= 1
        assert all(v is None or v == getattr(scene, k) for k, v in said.items())
    assert texts == [ShapesDataset(400, seed=5, open_captions=0.25)[i]["text"] for i in range(400)]
    assert [ShapesDataset(20, seed=5)[i]["text"] for i in range(20)] == [data.scene(i).caption for i in range(20)]
    assert "open_captions=0.25" in repr(data) and "open" not in repr(ShapesDataset(3))
    with pytest.raises(ValueError, match="open_captions"):
        ShapesDataset(3, open_captions=1.5)

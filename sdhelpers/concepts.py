"""A concept TinySD never saw, the cross, and how to tell whether a model learnt it.

Teaching a model something new is measured on three questions, each answered here from pixels by
the judge (:mod:`sdhelpers.judge`, with the new shapes among its candidates):

* **Does it draw the concept?** :func:`concept_report` on the colours and backgrounds of the
  examples (:func:`seen_scenes`), and on colours and backgrounds the examples never had
  (:func:`unseen_scenes`): the real test, since a model that only memorised its examples fails it.
* **Did it forget the old world?** :func:`drift_report`: the standard evaluation's training
  compositions (:func:`sdhelpers.evaluate.adherence_prompts`), before and after.
* **Did the class word drift?** :func:`class_drift`: how often "a red shape on a white
  background" comes out as a cross. DreamBooth's prior preservation exists to keep this low.

Before any of that, :func:`round_trip_report` asks whether the frozen VAE can carry the concept
at all: fine-tuning the UNet or a word cannot draw what the decoder cannot show. TinySD's VAE,
trained on circles, squares and triangles, keeps a cross of 28 px or more, and not a star.

The examples are few, as a user's own photos are: :func:`example_set` draws 12 crosses in three
colours on two backgrounds, at random sizes (30 to 44 px) and places.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from sdhelpers import checks
import torch

from sdhelpers.data import ALL_SHAPES, BACKGROUNDS, COLOURS, NEW_SHAPES, Scene, open_caption, render, sample_geometry
from sdhelpers.evaluate import adherence_prompts, generate, grade_pipeline
from sdhelpers.images import pil_to_tensor, tensor_to_pil
from sdhelpers.judge import judge, score_scenes

EXAMPLE_COLOURS: tuple[str, ...] = ("red", "yellow", "blue")
EXAMPLE_BACKGROUNDS: tuple[str, ...] = ("white", "black")
EXAMPLE_COUNT = 12
EXAMPLE_MIN_SIZE = 30.0
"""The smallest example, in pixels: above the 28 px below which TinySD's VAE loses a cross."""
CONCEPT = "cross"
"""The new shape of :data:`sdhelpers.data.NEW_SHAPES` that the chapter teaches."""


@dataclass(frozen=True)
class ConceptExamples:
    """The few images a user has of the new concept, and the scenes they show."""

    scenes: tuple[Scene, ...]
    images: tuple[Image.Image, ...]

    def prompts(self, word: str) -> list[str]:
        """Each example's caption with the concept named by ``word`` (``"cross"``, ``"<cross>"``, …)."""
        return [concept_prompt(scene, word) for scene in self.scenes]

    def __len__(self) -> int:
        return len(self.scenes)


def _names(values: Any, allowed: Sequence[str], name: str) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name}: {values!r} is not allowed; use a non-empty list of {', '.join(allowed)}")
    return tuple(checks.choice(value, tuple(allowed), name) for value in values)


def example_set(count: int = EXAMPLE_COUNT, seed: int = 0, colours: Sequence[str] = EXAMPLE_COLOURS,
                backgrounds: Sequence[str] = EXAMPLE_BACKGROUNDS, shape: str = CONCEPT,
                min_size: float = EXAMPLE_MIN_SIZE) -> ConceptExamples:
    """``count`` images of ``shape``, cycling through the ``colours`` × ``backgrounds`` pairs.

    Geometry comes from :func:`sdhelpers.data.sample_geometry` with ``seed`` and ``min_size``, so
    the set is the same on every machine. A pair whose colour is its background's is skipped.
    """
    count = checks.positive_int(count, "count")
    shape = checks.choice(shape, NEW_SHAPES, "shape")
    pairs = [(c, b) for c in _names(colours, tuple(COLOURS), "colours")
             for b in _names(backgrounds, tuple(BACKGROUNDS), "backgrounds") if c != b]
    if not pairs:
        raise ValueError(f"colours: {colours!r} on backgrounds {backgrounds!r} leave no allowed pair")
    rng = np.random.default_rng([checks.seed(seed), 11])
    scenes = []
    for i in range(count):
        centre, size = sample_geometry(rng, min_size)
        colour, background = pairs[i % len(pairs)]
        scenes.append(Scene(colour, shape, background, centre=centre, size=size))
    return ConceptExamples(tuple(scenes), tuple(render(scene) for scene in scenes))


def concept_prompt(scene: Scene, word: str) -> str:
    """The world's caption with the shape's word replaced by ``word``: ``"a red <cross> on a white background"``."""
    if not isinstance(word, str) or not word.strip():
        raise ValueError(f"word: {word!r} is not allowed; use the word or token that names the concept")
    return f"a {scene.colour} {word.strip()} on a {scene.background} background"


def _scenes(colours: Sequence[str], backgrounds: Sequence[str], shape: str) -> list[Scene]:
    return [Scene(c, shape, b) for c in colours for b in backgrounds if c != b]


def seen_scenes(shape: str = CONCEPT) -> list[Scene]:
    """Every colour × background pair the examples show (default geometry)."""
    return _scenes(EXAMPLE_COLOURS, EXAMPLE_BACKGROUNDS, shape)


def unseen_scenes(shape: str = CONCEPT) -> list[Scene]:
    """Colours *and* backgrounds the examples never had: orange, green, purple, white and black
    shapes on gray and blue."""
    colours = [c for c in COLOURS if c not in EXAMPLE_COLOURS]
    backgrounds = [b for b in BACKGROUNDS if b not in EXAMPLE_BACKGROUNDS]
    return _scenes(colours, backgrounds, shape)


def concept_report(pipe: Any, word: str, scenes: Sequence[Scene], *, seeds: int = 4, seed: int = 0,
                   **generate_kwargs: Any) -> dict[str, float]:
    """Generate ``seeds`` images per scene with the concept named ``word``; score them against it.

    ``both`` is the headline: colour and shape (the concept) right. ``generate_kwargs`` go to
    :func:`sdhelpers.evaluate.generate` (``cross_attention_kwargs={"scale": 0.5}`` for a LoRA
    strength, for instance).
    """
    seeds = checks.positive_int(seeds, "seeds")
    wanted = [scene for scene in scenes for _ in range(seeds)]
    images = generate(pipe, [concept_prompt(scene, word) for scene in wanted], seed=seed, **generate_kwargs)
    return score_scenes(images, wanted, ALL_SHAPES)


def drift_report(pipe: Any, prompts: int = 200, seed: int = 0, **generate_kwargs: Any) -> dict[str, float]:
    """The standard evaluation's training compositions, judged with the new shapes among the
    candidates, so a square that turned into a cross counts as wrong."""
    return grade_pipeline(pipe, adherence_prompts("train", prompts, seed), shapes=ALL_SHAPES, seed=seed,
                          **generate_kwargs)


def class_prompts(colours: Sequence[str] = tuple(COLOURS), backgrounds: Sequence[str] = tuple(BACKGROUNDS)) -> list[str]:
    """DreamBooth's class prompts: the shape left unsaid, ``"a red shape on a white background"``."""
    return [open_caption(colour=c, background=b) for c in colours for b in backgrounds if c != b]


REPLAY_COUNT = 64
REPLAY_SEED = 12_345
"""The old-world captions replayed beside the examples: drawn apart from the drift test's (seed 0)."""


def replay_prompts(count: int = REPLAY_COUNT, seed: int = REPLAY_SEED) -> list[str]:
    """Captions of the world the model was trained on, ``"a red circle on a blue background"``.

    Their pictures, drawn by the untouched model, are the regularisation images of a LoRA that
    should keep the old world: prior preservation over every old prompt rather than one class.
    """
    return adherence_prompts("train", count, seed)


def class_drift(pipe: Any, prompts: Sequence[str] | None = None, *, seed: int = 0,
                     **generate_kwargs: Any) -> float:
    """The share of class-prompt images the judge reads as the concept: the class word's drift.

    The base model draws circles, squares and triangles for "a red shape on a white background";
    a fine-tune that taught "shape" to mean "cross" shows up here.
    """
    prompts = class_prompts() if prompts is None else list(prompts)
    images = generate(pipe, prompts, seed=seed, **generate_kwargs)
    return float(np.mean([judge(image, ALL_SHAPES).shape == CONCEPT for image in images]))


def round_trip_report(vae: Any, shape: str = CONCEPT, count: int = 64, seed: int = 0,
                      min_size: float = EXAMPLE_MIN_SIZE) -> float:
    """The share of ``shape`` images the judge still reads as ``shape`` after the VAE's encoder and decoder.

    The ceiling of every fine-tune that leaves the VAE frozen. Colours and backgrounds cycle
    through the whole world; sizes run from ``min_size`` to 44 px.
    """
    examples = example_set(count, seed, tuple(COLOURS), tuple(BACKGROUNDS), shape, min_size)
    return float(np.mean([judge(image, ALL_SHAPES).shape == shape for image in round_trip(vae, examples.images)]))


@torch.no_grad()
def round_trip(vae: Any, images: Sequence[Image.Image]) -> list[Image.Image]:
    """Each image encoded (the posterior's mean) and decoded again by ``vae``."""
    pixels = pil_to_tensor(list(images)).to(vae.device, vae.dtype)
    decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample.float().clamp(-1, 1)
    return tensor_to_pil(decoded.cpu())

"""Prompt adherence: a judge that reads a shapes-world image back into words.

Generated images are scored against their prompts without any learned model: the shapes world
is simple enough that a few measurements on the pixels decide colour, shape and background.
The judge is right on more than 99% of real dataset images, also after Gaussian noise and a light
blur (tests/test_evaluate.py), so its verdict on a generated image measures the generator, not
the judge.

How :func:`judge` reads an image:

1. **Background**: the median colour of the 2-pixel border (shapes never touch it), named by the
   nearest entry of :data:`~sdhelpers.data.BACKGROUNDS`.
2. **Foreground mask**: pixels far from that background colour. The cut sits halfway between the
   background and the shape's typical distance from it (found with Otsu's method), which is where
   a box-filtered edge is half covered; a 3×3 majority vote removes stray specks.
3. **Shape colour**: the median of the mask's inner pixels (its edge ring, a mix with the
   background, is left out), named by the nearest entry of :data:`~sdhelpers.data.COLOURS`.
4. **Shape**: each candidate (circle, square, triangle) is fitted to the mask from its moments
   (area, centroid, spread) and drawn; the candidate whose drawing overlaps the mask best
   (highest intersection-over-union) wins. The fill ratio of the mask's bounding box (square 1,
   circle 0.785, triangle 0.5) is reported too: it is the intuition the fit makes robust.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdhelpers import checks
from sdhelpers.data import BACKGROUNDS, COLOURS, SHAPES, Scene, caption, parse_caption
from sdhelpers.images import tensor_to_pil

BORDER = 2
"""Width in pixels of the frame read as background."""

MIN_CONTRAST = 40.0
"""Below this RGB distance from the background, nothing counts as a shape (an empty image)."""

MIN_AREA = 12
"""A foreground of fewer pixels is noise, not a shape."""

_COLOUR_NAMES = list(COLOURS)
_COLOUR_RGB = np.array([COLOURS[n] for n in _COLOUR_NAMES], dtype=np.float32)
_BACKGROUND_NAMES = list(BACKGROUNDS)
_BACKGROUND_RGB = np.array([BACKGROUNDS[n] for n in _BACKGROUND_NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Verdict:
    """What the judge read from one image, with the measurements behind it.

    ``colour`` and ``shape`` are ``None`` when no shape stands out from the background.
    ``confidence`` is the smallest of three margins in [0, 1] (colour, background, shape): 0 is a
    tie between the two best names, 1 an exact match, so low values flag doubtful verdicts.
    """

    colour: str | None
    shape: str | None
    background: str
    confidence: float
    foreground_rgb: tuple[int, int, int] | None
    background_rgb: tuple[int, int, int]
    area: int
    fill_ratio: float | None
    shape_scores: dict[str, float] = field(default_factory=dict)

    @property
    def caption(self) -> str | None:
        if self.colour is None or self.shape is None:
            return None
        return caption(self.colour, self.shape, self.background)

    def matches(self, scene: Scene) -> bool:
        """Whether colour, shape and background all agree with ``scene``."""
        return (self.colour, self.shape, self.background) == (scene.colour, scene.shape, scene.background)


def _as_rgb_array(image: Any) -> np.ndarray:
    """Any supported image → float32 array (H, W, 3) in 0..255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image: a tensor must have shape (3, H, W) with values in [-1, 1], got {tuple(image.shape)}")
        return np.asarray(tensor_to_pil(image)[0], dtype=np.float32)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"image: an array must be uint8 of shape (H, W, 3), got {image.dtype} {image.shape}"
            )
        return image.astype(np.float32)
    raise TypeError(
        f"image: expected a PIL image, a uint8 array (H, W, 3) or a tensor (3, H, W) in [-1, 1], got {type(image).__name__}"
    )


def _nearest(rgb: np.ndarray, names: list[str], table: np.ndarray) -> tuple[str, float]:
    """The nearest named colour, and a margin 1 - d_best / d_second in [0, 1]."""
    distances = np.linalg.norm(table - rgb, axis=1)
    order = np.argsort(distances)
    best, second = distances[order[0]], distances[order[1]]
    return names[order[0]], float(1.0 - best / second) if second > 0 else 0.0


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold: the cut that best separates ``values`` into two groups."""
    hist, edges = np.histogram(values, bins=128, range=(0.0, float(values.max()) + 1e-6))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(hist * centres)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def _neighbour_count(mask: np.ndarray) -> np.ndarray:
    """How many of the 3×3 neighbourhood (itself included) are set, for every pixel."""
    padded = np.pad(mask.astype(np.int8), 1)
    h, w = mask.shape
    return sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))


@functools.lru_cache(maxsize=8)
def _pixel_centres(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:h, 0:w] + 0.5


def _templates(mask: np.ndarray) -> dict[str, np.ndarray]:
    """Each candidate shape, fitted to ``mask`` by its moments and drawn on the same grid.

    Standard results for a solid figure: a square of side s has variance s²/12 along each axis, a
    disc of diameter d has d²/16, and an upright triangle of base b and height h has b²/24 across,
    h²/18 down, with its centroid two thirds of the way from apex to base.
    """
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5  # pixel centres
    vy, vx = ys.var() + 1 / 12, xs.var() + 1 / 12  # + a pixel's own spread
    gy, gx = _pixel_centres(*mask.shape)
    half_w, half_h = np.sqrt(3 * vx), np.sqrt(3 * vy)
    square = (np.abs(gx - cx) <= half_w) & (np.abs(gy - cy) <= half_h)
    rx, ry = 2 * np.sqrt(vx), 2 * np.sqrt(vy)
    circle = ((gx - cx) / rx) ** 2 + ((gy - cy) / ry) ** 2 <= 1
    base, height = np.sqrt(24 * vx), np.sqrt(18 * vy)
    apex = cy - 2 * height / 3
    depth = (gy - apex) / height
    triangle = (depth >= 0) & (depth <= 1) & (np.abs(gx - cx) <= depth * base / 2)
    return {"circle": circle, "square": square, "triangle": triangle}


def _shape_scores(mask: np.ndarray) -> dict[str, float]:
    scores = {}
    for name, template in _templates(mask).items():
        union = np.count_nonzero(template | mask)
        scores[name] = np.count_nonzero(template & mask) / union if union else 0.0
    return {name: float(scores[name]) for name in SHAPES}


def judge(image: Any) -> Verdict:
    """Read colour, shape and background from the pixels of a shapes-world image.

    ``image`` is a PIL image, a uint8 array (H, W, 3) or a tensor (3, H, W) in [-1, 1] (what
    :class:`~sdhelpers.data.ShapesDataset` yields). Any size works; the world's is 64×64.
    """
    rgb = _as_rgb_array(image)
    h, w, _ = rgb.shape
    if min(h, w) < 4 * BORDER:
        raise ValueError(f"image: {w}×{h} is too small to judge; need at least {4 * BORDER} pixels a side")

    frame = np.ones((h, w), dtype=bool)
    frame[BORDER:-BORDER, BORDER:-BORDER] = False
    background_rgb = np.median(rgb[frame], axis=0)
    background, background_margin = _nearest(background_rgb, _BACKGROUND_NAMES, _BACKGROUND_RGB)

    distance = np.linalg.norm(rgb - background_rgb, axis=2)
    background_rgb_int = tuple(int(round(v)) for v in background_rgb)
    empty = dict(colour=None, shape=None, background=background, confidence=0.0,
                 foreground_rgb=None, background_rgb=background_rgb_int, fill_ratio=None)
    if np.count_nonzero(distance > MIN_CONTRAST) < MIN_AREA:
        return Verdict(area=0, **empty)
    rough = distance > max(_otsu(distance), MIN_CONTRAST / 2)
    level = float(np.median(distance[rough]))
    mask = _neighbour_count(distance > level / 2) >= 5
    area = int(np.count_nonzero(mask))
    if area < MIN_AREA:
        return Verdict(area=area, **empty)

    inner = _neighbour_count(mask) == 9
    foreground_rgb = np.median(rgb[inner if np.count_nonzero(inner) >= MIN_AREA else mask], axis=0)
    colour, colour_margin = _nearest(foreground_rgb, _COLOUR_NAMES, _COLOUR_RGB)

    scores = _shape_scores(mask)
    ranked = sorted(scores.values(), reverse=True)
    shape = max(scores, key=scores.get)
    shape_margin = 1.0 - (1.0 - ranked[0]) / (1.0 - ranked[1]) if ranked[1] < 1 else 0.0

    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    return Verdict(
        colour=colour,
        shape=shape,
        background=background,
        confidence=float(min(colour_margin, background_margin, shape_margin)),
        foreground_rgb=tuple(int(round(v)) for v in foreground_rgb),
        background_rgb=background_rgb_int,
        area=area,
        fill_ratio=float(area / box),
        shape_scores=scores,
    )


def _as_image_list(images: Any) -> list[Any]:
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"images: a tensor must be a batch (N, 3, H, W), got shape {tuple(images.shape)}")
        return list(images)
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"images: an array must be a uint8 batch (N, H, W, 3), got shape {images.shape}")
        return list(images)
    if isinstance(images, (Image.Image, str)) or not isinstance(images, Sequence):
        raise TypeError(
            f"images: expected a list of images, a tensor (N, 3, H, W) or an array (N, H, W, 3), got {type(images).__name__}"
        )
    return list(images)


def score(images: Any, captions: Sequence[str]) -> dict[str, float]:
    """Prompt adherence of a batch: how often the judge reads back what each caption asked for.

    Returns accuracies in [0, 1]: ``colour``, ``shape``, ``background``, ``both`` (colour and shape
    right: the composition the prompt asked for) and ``all`` (all three), plus ``n``, the count.
    """
    items = _as_image_list(images)
    if isinstance(captions, str) or not isinstance(captions, Sequence):
        raise TypeError(f"captions: expected a list of caption strings, got {type(captions).__name__}")
    if len(items) != len(captions):
        raise ValueError(f"captions: got {len(captions)} captions for {len(items)} images; they must match one to one")
    if not items:
        raise ValueError("images: got an empty batch; need at least one image to score")
    wanted = []
    for i, text in enumerate(captions):
        scene = parse_caption(text)
        if scene is None:
            raise ValueError(
                f"captions[{i}]: {text!r} is not a shapes-world caption like 'a red circle on a blue background'"
            )
        wanted.append(scene)
    verdicts = [judge(image) for image in items]
    colour = np.array([v.colour == s.colour for v, s in zip(verdicts, wanted)])
    shape = np.array([v.shape == s.shape for v, s in zip(verdicts, wanted)])
    background = np.array([v.background == s.background for v, s in zip(verdicts, wanted)])
    return {
        "colour": float(colour.mean()),
        "shape": float(shape.mean()),
        "background": float(background.mean()),
        "both": float((colour & shape).mean()),
        "all": float((colour & shape & background).mean()),
        "n": len(items),
    }


# --------------------------------------------------------------------------- the networks' own metrics


@torch.no_grad()
def vae_psnr(vae: Any, count: int = 256, seed: int = 0, split: str = "held_out", batch_size: int = 64) -> float:
    """Mean PSNR (dB) of the VAE's round trip over ``count`` shapes-world images of ``split``.

    Both the original and the reconstruction are compared as 8-bit images, i.e. what a reader sees.
    The latent is the posterior mean, as in ``vae.encode(x).latent_dist.mode()``.
    """
    from sdhelpers.data import ShapesDataset
    from sdhelpers.device import flush_denormals
    from sdhelpers.images import psnr
    from sdhelpers.latents import batch_of

    count = checks.positive_int(count, "count")
    data = ShapesDataset(count, seed=seed + 1_000_003, split=split)
    device = next(vae.parameters()).device
    values = []
    with flush_denormals():
        for start in range(0, count, batch_size):
            images, _ = batch_of(data, range(start, min(count, start + batch_size)))
            latents = vae.encode(images.to(device, vae.dtype)).latent_dist.mode()
            decoded = vae.decode(latents).sample.float().clamp(-1, 1).cpu()
            values += [psnr(a, b) for a, b in zip(tensor_to_pil(images), tensor_to_pil(decoded))]
    return float(np.mean(values))


@torch.no_grad()
def clip_accuracy(clip: Any, tokens=None, count: int = 128, seed: int = 0, split: str = "train") -> float:
    """How often an image's most similar caption, among every caption of the world, is its own.

    ``clip`` is the trainer's :class:`~sdhelpers.objectives.ContrastiveCLIP`; ``tokens`` a
    :class:`~sdhelpers.models.TokenCache` (a new one by default).
    """
    from sdhelpers.data import ShapesDataset, held_out_scenes, training_scenes
    from sdhelpers.latents import batch_of
    from sdhelpers.models import TokenCache

    tokens = tokens or TokenCache()
    captions = [scene.caption for scene in training_scenes() + held_out_scenes()]
    device = next(clip.parameters()).device
    text = clip.embed_text(tokens(captions).to(device))
    data = ShapesDataset(count, seed=seed + 2_000_003, split=split)
    images, truth = batch_of(data, range(count))
    best = (clip.embed_images(images.to(device)) @ text.T).argmax(dim=1).cpu()
    return float(np.mean([captions[int(b)] == t for b, t in zip(best, truth)]))


# --------------------------------------------------------------------------- grading a pipeline


def adherence_prompts(split: str, count: int, seed: int = 0) -> list[str]:
    """``count`` captions of ``split`` ("train" or "held_out"), drawn like the training data draws them.

    Each prompt is a fresh :func:`~sdhelpers.data.sample_scene`, so colours and shapes come out
    balanced and the list is the same for a given seed on every machine.
    """
    from sdhelpers.data import sample_scene

    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"count: {count!r} is not allowed; use a whole number of prompts ≥ 1")
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split).caption for _ in range(count)]


@torch.no_grad()
def grade_pipeline(
    pipe: Any,
    prompts: Sequence[str],
    *,
    steps: int = 25,
    guidance_scale: float = 7.5,
    seed: int = 0,
    batch_size: int = 25,
) -> dict[str, float]:
    """Generate one 64×64 image per prompt and :func:`score` them: the model card's quality figures.

    Image ``i`` uses a CPU generator seeded ``seed + i``, so a figure does not depend on the batch size.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size: {batch_size!r} is not allowed; use a whole number ≥ 1")
    prompts = list(prompts)
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + j) for j in range(len(chunk))]
        images += pipe(chunk, height=64, width=64, num_inference_steps=steps, guidance_scale=guidance_scale,
                       generator=generators).images
    return score(images, prompts)


def quality_report(pipe: Any, *, train_prompts: int = 200, held_out_prompts: int = 100, steps: int = 25,
                   guidance_scale: float = 7.5, seed: int = 0) -> dict[str, Any]:
    """The model card's table: adherence on training and held-out compositions, with the settings used."""
    settings = {"steps": steps, "guidance_scale": guidance_scale, "seed": seed,
                "scheduler": type(pipe.scheduler).__name__, "size": 64}
    train = grade_pipeline(pipe, adherence_prompts("train", train_prompts, seed), steps=steps,
                           guidance_scale=guidance_scale, seed=seed)
    held_out = grade_pipeline(pipe, adherence_prompts("held_out", held_out_prompts, seed + 1), steps=steps,
                              guidance_scale=guidance_scale, seed=seed + 100_000)
    return {"settings": settings, "train": train, "held_out": held_out}


def seconds_per_image(pipe: Any, *, steps: int = 25, guidance_scale: float = 7.5, repeats: int = 5) -> float:
    """Median wall-clock seconds for one 64×64 image (batch 1) after one warm-up call."""
    import statistics
    import time

    def once() -> float:
        began = time.perf_counter()
        pipe("a red circle on a blue background", height=64, width=64, num_inference_steps=steps,
             guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(0))
        return time.perf_counter() - began

    once()
    return statistics.median(once() for _ in range(repeats))


LOW_GUIDANCE = 3.0
"""A second guidance scale the card reports besides SD's default 7.5 (see :func:`measure_model`)."""


def measure_model(folder: Any, *, train_prompts: int = 200, held_out_prompts: int = 100, seed: int = 0,
                  speed_repeats: int = 5, low_guidance: float | None = LOW_GUIDANCE) -> dict[str, Any]:
    """Everything the model card reports about a pipeline folder: adherence, VAE PSNR, speed, sizes.

    Adherence is measured at SD's default guidance 7.5 (the targets) and, unless ``low_guidance``
    is None, again at ``low_guidance``: guidance multiplies everything the prompt changes in the
    prediction, including what a shape word wrongly implies about colour, so a small model trained
    without some colour×shape pairs draws them best at a lower scale.
    """
    from sdhelpers.architectures import count_parameters
    from sdhelpers.device import flush_denormals, hardware_summary
    from sdhelpers.models import load_pipeline

    pipe = load_pipeline(str(folder), device="cpu")
    with flush_denormals():
        report = quality_report(pipe, train_prompts=train_prompts, held_out_prompts=held_out_prompts, seed=seed)
        report["settings"].update(train_prompts=train_prompts, held_out_prompts=held_out_prompts)
        if low_guidance is not None:
            low = quality_report(pipe, train_prompts=train_prompts, held_out_prompts=held_out_prompts, seed=seed,
                                 guidance_scale=low_guidance)
            report["low_guidance"] = {"guidance_scale": low_guidance, "train": low["train"], "held_out": low["held_out"]}
        report["vae_psnr"] = round(vae_psnr(pipe.vae, 256, split="held_out"), 3)
        report["seconds_per_image"] = round(seconds_per_image(pipe, repeats=speed_repeats), 4)
    report.update(speed_repeats=speed_repeats, hardware=hardware_summary("cpu"), threads=torch.get_num_threads(),
                  parameters={name: (type(getattr(pipe, name)).__name__, count_parameters(getattr(pipe, name)))
                              for name in ("vae", "text_encoder", "unet")})
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m sdhelpers.evaluate``: grade a pipeline folder; ``--write`` stores quality.json and the card."""
    import argparse
    import json
    from pathlib import Path

    from sdhelpers.checkpoint import atomic_write_json
    from sdhelpers.model_card import write_model_card
    from sdhelpers.models import TINYSD_DIR

    parser = argparse.ArgumentParser(prog="python -m sdhelpers.evaluate", description=main.__doc__)
    parser.add_argument("--model", type=Path, default=TINYSD_DIR, help="a diffusers pipeline folder (default: TinySD)")
    parser.add_argument("--train-prompts", type=int, default=200)
    parser.add_argument("--held-out-prompts", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--write", action="store_true", help="write quality.json and README.md into the folder")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = measure_model(args.model, train_prompts=args.train_prompts, held_out_prompts=args.held_out_prompts,
                           seed=args.seed)
    shown = ("train", "held_out", "low_guidance", "vae_psnr", "seconds_per_image")
    print(json.dumps({k: report[k] for k in shown if k in report}, indent=1))
    if args.write:
        atomic_write_json(args.model / "quality.json", report)
        print("wrote", write_model_card(args.model).name)
    return report


if __name__ == "__main__":
    main()

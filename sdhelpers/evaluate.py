"""Measuring a model: the networks' own metrics, and a pipeline graded the way its model card reports it.

- :func:`vae_psnr` and :func:`clip_accuracy`: the autoencoder's round trip and the mini CLIP's
  caption retrieval, measured at the end of their training stages;
- :func:`grade_pipeline` and :func:`quality_report`: images generated from shapes-world prompts and
  read back by the pixel judge (:mod:`sdhelpers.judge`);
- :func:`measure_model` and ``python -m sdhelpers.evaluate``: everything the model card reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from sdhelpers import checks
from sdhelpers.images import tensor_to_pil
from sdhelpers.judge import score


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
def generate(pipe: Any, prompts: Sequence[str], *, steps: int = 25, guidance_scale: float = 7.5, seed: int = 0,
             batch_size: int = 25, **pipe_kwargs: Any) -> list[Any]:
    """One 64×64 image per prompt, image ``i`` from a CPU generator seeded ``seed + i``.

    So an image does not depend on the batch size. ``pipe_kwargs`` go to every pipeline call
    (a ``negative_prompt``, a ``callback_on_step_end``, a LoRA ``cross_attention_kwargs``).
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size: {batch_size!r} is not allowed; use a whole number ≥ 1")
    prompts = list(prompts)
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + j) for j in range(len(chunk))]
        images += pipe(chunk, height=64, width=64, num_inference_steps=steps, guidance_scale=guidance_scale,
                       generator=generators, **pipe_kwargs).images
    return images


def grade_pipeline(pipe: Any, prompts: Sequence[str], *, shapes: Sequence[str] | None = None,
                   **generate_kwargs: Any) -> dict[str, float]:
    """:func:`generate` one image per prompt and :func:`score` them: the model card's quality figures.

    ``shapes`` are the judge's candidates (:func:`sdhelpers.judge.score`); the other keywords go
    to :func:`generate`.
    """
    prompts = list(prompts)
    return score(generate(pipe, prompts, **generate_kwargs), prompts, shapes)


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


GUIDANCE_SWEEP = (1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 12.0)
"""The guidance scales of :func:`guidance_sweep`: from none to beyond SD's default 7.5."""

OTHER_SCHEDULERS = ("ddim", "dpm++")
"""Samplers besides SD 1.5's PNDM that the model card grades (names of :data:`sdhelpers.sampling.SCHEDULERS`)."""


def guidance_sweep(pipe: Any, prompts: Sequence[str], scales: Sequence[float] = GUIDANCE_SWEEP, *,
                   steps: int = 25, seed: int = 0) -> dict[str, dict[str, float]]:
    """:func:`grade_pipeline` at each guidance scale, same prompts and seeds: where does adherence hold?"""
    return {str(scale): grade_pipeline(pipe, prompts, steps=steps, guidance_scale=scale, seed=seed) for scale in scales}


def scheduler_report(pipe: Any, prompts: Sequence[str], names: Sequence[str] = OTHER_SCHEDULERS, *,
                     steps: int = 25, guidance_scale: float = 7.5, seed: int = 0) -> dict[str, dict[str, float]]:
    """:func:`grade_pipeline` with other samplers built from the pipeline's own schedule.

    The pipeline's scheduler is swapped for each and put back afterwards.
    """
    from sdhelpers.sampling import use_scheduler

    original, report = pipe.scheduler, {}
    try:
        for name in names:
            use_scheduler(pipe, name)
            report[name] = grade_pipeline(pipe, prompts, steps=steps, guidance_scale=guidance_scale, seed=seed)
    finally:
        pipe.scheduler = original
    return report


@torch.no_grad()
def negative_prompt_effect(pipe: Any, prompt: str = "a circle on a white background",
                           negative_prompt: str = "a red circle on a white background", *, count: int = 32,
                           steps: int = 25, guidance_scale: float = 7.5, seed: int = 0) -> dict[str, Any]:
    """What a negative prompt does to an open prompt: the colours drawn over ``count`` seeds, without and with it.

    The prompt leaves the colour open, so the model picks one per seed; the negative prompt names
    one colour (red by default). Reported: the count of each colour without and with the negative,
    and how often the stated attributes (shape, background) are still right with it.
    """
    from collections import Counter

    from sdhelpers.data import parse_open_caption
    from sdhelpers.judge import judge

    said = parse_open_caption(prompt)
    if said is None:
        raise ValueError(f"prompt: {prompt!r} is not a shapes-world caption (see sdhelpers.data.open_caption)")
    count = checks.positive_int(count, "count")
    result: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative_prompt, "count": count}
    for key, negative in (("without", None), ("with", negative_prompt)):
        generators = [torch.Generator().manual_seed(seed + i) for i in range(count)]
        images = pipe([prompt] * count, negative_prompt=None if negative is None else [negative] * count,
                      height=64, width=64, num_inference_steps=steps, guidance_scale=guidance_scale,
                      generator=generators).images
        verdicts = [judge(image) for image in images]
        result[f"colours_{key}"] = dict(Counter(v.colour for v in verdicts).most_common())
        result[f"stated_right_{key}"] = float(np.mean([
            all(getattr(v, k) == want for k, want in said.items() if want is not None) for v in verdicts]))
    return result


def seconds_per_image(pipe: Any, *, steps: int = 25, guidance_scale: float = 7.5, repeats: int = 5,
                      batch_size: int = 1) -> float:
    """Median wall-clock seconds per 64×64 image, in calls of ``batch_size`` images, after one warm-up call."""
    import statistics
    import time

    batch_size = checks.positive_int(batch_size, "batch_size")

    def once() -> float:
        began = time.perf_counter()
        pipe(["a red circle on a blue background"] * batch_size, height=64, width=64, num_inference_steps=steps,
             guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(0))
        return (time.perf_counter() - began) / batch_size

    once()
    return statistics.median(once() for _ in range(repeats))


def extended_report(pipe: Any, *, train_prompts: int = 200, sweep_prompts: int = 100, negative_count: int = 32,
                    gap_count: int = 64, seed: int = 0, steps: int = 25) -> dict[str, Any]:
    """What decides whether a model holds at SD's settings: twice the steps, other samplers, a guidance
    sweep, the branch gap by timestep and a negative prompt's effect (see :mod:`sdhelpers.guidance`)."""
    from sdhelpers.guidance import branch_gap

    prompts = adherence_prompts("train", train_prompts, seed)
    return {
        f"pndm_{2 * steps}_steps": grade_pipeline(pipe, prompts, steps=2 * steps, seed=seed),
        "schedulers": scheduler_report(pipe, prompts, steps=steps, seed=seed),
        "guidance_sweep": guidance_sweep(pipe, adherence_prompts("train", sweep_prompts, seed), steps=steps,
                                         seed=seed),
        "branch_gap": {str(t): row for t, row in branch_gap(pipe, count=gap_count, seed=seed).items()},
        "negative_prompt": negative_prompt_effect(pipe, count=negative_count, steps=steps, seed=seed),
    }


def measure_model(folder: Any, *, train_prompts: int = 200, held_out_prompts: int = 100, seed: int = 0,
                  speed_repeats: int = 5, extended: bool = True,
                  sweep_prompts: int = 100, negative_count: int = 32, gap_count: int = 64) -> dict[str, Any]:
    """Everything the model card reports about a pipeline folder: adherence, VAE PSNR, speed, sizes.

    Adherence is measured at SD's default guidance 7.5 and 25 PNDM steps, the settings of the
    targets (:mod:`sdhelpers.targets`); ``extended`` adds the other steps, samplers and scales.
    """
    from pathlib import Path

    from sdhelpers.architectures import count_parameters
    from sdhelpers.device import flush_denormals, hardware_summary
    from sdhelpers.export import folder_megabytes
    from sdhelpers.models import load_pipeline

    pipe = load_pipeline(str(folder), device="cpu")
    with flush_denormals():
        report = quality_report(pipe, train_prompts=train_prompts, held_out_prompts=held_out_prompts, seed=seed)
        report["settings"].update(train_prompts=train_prompts, held_out_prompts=held_out_prompts)
        if extended:
            report.update(extended_report(pipe, train_prompts=train_prompts, sweep_prompts=sweep_prompts,
                                          negative_count=negative_count, gap_count=gap_count, seed=seed))
        report["vae_psnr"] = round(vae_psnr(pipe.vae, 256, split="held_out"), 3)
        report["seconds_per_image"] = round(seconds_per_image(pipe, repeats=speed_repeats), 4)
        report["seconds_per_image_batch8"] = round(seconds_per_image(pipe, repeats=speed_repeats, batch_size=8), 4)
    report["folder_megabytes"] = round(folder_megabytes(Path(folder)), 2)
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
    from sdhelpers.model_card import write_model_card, write_sweep_plot
    from sdhelpers.targets import missed
    from sdhelpers.models import TINYSD_DIR

    parser = argparse.ArgumentParser(prog="python -m sdhelpers.evaluate", description=main.__doc__)
    parser.add_argument("--model", type=Path, default=TINYSD_DIR, help="a diffusers pipeline folder (default: TinySD)")
    parser.add_argument("--train-prompts", type=int, default=200)
    parser.add_argument("--held-out-prompts", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--basic", action="store_true",
                        help="only the adherence table, the VAE PSNR and the speed (no sweep, samplers, gap, negatives)")
    parser.add_argument("--write", action="store_true", help="write quality.json and README.md into the folder")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = measure_model(args.model, train_prompts=args.train_prompts, held_out_prompts=args.held_out_prompts,
                           seed=args.seed, extended=not args.basic)
    shown = ("train", "held_out", "pndm_50_steps", "schedulers", "guidance_sweep", "branch_gap",
             "negative_prompt", "vae_psnr", "seconds_per_image", "seconds_per_image_batch8", "folder_megabytes")
    print(json.dumps({k: report[k] for k in shown if k in report}, indent=1))
    training_file = args.model / "training.json"
    training = json.loads(training_file.read_text()) if training_file.is_file() else {}
    print("targets missed:", ", ".join(missed(training, report)) or "none")
    if args.write:
        if "guidance_sweep" in report:
            report["sweep_plot"] = write_sweep_plot(args.model, report).name
        atomic_write_json(args.model / "quality.json", report)
        print("wrote", write_model_card(args.model).name)
    return report


if __name__ == "__main__":
    main()

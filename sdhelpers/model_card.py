"""TinySD's model card, written from what was measured rather than typed in.

``python -m sdhelpers.evaluate --model DIR --write`` grades a pipeline folder and calls
:func:`write_model_card`, which renders ``README.md`` from two files beside the weights:
``training.json`` (written by ``python -m sdhelpers.train``: recipe, seconds per stage, hardware)
and ``quality.json`` (written by the evaluation: prompt adherence, VAE PSNR, speed). Every number
in the card therefore comes from a run, and re-running the two commands rewrites it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

TARGETS: dict[str, tuple[str, float, str]] = {
    "train_colour": ("colour accuracy, training compositions", 0.95, "≥"),
    "train_shape": ("shape accuracy, training compositions", 0.90, "≥"),
    "held_out_both": ("held-out compositions right on colour and shape", 0.85, "≥"),
    "vae_psnr": ("VAE reconstruction PSNR, held-out images (dB)", 30.0, "≥"),
    "seconds_per_image": ("seconds per 64×64 image, 25 steps with CFG, CPU", 0.5, "≤"),
    "training_minutes": ("full training recipe (minutes)", 45.0, "≤"),
}
"""The quality bar the shipped model is held to: (description, target, direction)."""

REBUILD_COMMANDS = (
    "python -m sdhelpers.train all --out sdhelpers/tinysd --threads 2",
    "python -m sdhelpers.evaluate --model sdhelpers/tinysd --write",
)


def measured_values(training: dict[str, Any], quality: dict[str, Any]) -> dict[str, float]:
    """The figures :data:`TARGETS` names, read from ``training.json`` and ``quality.json``."""
    return {
        "train_colour": quality["train"]["colour"],
        "train_shape": quality["train"]["shape"],
        "held_out_both": quality["held_out"]["both"],
        "vae_psnr": quality["vae_psnr"],
        "seconds_per_image": quality["seconds_per_image"],
        "training_minutes": training["total_seconds"] / 60,
    }


def meets(value: float, target: float, direction: str) -> bool:
    return value >= target if direction == "≥" else value <= target


def _fmt(key: str, value: float) -> str:
    if key in ("train_colour", "train_shape", "held_out_both"):
        return f"{100 * value:.1f}%"
    if key == "vae_psnr":
        return f"{value:.2f}"
    if key == "seconds_per_image":
        return f"{value:.3f}"
    return f"{value:.1f}"


def quality_table(training: dict[str, Any], quality: dict[str, Any]) -> str:
    """A Markdown table: each target, the measured value and whether it is met."""
    values = measured_values(training, quality)
    rows = ["| figure | target | measured | met |", "|---|---|---|---|"]
    for key, (label, target, direction) in TARGETS.items():
        shown = _fmt(key, target) if key not in ("train_colour", "train_shape", "held_out_both") else f"{100 * target:.0f}%"
        rows.append(f"| {label} | {direction} {shown} | {_fmt(key, values[key])} | "
                    f"{'yes' if meets(values[key], target, direction) else '**no**'} |")
    return "\n".join(rows)


def _stage_rows(training: dict[str, Any]) -> str:
    rows = ["| stage | steps × batch | learning rate | seconds | result |", "|---|---|---|---|---|"]
    for name, report in training["stages"].items():
        settings = report.get("settings", {})
        if name == "vae":
            psnr = report.get("psnr", {})
            result = f"PSNR {psnr.get('train', float('nan')):.2f} dB train, {psnr.get('held_out', float('nan')):.2f} dB held-out images"
        elif name == "clip":
            accuracy = report.get("caption_accuracy", {})
            result = (f"zero-shot caption top-1: train {100 * accuracy.get('train', 0):.1f}%, "
                      f"held-out {100 * accuracy.get('held_out', 0):.1f}%")
        else:
            result = f"final loss {report.get('final_loss', float('nan')):.4f}, scaling_factor {report.get('scaling_factor')}"
        rows.append(f"| {name} | {report['steps']} × {report['batch_size']} | {settings.get('learning_rate')} | "
                    f"{report['seconds']:.0f} | {result} |")
    return "\n".join(rows)


def _parameter_rows(quality: dict[str, Any]) -> str:
    rows = ["| component | class | parameters |", "|---|---|---|"]
    for name, (cls, count) in quality["parameters"].items():
        rows.append(f"| {name} | `{cls}` | {count:,} |")
    return "\n".join(rows)


def _caption_dropout(training: dict[str, Any]) -> float:
    """The UNet stage's caption dropout: from its report (written since TinySD 2), else from the preset."""
    from sdhelpers.recipe import PRESETS

    reported = training.get("stages", {}).get("unet", {}).get("caption_dropout")
    return reported if reported is not None else PRESETS[training.get("preset") or "tinysd"].caption_dropout


def _low_guidance_text(quality: dict[str, Any]) -> str:
    low = quality.get("low_guidance")
    if not low:
        return ""
    train, held = low["train"], low["held_out"]
    return (f"At guidance {low['guidance_scale']} (same prompts and seeds): training compositions colour "
            f"{100 * train['colour']:.1f}%, shape {100 * train['shape']:.1f}%, both {100 * train['both']:.1f}%; "
            f"held-out compositions both {100 * held['both']:.1f}%. This is the scale the book uses with TinySD "
            "(`sdhelpers.models.TINYSD_GUIDANCE`). Guidance multiplies the difference between the prediction "
            "with the prompt and without it; in TinySD's small 8×8×4 latent that difference is large (the empty "
            "prompt says nothing about colour or background), so at 7.5 the sampled latents overshoot far "
            "beyond those of real images and the decoder answers with wrong colours. Guidance also amplifies "
            "what a shape word wrongly implies about colour (a triangle was never green in training), so "
            "held-out compositions are drawn best at a low scale.\n")


def _percent(score: dict[str, float], keys=("colour", "shape", "background", "both")) -> str:
    return " | ".join(f"{100 * score[k]:.1f}%" for k in keys)


def _extended_sections(quality: dict[str, Any]) -> str:
    """The card's sections on guidance, samplers, the branch gap and negative prompts, where measured."""
    if "guidance_sweep" not in quality:
        return ""
    steps = quality["settings"]["steps"]
    rows = ["| sampling | colour | shape | background | both |", "|---|---|---|---|---|"]
    rows += [f"| PNDM, {steps} steps, guidance {scale} | {_percent(score)} |"
             for scale, score in quality["guidance_sweep"].items()]
    rows += [f"| PNDM, {key.split('_')[1]} steps, guidance 7.5 | {_percent(score)} |"
             for key, score in quality.items() if key.startswith("pndm_") and key.endswith("_steps")]
    rows += [f"| {name}, {steps} steps, guidance 7.5 | {_percent(score)} |" for name, score in quality["schedulers"].items()]
    gap = ["| timestep | prompted MSE | empty-prompt MSE | gap (rms) |", "|---|---|---|---|"]
    gap += [f"| {t} | {row['prompted_mse']:.4f} | {row['empty_mse']:.4f} | {row['gap']:.3f} |"
            for t, row in quality["branch_gap"].items()]
    negative = quality["negative_prompt"]
    shares = lambda counts: ", ".join(f"{name} {n}" for name, n in counts.items())  # noqa: E731
    return f"""
## Guidance and samplers

Training-composition prompts as above, each setting with the same prompts and seeds:

{chr(10).join(rows)}

## The two branches of classifier-free guidance

On real training images noised to each timestep: the noise-prediction error with the caption and
with the empty prompt, and the rms difference of the two predictions, which guidance multiplies by
`scale - 1` (`sdhelpers.guidance.branch_gap`). Where the noise is low the latent already fixes the
picture and the two should agree.

{chr(10).join(gap)}

## Open prompts and negative prompts

"{negative['prompt']}" over {negative['count']} seeds leaves the colour to the model. Colours
drawn: {shares(negative['colours_without'])}. With the negative prompt "{negative['negative_prompt']}":
{shares(negative['colours_with'])}; the stated shape and background right
{100 * negative['stated_right_with']:.1f}% of the time (without it {100 * negative['stated_right_without']:.1f}%).
"""


def render_model_card(training: dict[str, Any], quality: dict[str, Any]) -> str:
    """The model card's Markdown text."""
    settings = quality["settings"]
    train, held = quality["train"], quality["held_out"]
    return f"""# TinySD

A complete Stable Diffusion, small enough to train and run on a laptop CPU. It is built from the
exact classes of Stable Diffusion 1.5 (`AutoencoderKL`, `CLIPTextModel` with CLIP's real
tokenizer, `UNet2DConditionModel` with cross-attention, `PNDMScheduler` configured like SD 1.5)
and saved as a standard diffusers folder, so plain diffusers loads it offline:

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("sdhelpers/tinysd")  # or sdhelpers.models.load_pipeline()
image = pipe("a red circle on a blue background", height=64, width=64).images[0]
```

`StableDiffusionImg2ImgPipeline` and `StableDiffusionInpaintPipeline` load the same folder.

## Architecture

64×64 RGB images; latents 8×8×4 (the VAE downsamples 8× like SD's); text 77 tokens × 64 features.

{_parameter_rows(quality)}

The weights are stored in fp16 to keep the folder small and load as fp32 on the CPU.

## Training data: the shapes world

Generated on the fly by `sdhelpers.data`: one circle, square or triangle of a named colour (red,
orange, yellow, green, blue, purple, white, black) on a plain black, white, gray or blue
background, with random size and position, captioned `a {{colour}} {{shape}} on a {{background}} background`.
Three colour×shape pairs are never shown in training (`sdhelpers.data.HELD_OUT`: an orange
circle, a green triangle, a purple square), so they test whether the model combines colour and
shape as separate ideas.

## Training recipe

In Stable Diffusion's order: the VAE (KL-regularised, L1 + MSE + edge loss), then a mini CLIP
trained contrastively against a small image tower (only the text tower ships), then the UNet on
cached latents scaled by the VAE's own `scaling_factor` (1/std of the training latents, computed
like SD's 0.18215), with the VAE and text encoder frozen, DDPM scaled-linear noise over 1000
steps, captions dropped {100 * _caption_dropout(training):.0f}% of the time for
classifier-free guidance, and an EMA of the weights. Seed {training['seed']}.

{_stage_rows(training)}

Total: {training['total_seconds'] / 60:.1f} minutes on {training['hardware']}, {training['threads']} threads
(the sum of the stages' recorded seconds; a machine shared with other work takes longer).
The shipped folder is rebuilt from nothing by:

```bash
{REBUILD_COMMANDS[0]}
{REBUILD_COMMANDS[1]}
```

The first trains (checkpoints and loss curves go to `sdhelpers/tinysd.work/`; `--resume` continues
an interrupted run exactly); the second measures the figures below and rewrites this card.

## Measured quality

{settings['train_prompts']} training-composition prompts and {settings['held_out_prompts']}
held-out ones, one image each, {settings['steps']} {settings['scheduler']} steps, guidance
{settings['guidance_scale']}, seeds from {settings['seed']}, graded from pixels by
`sdhelpers.judge.judge` (right on more than 99% of real dataset images).

{quality_table(training, quality)}

In detail: training compositions colour {100 * train['colour']:.1f}%, shape {100 * train['shape']:.1f}%,
background {100 * train['background']:.1f}%, all three {100 * train['all']:.1f}%; held-out compositions
colour {100 * held['colour']:.1f}%, shape {100 * held['shape']:.1f}%, both {100 * held['both']:.1f}%.
{_low_guidance_text(quality)}
Speed measured on {quality['hardware']} ({quality['threads']} threads), batch 1, median of
{quality['speed_repeats']} runs after a warm-up.
{_extended_sections(quality)}
## Limits

- TinySD knows only the shapes world. It answers any prompt, since the tokenizer is CLIP's full
  49,408-token vocabulary, but the embedding rows of words it never saw were never trained, so
  "an astronaut riding a horse" gives some shape, not an astronaut.
- 64×64 pixels. Other sizes that are multiples of 8 run, but the model never saw them.
- One shape per image; no counting, no relations, no text.

## Licence and provenance

Trained from scratch by the commands above on generated data; no third-party weights. The
tokenizer files are OpenAI CLIP's BPE vocabulary (MIT licence, see `tokenizer/LICENSE`).
"""


def write_model_card(folder: str | os.PathLike) -> Path:
    """Render ``README.md`` in a pipeline folder from its ``training.json`` and ``quality.json``."""
    from sdhelpers.checkpoint import atomic_write_bytes

    folder = Path(folder)
    missing = [name for name in ("training.json", "quality.json") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"folder: {folder.name} lacks {', '.join(missing)}; train and evaluate it first")
    training = json.loads((folder / "training.json").read_text())
    quality = json.loads((folder / "quality.json").read_text())
    path = folder / "README.md"
    atomic_write_bytes(path, render_model_card(training, quality).encode())
    return path

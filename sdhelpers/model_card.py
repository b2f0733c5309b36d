"""TinySD's model card, written from what was measured rather than typed in.

``python -m sdhelpers.evaluate --model DIR --write`` grades a pipeline folder and calls
:func:`write_model_card`, which renders ``README.md`` from two files beside the weights:
``training.json`` (written by ``python -m sdhelpers.train``: recipe, seconds per stage, hardware)
and ``quality.json`` (written by the evaluation: prompt adherence, VAE PSNR, speed). Every number
in the card therefore comes from a run, and re-running the two commands rewrites it.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

from sdhelpers.checkpoint import atomic_write_bytes
from sdhelpers.levers import levers_section, read_levers
from sdhelpers.targets import quality_table

REBUILD_COMMANDS = (
    "python -m sdhelpers.train all --out sdhelpers/tinysd --threads 2",
    "python -m sdhelpers.evaluate --model sdhelpers/tinysd --write",
)

SWEEP_PLOT = "guidance_sweep.png"
"""The guidance-sweep figure ``--write`` puts beside the card (see :func:`write_sweep_plot`)."""


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


def _unet_objective(training: dict[str, Any]) -> str:
    """What the last UNet stage adds to SD's loss, as its report records it (empty for SD's plain loss).

    That stage is the refine stage where the recipe has one (its pull is an extra pass), else the
    UNet stage itself (its pull replaces SD's loss on the pulled items).
    """
    stages = training.get("stages", {})
    refine = stages.get("refine")
    report = refine or stages.get("unet", {})
    parts = []
    if stages.get("unet", {}).get("latent_std", 1.0) != 1.0:
        parts.append(f"the latents scaled to a standard deviation of {stages['unet']['latent_std']:g} instead of "
                     "SD's 1, so that every timestep keeps more of the picture")
    if refine:
        parts.append(f"Then the refine stage trains that UNet on for {refine['steps']:,} steps (as SD 1.5 went on "
                     "from SD 1.2 to improve classifier-free guidance), with SD's loss"
                     + ("" if refine.get("guidance_calibration") else " on every item"))
    if report.get("open_captions"):
        parts.append(f"{100 * report['open_captions']:.0f}% of {'its' if refine else 'the'} captions leave the "
                     "colour, the shape or the background unsaid")
    if report.get("branch_consistency"):
        swaps = report.get("consistency_swaps")
        other = (f" or (for {100 * swaps:.0f}% of the {'' if refine else 'other '}items) with another item's "
                 "caption") if swaps else ""
        loss = "extra_pass_consistency_loss" if refine else "consistent_diffusion_loss"
        parts.append(
            f"{'and an extra pass: ' if refine else ''}below timestep {report.get('consistency_below_timestep', 400)}"
            f", where the noised latent already fixes the picture, the prediction with the empty prompt{other} is "
            f"pulled towards the one with the true caption, weight {report['branch_consistency']:g} "
            f"(`sdhelpers.objectives.{loss}`)")
    if report.get("guidance_calibration"):
        scale, full = report["guidance_calibration"], report.get("calibration_full_below")
        below = report.get("consistency_below_timestep", 400)
        where = f"below timestep {below}"
        if full:
            where = f"below timestep {full}, and a share rising to all of it at {below}"
        parts.append(
            f"and {where}, where the noised latent already fixes the picture, the prompted branch is taught "
            f"to move 1/{scale:g} of the way from the empty prompt's prediction towards SD's target, so that "
            f"guidance {scale:g} gives that target back there: limited-interval guidance learnt by the model "
            "(`sdhelpers.objectives.calibrated_diffusion_loss`)")
    return "; ".join(parts) + (". " if parts else "")


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


def _sweep_figure(quality: dict[str, Any]) -> str:
    if not quality.get("sweep_plot"):
        return ""
    return f"\n![Share of images right, by guidance scale]({quality['sweep_plot']})\n"


def write_sweep_plot(folder: Path, quality: dict[str, Any]) -> Path:
    """Draw the guidance sweep (share right on colour, shape and both, by scale) as a small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sdhelpers.targets import GUIDANCE_RANGE

    sweep = quality["guidance_sweep"]
    scales = [float(s) for s in sweep]
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    for key in ("colour", "shape", "both"):
        ax.plot(scales, [100 * score[key] for score in sweep.values()], "o-", label=key)
    ax.axvspan(*GUIDANCE_RANGE, color="0.92", zorder=0, label="scales that must hold")
    ax.axvline(7.5, color="0.5", ls=":", lw=1)
    ax.set(xlabel="guidance scale", ylabel="% of images right", ylim=(0, 102),
           title="TinySD, training compositions, 25 PNDM steps")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    path = folder / SWEEP_PLOT
    atomic_write_bytes(path, buffer.getvalue())
    return path


def render_model_card(training: dict[str, Any], quality: dict[str, Any],
                      levers: list[dict[str, Any]] | None = None) -> str:
    """The model card's Markdown text (``levers``: the measured recipe variants, if any)."""
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
classifier-free guidance, and an EMA of the weights. {_unet_objective(training)}Seed {training['seed']}.

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
Speed measured on {quality['hardware']} ({quality['threads']} threads), batch 1, median of
{quality['speed_repeats']} runs after a warm-up.
{_extended_sections(quality)}{_sweep_figure(quality)}{levers_section(levers or [])}
## Limits

- Compositions held out of training (an orange circle, a green triangle, a purple square) come out
  right on colour and shape {100 * held['both']:.0f}% of the time at guidance 7.5, mostly the colour without
  the shape (colour {100 * held['colour']:.0f}%, shape {100 * held['shape']:.0f}%): the text encoder writes the
  colour into the shape word's state, and the UNet draws a shape it saw in that colour.
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
    folder = Path(folder)
    missing = [name for name in ("training.json", "quality.json") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"folder: {folder.name} lacks {', '.join(missing)}; train and evaluate it first")
    training = json.loads((folder / "training.json").read_text())
    quality = json.loads((folder / "quality.json").read_text())
    levers = read_levers(folder)
    path = folder / "README.md"
    atomic_write_bytes(path, render_model_card(training, quality, levers).encode())
    return path

"""Training TinySD the way Stable Diffusion was trained: VAE, then CLIP, then the UNet.

The book's small model is rebuilt from nothing by one command::

    python -m sdhelpers.train all --out sdhelpers/tinysd

which runs the three stages of SD's recipe (:mod:`sdhelpers.recipe`) on the shapes world:

1. **VAE** (``AutoencoderKL``, 64×64×3 → 8×8×4, SD's 8× downsampling): reconstruction + a tiny
   KL penalty (:class:`~sdhelpers.objectives.VAEObjective`).
2. **Mini CLIP**: a ``CLIPTextModel`` on the real 49,408-token tokenizer, trained contrastively
   against a small CNN image tower. Only the text tower ships, as SD ships only CLIP's.
3. **UNet** on the cached latents of the frozen VAE (:class:`~sdhelpers.latents.LatentCache`),
   conditioned on the frozen text encoder, with captions dropped for classifier-free guidance and
   SD's noise-prediction loss (:func:`~sdhelpers.objectives.diffusion_loss`): chapter 4's loop.
4. **Refine**, where the recipe has it: that UNet trained on, as SD 1.5 went on from SD 1.2, with
   the branch pull of :func:`~sdhelpers.objectives.consistent_diffusion_loss`, so that it holds at
   guidance 7.5.

Every stage runs the one loop of :mod:`sdhelpers.fit` through Hugging Face Accelerate, so the same
code trains on a CPU, one GPU, or several processes with ``accelerate launch -m sdhelpers.train``:
each process draws its share of the batch, gradients are averaged, and only the main process
writes checkpoints, logs and the exported pipeline. Every random draw of a step comes from a
generator seeded by ``(seed, stage, step, rank)``, so a run stopped and resumed in a fresh process
continues bit for bit (on the CPU). Checkpoints are atomic safetensors files.

The stage subcommands ``vae``, ``clip``, ``unet`` and ``refine`` run one stage each; their
checkpoints, loss curves and finished models live in a work folder (``--work``, by default
``<out>.work``), and the recipe's last stage ends by writing the pipeline like ``all`` does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdhelpers import checks
from sdhelpers.architectures import build_vae
from sdhelpers.export import FINAL_FOLDER, default_work, finish, load_component, load_scaled_vae, save_component
from sdhelpers.latents import batch_of
from sdhelpers.models import TokenCache, load_tokenizer
from sdhelpers.objectives import ContrastiveCLIP, VAEObjective
from sdhelpers.recipe import PRESETS, STAGES, TINYSD_RECIPE, Recipe
from sdhelpers.stages import StageResult, prepare_stage, run_stage, seed_init, stage_dataset, stage_info, write_report
from sdhelpers.unet_stages import train_refine, train_unet

__all__ = ["COMMANDS", "build_clip", "main", "train_all", "train_clip", "train_refine", "train_unet", "train_vae"]

COMMANDS = (*STAGES, "all")


# --------------------------------------------------------------------------- the VAE and CLIP stages

def train_vae(work, *, recipe: Recipe = TINYSD_RECIPE, seed: int = 0, steps: int | None = None,
              batch_size: int | None = None, dataset: Any = None, resume: bool = False,
              stop_at: int | None = None, progress: bool = True) -> StageResult:
    """Stage 1: train the VAE on shapes-world images; the finished model goes to ``work/vae/final``."""
    from sdhelpers.evaluate import vae_psnr

    stage = prepare_stage("vae", work, recipe, seed, steps, batch_size)
    data, device = stage_dataset(stage, dataset), stage.accelerator.device
    seed_init(stage)
    vae = build_vae(recipe.vae_config)
    if recipe.vae_initial_logvar is not None:
        start_nearly_deterministic(vae, recipe.vae_initial_logvar)
    latent_shape = latent_shape_of(vae)

    def batch_loss(model: nn.Module, step: int) -> torch.Tensor:
        generator = stage.generator(step)
        indices = torch.randint(0, len(data), (stage.local_batch,), generator=generator)
        eps = torch.randn((stage.local_batch, *latent_shape), generator=generator)
        images, _ = batch_of(data, indices)
        return model(images.to(device), eps.to(device))

    info = stage_info(stage, recipe.vae_config, {"loss": recipe.vae_loss, "initial_logvar": recipe.vae_initial_logvar},
                 dataset)
    result = run_stage(stage, VAEObjective(vae, recipe.vae_loss), batch_loss, info,
                       resume=resume, stop_at=stop_at, progress=progress)
    if result.finished and stage.accelerator.is_main_process:
        vae = result.model.eval()
        save_component(vae, stage.folder / FINAL_FOLDER)
        psnr = {split: round(vae_psnr(vae, count=recipe.eval_images, seed=stage.seed, split=split), 2)
                for split in ("train", "held_out")}
        write_report(stage, result, psnr=psnr)
    return result


@torch.no_grad()
def start_nearly_deterministic(vae: nn.Module, logvar: float = -6.0) -> None:
    """Make a fresh VAE's posterior start narrow: log-variance ``logvar`` (std e^(logvar/2)).

    A new ``AutoencoderKL`` starts with std ≈ 1 while its latents spread by only a few units, so
    early training decodes mostly sampling noise and learns slowly. With SD's tiny KL weight the
    trained posterior ends up narrow anyway; starting there (the bias of the last 1×1 convolution,
    ``quant_conv``, whose second half of outputs is the log-variance) skips that slow phase.
    """
    channels = vae.config.latent_channels
    vae.quant_conv.weight[channels:] *= 0.1
    vae.quant_conv.bias[channels:] = logvar


def latent_shape_of(vae: nn.Module, image_size: int = 64) -> tuple[int, int, int]:
    """The latent's (channels, height, width) for an ``image_size`` square image."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return (vae.config.latent_channels, image_size // factor, image_size // factor)


def build_clip(recipe: Recipe = TINYSD_RECIPE) -> ContrastiveCLIP:
    """An untrained :class:`~sdhelpers.objectives.ContrastiveCLIP` with the recipe's configs."""
    return ContrastiveCLIP(recipe.text_config, recipe.image_tower_config, recipe.text_invariance)


def train_clip(work, *, recipe: Recipe = TINYSD_RECIPE, seed: int = 0, steps: int | None = None,
               batch_size: int | None = None, dataset: Any = None, resume: bool = False,
               stop_at: int | None = None, progress: bool = True) -> StageResult:
    """Stage 2: contrastive pre-training of the text encoder; it goes to ``work/clip/final``.

    With several processes each computes InfoNCE over its own share of the batch (no all-gather):
    simpler, and the shapes world has few enough captions that a share still holds most of them.
    """
    from sdhelpers.evaluate import clip_accuracy

    stage = prepare_stage("clip", work, recipe, seed, steps, batch_size)
    data, device = stage_dataset(stage, dataset), stage.accelerator.device
    tokens = TokenCache(load_tokenizer())
    seed_init(stage)

    def batch_loss(model: nn.Module, step: int) -> torch.Tensor:
        indices = torch.randint(0, len(data), (stage.local_batch,), generator=stage.generator(step))
        images, texts = batch_of(data, indices)
        ids = {text: i for i, text in enumerate(dict.fromkeys(texts))}
        caption_ids = torch.tensor([ids[text] for text in texts])
        return model(tokens(texts).to(device), images.to(device), caption_ids.to(device))

    info = stage_info(stage, {"text": recipe.text_config, "image": recipe.image_tower_config}, None, dataset)
    result = run_stage(stage, build_clip(recipe), batch_loss, info, resume=resume, stop_at=stop_at,
                       progress=progress)
    if result.finished and stage.accelerator.is_main_process:
        clip = result.model.eval()
        save_component(clip.text_model, stage.folder / FINAL_FOLDER)
        accuracy = {split: round(clip_accuracy(clip, tokens, count=recipe.eval_images, seed=stage.seed,
                                               split=split), 3) for split in ("train", "held_out")}
        extra = {"text_invariance": recipe.text_invariance} if recipe.text_invariance else {}
        write_report(stage, result, caption_accuracy=accuracy, **extra)
    return result


def train_all(out, *, work=None, recipe: Recipe = TINYSD_RECIPE, seed: int = 0, resume: bool = False,
              progress: bool = True, preset: str | None = None) -> Path:
    """Run SD's recipe end to end (VAE, CLIP, UNet) and write the pipeline folder ``out``."""
    work = Path(work) if work is not None else default_work(out)
    common = dict(recipe=recipe, seed=seed, resume=resume, progress=progress)
    vae = train_vae(work, **common).model
    text_encoder = train_clip(work, **common).model.text_model
    unet = train_unet(work, vae, text_encoder, **common).model
    if recipe.refine is not None:
        train_refine(work, load_scaled_vae(work), text_encoder, unet, **common)
    return finish_on_main_process(out, work, seed=seed, preset=preset)


def finish_on_main_process(out, work, *, seed: int, preset: str | None) -> Path:
    """Export the pipeline once (the main process), while the others wait; every process gets ``out``."""
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        finish(out, work, seed=seed, preset=preset)
    state.wait_for_everyone()
    return Path(out)


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sdhelpers.train",
        description="Train TinySD like Stable Diffusion: the VAE, a mini CLIP, the UNet on cached latents, "
                    "then the UNet refined for guidance.",
    )
    parser.add_argument("command", choices=COMMANDS, help="one stage, or all of them and the pipeline export")
    parser.add_argument("--out", required=True, type=Path, help="the pipeline folder that 'unet' and 'all' write")
    parser.add_argument("--work", type=Path, default=None,
                        help="checkpoints, loss curves and stage outputs (default: OUT.work)")
    parser.add_argument("--steps", type=int, default=None, help="training steps of this stage (not with 'all')")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch size of this stage (not with 'all')")
    parser.add_argument("--seed", type=int, default=0, help="decides the data, the initial weights and every draw")
    parser.add_argument("--resume", action="store_true", help="continue from the stage checkpoints in the work folder")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tinysd",
                        help="'tinysd' is the shipped model; 'tinysd1' the first TinySD (SD's plain loss); "
                             "'smoke' a seconds-long run of tiny networks")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    """The command-line entry point; returns the folder written (the pipeline, or the work folder)."""
    args = _parser().parse_args(argv)
    if args.command == "all" and (args.steps is not None or args.batch_size is not None):
        raise SystemExit("--steps/--batch-size: set them per stage (vae, clip, unet, refine), not with 'all'")
    if args.threads is not None:
        torch.set_num_threads(checks.positive_int(args.threads, "threads"))
    work = args.work if args.work is not None else default_work(args.out)
    common = dict(recipe=PRESETS[args.preset], seed=args.seed, resume=args.resume, progress=not args.no_progress)
    if args.command == "all":
        return train_all(args.out, work=work, preset=args.preset, **common)
    overrides = dict(steps=args.steps, batch_size=args.batch_size)
    if args.command in ("vae", "clip"):
        (train_vae if args.command == "vae" else train_clip)(work, **common, **overrides)
        return work
    text_encoder = load_component(work, "clip")
    if args.command == "unet":
        if not train_unet(work, load_component(work, "vae"), text_encoder, **common, **overrides).finished:
            return work
        if common["recipe"].refine is not None:
            return work  # the pipeline is written after the refine stage
    elif not train_refine(work, load_scaled_vae(work), text_encoder, load_component(work, "unet"), **common,
                          **overrides).finished:
        return work
    return finish_on_main_process(args.out, work, seed=args.seed, preset=args.preset)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")

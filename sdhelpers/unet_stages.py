"""The UNet stages of TinySD's recipe: the UNet on frozen latents, then the refine stage.

Why a module: both stages train a UNet on the same cached latents and caption embeddings of the
frozen VAE and text encoder (chapter 4's loop); they differ in where they start (fresh weights, or
the UNet stage's model) and in the loss (SD's, or SD's plus the branch pull of
:func:`~sdhelpers.objectives.consistent_diffusion_loss`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sdhelpers import checks
from sdhelpers.architectures import build_unet
from sdhelpers.export import FINAL_FOLDER, save_component
from sdhelpers.latents import LatentCache, cached_posteriors, compute_scaling_factor, fingerprint
from sdhelpers.models import load_tokenizer
from sdhelpers.objectives import (
    calibrated_diffusion_loss,
    consistent_diffusion_loss,
    diffusion_loss,
    extra_pass_consistency_loss,
)
from sdhelpers.recipe import TINYSD_RECIPE, Recipe
from sdhelpers.stages import (
    Stage,
    StageResult,
    prepare_stage,
    run_stage,
    seed_init,
    stage_dataset,
    stage_info,
    write_report,
)


def train_unet(work, vae: nn.Module, text_encoder: nn.Module, *, recipe: Recipe = TINYSD_RECIPE, seed: int = 0,
               steps: int | None = None, batch_size: int | None = None, dataset: Any = None,
               resume: bool = False, stop_at: int | None = None, progress: bool = True) -> StageResult:
    """Stage 3: the UNet on cached latents, with the VAE and text encoder frozen: chapter 4's loop.

    SD's loss with the recipe's caption dropout; in a recipe without a refine stage, plus the open
    captions and the pull of :func:`~sdhelpers.objectives.consistent_diffusion_loss` (TinySD 2).
    Sets ``vae.config.scaling_factor`` to ``recipe.latent_std``/std of the cached latents (SD's
    0.18215 recipe when ``latent_std`` is 1). The
    dataset is the recipe's ``unet.dataset_size`` shapes-world items unless one is given.
    """
    stage = prepare_stage("unet", work, recipe, seed, steps, batch_size)
    checks.positive_number(recipe.latent_std, "latent_std", example="1.0")
    if recipe.unet_config["cross_attention_dim"] != text_encoder.config.hidden_size:
        raise ValueError(
            f"recipe: the UNet's cross_attention_dim ({recipe.unet_config['cross_attention_dim']}) must equal the "
            f"text encoder's hidden_size ({text_encoder.config.hidden_size})"
        )
    cache, noise_scheduler, vae = _latent_cache(stage, vae, text_encoder, dataset, progress, measure_scaling=True)
    seed_init(stage)
    pull = _pull_settings(recipe) if recipe.pull_stage == "unet" else {}
    extra = {"caption_dropout": recipe.caption_dropout, "latent_std": recipe.latent_std,
             "noise_scheduler": recipe.noise_scheduler_config,
             **pull, "vae": fingerprint(vae), "text_encoder": fingerprint(text_encoder)}
    result = run_stage(stage, build_unet(recipe.unet_config), _unet_batch_loss(stage, cache, noise_scheduler),
                       stage_info(stage, recipe.unet_config, extra, dataset), resume=resume, stop_at=stop_at,
                       progress=progress)
    if result.finished and stage.accelerator.is_main_process:
        save_component(result.model, stage.folder / FINAL_FOLDER)
        save_component(vae, stage.folder / "vae")  # the VAE with its measured scaling_factor
        write_report(stage, result, scaling_factor=round(cache.scaling_factor, 6), latent_std=recipe.latent_std,
                     latent_dataset_size=len(cache),
                     distinct_captions=cache.empty_id, caption_dropout=recipe.caption_dropout, **pull)
    return result


def train_refine(work, vae: nn.Module, text_encoder: nn.Module, unet: nn.Module, *, recipe: Recipe = TINYSD_RECIPE,
                 seed: int = 0, steps: int | None = None, batch_size: int | None = None, dataset: Any = None,
                 resume: bool = False, stop_at: int | None = None, progress: bool = True) -> StageResult:
    """Stage 4: continue the UNet so that its two guidance branches agree where the picture is fixed.

    SD 1.5 was itself SD 1.2 trained on, with text dropped for classifier-free guidance. Here the
    UNet stage's model goes on with SD's loss on captions of which some leave an attribute unsaid
    (``recipe.open_captions``), plus :func:`~sdhelpers.objectives.extra_pass_consistency_loss`'s
    pull of the empty-prompt and other-caption predictions towards the prompted one at low noise;
    or, with ``recipe.guidance_calibration``, :func:`~sdhelpers.objectives.calibrated_diffusion_loss`,
    which teaches the prompted branch a step that guidance at that scale gives back.
    ``vae`` must carry the UNet stage's scaling factor (the work folder's ``unet/vae``).
    """
    stage = prepare_stage("refine", work, recipe, seed, steps, batch_size)
    cache, noise_scheduler, vae = _latent_cache(stage, vae, text_encoder, dataset, progress, measure_scaling=False)
    pull = _pull_settings(recipe)
    extra = {"caption_dropout": recipe.caption_dropout, **pull, "vae": fingerprint(vae),
             "text_encoder": fingerprint(text_encoder), "unet": fingerprint(unet)}
    result = run_stage(stage, copy.deepcopy(unet), _unet_batch_loss(stage, cache, noise_scheduler),
                       stage_info(stage, {k: v for k, v in unet.config.items() if not k.startswith("_")}, extra,
                             dataset), resume=resume, stop_at=stop_at,
                       progress=progress)
    if result.finished and stage.accelerator.is_main_process:
        save_component(result.model, stage.folder / FINAL_FOLDER)
        write_report(stage, result, latent_dataset_size=len(cache), caption_dropout=recipe.caption_dropout, **pull)
    return result


def _pull_settings(recipe: Recipe) -> dict[str, Any]:
    return {"open_captions": recipe.open_captions, "branch_consistency": recipe.branch_consistency,
            "consistency_below_timestep": recipe.consistency_below_timestep,
            "consistency_swaps": recipe.consistency_swaps, "guidance_calibration": recipe.guidance_calibration,
            "calibration_full_below": recipe.calibration_full_below}


def _latent_cache(stage: Stage, vae: nn.Module, text_encoder: nn.Module, dataset: Any, progress: bool, *,
                  measure_scaling: bool):
    """The stage's frozen latents and caption embeddings, its noise schedule, and the VAE (on the device)."""
    from diffusers import DDPMScheduler

    device = stage.accelerator.device
    vae = vae.to(device).eval().requires_grad_(False)
    text_encoder = text_encoder.to(device).eval().requires_grad_(False)
    mean, std, captions = _posteriors(stage, vae, stage_dataset(stage, dataset), progress)
    if measure_scaling:
        sampled = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(stage.seed))
        vae.register_to_config(scaling_factor=stage.recipe.latent_std * compute_scaling_factor(sampled))
    cache = LatentCache.from_posteriors(mean, std, captions, text_encoder, load_tokenizer(),
                                        vae.config.scaling_factor)
    return cache, DDPMScheduler(**stage.recipe.noise_scheduler_config), vae


def _unet_batch_loss(stage: Stage, cache: LatentCache, noise_scheduler) -> Callable[[nn.Module, int], torch.Tensor]:
    """One step's loss: SD's, with the recipe's branch pull on its pull stage (see :class:`Recipe`)."""
    recipe, device = stage.recipe, stage.accelerator.device
    empty = cache.embeddings[cache.empty_id][None].to(device)

    def batch_loss(unet: nn.Module, step: int) -> torch.Tensor:
        generator = stage.generator(step)
        if stage.name != recipe.pull_stage or not (recipe.branch_consistency or recipe.guidance_calibration):
            latents, text = cache.sample(stage.local_batch, generator, recipe.caption_dropout)
            return diffusion_loss(unet, noise_scheduler, latents.to(device), text.to(device), generator)
        latents, text, captions, dropped = cache.sample(stage.local_batch, generator, recipe.caption_dropout,
                                                        with_captions=True)
        latents, text, captions = latents.to(device), text.to(device), captions.to(device)
        if recipe.guidance_calibration:
            return calibrated_diffusion_loss(unet, noise_scheduler, latents, text, empty, dropped, generator,
                                             recipe.guidance_calibration, recipe.consistency_below_timestep,
                                             recipe.calibration_full_below)
        settings = (recipe.branch_consistency, recipe.consistency_below_timestep, recipe.consistency_swaps)
        if stage.name == "unet":
            return consistent_diffusion_loss(unet, noise_scheduler, latents, text, captions, dropped, generator,
                                             *settings)
        return extra_pass_consistency_loss(unet, noise_scheduler, latents, text, captions, empty, dropped,
                                           generator, *settings)

    return batch_loss


def _posteriors(stage: Stage, vae: nn.Module, data: Any, progress: bool):
    """The cached posteriors: encoded (and written) by the main process, then read by the others."""
    path, accelerator = stage.folder / "latents.safetensors", stage.accelerator
    if accelerator.is_main_process:
        posteriors = cached_posteriors(vae, data, path, progress=progress)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        posteriors = cached_posteriors(vae, data, path)
    return posteriors

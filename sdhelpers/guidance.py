"""Why a small model can break under strong classifier-free guidance, measured; and a remedy.

Classifier-free guidance predicts the noise twice, with the prompt and with the empty prompt, and
steps along ``uncond + s * (cond - uncond)``. Where the latent already fixes the picture (low noise),
the two predictions should nearly agree, and guidance changes little. If the empty-prompt branch is
poorly learnt there, the two disagree, guidance multiplies the disagreement by ``s - 1`` and the
late steps push the latent around: at SD's 7.5 the colours flip from step to step.

- :func:`branch_gap` measures it on real noised latents: each branch's error and the rms of their
  difference, per timestep. A model that holds at 7.5 has a small gap at low noise.
- :func:`interval_guidance` is limited-interval guidance (Kynkäänniemi et al., 2024): full guidance
  only while the noise is high, the conditional prediction alone after that, through diffusers'
  ``callback_on_step_end``, so the stock pipeline runs it.
- :func:`empty_prompt_below` shows what the low-noise steps draw when they ignore the prompt, the
  behaviour a small gap asks of them there: the empty prompt's branch has learnt the training
  distribution, so it repaints what that distribution lacks, such as a held-out colour×shape pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sdhelpers import checks

GAP_TIMESTEPS = (20, 200, 400, 600, 800)
"""Where :func:`branch_gap` measures by default: from nearly clean to mostly noise."""


@torch.no_grad()
def branch_gap(pipe: Any, timesteps: Sequence[int] = GAP_TIMESTEPS, count: int = 64, seed: int = 0,
               split: str = "train") -> dict[int, dict[str, float]]:
    """Per timestep: the prompted and the empty branch's noise-prediction MSE, and their rms gap.

    ``count`` shapes-world images of ``split`` are encoded by the pipeline's VAE (posterior mean,
    times the scaling factor), noised to each ``t`` with SD's training schedule and one seeded noise
    draw, and denoised by the UNet with their own caption and with the empty prompt. ``gap`` is
    ``sqrt(mean((cond - uncond)^2))``: what guidance multiplies by ``s - 1``.
    """
    from diffusers import DDPMScheduler

    from sdhelpers.data import ShapesDataset
    from sdhelpers.latents import batch_of
    from sdhelpers.sampling import encode_prompt

    count = checks.positive_int(count, "count")
    steps = DDPMScheduler.from_config(pipe.scheduler.config).config.num_train_timesteps
    bad = [t for t in timesteps if not 0 <= int(t) < steps]
    if bad or not timesteps:
        raise ValueError(f"timesteps: {list(timesteps)!r} is not allowed; use training timesteps in [0, {steps})")
    images, captions = batch_of(ShapesDataset(count, seed=checks.seed(seed) + 3_000_017, split=split), range(count))
    device, dtype = pipe.unet.device, pipe.unet.dtype
    latents = pipe.vae.encode(images.to(device, pipe.vae.dtype)).latent_dist.mode() * pipe.vae.config.scaling_factor
    cond, uncond = encode_prompt(pipe, captions)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(seed)
    report = {}
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
        t_batch = torch.full((count,), int(t), device=device, dtype=torch.long)
        noisy = noise_scheduler.add_noise(latents, noise, t_batch).to(dtype)
        eps_cond = pipe.unet(noisy, t_batch, encoder_hidden_states=cond).sample.float()
        eps_uncond = pipe.unet(noisy, t_batch, encoder_hidden_states=uncond).sample.float()
        noise = noise.float()
        report[int(t)] = {
            "prompted_mse": round(float((eps_cond - noise).pow(2).mean()), 5),
            "empty_mse": round(float((eps_uncond - noise).pow(2).mean()), 5),
            "gap": round(float((eps_cond - eps_uncond).pow(2).mean().sqrt()), 5),
        }
    return report


def _next_step_below(pipeline: Any, index: int, threshold: float) -> bool:
    """Whether the step after ``index`` in this call's schedule (whatever its step count) is below ``threshold``."""
    schedule = pipeline.scheduler.timesteps
    return index + 1 < len(schedule) and float(schedule[index + 1]) < threshold


def interval_guidance(pipe: Any, from_timestep: float = 600.0):
    """A ``callback_on_step_end`` that turns guidance off once the timestep falls below ``from_timestep``.

    Pass it with ``callback_on_step_end_tensor_inputs=["prompt_embeds"]``. From the first step whose
    next timestep is below the threshold, the callback keeps only the prompt's half of the
    embeddings and sets the guidance scale to 1, so the remaining steps use the conditional
    prediction alone (one UNet call each, not two)::

        pipe(prompt, guidance_scale=7.5, callback_on_step_end=interval_guidance(pipe),
             callback_on_step_end_tensor_inputs=["prompt_embeds"])
    """
    checks.positive_number(from_timestep, "from_timestep", example="600")

    def callback(pipeline, index: int, t, tensors: dict[str, Any]) -> dict[str, Any]:
        if pipeline.guidance_scale > 1 and _next_step_below(pipeline, index, from_timestep):
            pipeline._guidance_scale = 1.0
            tensors["prompt_embeds"] = tensors["prompt_embeds"].chunk(2)[-1]
        return tensors

    return callback


def empty_prompt_below(pipe: Any, below_timestep: float = 200.0):
    """A ``callback_on_step_end`` that swaps the prompt for the empty prompt below ``below_timestep``.

    Pass it with ``callback_on_step_end_tensor_inputs=["prompt_embeds"]``. From the first step whose
    next timestep is below the threshold, every half of the embeddings becomes the empty prompt's,
    so the remaining steps denoise without the prompt (at any guidance scale)::

        pipe(prompt, guidance_scale=1.0, callback_on_step_end=empty_prompt_below(pipe, 200),
             callback_on_step_end_tensor_inputs=["prompt_embeds"])

    Compare training and held-out compositions with and without it: whatever the late steps change
    on the held-out ones is what the model's unprompted prior puts in their place.
    """
    checks.positive_number(below_timestep, "below_timestep", example="200")
    empty = pipe.encode_prompt([""], pipe._execution_device, 1, False)[0]

    def callback(pipeline, index: int, t, tensors: dict[str, Any]) -> dict[str, Any]:
        if _next_step_below(pipeline, index, below_timestep):
            embeds = tensors["prompt_embeds"]
            tensors["prompt_embeds"] = empty.to(embeds).expand_as(embeds)
        return tensors

    return callback

"""What textual inversion, LoRA and DreamBooth share: a few example images and the one training loop.

Each method teaches a frozen pipeline a new concept from a handful of images, and each trains with
SD's own objective (:func:`sdhelpers.objectives.diffusion_loss`): noise the examples' latents at a
random timestep and predict the noise, given the examples' captions. They differ only in *what*
the optimizer may change: one embedding vector (:mod:`sdhelpers.textual_inversion`), low-rank
updates of the UNet's attention (:mod:`sdhelpers.lora`), or the same with a rare word and the
model's own pictures alongside (DreamBooth, in :mod:`sdhelpers.lora`).

- :func:`check_examples`: the images and captions, validated once at the entrance;
- :class:`ExampleLatents`: the examples encoded once by the frozen VAE, sampled afresh each step;
- :func:`teach`: AdamW and :func:`sdhelpers.fit.train_steps`, the loop that trained TinySD, with
  each step's draws seeded by ``(seed, step)`` alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import nn

from sdhelpers import checks
from sdhelpers.fit import make_optimizer, step_generator, train_steps
from sdhelpers.images import pil_to_tensor
from sdhelpers.objectives import diffusion_loss


@dataclass
class TeachResult:
    """What a fine-tune did: its loss per step, how many numbers it trained, and for how long."""

    method: str
    losses: list[float]
    steps: int
    trainable_parameters: int
    seconds: float = field(default=0.0, compare=False)


def check_examples(images: Any, prompts: Any, name: str = "images") -> tuple[list[Image.Image], list[str]]:
    """The example images and their captions, one each; an empty set is refused."""
    if isinstance(images, Image.Image) or not isinstance(images, Sequence):
        raise TypeError(f"{name}: expected a list of PIL images, got {type(images).__name__}")
    if not images:
        raise ValueError(f"{name}: the example set is empty; give at least one image of the concept")
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) != len(images):
        raise ValueError(f"prompts: give one caption per image ({len(images)} images)")
    for i, image in enumerate(images):
        checks.pil_image(image, f"{name}[{i}]")
    return list(images), [str(p) for p in prompts]


class ExampleLatents:
    """The examples through the frozen VAE, once: each step draws fresh latents from the posterior.

    Drawing ``mean + std · ε`` at every step, as SD's training loop does with
    ``latent_dist.sample()``, costs nothing once the posterior is stored.
    """

    def __init__(self, vae: nn.Module, images: Sequence[Image.Image]) -> None:
        device, dtype = vae.device, vae.dtype
        with torch.no_grad():
            posterior = vae.encode(pil_to_tensor(list(images)).to(device, dtype)).latent_dist
        self.mean, self.std = posterior.mean, posterior.std
        self.scaling_factor = float(vae.config.scaling_factor)

    def __len__(self) -> int:
        return self.mean.shape[0]

    def sample(self, generator: torch.Generator, index: torch.Tensor | None = None) -> torch.Tensor:
        mean, std = (self.mean, self.std) if index is None else (self.mean[index], self.std[index])
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return (mean + std * noise) * self.scaling_factor


def noise_scheduler(pipe: Any):
    """The training-time scheduler: DDPM with the pipeline's own noise schedule, as diffusers' scripts use."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def example_loss(unet: nn.Module, scheduler, latents: ExampleLatents, text_embeddings: torch.Tensor,
                 generator: torch.Generator, index: torch.Tensor | None = None) -> torch.Tensor:
    """SD's loss on the examples (or the ``index`` subset): fresh latents, fresh noise, fresh timesteps."""
    sample = latents.sample(generator, index)
    embeddings = text_embeddings if index is None else text_embeddings[index]
    return diffusion_loss(unet, scheduler, sample, embeddings.to(sample.dtype), generator)


def trainable(parameters: Sequence[nn.Parameter]) -> int:
    """How many numbers the optimizer may change."""
    return int(sum(p.numel() for p in parameters))


def teach(method: str, model: nn.Module, parameters: Sequence[nn.Parameter],
          loss_fn: Callable[[torch.Generator], torch.Tensor], *, steps: int, learning_rate: float,
          seed: int = 0, warmup_steps: int = 0) -> TeachResult:
    """AdamW on ``parameters`` for ``steps`` steps of :func:`sdhelpers.fit.train_steps`.

    ``loss_fn(generator)`` computes one step's loss from that step's own generator, seeded by
    ``(seed, step)``, so a run is the same bit for bit on one machine.
    """
    steps = checks.positive_int(steps, "steps")
    seed = checks.seed(seed)
    parameters = list(parameters)
    optimizer, schedule = make_optimizer(parameters, learning_rate, steps, warmup_steps, weight_decay=0.0)
    began = time.perf_counter()
    losses = train_steps(model, optimizer, schedule, lambda step: loss_fn(step_generator(seed, "finetune", step)),
                         steps)
    return TeachResult(method, losses, steps, trainable(parameters), time.perf_counter() - began)

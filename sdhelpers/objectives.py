"""The three training objectives of Stable Diffusion's recipe, each a loss of one batch.

Why a module: the trainer (:mod:`sdhelpers.train`), chapter 4's loop (:mod:`sdhelpers.loop`) and the
tests share these losses, and an objective written once cannot drift between the code a chapter
teaches and the code that trained the shipped model.

- :class:`VAEObjective`: the autoencoder's reconstruction + KL loss (:func:`vae_loss`);
- :class:`ContrastiveCLIP`: a mini CLIP whose forward is the symmetric InfoNCE loss (and, as a
  measured lever, :func:`context_invariance`);
- :func:`diffusion_loss`: SD's UNet objective, MSE between the true and the predicted noise;
  :func:`calibrated_diffusion_loss`, :func:`consistent_diffusion_loss` and
  :func:`extra_pass_consistency_loss`: that objective changed so that a small model holds at guidance 7.5.

The first two are modules whose ``forward`` returns the loss, so that Accelerate can wrap them
for several processes (DDP synchronises gradients through the wrapped module's forward); the
UNet is wrapped itself and :func:`diffusion_loss` calls it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sdhelpers import checks
from sdhelpers.architectures import build_text_encoder


class VAEObjective(nn.Module):
    """Wraps the VAE so one ``forward`` returns its training loss (what Accelerate/DDP can wrap).

    ``eps`` is the noise of the reparameterised posterior sample ``z = mean + std * eps``, drawn
    by the caller from the step's generator.
    """

    def __init__(self, vae: nn.Module, weights: dict[str, float]) -> None:
        super().__init__()
        self.model = vae
        self.weights = dict(weights)

    def forward(self, images: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        posterior = self.model.encode(images).latent_dist
        latents = posterior.mean + posterior.std * eps.to(posterior.mean.dtype)
        reconstruction = self.model.decode(latents).sample.float()
        return vae_loss(reconstruction, images.float(), posterior.kl().float(), self.weights)


def vae_loss(reconstruction: torch.Tensor, images: torch.Tensor, kl: torch.Tensor, weights: dict[str, float]) -> torch.Tensor:
    """L1 + MSE + edge + KL, each weighted by ``weights``.

    - L1 keeps flat colours exact; MSE punishes the few large errors (a wrong colour patch).
    - The edge term compares horizontal and vertical pixel differences: it is what keeps a shape's
      outline sharp where L1/MSE alone accept a soft blur.
    - KL (per image, summed over the latent) is divided by the pixels per image, so its weight
      means what SD's ``kl_weight = 1e-6`` means next to a per-pixel reconstruction sum.
    """
    difference = reconstruction - images
    l1 = difference.abs().mean()
    mse = difference.pow(2).mean()
    dx = (reconstruction.diff(dim=-1) - images.diff(dim=-1)).abs().mean()
    dy = (reconstruction.diff(dim=-2) - images.diff(dim=-2)).abs().mean()
    kl_per_pixel = kl.mean() / images[0].numel()
    return (weights["l1"] * l1 + weights["mse"] * mse + weights["edge"] * (dx + dy) / 2
            + weights["kl"] * kl_per_pixel)


class TinyImageTower(nn.Module):
    """CLIP's image tower, shrunk to a CNN: stride-2 convolutions, average pooling, a projection."""

    def __init__(self, channels: Sequence[int] = (32, 64, 128, 128), embed_dim: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = 3
        for width in channels:
            layers += [nn.Conv2d(previous, width, 3, stride=2, padding=1), nn.GroupNorm(min(8, width), width), nn.SiLU()]
            previous = width
        layers += [nn.Conv2d(previous, previous, 3, padding=1), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.projection = nn.Linear(previous, embed_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(self.features(pixel_values).mean(dim=(2, 3)))


class ContrastiveCLIP(nn.Module):
    """A mini CLIP: ``CLIPTextModel`` + :class:`TinyImageTower`, projections and a learnable temperature.

    ``forward`` returns the symmetric InfoNCE loss of a batch. Captions repeat a lot in the shapes
    world (75 distinct training captions), so a plain one-hot target would call the image of an
    identical caption a negative; the target instead spreads evenly over every item with the same
    caption (``caption_ids``), which removes that noise.
    """

    def __init__(self, text_config: dict[str, Any], image_tower_config: dict[str, Any],
                 invariance_weight: float = 0.0) -> None:
        super().__init__()
        self.invariance_weight = float(invariance_weight)
        self.text_model = build_text_encoder(text_config)
        embed_dim = int(image_tower_config["embed_dim"])
        self.image_model = TinyImageTower(tuple(image_tower_config["channels"]), embed_dim)
        self.text_projection = nn.Linear(int(text_config["hidden_size"]), embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        pooled = self.text_model(input_ids=input_ids).pooler_output
        return F.normalize(self.text_projection(pooled), dim=-1)

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_model(pixel_values), dim=-1)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, caption_ids: torch.Tensor) -> torch.Tensor:
        output = self.text_model(input_ids=input_ids)
        text = F.normalize(self.text_projection(output.pooler_output), dim=-1)
        image = self.embed_images(pixel_values)
        logits = self.logit_scale.exp().clamp(max=100) * text @ image.T
        same = (caption_ids[:, None] == caption_ids[None, :]).float()
        targets = same / same.sum(dim=1, keepdim=True)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        if self.invariance_weight:
            eos = self.text_model.config.eos_token_id
            loss = loss + self.invariance_weight * context_invariance(output.last_hidden_state, input_ids, eos)
        return loss


def context_invariance(hidden: torch.Tensor, input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """How much a word's state varies with the caption around it: a share of the states' variance.

    A causal text encoder mixes each word's state with the words before it, so "circle" after
    "orange" is another vector than after "red", and a colour×shape pair never trained is a state
    the UNet never saw. Positions are grouped by (token, place); the term is the mean squared
    distance of each state from its group's mean, over the total variance of the states. The
    first end token is left out: it is the pooled output, which must sum the caption up. 0 when
    every word's state, and every padding position's, is the same whatever the caption.
    """
    places = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    first_end = (input_ids == eos_token_id).int().argmax(dim=-1, keepdim=True)
    kept = (input_ids != eos_token_id) | (places > first_end)
    keys = (input_ids.long() * input_ids.shape[1] + places)[kept]
    states = hidden[kept].float()
    _, group, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), states.shape[1], device=states.device).index_add_(0, group, states)
    deviation = ((states - (sums / counts[:, None])[group]) ** 2).sum(dim=-1).mean()
    return deviation / (states.var(dim=0).sum().detach() + 1e-6)


def noised(noise_scheduler, latents: torch.Tensor, generator: torch.Generator):
    """SD's forward process on a batch: ``(noisy latents, the noise, the timesteps)``.

    Gaussian noise like the latents, then one timestep per item, uniform in
    ``[0, num_train_timesteps)``, both from ``generator``; ``add_noise`` is the closed form
    ``sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε``.
    """
    device = latents.device
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(device)
    steps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(device)
    return noise_scheduler.add_noise(latents, noise, timesteps), noise, timesteps


def diffusion_loss(
    unet: nn.Module,
    noise_scheduler,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """SD's training objective on a batch of (already scaled) latents: MSE between true and predicted noise.

    Draws Gaussian noise like the latents and one timestep per item, uniform in
    ``[0, num_train_timesteps)``, noises the latents with ``noise_scheduler.add_noise`` (the closed
    form ``sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε``) and asks the UNet for ``ε``.
    """
    checks.generator(generator)
    if latents.dim() != 4:
        raise ValueError(f"latents: expected a batch (B, C, h, w), got shape {tuple(latents.shape)}")
    if text_embeddings.shape[0] != latents.shape[0]:
        raise ValueError(
            f"text_embeddings: {text_embeddings.shape[0]} embeddings for {latents.shape[0]} latents; they must match"
        )
    noisy_latents, noise, timesteps = noised(noise_scheduler, latents, generator)
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states=text_embeddings).sample
    return F.mse_loss(model_pred.float(), noise.float(), reduction="mean")


def consistent_diffusion_loss(unet: nn.Module, noise_scheduler, latents: torch.Tensor, text_embeddings: torch.Tensor,
                              caption_embeddings: torch.Tensor, dropped: torch.Tensor, generator: torch.Generator,
                              weight: float, below_timestep: int, swap: float = 0.0) -> torch.Tensor:
    """:func:`diffusion_loss` plus a pull of the other branches towards the prompted one at low noise.

    Where the noise is low the latent already fixes the picture, so the best prediction with the
    empty prompt, or with any other prompt, equals the one with the true caption; classifier-free
    guidance multiplies any difference by ``s - 1`` (a negative prompt is such another prompt).
    Items below ``below_timestep`` whose caption was dropped are pulled (with ``weight``) towards
    the UNet's own prediction with the real caption, held fixed (no gradient). With ``swap`` > 0,
    that share of the other low-noise items is shown the next item's caption instead of its own,
    and pulled the same way. Same draws as :func:`diffusion_loss` (the swaps come after them), so
    ``weight=0`` gives exactly it.
    """
    noisy_latents, noise, timesteps = noised(noise_scheduler, latents, generator)
    low = timesteps < below_timestep
    taught = dropped.to(timesteps.device) & low
    if weight and swap:
        swapped = (torch.rand(latents.shape[0], generator=generator) < swap).to(low.device) & low & ~taught
        text_embeddings = torch.where(swapped[:, None, None], caption_embeddings.roll(1, 0), text_embeddings)
        taught = taught | swapped
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states=text_embeddings).sample
    loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
    if weight and bool(taught.any()):
        with torch.no_grad():
            target = unet(noisy_latents[taught], timesteps[taught],
                          encoder_hidden_states=caption_embeddings[taught]).sample
        pull = F.mse_loss(model_pred[taught].float(), target.float(), reduction="sum") / model_pred[0].numel()
        loss = loss + weight * pull / latents.shape[0]
    return loss


def extra_pass_consistency_loss(unet: nn.Module, noise_scheduler, latents: torch.Tensor, text_embeddings: torch.Tensor,
                                caption_embeddings: torch.Tensor, empty_embedding: torch.Tensor, dropped: torch.Tensor,
                                generator: torch.Generator, weight: float, below_timestep: int,
                                swap: float = 0.0) -> torch.Tensor:
    """:func:`diffusion_loss` whole, plus an extra pass that pulls the other branches towards the prompted one.

    The refine stage's loss. Unlike :func:`consistent_diffusion_loss`, no item leaves SD's loss:
    the prompted branch keeps all it learnt. Then the items below ``below_timestep`` that kept their
    caption go through the UNet a second time, with the empty prompt or (a ``swap`` share of them)
    the next item's caption, and that prediction is pulled (with ``weight``) towards the first
    pass's, held fixed. ``weight=0`` gives exactly :func:`diffusion_loss` (same draws).
    """
    noisy_latents, noise, timesteps = noised(noise_scheduler, latents, generator)
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states=text_embeddings).sample
    loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
    taught = (timesteps < below_timestep) & ~dropped.to(timesteps.device)
    if not weight or not bool(taught.any()):
        return loss
    swapped = (torch.rand(latents.shape[0], generator=generator) < swap).to(taught.device)
    other = torch.where(swapped[:, None, None], caption_embeddings.roll(1, 0),
                        empty_embedding.to(caption_embeddings).expand_as(caption_embeddings))
    pulled = unet(noisy_latents[taught], timesteps[taught], encoder_hidden_states=other[taught]).sample
    target = model_pred[taught].detach()
    pull = F.mse_loss(pulled.float(), target.float(), reduction="sum") / model_pred[0].numel()
    return loss + weight * pull / latents.shape[0]


def calibration_share(timesteps: torch.Tensor, scale: float, below_timestep: int,
                      full_below: int | None = None) -> torch.Tensor:
    """Per timestep, the share ``m`` of the way from the empty prediction that the prompted branch is taught.

    ``1/scale`` below ``full_below``, 1 (SD's own target) from ``below_timestep`` up, and a linear
    ramp between them; ``full_below=None`` means a step at ``below_timestep``. Guidance ``g`` then
    acts as ``g·m``: the full ``g`` at high noise, ``g/scale`` where the picture is fixed.
    """
    full_below = below_timestep if full_below is None else full_below
    t = timesteps.float()
    ramp = ((t - full_below) / max(below_timestep - full_below, 1)).clamp(0, 1)
    share = 1 / scale + (1 - 1 / scale) * ramp
    return torch.where(t >= below_timestep, torch.ones_like(t), share)


def calibrated_diffusion_loss(unet: nn.Module, noise_scheduler, latents: torch.Tensor, text_embeddings: torch.Tensor,
                              empty_embedding: torch.Tensor, dropped: torch.Tensor, generator: torch.Generator,
                              scale: float, below_timestep: int, full_below: int | None = None) -> torch.Tensor:
    """SD's loss, with the prompted branch at low noise calibrated so that guidance ``scale`` gives back SD's target.

    Classifier-free guidance returns ``e∅ + s·(e_c − e∅)``. Where the noise is low, the latent
    already fixes most of the picture and the difference ``e_c − e∅`` is small, so a small model's
    errors in it are all that guidance multiplies. Here, below ``below_timestep``, an item that kept
    its caption is taught ``e∅ + m·(ε − e∅)`` instead of ``ε``, with ``e∅`` the UNet's own
    empty-prompt prediction held fixed (no gradient) and ``m`` from :func:`calibration_share`
    (``1/scale`` where the picture is fixed): the prompted branch moves only ``m`` of the way from
    the empty one, and guidance at ``scale`` multiplies it back, to the prediction that SD's loss
    teaches. The item's loss is weighted by ``1/m``, so the small step is learnt as firmly as a
    full one. Guidance ``s`` then acts as ``s`` at high noise and as ``s·m`` below
    ``below_timestep``: limited-interval guidance (Kynkäänniemi et al., 2024) learnt by the model,
    with the stock pipeline unchanged. Because ``e∅`` comes from the same network, the errors the
    two branches share cancel in their difference instead of being multiplied. Dropped captions
    (the empty branch) and the items at higher noise keep SD's loss; ``scale=1`` gives exactly
    :func:`diffusion_loss` (same draws).
    """
    noisy_latents, noise, timesteps = noised(noise_scheduler, latents, generator)
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states=text_embeddings).sample.float()
    target = noise.float().clone()
    share = calibration_share(timesteps, scale, below_timestep, full_below)
    calibrated = (share < 1) & ~dropped.to(timesteps.device)
    weight = torch.where(calibrated, 1 / share, torch.ones_like(share))
    if bool(calibrated.any()):
        empty = empty_embedding.to(text_embeddings).expand(int(calibrated.sum()), -1, -1)
        with torch.no_grad():
            e_empty = unet(noisy_latents[calibrated], timesteps[calibrated], encoder_hidden_states=empty).sample.float()
        m = share[calibrated].view(-1, *[1] * (target.dim() - 1))
        target[calibrated] = e_empty + m * (target[calibrated] - e_empty)
    per_item = (model_pred - target).pow(2).mean(dim=tuple(range(1, model_pred.dim())))
    return (weight * per_item).sum() / len(timesteps)

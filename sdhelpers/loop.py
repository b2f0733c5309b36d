"""The source text's UNet training loop, as small readable functions.

The source trains Stable Diffusion's UNet with one loop: a ``CustomImageTextDataset`` of image
paths and captions, torchvision transforms, a ``DataLoader``; the frozen VAE turns each batch into
latents (times ``scaling_factor``), the frozen CLIP text encoder turns its captions into
embeddings; random noise and timesteps go through ``noise_scheduler.add_noise``; the UNet predicts
the noise and an MSE loss trains it with AdamW; ``torch.save`` keeps the weights. This module is
that loop, split so that a chapter can run each part and a test can check it:

- :class:`ImageTextDataset` and :class:`ImageTextTransform`: the dataset class and the transform,
  without torchvision (which does not install beside a CPU-only torch), giving images in [-1, 1];
- :func:`training_step`: one step of the source's loop body, from a batch to the loss;
- :func:`diffusion_loss`: its core (noise, timesteps, ``add_noise``, MSE), shared with
- :class:`CachedLatents`: the same training set encoded once, as :mod:`sdhelpers.train` does;
- :func:`drop_captions`: classifier-free guidance's caption dropout;
- :func:`make_optimizer`, :func:`train_steps`: AdamW with a warm-up + cosine schedule, and the loop;
- :func:`save_training_state` / :func:`load_training_state`: the source's ``torch.save`` as one
  atomic safetensors file (:mod:`sdhelpers.checkpoint`) holding everything an exact resume needs.

Every random draw comes from a ``torch.Generator`` passed in, so a run is reproducible and a
checkpoint can carry the generator's state. :mod:`sdhelpers.train` is the full version (Accelerate,
EMA, several GPUs) that trained the shipped TinySD.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from sdhelpers.checkpoint import CheckpointError, guarded, load_state, rng_state, save_state, set_rng_state
from sdhelpers.images import load_image, pil_to_tensor

STATE_KIND = "sdhelpers.loop/1"
"""Written into every state saved by :func:`save_training_state`; anything else is refused on load."""


def _check_probability(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: {value!r} is not allowed; use a number in [0, 1]")
    return float(value)


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name}: {value!r} is not allowed; use a positive integer")
    return int(value)


def _check_generator(generator: Any) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator (make_generator(seed)), got {type(generator).__name__}")
    return generator


# --------------------------------------------------------------------------- data


class ImageTextTransform:
    """The source's ``transforms.Compose([Resize((size, size)), ToTensor()])``, without torchvision.

    Resizes (bilinear, with Pillow's antialiasing when shrinking) to ``size``×``size`` and returns a
    float tensor (3, size, size) in **[-1, 1]**: the range the VAE was trained on. The source's
    ``ToTensor()`` alone gives [0, 1] and leaves out the ``Normalize([0.5], [0.5])`` that maps it to
    [-1, 1]; here that step is part of the transform (:func:`sdhelpers.images.pil_to_tensor`).
    An image already ``size``×``size`` is not resampled at all.
    """

    def __init__(self, size: int = 64) -> None:
        self.size = _check_positive_int(size, "size")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(f"image: expected a PIL image, got {type(image).__name__}")
        image = image.convert("RGB")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
        return pil_to_tensor(image)[0]

    def __repr__(self) -> str:
        return f"ImageTextTransform(size={self.size})"


class ImageTextDataset(Dataset):
    """The source's ``CustomImageTextDataset``: image files and their captions, one dict per item.

    ``image_paths[i]`` is opened with Pillow (EXIF rotation applied, converted to RGB) and passed
    through ``transform`` (default :class:`ImageTextTransform` at 64 px); the item is
    ``{"image": tensor, "text": text_descriptions[i]}``, exactly what
    :class:`sdhelpers.data.ShapesDataset` yields, so either feeds the same ``DataLoader``.
    """

    def __init__(
        self,
        image_paths: Sequence[str | os.PathLike],
        text_descriptions: Sequence[str],
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        if isinstance(image_paths, (str, os.PathLike)) or not isinstance(image_paths, Sequence):
            raise TypeError(f"image_paths: expected a list of file paths, got {type(image_paths).__name__}")
        if isinstance(text_descriptions, str) or not isinstance(text_descriptions, Sequence):
            raise TypeError(f"text_descriptions: expected a list of strings, got {type(text_descriptions).__name__}")
        if len(image_paths) != len(text_descriptions):
            raise ValueError(
                f"text_descriptions: {len(text_descriptions)} captions for {len(image_paths)} images; they must match one to one"
            )
        if not all(isinstance(t, str) for t in text_descriptions):
            raise TypeError("text_descriptions: every caption must be a string")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform: expected a callable or None, got {type(transform).__name__}")
        self.image_paths = [Path(p) for p in image_paths]
        self.text_descriptions = list(text_descriptions)
        self.transform = transform if transform is not None else ImageTextTransform()

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        image = load_image(self.image_paths[idx], name=f"image_paths[{idx}]")
        return {"image": self.transform(image), "text": self.text_descriptions[idx]}


def drop_captions(texts: Sequence[str], probability: float, generator: torch.Generator) -> list[str]:
    """Replace each caption by ``""`` with ``probability``: classifier-free guidance's caption dropout.

    Trained this way, one UNet learns both the conditional noise prediction and the unconditional
    one (the empty prompt), which sampling then combines as ``uncond + s * (cond - uncond)``.
    One uniform number is drawn per caption, whatever ``probability`` is.
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts: expected a list of caption strings, got {type(texts).__name__}")
    probability = _check_probability(probability, "probability")
    draws = torch.rand(len(texts), generator=_check_generator(generator))
    return ["" if float(u) < probability else text for text, u in zip(texts, draws)]


@torch.no_grad()
def encode_text(text_encoder: nn.Module, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """The source's text step: pad/truncate to 77 tokens, take the encoder's last hidden state (B, 77, d)."""
    ids = tokenizer(
        list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids.to(next(text_encoder.parameters()).device))[0]


# --------------------------------------------------------------------------- the loss


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
    generator = _check_generator(generator)
    if latents.dim() != 4:
        raise ValueError(f"latents: expected a batch (B, C, h, w), got shape {tuple(latents.shape)}")
    if text_embeddings.shape[0] != latents.shape[0]:
        raise ValueError(
            f"text_embeddings: {text_embeddings.shape[0]} embeddings for {latents.shape[0]} latents; they must match"
        )
    device = latents.device
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(device)
    steps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(device)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states=text_embeddings).sample
    return F.mse_loss(model_pred.float(), noise.float(), reduction="mean")


def training_step(
    unet: nn.Module,
    vae: nn.Module,
    text_encoder: nn.Module,
    tokenizer,
    noise_scheduler,
    batch: dict[str, Any],
    generator: torch.Generator,
    caption_dropout: float = 0.0,
) -> torch.Tensor:
    """The body of the source's loop, from a DataLoader batch to the loss (not yet back-propagated).

    1. ``vae.encode(images).latent_dist.sample()`` × ``vae.config.scaling_factor`` (frozen VAE);
    2. captions, a ``caption_dropout`` share replaced by ``""``, through the frozen text encoder;
    3. :func:`diffusion_loss`.
    """
    generator = _check_generator(generator)
    if not isinstance(batch, dict) or "image" not in batch or "text" not in batch:
        raise ValueError("batch: expected a dict with 'image' (B, 3, H, W) and 'text' (B captions), as a DataLoader gives")
    images, texts = batch["image"], list(batch["text"])
    if images.shape[0] != len(texts):
        raise ValueError(f"batch: {images.shape[0]} images but {len(texts)} captions")
    with torch.no_grad():
        posterior = vae.encode(images.to(next(vae.parameters()).device, vae.dtype)).latent_dist
        latents = posterior.sample(generator) * vae.config.scaling_factor
        text_embeddings = encode_text(text_encoder, tokenizer, drop_captions(texts, caption_dropout, generator))
    return diffusion_loss(unet, noise_scheduler, latents, text_embeddings, generator)


class CachedLatents:
    """A training set encoded once by the frozen VAE and text encoder, sampled like the source's loop.

    The VAE and the text encoder never change during UNet training, so their outputs can be
    computed once: the posterior's mean and std for every image, the embedding of every distinct
    caption and of the empty prompt. :meth:`sample` then draws a batch as the source's loop would
    see it (a fresh ``latent_dist.sample()`` × scaling factor, with caption dropout) for the cost
    of an index. This is what :mod:`sdhelpers.train` does to train TinySD (its ``LatentCache``).
    """

    def __init__(self, vae: nn.Module, text_encoder: nn.Module, tokenizer, dataset: Any, batch_size: int = 64) -> None:
        from sdhelpers.train import encode_captions, encode_dataset

        cache = encode_dataset(vae, dataset, batch_size=_check_positive_int(batch_size, "batch_size"))
        self.mean, self.std, self.captions = cache.mean, cache.std, cache.captions
        unique = list(dict.fromkeys(self.captions))
        self.embeddings = encode_captions(text_encoder, tokenizer, unique + [""])
        lookup = {text: i for i, text in enumerate(unique)}
        self.caption_ids = torch.tensor([lookup[text] for text in self.captions], dtype=torch.long)
        self.empty_id = len(unique)
        self.scaling_factor = float(vae.config.scaling_factor)

    def __len__(self) -> int:
        return len(self.captions)

    def sample(
        self, batch_size: int, generator: torch.Generator, caption_dropout: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latents, text_embeddings)`` of ``batch_size`` random items (with replacement), on the CPU."""
        batch_size = _check_positive_int(batch_size, "batch_size")
        caption_dropout = _check_probability(caption_dropout, "caption_dropout")
        generator = _check_generator(generator)
        index = torch.randint(0, len(self), (batch_size,), generator=generator)
        eps = torch.randn((batch_size, *self.mean.shape[1:]), generator=generator)
        latents = (self.mean[index] + self.std[index] * eps) * self.scaling_factor
        dropped = torch.rand(batch_size, generator=generator) < caption_dropout
        ids = torch.where(dropped, torch.full_like(index, self.empty_id), self.caption_ids[index])
        return latents, self.embeddings[ids]


# --------------------------------------------------------------------------- optimisation


def make_optimizer(
    unet: nn.Module,
    learning_rate: float = 1e-3,
    steps: int = 1000,
    warmup_steps: int = 0,
    weight_decay: float = 0.01,
):
    """AdamW (the source's optimizer) and a linear warm-up + cosine decay over ``steps`` steps."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not learning_rate > 0:
        raise ValueError(f"learning_rate: {learning_rate!r} is not allowed; use a positive number")
    steps = _check_positive_int(steps, "steps")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps < steps:
        raise ValueError(f"warmup_steps: {warmup_steps!r} is not allowed; use an integer in [0, steps)")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate, weight_decay=weight_decay)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup_steps, steps)


def train_steps(
    unet: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    loss_fn: Callable[[], torch.Tensor],
    steps: int,
    max_grad_norm: float | None = 1.0,
) -> list[float]:
    """Run ``steps`` optimisation steps of ``loss_fn()`` (the source's inner loop); return the losses.

    Each step: loss, ``zero_grad``, ``backward``, clip the gradient norm to ``max_grad_norm``
    (``None``: no clipping), ``optimizer.step()``, ``lr_scheduler.step()``.
    """
    from sdhelpers.train import flush_denormals

    steps = _check_positive_int(steps, "steps")
    losses: list[float] = []
    unet.train()
    with flush_denormals():
        for _ in range(steps):
            loss = loss_fn()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(unet.parameters(), max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"loss: became {value} at step {len(losses)}; lower the learning rate")
            losses.append(value)
    unet.eval()
    return losses


# --------------------------------------------------------------------------- save, load, resume


def save_training_state(
    path: str | os.PathLike,
    unet: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    generator: torch.Generator,
    step: int,
    losses: Sequence[float] = (),
) -> Path:
    """The source's two ``torch.save`` calls as one safetensors file, plus what an exact resume needs.

    Holds the UNet's weights, AdamW's state (its two moment tensors per parameter and its step
    count), the learning-rate schedule's position, the data/noise generator's state and the
    global RNGs, the step and the loss curve. Written atomically (:func:`sdhelpers.checkpoint.save_state`):
    a crash mid-save leaves the previous file intact. No pickle is written.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: {step!r} is not allowed; use a non-negative integer")
    state = {
        "kind": STATE_KIND,
        "step": step,
        "model": unet.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "generator": _check_generator(generator).get_state(),
        "rng": rng_state(),
        "losses": [float(v) for v in losses],
    }
    return save_state(path, state)


def load_training_state(
    path: str | os.PathLike,
    unet: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    generator: torch.Generator,
) -> tuple[int, list[float]]:
    """Restore what :func:`save_training_state` wrote into these objects; return ``(step, losses)``.

    A file of another kind, or one that does not fit ``unet`` or ``optimizer``, raises
    :class:`sdhelpers.checkpoint.CheckpointError` naming the file.
    """
    generator = _check_generator(generator)
    state = load_state(path)
    name = str(path)
    if state.get("kind") != STATE_KIND:
        raise CheckpointError(f"checkpoint: {name} was not written by save_training_state (kind {state.get('kind')!r})")
    guarded(lambda: unet.load_state_dict(state["model"]), name)
    guarded(lambda: optimizer.load_state_dict(state["optimizer"]), name)
    guarded(lambda: lr_scheduler.load_state_dict(state["lr_scheduler"]), name)
    generator.set_state(state["generator"])
    set_rng_state(state["rng"])
    return int(state["step"]), [float(v) for v in state["losses"]]

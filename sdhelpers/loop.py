"""The source text's UNet training loop, as small readable functions.

The source trains Stable Diffusion's UNet with one loop: a ``CustomImageTextDataset`` of image
paths and captions, torchvision transforms, a ``DataLoader``; the frozen VAE turns each batch into
latents (times ``scaling_factor``), the frozen CLIP text encoder turns its captions into
embeddings; random noise and timesteps go through ``noise_scheduler.add_noise``; the UNet predicts
the noise and an MSE loss trains it with AdamW; ``torch.save`` keeps the weights. This module is
the data side and the body of that loop, split so that a chapter can run each part:

- :class:`ImageTextDataset` and :class:`ImageTextTransform`: the dataset class and the transform,
  without torchvision (which does not install beside a CPU-only torch), giving images in [-1, 1];
- :func:`drop_captions`: classifier-free guidance's caption dropout;
- :func:`encode_text`: the source's text step;
- :func:`training_step`: one step of the source's loop body, from a DataLoader batch to the loss.

The rest of the loop is shared with the trainer that built the shipped TinySD, so the chapter
teaches the code that really ran: the loss (:func:`sdhelpers.objectives.diffusion_loss`), the
latent cache (:class:`sdhelpers.latents.LatentCache`), the optimiser, the steps and the checkpoint
(:mod:`sdhelpers.fit`). Every random draw comes from a ``torch.Generator`` passed in, so a run is
reproducible and a checkpoint can carry the generator's state.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from sdhelpers import checks
from sdhelpers.images import load_image, pil_to_tensor
from sdhelpers.models import tokenize
from sdhelpers.objectives import diffusion_loss


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
        self.size = checks.positive_int(size, "size")

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
    probability = checks.probability(probability, "probability")
    draws = torch.rand(len(texts), generator=checks.generator(generator))
    return ["" if float(u) < probability else text for text, u in zip(texts, draws)]


@torch.no_grad()
def encode_text(text_encoder: nn.Module, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """The source's text step: pad/truncate to 77 tokens, take the encoder's last hidden state (B, 77, d)."""
    ids = tokenize(tokenizer, texts)
    return text_encoder(ids.to(next(text_encoder.parameters()).device))[0]


# --------------------------------------------------------------------------- the loop body


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
    generator = checks.generator(generator)
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

"""The training set as the UNet sees it: latents of the frozen VAE and embeddings of the frozen text encoder.

Why a cache: during UNet training the VAE and the text encoder never change, so their outputs can
be computed once: the posterior's mean and std for every image, and the embedding of every
distinct caption and of the empty prompt. :meth:`LatentCache.sample` then draws a batch exactly as
the source's loop would see it (a fresh ``latent_dist.sample()`` × scaling factor, captions dropped
for classifier-free guidance) for the cost of an index. Storing the posterior's mean *and* std,
rather than one sample, keeps SD's ``latent_dist.sample()``: each draw is a fresh
``mean + std * eps``.

Chapter 4's loop and the TinySD trainer both train on this one cache.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdhelpers import checks
from sdhelpers.device import flush_denormals
from sdhelpers.models import TokenCache


def compute_scaling_factor(latents: torch.Tensor) -> float:
    """``1 / std`` of VAE latents: the factor that gives the UNet unit-variance inputs.

    SD's 0.18215 is exactly this, measured on its VAE's latents of real images. The diffusion
    noise schedule assumes data of variance about 1; unscaled latents would make every timestep's
    signal-to-noise ratio wrong.
    """
    if not isinstance(latents, torch.Tensor) or latents.numel() < 2:
        raise ValueError("latents: expected a tensor with at least two values to measure a spread")
    std = float(latents.float().std())
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"latents: their standard deviation is {std}; can't scale them to unit variance")
    return 1.0 / std


def batch_of(dataset: Any, indices: Sequence[int]) -> tuple[torch.Tensor, list[str]]:
    """The images (stacked) and captions of ``dataset[i]`` for each index."""
    items = [dataset[int(i)] for i in indices]
    return torch.stack([item["image"] for item in items]), [item.get("text", "") for item in items]


@torch.no_grad()
def encode_images(vae: nn.Module, dataset: Any, batch_size: int = 64, progress: bool = False):
    """The frozen VAE's posterior ``(mean, std)`` of every image of ``dataset``, and the captions."""
    from tqdm.auto import tqdm

    device = next(vae.parameters()).device
    means, stds, captions = [], [], []
    with flush_denormals():
        for start in tqdm(range(0, len(dataset), batch_size), desc="latents", disable=not progress,
                          dynamic_ncols=True):
            images, texts = batch_of(dataset, range(start, min(len(dataset), start + batch_size)))
            posterior = vae.encode(images.to(device, vae.dtype)).latent_dist
            means.append(posterior.mean.float().cpu())
            stds.append(posterior.std.float().cpu())
            captions += texts
    return torch.cat(means), torch.cat(stds), captions


@torch.no_grad()
def encode_captions(text_encoder: nn.Module, tokenizer, captions: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """``last_hidden_state`` of every caption (77 tokens each): what the UNet's cross-attention reads."""
    device = next(text_encoder.parameters()).device
    tokens = TokenCache(tokenizer)
    states = []
    for start in range(0, len(captions), batch_size):
        ids = tokens(captions[start : start + batch_size]).to(device)
        states.append(text_encoder(input_ids=ids).last_hidden_state.float().cpu())
    return torch.cat(states)


@dataclass
class LatentCache:
    """Posteriors of every training image, embeddings of every distinct caption, and how to sample them.

    ``embeddings[caption_ids[i]]`` is item ``i``'s caption embedding; ``embeddings[empty_id]`` is
    the empty prompt's, which replaces a dropped caption.
    """

    mean: torch.Tensor
    std: torch.Tensor
    captions: list[str]
    embeddings: torch.Tensor
    caption_ids: torch.Tensor
    empty_id: int
    scaling_factor: float

    @classmethod
    def from_posteriors(cls, mean, std, captions, text_encoder, tokenizer, scaling_factor: float) -> "LatentCache":
        unique = list(dict.fromkeys(captions))
        lookup = {text: i for i, text in enumerate(unique)}
        return cls(
            mean=mean, std=std, captions=list(captions),
            embeddings=encode_captions(text_encoder, tokenizer, unique + [""]),
            caption_ids=torch.tensor([lookup[text] for text in captions], dtype=torch.long),
            empty_id=len(unique), scaling_factor=float(scaling_factor),
        )

    @classmethod
    def encode(cls, vae: nn.Module, text_encoder: nn.Module, tokenizer, dataset: Any,
               batch_size: int = 64) -> "LatentCache":
        """Encode ``dataset`` once with the frozen VAE and text encoder (scaled by the VAE's factor)."""
        checks.dataset(dataset)
        mean, std, captions = encode_images(vae, dataset, checks.positive_int(batch_size, "batch_size"))
        return cls.from_posteriors(mean, std, captions, text_encoder, tokenizer, vae.config.scaling_factor)

    def __len__(self) -> int:
        return len(self.captions)

    def sample(self, batch_size: int, generator: torch.Generator, caption_dropout: float = 0.0,
               with_captions: bool = False):
        """``(latents, text_embeddings)`` of ``batch_size`` random items (with replacement), on the CPU.

        The draws, in order: the items, their posterior noise, then which captions are dropped.
        ``with_captions=True`` also returns each item's own caption embedding and the dropped mask
        (the same draws), for a loss that compares the two branches.
        """
        batch_size = checks.positive_int(batch_size, "batch_size")
        caption_dropout = checks.probability(caption_dropout, "caption_dropout")
        checks.generator(generator)
        index = torch.randint(0, len(self), (batch_size,), generator=generator)
        eps = torch.randn((batch_size, *self.mean.shape[1:]), generator=generator)
        latents = (self.mean[index] + self.std[index] * eps) * self.scaling_factor
        dropped = torch.rand(batch_size, generator=generator) < caption_dropout
        ids = torch.where(dropped, torch.full_like(index, self.empty_id), self.caption_ids[index])
        if with_captions:
            return latents, self.embeddings[ids], self.embeddings[self.caption_ids[index]], dropped
        return latents, self.embeddings[ids]


# --------------------------------------------------------------------------- kept on disk


def fingerprint(module: nn.Module) -> str:
    """A short hash of a module's weights: a cache made by other weights is never reused."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def cached_posteriors(vae: nn.Module, dataset: Any, path: Path, batch_size: int = 128, progress: bool = False):
    """:func:`encode_images`, stored in ``path`` (safetensors) so that a resumed run skips it.

    The file is keyed by the VAE's weights and the dataset; another key, or a damaged file, is
    simply encoded again and replaced (atomically).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    from sdhelpers.checkpoint import atomic_write_bytes

    key = f"{fingerprint(vae)}|{dataset!r}|{len(dataset)}"
    if path.is_file():
        try:
            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata() or {}
            if metadata.get("key") == key:
                tensors = load_file(str(path))
                return tensors["mean"], tensors["std"], json.loads(metadata["captions"])
        except Exception:  # a damaged cache is simply rebuilt
            pass
    mean, std, captions = encode_images(vae, dataset, batch_size, progress)
    atomic_write_bytes(path, save({"mean": mean.contiguous(), "std": std.contiguous()},
                                  metadata={"key": key, "captions": json.dumps(captions)}))
    return mean, std, captions

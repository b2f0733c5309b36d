"""Fine-tuning only the VAE's decoder, the trick behind Stability AI's ``sd-vae-ft-mse``.

Stable Diffusion's UNet never sees pixels: it was trained on latents made by the VAE's *encoder*
and its outputs are turned into pixels by the *decoder*. So the decoder can be improved after the
fact without touching anything the UNet depends on, as long as the encoder (and with it the latent
space) stays exactly as it was. Stability AI did this for SD's VAE (``sd-vae-ft-mse``: the decoder
fine-tuned with an MSE loss); Google's Parti did the same with its ViT-VQGAN decoder.

:func:`finetune_decoder` reproduces that recipe on any ``AutoencoderKL``:

* it works on a deep copy, so the caller's VAE is never modified;
* the encoder and ``quant_conv`` (the 1x1 convolution that makes the posterior's mean and
  log-variance) are frozen; only the decoder and ``post_quant_conv`` are trained;
* each step encodes a batch of images with the frozen encoder, draws latents from the posterior
  with ``latent_dist.sample()`` and a seeded generator, decodes them and takes the MSE against the
  input images; AdamW updates the decoder.

Why ``sample()`` and not ``mode()``: at generation time the decoder receives what the UNet makes,
and the UNet was trained on *samples* of the posterior (``mean + std * eps``), as in the training
loop of the source text. Training the decoder on samples teaches it exactly that input
distribution. The generator is seeded from ``seed``, so a run is reproducible bit for bit on the CPU.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sdhelpers.device import make_generator
from sdhelpers.train import flush_denormals

__all__ = [
    "DEFAULT_DATASET_SIZE",
    "DecoderFinetune",
    "finetune_decoder",
    "learning_rate_factor",
    "pipeline_with_vae",
    "trainable_parameters",
]

DEFAULT_DATASET_SIZE = 4096
"""Training images drawn from the shapes world's training split when no ``dataset`` is given."""


@dataclass
class DecoderFinetune:
    """The result of :func:`finetune_decoder`.

    ``vae`` is the fine-tuned copy (in eval mode, no gradients, on the input VAE's device and
    dtype); ``losses`` holds the MSE of every step, in order, measured on [-1, 1] pixels.
    """

    vae: nn.Module
    losses: list[float]
    steps: int
    batch_size: int
    learning_rate: float
    seed: int
    seconds: float = field(default=0.0, compare=False)

    def smoothed_losses(self, window: int = 10) -> list[float]:
        """The loss curve averaged over a sliding ``window`` of steps (shorter at the start)."""
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"window: {window!r} is not allowed; use a positive integer")
        values = np.asarray(self.losses, dtype=np.float64)
        sums = np.cumsum(np.concatenate([[0.0], values]))
        starts = np.maximum(np.arange(1, len(values) + 1) - window, 0)
        ends = np.arange(1, len(values) + 1)
        return ((sums[ends] - sums[starts]) / (ends - starts)).tolist()


def _check_int(value: Any, name: str, minimum: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: {value!r} is not allowed; use an integer >= {minimum}")
    return int(value)


def _check_learning_rate(value: Any) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise ValueError(f"learning_rate: {value!r} is not allowed; use a finite number > 0 (e.g. 1e-4)")
    return float(value)


def _check_vae(vae: Any) -> nn.Module:
    needed = ("encoder", "decoder", "encode", "decode", "quant_conv", "post_quant_conv")
    if not isinstance(vae, nn.Module) or not all(hasattr(vae, name) for name in needed):
        raise TypeError(f"vae: expected a diffusers AutoencoderKL, got {type(vae).__name__}")
    return vae


def _check_dataset(dataset: Any) -> Any:
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TypeError(f"dataset: expected a map-style dataset yielding {{'image': tensor}}, got {type(dataset).__name__}")
    if len(dataset) < 1:
        raise ValueError("dataset: is empty; need at least one image")
    item = dataset[0]
    if not isinstance(item, dict) or not isinstance(item.get("image"), torch.Tensor):
        raise TypeError("dataset: items must be dicts with an 'image' tensor (3, H, W) in [-1, 1], like ShapesDataset's")
    return dataset


def learning_rate_factor(step: int, steps: int) -> float:
    """The multiplier of the learning rate at ``step`` (0-based) of ``steps``: warm-up, then cosine to 0.

    Linear warm-up over the first ``max(1, steps // 10)`` steps, then ``0.5 * (1 + cos(pi * progress))``
    down to nearly 0 at the last step.
    """
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup + 1) / max(1, steps - warmup + 1)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _cast(vae: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``vae.to(dtype)``, skipped when nothing changes and without diffusers' casting notice."""
    if next(vae.parameters()).dtype == dtype:
        return vae
    from sdhelpers.models import quiet_libraries

    with quiet_libraries():
        return vae.to(dtype)


def trainable_parameters(vae: nn.Module) -> list[nn.Parameter]:
    """The parameters :func:`finetune_decoder` trains: the decoder's and ``post_quant_conv``'s.

    Everything before the latent (encoder, ``quant_conv``) stays frozen, so latents are unchanged.
    """
    _check_vae(vae)
    params = list(vae.decoder.parameters())
    if vae.post_quant_conv is not None:  # None when the config says use_post_quant_conv=False
        params += list(vae.post_quant_conv.parameters())
    return params


def finetune_decoder(
    vae: nn.Module,
    *,
    steps: int,
    batch_size: int = 16,
    learning_rate: float = 1e-4,
    seed: int = 0,
    dataset: Any = None,
    progress: bool = False,
) -> DecoderFinetune:
    """Fine-tune a copy of ``vae``'s decoder with an MSE loss for ``steps`` steps; return it and its loss curve.

    - ``dataset``: a map-style dataset of ``{"image": tensor (3, H, W) in [-1, 1]}`` items;
      by default :data:`DEFAULT_DATASET_SIZE` images of the shapes world's *training* split.
    - Each step takes ``batch_size`` random items (indices drawn from ``seed``), encodes them with the
      frozen encoder, draws ``latent_dist.sample()`` with a generator seeded from ``seed`` and trains
      the decoder (and ``post_quant_conv``) with AdamW (``learning_rate``, no weight decay, so weights
      are only moved by the data) on ``mse(decode(latents), images)``. The learning rate warms up
      linearly over the first tenth of the steps (Adam's first updates are as large as the learning
      rate whatever the gradient, which would first knock a trained decoder off its optimum), then
      decays to zero along a cosine, so the run ends on a quiet average instead of a noisy last step.
    - Training runs in float32 on the VAE's device, with denormals flushed on the CPU
      (:class:`sdhelpers.train.flush_denormals`); the result is cast back to the VAE's dtype.

    The caller's ``vae`` is never modified. Same arguments, same result, bit for bit on the CPU.
    """
    _check_vae(vae)
    steps = _check_int(steps, "steps", 1)
    batch_size = _check_int(batch_size, "batch_size", 1)
    learning_rate = _check_learning_rate(learning_rate)
    seed = _check_int(seed, "seed", 0)
    if dataset is None:
        from sdhelpers.data import ShapesDataset

        dataset = ShapesDataset(DEFAULT_DATASET_SIZE, seed=seed, split="train")
    dataset = _check_dataset(dataset)

    first = next(vae.parameters())
    device, dtype = first.device, first.dtype
    tuned = _cast(copy.deepcopy(vae), torch.float32)
    tuned.requires_grad_(False)
    params = trainable_parameters(tuned)
    for param in params:
        param.requires_grad_(True)
    tuned.eval()  # the frozen encoder stays in eval mode
    tuned.decoder.train()
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, steps))

    rng = np.random.default_rng([seed, 1])  # which images
    generator = make_generator(seed, device)  # which posterior samples
    losses: list[float] = []
    start = time.perf_counter()
    from tqdm.auto import tqdm

    with flush_denormals():
        for _ in tqdm(range(steps), desc="decoder", disable=not progress, dynamic_ncols=True):
            indices = rng.integers(0, len(dataset), batch_size)
            images = torch.stack([dataset[int(i)]["image"] for i in indices]).to(device, torch.float32)
            with torch.no_grad():
                latents = tuned.encode(images).latent_dist.sample(generator=generator)
            reconstruction = tuned.decode(latents).sample
            loss = F.mse_loss(reconstruction, images)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"learning_rate: the loss became {value}; lower learning_rate (got {learning_rate})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(value)
    seconds = time.perf_counter() - start

    tuned.requires_grad_(False)
    tuned.eval()
    return DecoderFinetune(vae=_cast(tuned, dtype), losses=losses, steps=steps, batch_size=batch_size,
                           learning_rate=learning_rate, seed=seed, seconds=seconds)


def pipeline_with_vae(pipe, vae):
    """A new pipeline of ``pipe``'s class that uses ``vae`` and *shares* every other component.

    The in-memory form of ``StableDiffusionPipeline.from_pretrained(..., vae=vae)``: the UNet, text
    encoder, tokenizer and scheduler are the very same objects (no copy, no extra memory), only the
    autoencoder differs. ``pipe`` itself is not changed. Progress bars stay off, as in
    :func:`sdhelpers.models.load_pipeline`.
    """
    _check_vae(vae)
    if not hasattr(pipe, "components") or "vae" not in pipe.components:
        raise TypeError(f"pipe: expected a diffusers pipeline with a 'vae' component, got {type(pipe).__name__}")
    from sdhelpers.models import quiet_libraries

    with quiet_libraries():
        new = type(pipe).from_pipe(pipe, vae=vae)
    new.set_progress_bar_config(disable=True)
    return new

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
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sdhelpers import checks
from sdhelpers.device import make_generator
from sdhelpers.fit import make_optimizer, train_steps

__all__ = [
    "DEFAULT_DATASET_SIZE",
    "DecoderFinetune",
    "finetune_decoder",
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


def _check_vae(vae: Any) -> nn.Module:
    needed = ("encoder", "decoder", "encode", "decode", "quant_conv", "post_quant_conv")
    if not isinstance(vae, nn.Module) or not all(hasattr(vae, name) for name in needed):
        raise TypeError(f"vae: expected a diffusers AutoencoderKL, got {type(vae).__name__}")
    return vae


def _cast(vae: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``vae.to(dtype)``, skipped when nothing changes and without diffusers' casting notice."""
    if next(vae.parameters()).dtype == dtype:
        return vae
    from sdhelpers.libraries import quiet_libraries

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
      (:class:`sdhelpers.device.flush_denormals`), in :func:`sdhelpers.fit.train_steps`; the result is cast back to the VAE's dtype.

    The caller's ``vae`` is never modified. Same arguments, same result, bit for bit on the CPU.
    """
    _check_vae(vae)
    steps = checks.positive_int(steps, "steps")
    batch_size = checks.positive_int(batch_size, "batch_size")
    learning_rate = checks.positive_number(learning_rate, "learning_rate")
    seed = checks.seed(seed)
    if dataset is None:
        from sdhelpers.data import ShapesDataset

        dataset = ShapesDataset(DEFAULT_DATASET_SIZE, seed=seed, split="train")
    dataset = checks.dataset(dataset)

    first = next(vae.parameters())
    device, dtype = first.device, first.dtype
    tuned = _cast(copy.deepcopy(vae), torch.float32)
    tuned.requires_grad_(False)
    params = trainable_parameters(tuned)
    for param in params:
        param.requires_grad_(True)
    tuned.eval()  # the frozen encoder stays in eval mode; train_steps puts the decoder in training mode
    optimizer, schedule = make_optimizer(params, learning_rate, steps, warmup_steps=steps // 10,
                                         weight_decay=0.0)
    # One process: Accelerate changes nothing. Under `accelerate launch` each process draws its own
    # images and samples and the decoder's gradients are averaged (DDP skips the frozen encoder).
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=device.type == "cpu")
    objective, optimizer = accelerator.prepare(DecoderObjective(tuned), optimizer)
    if batch_size % accelerator.num_processes:
        raise ValueError(f"batch_size: {batch_size} can't be split over {accelerator.num_processes} processes; "
                         "use a multiple of it")
    rank = accelerator.process_index
    rng = np.random.default_rng([seed, 1] + ([rank] if rank else []))  # which images
    generator = make_generator(seed + 1_000_003 * rank, device)  # which posterior samples

    def batch_loss(step: int) -> torch.Tensor:
        indices = rng.integers(0, len(dataset), batch_size // accelerator.num_processes)
        images = torch.stack([dataset[int(i)]["image"] for i in indices]).to(device, torch.float32)
        return objective(images, generator)

    from tqdm.auto import tqdm

    start = time.perf_counter()
    with tqdm(total=steps, desc="decoder", disable=not progress, dynamic_ncols=True) as bar:
        losses = train_steps(tuned.decoder, optimizer, schedule, batch_loss, steps, max_grad_norm=None,
                             accelerator=accelerator, after_step=lambda step, value: bar.update(1))
    seconds = time.perf_counter() - start

    tuned.requires_grad_(False)
    tuned.eval()
    return DecoderFinetune(vae=_cast(tuned, dtype), losses=losses, steps=steps, batch_size=batch_size,
                           learning_rate=learning_rate, seed=seed, seconds=seconds)


class DecoderObjective(nn.Module):
    """The fine-tune's loss as a module (what Accelerate can wrap): MSE of decoding a posterior sample.

    The encoder runs without gradients, so the latents, and with them everything the UNet learnt,
    stay exactly as they were.
    """

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            latents = self.vae.encode(images).latent_dist.sample(generator=generator)
        return F.mse_loss(self.vae.decode(latents).sample, images)


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
    from sdhelpers.libraries import quiet_libraries

    with quiet_libraries():
        new = type(pipe).from_pipe(pipe, vae=vae)
    new.set_progress_bar_config(disable=True)
    return new

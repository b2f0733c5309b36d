"""Training TinySD the way Stable Diffusion was trained: VAE, then CLIP, then the UNet.

The book's small model is rebuilt from nothing by one command::

    python -m sdhelpers.train all --out sdhelpers/tinysd

which runs the three stages of SD's recipe on the shapes world (:mod:`sdhelpers.data`):

1. **VAE** (``AutoencoderKL``, 64×64×3 → 8×8×4, SD's 8× downsampling): a reconstruction loss
   (L1 + MSE + an edge term that keeps shape outlines sharp) plus a tiny KL penalty, weighted like
   SD's ``kl_weight = 1e-6``.
2. **Mini CLIP**: a ``CLIPTextModel`` on the real 49,408-token tokenizer, trained contrastively
   (InfoNCE) against a small CNN image tower. Only the text tower ships, as SD ships only CLIP's.
3. **UNet** (``UNet2DConditionModel`` with cross-attention) on *cached* latents of the frozen VAE,
   scaled by the VAE's own ``scaling_factor`` (1/std of the latents, SD's 0.18215 for its VAE),
   conditioned on the frozen text encoder, with 10% of captions dropped for classifier-free
   guidance, an MSE loss on the noise, AdamW, warm-up + cosine learning rate and EMA weights.

Everything runs through Hugging Face Accelerate, so the same code trains on a CPU, one GPU, or
several with ``accelerate launch -m sdhelpers.train ...``. Every random draw of a step (which
images, which timesteps, which noise, which captions are dropped) comes from a generator seeded
by ``(seed, stage, step)``, never from an iterator's position: a run stopped, checkpointed and
resumed in a fresh process continues bit for bit as if it had never stopped (on the CPU).
Checkpoints are safetensors files written atomically (:mod:`sdhelpers.checkpoint`).

The stage subcommands ``vae``, ``clip`` and ``unet`` run one stage each; their checkpoints, loss
curves and finished models live in a work folder (``--work``, by default ``<out>.work``), and
``unet`` ends by writing the pipeline like ``all`` does.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sdhelpers.checkpoint import (
    CheckpointError,
    atomic_write_json,
    compare_info,
    guarded,
    load_state,
    rng_state,
    save_state,
    set_rng_state,
)
from sdhelpers.models import assemble_pipeline, load_tokenizer, quiet_libraries

STAGES = ("vae", "clip", "unet")
COMMANDS = (*STAGES, "all")
CHECKPOINT_NAME = "checkpoint.safetensors"
LOSS_NAME = "loss.json"
REPORT_NAME = "report.json"
FINAL_FOLDER = "final"

# --------------------------------------------------------------------------- the default recipe

TINYSD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (16, 32, 64, 64),
    "layers_per_block": 1,
    "norm_num_groups": 1,
    "act_fn": "silu",
    "sample_size": 64,
    "mid_block_add_attention": True,
    "scaling_factor": 1.0,  # replaced by 1/std of the training latents before the UNet stage
}
"""SD's VAE layout (4 levels, 3 downsamplings: 8×) at 1/8 of its width and one ResNet per level.

``norm_num_groups`` is 1 where SD has 32. GroupNorm removes each group's mean and spread per image;
in a flat-colour image that is most of what there is to say about the colours, and with small
groups the network must smuggle absolute colour through the ratios between a group's few
channels. One group (a LayerNorm over all channels) keeps those ratios across all channels. Same
recipe otherwise (batch 16, 600 of 900 steps): 27.4 dB held-out PSNR with one group, 23.7 with 8.
"""

TINYSD_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 64,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
"""CLIP's text transformer with SD's tokenizer, vocabulary and context, 12× narrower and 4× shallower.

Unlike SD 1.5's exported config (eos id 2, see ``SD15_TEXT_ENCODER_CONFIG``), the token ids here are
the tokenizer's real ones; either way the pooled output is read at the first end-of-text token.
"""

TINYSD_IMAGE_TOWER_CONFIG: dict[str, Any] = {"channels": (32, 64, 128, 128), "embed_dim": 64}
"""The CNN that stands in for CLIP's vision transformer during contrastive training (not shipped)."""

TINYSD_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (64, 128),
    "layers_per_block": 1,
    "cross_attention_dim": 64,
    "attention_head_dim": 4,  # diffusers' historical name: this is the number of heads, like SD's 8
    "norm_num_groups": 32,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
"""SD's UNet (cross-attention down/up blocks around a cross-attention middle) on 8×8 latents.

Two levels (8×8 and 4×4) instead of SD's four: an 8×8 latent has nothing left to halve after that.
Unlike SD, both levels cross-attend to the text (7 attention blocks in all): with so few pixels the
attention is cheap, and the prompt is the whole point. 4.2M parameters; 64 channels at 8×8 rather
than 128 halve the cost of a training step. ``cross_attention_dim`` must equal the text encoder's
``hidden_size``.
"""

TINYSD_NOISE_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
}
"""SD's training noise schedule (``DDPMScheduler``); the shipped sampler is PNDM with SD 1.5's config."""

TINYSD_VAE_LOSS: dict[str, float] = {"l1": 1.0, "mse": 1.0, "edge": 1.0, "kl": 1e-6}
"""VAE loss weights. ``kl`` is relative to per-pixel reconstruction sums, exactly like SD's kl_weight."""


@dataclass(frozen=True)
class StageSettings:
    """How one stage trains: the numbers a reader may want to change.

    ``batch_size`` is the global batch (split across processes by ``accelerate launch``);
    ``dataset_size`` is how many distinct shapes-world items the stage draws from;
    ``ema_decay`` None means no EMA copy of the weights.
    """

    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    ema_decay: float | None = None
    dataset_size: int = 1_000_000
    checkpoint_every: int = 500


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained model, apart from the seed."""

    vae_config: dict[str, Any]
    text_config: dict[str, Any]
    image_tower_config: dict[str, Any]
    unet_config: dict[str, Any]
    vae: StageSettings
    clip: StageSettings
    unet: StageSettings
    vae_loss: dict[str, float] = dataclasses.field(default_factory=lambda: dict(TINYSD_VAE_LOSS))
    vae_initial_logvar: float | None = -6.0
    caption_dropout: float = 0.1
    eval_images: int = 256  # images per split for the end-of-stage VAE PSNR and CLIP accuracy
    noise_scheduler_config: dict[str, Any] = dataclasses.field(
        default_factory=lambda: dict(TINYSD_NOISE_SCHEDULER_CONFIG)
    )

    def stage(self, name: str) -> StageSettings:
        return getattr(self, _check_stage(name))

    def with_stage(self, name: str, **changes: Any) -> "Recipe":
        """A copy with some of one stage's settings changed (``steps``, ``batch_size``...)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        current = self.stage(name)
        steps = changes.get("steps")
        if isinstance(steps, int) and steps > 0 and "warmup_steps" not in changes:
            changes["warmup_steps"] = min(current.warmup_steps, steps // 10)  # a short run keeps a short warm-up
        return dataclasses.replace(self, **{name: dataclasses.replace(current, **changes)})


TINYSD_RECIPE = Recipe(
    vae_config=TINYSD_VAE_CONFIG,
    text_config=TINYSD_TEXT_CONFIG,
    image_tower_config=TINYSD_IMAGE_TOWER_CONFIG,
    unet_config=TINYSD_UNET_CONFIG,
    vae=StageSettings(steps=2000, batch_size=16, learning_rate=1e-3, warmup_steps=50, checkpoint_every=200),
    clip=StageSettings(steps=300, batch_size=128, learning_rate=2e-3, warmup_steps=30, weight_decay=0.01,
                       checkpoint_every=100),
    unet=StageSettings(steps=4000, batch_size=64, learning_rate=1e-3, warmup_steps=200, weight_decay=0.01,
                       ema_decay=0.999, dataset_size=20_000, checkpoint_every=250),
)
"""The recipe of the shipped TinySD: about an hour on two CPU cores.

Measured per step on two cores: VAE 0.47-0.63 s (batch 16), CLIP 0.63-0.85 s (batch 128),
UNet 0.55 s (batch 64) when the cores are free, plus about 2 minutes to encode the 20,000 cached
latents. The shipped run recorded 80 minutes on a machine shared with other work (its model card).
"""

SMOKE_RECIPE = Recipe(
    vae_config={**TINYSD_VAE_CONFIG, "block_out_channels": (8, 8, 16, 16), "norm_num_groups": 4,
                "mid_block_add_attention": False},
    text_config={**TINYSD_TEXT_CONFIG, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                 "num_attention_heads": 2, "projection_dim": 16},
    image_tower_config={"channels": (8, 8, 16, 16), "embed_dim": 16},
    unet_config={**TINYSD_UNET_CONFIG, "block_out_channels": (16, 32), "norm_num_groups": 8,
                 "cross_attention_dim": 16, "attention_head_dim": 2},
    vae=StageSettings(steps=4, batch_size=4, learning_rate=1e-3, checkpoint_every=2),
    clip=StageSettings(steps=4, batch_size=8, learning_rate=1e-3, checkpoint_every=2),
    unet=StageSettings(steps=4, batch_size=8, learning_rate=1e-3, ema_decay=0.9, dataset_size=32,
                       checkpoint_every=2),
    eval_images=8,
)
"""A recipe small enough to run the whole pipeline in seconds: for tests and a first try."""

PRESETS = {"tinysd": TINYSD_RECIPE, "smoke": SMOKE_RECIPE}


# --------------------------------------------------------------------------- argument checks


def _check_stage(stage: Any) -> str:
    if stage not in STAGES:
        raise ValueError(f"stage: {stage!r} is not known; allowed: {', '.join(STAGES)}")
    return stage


def _check_positive_int(value: Any, name: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}: {value!r} is not allowed; use a positive integer")
    return int(value)


def _check_seed(seed: Any) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed: {seed!r} is not allowed; use a non-negative integer")
    return int(seed)


def _check_settings(settings: StageSettings, num_processes: int) -> None:
    _check_positive_int(settings.steps, "steps")
    _check_positive_int(settings.batch_size, "batch_size")
    _check_positive_int(settings.dataset_size, "dataset_size")
    _check_positive_int(settings.checkpoint_every, "checkpoint_every")
    if not settings.learning_rate > 0:
        raise ValueError(f"learning_rate: {settings.learning_rate!r} is not allowed; use a positive number")
    if not 0 <= settings.warmup_steps < settings.steps:
        raise ValueError(f"warmup_steps: {settings.warmup_steps!r} must be at least 0 and below steps ({settings.steps})")
    if settings.ema_decay is not None and not 0 < settings.ema_decay < 1:
        raise ValueError(f"ema_decay: {settings.ema_decay!r} is not allowed; use None or a number in (0, 1)")
    if settings.batch_size % num_processes:
        raise ValueError(
            f"batch_size: {settings.batch_size} can't be split over {num_processes} processes; use a multiple of it"
        )


def _check_dataset(dataset: Any) -> Any:
    try:
        length = len(dataset)
    except TypeError:
        raise TypeError(f"dataset: expected a sized dataset (len() and [i]), got {type(dataset).__name__}") from None
    if length == 0:
        raise ValueError("dataset: is empty (0 items); training needs at least one image-caption pair")
    return dataset


# --------------------------------------------------------------------------- randomness per step

_STAGE_CODES = {"vae": 1, "clip": 2, "unet": 3, "init": 4, "eval": 5}


def step_generators(seed: int, stage: str, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """The NumPy and torch generators of one training step, seeded by ``(seed, stage, step)`` alone.

    This is what makes resuming exact: the batch of step 1000 is the same whether the run got there
    straight or through a checkpoint, because nothing depends on how far an iterator had advanced.
    """
    rng = np.random.default_rng([seed, _STAGE_CODES[stage], step])
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    return rng, generator


def _shard(values: torch.Tensor | np.ndarray, accelerator) -> Any:
    """This process's share of a global batch (all of it with one process)."""
    return values[accelerator.process_index :: accelerator.num_processes]


# --------------------------------------------------------------------------- the three objectives


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

    def __init__(self, text_config: dict[str, Any], image_tower_config: dict[str, Any]) -> None:
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        with quiet_libraries():
            self.text_model = CLIPTextModel(CLIPTextConfig(**text_config))
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
        text = self.embed_text(input_ids)
        image = self.embed_images(pixel_values)
        logits = self.logit_scale.exp().clamp(max=100) * text @ image.T
        same = (caption_ids[:, None] == caption_ids[None, :]).float()
        targets = same / same.sum(dim=1, keepdim=True)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


class DenoiseObjective(nn.Module):
    """Wraps the UNet so ``forward`` returns SD's loss: MSE between predicted and true noise."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.model = unet

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        prediction = self.model(noisy, timesteps, encoder_hidden_states=text).sample
        return F.mse_loss(prediction.float(), noise.float())


# --------------------------------------------------------------------------- the generic loop


@dataclass
class StageResult:
    """What a stage returns: the trained (unwrapped) objective and its history."""

    objective: nn.Module
    ema: Any
    curve: list[list[float]]
    step: int
    seconds: float
    finished: bool

    @property
    def model(self) -> nn.Module:
        """The network the stage trains (with the EMA weights, if the stage keeps an EMA)."""
        model = self.objective.model if hasattr(self.objective, "model") else self.objective
        if self.ema is not None:
            model = copy.deepcopy(model)
            self.ema.copy_to(model.parameters())
        return model


def _make_accelerator():
    from accelerate import Accelerator

    return Accelerator()


def _fit(
    stage: str,
    objective: nn.Module,
    batch_loss: Callable[[nn.Module, int], torch.Tensor],
    settings: StageSettings,
    work: Path,
    info: dict[str, Any],
    accelerator,
    *,
    resume: bool,
    stop_at: int | None,
    progress: bool,
) -> StageResult:
    """Train ``objective`` for ``settings.steps`` steps; checkpoint, resume and log the loss curve.

    ``batch_loss(objective, step)`` computes this process's loss for global step ``step``.
    ``stop_at`` ends the run early after that step (saving a checkpoint there), as an interrupted
    run would; a later call with ``resume=True`` picks it up.
    """
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    folder = work / stage
    checkpoint = folder / CHECKPOINT_NAME
    if stop_at is not None and not (isinstance(stop_at, int) and 0 < stop_at <= settings.steps):
        raise ValueError(f"stop_at: {stop_at!r} is not allowed; use None or a step in 1..{settings.steps}")
    objective.to(accelerator.device)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, settings.warmup_steps, settings.steps)
    ema = EMAModel(objective.parameters(), decay=settings.ema_decay) if settings.ema_decay else None
    start, curve, seconds = 0, [], 0.0
    if resume and checkpoint.is_file():
        state = load_state(checkpoint)
        name = str(checkpoint)
        compare_info(state.get("info", {}), info, name)
        guarded(lambda: objective.load_state_dict(state["model"]), name)
        guarded(lambda: optimizer.load_state_dict(state["optimizer"]), name)
        guarded(lambda: scheduler.load_state_dict(state["lr_scheduler"]), name)
        if ema is not None:
            guarded(lambda: ema.load_state_dict(state["ema"]), name)
            ema.to(accelerator.device)
        set_rng_state(state["rng"])
        start, curve, seconds = int(state["step"]), [list(p) for p in state["curve"]], float(state["seconds"])
    prepared, optimizer = accelerator.prepare(objective, optimizer)
    end = settings.steps if stop_at is None else max(stop_at, start)

    def save(step: int, elapsed: float) -> None:
        if accelerator.is_main_process:
            save_state(checkpoint, {
                "step": step,
                "model": accelerator.unwrap_model(prepared).state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "rng": rng_state(),
                "curve": curve,
                "seconds": elapsed,
                "info": json.loads(json.dumps(info)),
            })
            atomic_write_json(folder / LOSS_NAME, curve)
        accelerator.wait_for_everyone()

    bar = tqdm(total=settings.steps, initial=start, desc=f"{stage:>4}", disable=not (progress and accelerator.is_local_main_process),
               dynamic_ncols=True)
    began = time.perf_counter()
    with flush_denormals():
        _loop(stage, prepared, optimizer, scheduler, ema, batch_loss, settings, accelerator, curve, bar, start, end,
              lambda step: save(step, seconds + time.perf_counter() - began))
    bar.close()
    seconds += time.perf_counter() - began if end > start else 0.0
    done = max(end, start)
    return StageResult(accelerator.unwrap_model(prepared), ema, curve, done, seconds, done == settings.steps)


def _loop(stage, prepared, optimizer, scheduler, ema, batch_loss, settings, accelerator, curve, bar, start, end, save):
    """The optimisation steps ``start`` to ``end`` (exclusive), checkpointing every ``checkpoint_every``."""
    for step in range(start, end):
        prepared.train()
        loss = batch_loss(prepared, step)
        accelerator.backward(loss)
        if settings.max_grad_norm:
            accelerator.clip_grad_norm_(prepared.parameters(), settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(prepared.parameters())
        value = accelerator.reduce(loss.detach().float(), reduction="mean").item()
        if not math.isfinite(value):
            raise FloatingPointError(f"{stage}: the loss became {value} at step {step}; lower learning_rate")
        curve.append([step, value])
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == end:
            save(step + 1)


class flush_denormals:
    """Flush denormal floats to zero inside the block (CPU only; restored to torch's default after).

    Tiny values below 1e-38 appear during training (in Adam's moments, in near-silent activations)
    and x86 CPUs compute with them 10-100x slower: without this a TinySD VAE step took 2 s
    instead of 0.4 s. Flushing them changes results by less than 1e-38.
    """

    def __enter__(self):
        self._set = torch.set_flush_denormal(True)
        return self

    def __exit__(self, *exc):
        if self._set:
            torch.set_flush_denormal(False)


def _stage_info(stage: str, recipe: Recipe, seed: int, config: dict[str, Any], extra: dict[str, Any] | None = None,
                dataset: Any = None) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed: stage, config, settings, seed, data."""
    settings = dataclasses.asdict(recipe.stage(stage))
    settings.pop("checkpoint_every")
    return json.loads(json.dumps({
        "stage": stage, "seed": seed, "config": config, "settings": settings, "extra": extra or {},
        "dataset": repr(dataset) if dataset is not None else "default",
    }))


def _prepare_stage(stage: str, recipe: Recipe, seed: Any, steps: int | None, batch_size: int | None):
    """What every stage starts with: the checked seed, the recipe with this call's overrides, the
    stage's settings and an accelerator they have been checked against."""
    seed = _check_seed(seed)
    recipe = recipe.with_stage(stage, steps=steps, batch_size=batch_size)
    settings = recipe.stage(stage)
    accelerator = _make_accelerator()
    _check_settings(settings, accelerator.num_processes)
    return seed, recipe, settings, accelerator


def _default_dataset(settings: StageSettings, seed: int, dataset: Any) -> Any:
    if dataset is not None:
        return _check_dataset(dataset)
    from sdhelpers.data import ShapesDataset

    return ShapesDataset(settings.dataset_size, seed=seed, split="train")


def _seed_init(seed: int, stage: str) -> None:
    """Seed the weight initialisation of a stage's networks (so a seed decides the whole model)."""
    torch.manual_seed(int(np.random.default_rng([seed, _STAGE_CODES["init"], _STAGE_CODES[stage]]).integers(2**62)))


def _batch(dataset: Any, indices: Sequence[int]) -> tuple[torch.Tensor, list[str]]:
    items = [dataset[int(i)] for i in indices]
    return torch.stack([item["image"] for item in items]), [item["text"] for item in items]


def _write_report(work: Path, stage: str, report: dict[str, Any]) -> None:
    atomic_write_json(work / stage / REPORT_NAME, report)


def _settings_report(result: StageResult, settings: StageSettings) -> dict[str, Any]:
    tail = [v for _, v in result.curve[-50:]]
    return {"steps": result.step, "batch_size": settings.batch_size, "seconds": round(result.seconds, 1),
            "seconds_per_step": round(result.seconds / max(1, len(result.curve)), 4) if result.curve else None,
            "final_loss": round(float(np.mean(tail)), 6) if tail else None,
            "settings": dataclasses.asdict(settings)}


# --------------------------------------------------------------------------- stage 1: the VAE


def build_vae(config: dict[str, Any] | None = None):
    """An untrained ``AutoencoderKL`` with TinySD's (or the given) config."""
    from diffusers import AutoencoderKL

    with quiet_libraries():
        return AutoencoderKL(**(config or TINYSD_VAE_CONFIG))


def train_vae(
    work: str | os.PathLike,
    *,
    recipe: Recipe = TINYSD_RECIPE,
    seed: int = 0,
    steps: int | None = None,
    batch_size: int | None = None,
    dataset: Any = None,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
) -> StageResult:
    """Stage 1: train the VAE on shapes-world images; the finished model goes to ``work/vae/final``."""
    seed, recipe, settings, accelerator = _prepare_stage("vae", recipe, seed, steps, batch_size)
    data = _default_dataset(settings, seed, dataset)
    work = Path(work)
    _seed_init(seed, "vae")
    vae = build_vae(recipe.vae_config)
    if recipe.vae_initial_logvar is not None:
        start_nearly_deterministic(vae, recipe.vae_initial_logvar)
    objective = VAEObjective(vae, recipe.vae_loss)
    latent_shape = _latent_shape(objective.model)

    def batch_loss(model: nn.Module, step: int) -> torch.Tensor:
        rng, generator = step_generators(seed, "vae", step)
        indices = rng.integers(0, len(data), settings.batch_size)
        eps = torch.randn((settings.batch_size, *latent_shape), generator=generator)
        images, _ = _batch(data, _shard(indices, accelerator))
        return model(images.to(accelerator.device), _shard(eps, accelerator).to(accelerator.device))

    info = _stage_info("vae", recipe, seed, recipe.vae_config,
                       {"loss": recipe.vae_loss, "initial_logvar": recipe.vae_initial_logvar}, dataset)
    result = _fit("vae", objective, batch_loss, settings, work, info, accelerator,
                  resume=resume, stop_at=stop_at, progress=progress)
    if result.finished and accelerator.is_main_process:
        vae = result.model.eval()
        _save_component(vae, work / "vae" / FINAL_FOLDER)
        report = _settings_report(result, settings)
        report["psnr"] = {split: round(vae_psnr(vae, count=recipe.eval_images, seed=seed, split=split), 2)
                          for split in ("train", "held_out")}
        _write_report(work, "vae", report)
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


def _latent_shape(vae: nn.Module, image_size: int = 64) -> tuple[int, int, int]:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return (vae.config.latent_channels, image_size // factor, image_size // factor)


@torch.no_grad()
def vae_psnr(vae: nn.Module, count: int = 256, seed: int = 0, split: str = "held_out", batch_size: int = 64) -> float:
    """Mean PSNR (dB) of the VAE's round trip over ``count`` shapes-world images of ``split``.

    Both the original and the reconstruction are compared as 8-bit images, i.e. what a reader sees.
    The latent is the posterior mean, as in ``vae.encode(x).latent_dist.mode()``.
    """
    from sdhelpers.data import ShapesDataset
    from sdhelpers.images import psnr, tensor_to_pil

    count = _check_positive_int(count, "count")
    data = ShapesDataset(count, seed=seed + 1_000_003, split=split)
    device = next(vae.parameters()).device
    values = []
    with flush_denormals():
        for start in range(0, count, batch_size):
            images, _ = _batch(data, range(start, min(count, start + batch_size)))
            latents = vae.encode(images.to(device, vae.dtype)).latent_dist.mode()
            decoded = vae.decode(latents).sample.float().clamp(-1, 1).cpu()
            values += [psnr(a, b) for a, b in zip(tensor_to_pil(images), tensor_to_pil(decoded))]
    return float(np.mean(values))


# --------------------------------------------------------------------------- stage 2: mini CLIP


def build_clip(recipe: Recipe = TINYSD_RECIPE) -> ContrastiveCLIP:
    """An untrained :class:`ContrastiveCLIP` with the recipe's text and image configs."""
    return ContrastiveCLIP(recipe.text_config, recipe.image_tower_config)


class _TokenCache:
    """Token ids per caption, computed once: the slow Python BPE runs only for new strings."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: dict[str, torch.Tensor] = {}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        for text in texts:
            if text not in self.ids:
                self.ids[text] = self.tokenizer(
                    text, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                    return_tensors="pt",
                ).input_ids[0]
        return torch.stack([self.ids[text] for text in texts])


def train_clip(
    work: str | os.PathLike,
    *,
    recipe: Recipe = TINYSD_RECIPE,
    seed: int = 0,
    steps: int | None = None,
    batch_size: int | None = None,
    dataset: Any = None,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
) -> StageResult:
    """Stage 2: contrastive pre-training of the text encoder; it goes to ``work/clip/final``.

    With several processes each computes InfoNCE over its own share of the batch (no all-gather):
    simpler, and the shapes world has few enough captions that a share still holds most of them.
    """
    seed, recipe, settings, accelerator = _prepare_stage("clip", recipe, seed, steps, batch_size)
    data = _default_dataset(settings, seed, dataset)
    work = Path(work)
    tokens = _TokenCache(load_tokenizer())
    _seed_init(seed, "clip")
    objective = build_clip(recipe)

    def batch_loss(model: nn.Module, step: int) -> torch.Tensor:
        rng, _ = step_generators(seed, "clip", step)
        indices = _shard(rng.integers(0, len(data), settings.batch_size), accelerator)
        images, texts = _batch(data, indices)
        ids = {text: i for i, text in enumerate(dict.fromkeys(texts))}
        caption_ids = torch.tensor([ids[text] for text in texts])
        device = accelerator.device
        return model(tokens(texts).to(device), images.to(device), caption_ids.to(device))

    info = _stage_info("clip", recipe, seed, {"text": recipe.text_config, "image": recipe.image_tower_config},
                       dataset=dataset)
    result = _fit("clip", objective, batch_loss, settings, work, info, accelerator,
                  resume=resume, stop_at=stop_at, progress=progress)
    if result.finished and accelerator.is_main_process:
        clip = result.model.eval()
        _save_component(clip.text_model, work / "clip" / FINAL_FOLDER)
        report = _settings_report(result, settings)
        report["caption_accuracy"] = {split: round(clip_accuracy(clip, tokens, count=recipe.eval_images, seed=seed,
                                                                split=split), 3)
                                      for split in ("train", "held_out")}
        _write_report(work, "clip", report)
    return result


@torch.no_grad()
def clip_accuracy(clip: ContrastiveCLIP, tokens: Callable[[Sequence[str]], torch.Tensor] | None = None, count: int = 128,
                  seed: int = 0, split: str = "train") -> float:
    """How often an image's most similar caption, among every caption of the world, is its own."""
    from sdhelpers.data import ShapesDataset, held_out_scenes, training_scenes

    tokens = tokens or _TokenCache(load_tokenizer())
    captions = [scene.caption for scene in training_scenes() + held_out_scenes()]
    device = next(clip.parameters()).device
    text = clip.embed_text(tokens(captions).to(device))
    data = ShapesDataset(count, seed=seed + 2_000_003, split=split)
    images, truth = _batch(data, range(count))
    best = (clip.embed_images(images.to(device)) @ text.T).argmax(dim=1).cpu()
    return float(np.mean([captions[int(b)] == t for b, t in zip(best, truth)]))


# --------------------------------------------------------------------------- stage 3: the UNet


def build_unet(config: dict[str, Any] | None = None):
    """An untrained ``UNet2DConditionModel`` with TinySD's (or the given) config."""
    from diffusers import UNet2DConditionModel

    with quiet_libraries():
        return UNet2DConditionModel(**(config or TINYSD_UNET_CONFIG))


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


@dataclass
class LatentCache:
    """The training set as the UNet sees it: posterior mean and std of every image, and its caption.

    Encoding once saves the VAE encoder's forward pass at every step (most of a step's cost for a
    UNet this small). Storing the posterior's mean *and* std, rather than one sample, keeps SD's
    ``latent_dist.sample()``: each step draws a fresh ``mean + std * eps``.
    """

    mean: torch.Tensor
    std: torch.Tensor
    captions: list[str]


@torch.no_grad()
def encode_dataset(vae: nn.Module, dataset: Any, batch_size: int = 128, progress: bool = False) -> LatentCache:
    """Encode every item of ``dataset`` with the (frozen) VAE: the UNet stage's latent cache."""
    from tqdm.auto import tqdm

    _check_dataset(dataset)
    device = next(vae.parameters()).device
    means, stds, captions = [], [], []
    with flush_denormals():
        for start in tqdm(range(0, len(dataset), batch_size), desc="latents", disable=not progress, dynamic_ncols=True):
            images, texts = _batch(dataset, range(start, min(len(dataset), start + batch_size)))
            posterior = vae.encode(images.to(device, vae.dtype)).latent_dist
            means.append(posterior.mean.float().cpu())
            stds.append(posterior.std.float().cpu())
            captions += texts
    return LatentCache(torch.cat(means), torch.cat(stds), captions)


def _fingerprint(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _cached_latents(vae: nn.Module, dataset: Any, path: Path, progress: bool) -> LatentCache:
    """:func:`encode_dataset`, stored next to the UNet checkpoint so that a resumed run skips it."""
    from safetensors.torch import load_file, save

    key = f"{_fingerprint(vae)}|{dataset!r}|{len(dataset)}"
    if path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata() or {}
            if metadata.get("key") == key:
                tensors = load_file(str(path))
                return LatentCache(tensors["mean"], tensors["std"], json.loads(metadata["captions"]))
        except Exception:  # a damaged cache is simply rebuilt
            pass
    cache = encode_dataset(vae, dataset, progress=progress)
    from sdhelpers.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, save({"mean": cache.mean.contiguous(), "std": cache.std.contiguous()},
                                  metadata={"key": key, "captions": json.dumps(cache.captions)}))
    return cache


@torch.no_grad()
def encode_captions(text_encoder: nn.Module, tokenizer, captions: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """``last_hidden_state`` of every caption (77 tokens each): what the UNet's cross-attention reads."""
    device = next(text_encoder.parameters()).device
    tokens = _TokenCache(tokenizer)
    states = []
    for start in range(0, len(captions), batch_size):
        ids = tokens(captions[start : start + batch_size]).to(device)
        states.append(text_encoder(input_ids=ids).last_hidden_state.float().cpu())
    return torch.cat(states)


def train_unet(
    work: str | os.PathLike,
    vae: nn.Module,
    text_encoder: nn.Module,
    *,
    recipe: Recipe = TINYSD_RECIPE,
    seed: int = 0,
    steps: int | None = None,
    batch_size: int | None = None,
    dataset: Any = None,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
) -> StageResult:
    """Stage 3: the UNet on cached latents, with the VAE and text encoder frozen.

    Sets ``vae.config.scaling_factor`` to 1/std of the cached latents (SD's 0.18215 recipe).
    The dataset is the recipe's ``unet.dataset_size`` shapes-world items unless one is given.
    """
    from diffusers import DDPMScheduler

    seed, recipe, settings, accelerator = _prepare_stage("unet", recipe, seed, steps, batch_size)
    if recipe.unet_config["cross_attention_dim"] != text_encoder.config.hidden_size:
        raise ValueError(
            f"recipe: the UNet's cross_attention_dim ({recipe.unet_config['cross_attention_dim']}) must equal the "
            f"text encoder's hidden_size ({text_encoder.config.hidden_size})"
        )
    data = _default_dataset(settings, seed, dataset)
    work = Path(work)
    device = accelerator.device
    vae = vae.to(device).eval().requires_grad_(False)
    text_encoder = text_encoder.to(device).eval().requires_grad_(False)

    cache = _cached_latents(vae, data, work / "unet" / "latents.safetensors", progress and accelerator.is_main_process)
    sample_rng = torch.Generator().manual_seed(seed)
    sampled = cache.mean + cache.std * torch.randn(cache.mean.shape, generator=sample_rng)
    scaling_factor = compute_scaling_factor(sampled)
    vae.register_to_config(scaling_factor=scaling_factor)
    unique = list(dict.fromkeys(cache.captions))
    embeddings = encode_captions(text_encoder, load_tokenizer(), unique + [""]).to(device)
    lookup = {c: i for i, c in enumerate(unique)}
    caption_index = torch.tensor([lookup[c] for c in cache.captions], dtype=torch.long)
    empty_index = len(unique)
    mean, std = cache.mean.to(device), cache.std.to(device)
    noise_scheduler = DDPMScheduler(**recipe.noise_scheduler_config)
    steps_in_schedule = noise_scheduler.config.num_train_timesteps

    _seed_init(seed, "unet")
    objective = DenoiseObjective(build_unet(recipe.unet_config))

    def batch_loss(model: nn.Module, step: int) -> torch.Tensor:
        rng, generator = step_generators(seed, "unet", step)
        b = settings.batch_size
        indices = torch.from_numpy(rng.integers(0, len(cache.captions), b))
        timesteps = torch.from_numpy(rng.integers(0, steps_in_schedule, b))
        dropped = torch.from_numpy(rng.random(b) < recipe.caption_dropout)
        eps = torch.randn((b, *mean.shape[1:]), generator=generator)
        noise = torch.randn((b, *mean.shape[1:]), generator=generator)
        indices, timesteps, dropped, eps, noise = (_shard(v, accelerator).to(device)
                                                   for v in (indices, timesteps, dropped, eps, noise))
        latents = (mean[indices] + std[indices] * eps) * scaling_factor
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        text = embeddings[torch.where(dropped, empty_index, caption_index.to(device)[indices])]
        return model(noisy, timesteps, text, noise)

    extra = {"caption_dropout": recipe.caption_dropout, "noise_scheduler": recipe.noise_scheduler_config,
             "vae": _fingerprint(vae), "text_encoder": _fingerprint(text_encoder)}
    info = _stage_info("unet", recipe, seed, recipe.unet_config, extra, dataset)
    result = _fit("unet", objective, batch_loss, settings, work, info, accelerator,
                  resume=resume, stop_at=stop_at, progress=progress)
    if result.finished and accelerator.is_main_process:
        _save_component(result.model, work / "unet" / FINAL_FOLDER)
        _save_component(vae, work / "unet" / "vae")  # the VAE with its measured scaling_factor
        report = _settings_report(result, settings)
        report.update(scaling_factor=round(scaling_factor, 6), latent_dataset_size=len(cache.captions),
                      distinct_captions=len(unique))
        _write_report(work, "unet", report)
    return result


# --------------------------------------------------------------------------- saving and exporting


def _save_component(model: nn.Module, folder: Path) -> None:
    """``save_pretrained`` into a fresh folder (safetensors), replacing an older copy."""
    if folder.exists():
        shutil.rmtree(folder)
    with quiet_libraries():
        model.save_pretrained(folder, safe_serialization=True)


def load_component(work: str | os.PathLike, stage: str):
    """The finished model of a stage from the work folder (``vae``: AutoencoderKL, ``clip``: CLIPTextModel)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    classes = {"vae": AutoencoderKL, "clip": CLIPTextModel, "unet": UNet2DConditionModel}
    folder = Path(work) / _check_stage(stage) / FINAL_FOLDER
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"work: {folder} holds no finished {stage} model; "
            f"run `python -m sdhelpers.train {stage} --out OUT --work {work}` first"
        )
    with quiet_libraries():
        return classes[stage].from_pretrained(folder, dtype=torch.float32)


def build_pipeline(vae: nn.Module, text_encoder: nn.Module, unet: nn.Module):
    """A standard ``StableDiffusionPipeline``: TinySD's networks, the real tokenizer, SD 1.5's PNDM."""
    return assemble_pipeline(vae, text_encoder, unet)


def _folder_megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def _parameter_megabytes(modules: Sequence[nn.Module], bytes_per_value: int) -> float:
    return sum(t.numel() for m in modules for t in m.state_dict().values()) * bytes_per_value / 1e6


def export_pipeline(
    out: str | os.PathLike,
    vae: nn.Module,
    text_encoder: nn.Module,
    unet: nn.Module,
    *,
    extra_files: dict[str, Any] | None = None,
    max_megabytes: float = 25.0,
) -> Path:
    """Write a diffusers pipeline folder that plain ``StableDiffusionPipeline.from_pretrained`` loads.

    Weights are stored in fp16 when fp32 would not fit ``max_megabytes`` (TinySD's 49,408-token
    embedding alone is 12.6 MB in fp32). The text encoder's config then still says float32, because
    transformers 5 otherwise loads a checkpoint in the dtype it was saved in; diffusers models
    load in fp32 by default. ``extra_files`` (name → JSON value) are written beside the model.

    The folder is built under a temporary name and swapped in at the end, so a failed export
    leaves the previous model in place. An existing ``out`` must be a pipeline folder or empty.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "model_index.json").is_file():
        raise ValueError(f"out: {out} exists and is not a diffusers pipeline folder; refusing to overwrite it")
    from sdhelpers.models import TOKENIZER_DIR

    modules = [vae, text_encoder, unet]
    overhead = _folder_megabytes(TOKENIZER_DIR) + 1.0  # tokenizer files, configs, curves, training.json
    half = _parameter_megabytes(modules, 4) + overhead > max_megabytes
    dtype = torch.float16 if half else torch.float32
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with quiet_libraries():
            copies = [copy.deepcopy(m).to("cpu", dtype) for m in modules]
            build_pipeline(*copies).save_pretrained(staging, safe_serialization=True)
        _ship_slow_tokenizer_files(staging / "tokenizer")
        config_path = staging / "text_encoder" / "config.json"
        config = json.loads(config_path.read_text())
        config["dtype"] = "float32"
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, value in (extra_files or {}).items():
            atomic_write_json(staging / name, value)
        size = _folder_megabytes(staging)
        if size > max_megabytes:
            raise ValueError(f"max_megabytes: the pipeline takes {size:.1f} MB even in fp16, more than {max_megabytes} MB")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _ship_slow_tokenizer_files(folder: Path) -> None:
    """Replace the saved tokenizer by the package's ``vocab.json`` + ``merges.txt`` (SD 1.5's own layout).

    transformers 5 saves a single ``tokenizer.json`` of 3.6 MB; the two classic files hold the same
    BPE in 1.5 MB, and ``CLIPTokenizer.from_pretrained`` builds the identical tokenizer from them.
    """
    from sdhelpers.models import TOKENIZER_DIR

    shutil.rmtree(folder)
    folder.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "LICENSE"):
        if (TOKENIZER_DIR / name).is_file():
            shutil.copyfile(TOKENIZER_DIR / name, folder / name)


def _versions() -> dict[str, str]:
    import platform

    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy", "Pillow", "sdhelpers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def finish(out: str | os.PathLike, work: str | os.PathLike, *, seed: int, preset: str | None = None) -> Path:
    """Export the pipeline from a work folder whose three stages are done, with curves and ``training.json``."""
    from sdhelpers.device import hardware_summary

    work = Path(work)
    vae_folder = work / "unet" / "vae"
    if not (vae_folder / "config.json").is_file():
        raise FileNotFoundError(f"work: {work} has no finished UNet stage; run the unet stage first")
    from diffusers import AutoencoderKL

    with quiet_libraries():
        vae = AutoencoderKL.from_pretrained(vae_folder, dtype=torch.float32)
    text_encoder = load_component(work, "clip")
    unet = load_component(work, "unet")
    reports = {s: json.loads((work / s / REPORT_NAME).read_text()) for s in STAGES if (work / s / REPORT_NAME).is_file()}
    curves = {f"loss_{s}.json": json.loads((work / s / LOSS_NAME).read_text()) for s in STAGES
              if (work / s / LOSS_NAME).is_file()}
    training = {
        "seed": seed,
        "preset": preset,
        "stages": reports,
        "total_seconds": round(sum(r.get("seconds", 0) for r in reports.values()), 1),
        "scaling_factor": vae.config.scaling_factor,
        "configs": {"vae": dict(vae.config), "unet": dict(unet.config), "text_encoder": text_encoder.config.to_diff_dict()},
        "versions": _versions(),
        "hardware": hardware_summary("cpu") if not torch.cuda.is_available() else hardware_summary(),
        "threads": torch.get_num_threads(),
    }
    training = json.loads(json.dumps(training, default=str))
    return export_pipeline(out, vae, text_encoder, unet, extra_files={"training.json": training, **curves})


def default_work(out: str | os.PathLike) -> Path:
    """Where checkpoints go when ``--work`` isn't given: ``<out>.work`` beside the model folder.

    Not inside it: checkpoints hold optimizer moments (three times the weights) and would be shipped.
    """
    out = Path(out)
    return out.with_name(out.name + ".work")


def train_all(
    out: str | os.PathLike,
    *,
    work: str | os.PathLike | None = None,
    recipe: Recipe = TINYSD_RECIPE,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
    preset: str | None = None,
) -> Path:
    """Run SD's recipe end to end (VAE, CLIP, UNet) and write the pipeline folder ``out``."""
    work = Path(work) if work is not None else default_work(out)
    common = dict(recipe=recipe, seed=seed, resume=resume, progress=progress)
    vae = train_vae(work, **common).model
    text_encoder = train_clip(work, **common).model.text_model
    train_unet(work, vae, text_encoder, **common)
    return finish(out, work, seed=seed, preset=preset)


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sdhelpers.train",
        description="Train TinySD like Stable Diffusion: the VAE, a mini CLIP, then the UNet on cached latents.",
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
                        help="'tinysd' is the shipped model; 'smoke' a seconds-long run of tiny networks")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    """The command-line entry point; returns the folder written (the pipeline, or the work folder)."""
    args = _parser().parse_args(argv)
    if args.command == "all" and (args.steps is not None or args.batch_size is not None):
        raise SystemExit("--steps/--batch-size: set them per stage (vae, clip, unet), not with 'all'")
    if args.threads is not None:
        torch.set_num_threads(_check_positive_int(args.threads, "threads"))
    recipe = PRESETS[args.preset]
    work = args.work if args.work is not None else default_work(args.out)
    common = dict(recipe=recipe, seed=args.seed, resume=args.resume, progress=not args.no_progress)
    if args.command == "all":
        return train_all(args.out, work=work, preset=args.preset, **common)
    overrides = dict(steps=args.steps, batch_size=args.batch_size)
    if args.command == "vae":
        train_vae(work, **common, **overrides)
        return work
    if args.command == "clip":
        train_clip(work, **common, **overrides)
        return work
    vae, text_encoder = load_component(work, "vae"), load_component(work, "clip")
    result = train_unet(work, vae, text_encoder, **common, **overrides)
    if not result.finished:
        return work
    return finish(args.out, work, seed=args.seed, preset=args.preset)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")

"""Training TinySD the way Stable Diffusion was trained: VAE, then CLIP, then the UNet.

The book's small model is rebuilt from nothing by one command::

    python -m sdhelpers.train all --out sdhelpers/tinysd

which runs the three stages of SD's recipe (:mod:`sdhelpers.recipe`) on the shapes world:

1. **VAE** (``AutoencoderKL``, 64×64×3 → 8×8×4, SD's 8× downsampling): reconstruction + a tiny
   KL penalty (:class:`~sdhelpers.objectives.VAEObjective`).
2. **Mini CLIP**: a ``CLIPTextModel`` on the real 49,408-token tokenizer, trained contrastively
   against a small CNN image tower. Only the text tower ships, as SD ships only CLIP's.
3. **UNet** on the cached latents of the frozen VAE (:class:`~sdhelpers.latents.LatentCache`),
   conditioned on the frozen text encoder, with captions dropped for classifier-free guidance and
   SD's noise-prediction loss (:func:`~sdhelpers.objectives.diffusion_loss`): chapter 4's loop.

Every stage runs the one loop of :mod:`sdhelpers.fit` through Hugging Face Accelerate, so the same
code trains on a CPU, one GPU, or several processes with ``accelerate launch -m sdhelpers.train``:
each process draws its share of the batch, gradients are averaged, and only the main process
writes checkpoints, logs and the exported pipeline. Every random draw of a step comes from a
generator seeded by ``(seed, stage, step, rank)``, so a run stopped and resumed in a fresh process
continues bit for bit (on the CPU). Checkpoints are atomic safetensors files.

The stage subcommands ``vae``, ``clip`` and ``unet`` run one stage each; their checkpoints, loss
curves and finished models live in a work folder (``--work``, by default ``<out>.work``), and
``unet`` ends by writing the pipeline like ``all`` does.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sdhelpers import checks
from sdhelpers.architectures import build_unet, build_vae
from sdhelpers.checkpoint import atomic_write_json
from sdhelpers.export import FINAL_FOLDER, LOSS_NAME, REPORT_NAME, default_work, finish, load_component, save_component
from sdhelpers.fit import (
    STAGE_CODES,
    make_optimizer,
    read_training_state,
    restore_training_state,
    save_training_state,
    step_generator,
    train_steps,
)
from sdhelpers.latents import LatentCache, batch_of, cached_posteriors, compute_scaling_factor, fingerprint
from sdhelpers.models import TokenCache, load_tokenizer
from sdhelpers.objectives import ContrastiveCLIP, VAEObjective, consistent_diffusion_loss, diffusion_loss
from sdhelpers.recipe import PRESETS, STAGES, TINYSD_RECIPE, Recipe, StageSettings, check_settings

COMMANDS = (*STAGES, "all")
CHECKPOINT_NAME = "checkpoint.safetensors"


@dataclass
class StageResult:
    """What a stage returns: the trained (unwrapped) objective and its history."""

    objective: nn.Module
    ema: Any
    losses: list[float]
    step: int
    seconds: float
    finished: bool

    @property
    def curve(self) -> list[list[float]]:
        """``[step, loss]`` for every step so far (what ``loss.json`` holds)."""
        return [[step, value] for step, value in enumerate(self.losses)]

    @property
    def model(self) -> nn.Module:
        """The network the stage trains (with the EMA weights, if the stage keeps an EMA)."""
        model = self.objective.model if hasattr(self.objective, "model") else self.objective
        if self.ema is not None:
            model = copy.deepcopy(model)
            self.ema.copy_to(model.parameters())
        return model


@dataclass
class Stage:
    """One stage's run: its checked settings, where it writes, and the processes it runs on."""

    name: str
    recipe: Recipe
    seed: int
    settings: StageSettings
    work: Path
    accelerator: Any

    @property
    def local_batch(self) -> int:
        """This process's share of the global batch."""
        return self.settings.batch_size // self.accelerator.num_processes

    def generator(self, step: int) -> torch.Generator:
        return step_generator(self.seed, self.name, step, self.accelerator.process_index)

    @property
    def folder(self) -> Path:
        return self.work / self.name


def prepare_stage(name: str, work, recipe: Recipe, seed: Any, steps: int | None, batch_size: int | None) -> Stage:
    """Check a stage's arguments once, before anything is built or written."""
    from accelerate import Accelerator

    seed = checks.seed(seed)
    recipe = recipe.with_stage(name, steps=steps, batch_size=batch_size)
    accelerator = Accelerator()
    settings = check_settings(recipe.stage(name), accelerator.num_processes)
    return Stage(name, recipe, seed, settings, Path(work), accelerator)


def _info(stage: Stage, config: dict[str, Any], extra: dict[str, Any] | None, dataset: Any) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed: stage, config, settings, seed, data."""
    settings = dataclasses.asdict(stage.settings)
    settings.pop("checkpoint_every")
    return json.loads(json.dumps({
        "stage": stage.name, "seed": stage.seed, "config": config, "settings": settings, "extra": extra or {},
        "dataset": repr(dataset) if dataset is not None else "default",
    }))


def run_stage(stage: Stage, objective: nn.Module, batch_loss: Callable[[nn.Module, int], torch.Tensor],
              info: dict[str, Any], *, resume: bool, stop_at: int | None, progress: bool) -> StageResult:
    """Train ``objective`` with :func:`sdhelpers.fit.train_steps`; checkpoint, resume and log the loss.

    ``batch_loss(model, step)`` computes this process's loss for global step ``step``. ``stop_at``
    ends the run early after that step (saving a checkpoint there), as an interrupted run would; a
    later call with ``resume=True`` picks it up.
    """
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    settings, accelerator = stage.settings, stage.accelerator
    if stop_at is not None and not (isinstance(stop_at, int) and 0 < stop_at <= settings.steps):
        raise ValueError(f"stop_at: {stop_at!r} is not allowed; use None or a step in 1..{settings.steps}")
    checkpoint = stage.folder / CHECKPOINT_NAME
    objective.to(accelerator.device)
    optimizer, scheduler = make_optimizer(objective, settings.learning_rate, settings.steps,
                                          settings.warmup_steps, settings.weight_decay)
    ema = EMAModel(objective.parameters(), decay=settings.ema_decay) if settings.ema_decay else None
    start, losses, seconds = 0, [], 0.0
    if resume and checkpoint.is_file():
        state = read_training_state(checkpoint)
        start, losses = restore_training_state(state, checkpoint, objective, optimizer, scheduler, ema=ema, info=info)
        seconds = float(state.get("seconds", 0.0))
        if ema is not None:
            ema.to(accelerator.device)
    prepared, optimizer = accelerator.prepare(objective, optimizer)
    end = settings.steps if stop_at is None else max(stop_at, start)
    bar = tqdm(total=settings.steps, initial=start, desc=f"{stage.name:>4}", dynamic_ncols=True,
               disable=not (progress and accelerator.is_local_main_process))
    began = time.perf_counter()

    def after_step(step: int, value: float) -> None:
        losses.append(value)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        if (step + 1) % settings.checkpoint_every and step + 1 != end:
            return
        if accelerator.is_main_process:
            save_training_state(checkpoint, accelerator.unwrap_model(prepared), optimizer, scheduler,
                                step=step + 1, losses=losses, ema=ema, info=info,
                                seconds=seconds + time.perf_counter() - began)
            atomic_write_json(stage.folder / LOSS_NAME, [[i, v] for i, v in enumerate(losses)])
        accelerator.wait_for_everyone()

    train_steps(prepared, optimizer, scheduler, lambda step: batch_loss(prepared, step), end - start, start=start,
                max_grad_norm=settings.max_grad_norm, accelerator=accelerator, ema=ema, after_step=after_step)
    bar.close()
    seconds += time.perf_counter() - began if end > start else 0.0
    done = max(end, start)
    return StageResult(accelerator.unwrap_model(prepared), ema, losses, done, seconds, done == settings.steps)


def _dataset(stage: Stage, dataset: Any) -> Any:
    if dataset is not None:
        return checks.dataset(dataset)
    from sdhelpers.data import ShapesDataset

    open_captions = stage.recipe.open_captions if stage.name == "unet" else 0.0
    return ShapesDataset(stage.settings.dataset_size, seed=stage.seed, split="train", open_captions=open_captions)


def _seed_init(stage: Stage) -> None:
    """Seed the weight initialisation of a stage's networks (so a seed decides the whole model)."""
    codes = [stage.seed, STAGE_CODES["init"], STAGE_CODES[stage.name]]
    torch.manual_seed(int(np.random.default_rng(codes).integers(2**62)))


def _report(stage: Stage, result: StageResult, **extra: Any) -> None:
    tail = result.losses[-50:]
    atomic_write_json(stage.folder / REPORT_NAME, {
        "steps": result.step, "batch_size": stage.settings.batch_size, "seconds": round(result.seconds, 1),
        "seconds_per_step": round(result.seconds / max(1, len(result.losses)), 4) if result.losses else None,
        "final_loss": round(float(np.mean(tail)), 6) if tail else None,
        "settings": dataclasses.asdict(stage.settings), **extra,
    })


# --------------------------------------------------------------------------- the three stages

def train_vae(work, *, recipe: Recipe = TINYSD_RECIPE, seed: int = 0, steps: int | None = None,
              batch_size: int | None = None, dataset: Any = None, resume: bool = False,
              stop_at: int | None = None, progress: bool = True) -> StageResult:
    """Stage 1: train the VAE on shapes-world images; the finished model goes to ``work/vae/final``."""
    from sdhelpers.evaluate import vae_psnr

    stage = prepare_stage("vae", work, recipe, seed, steps, batch_size)
    data, device = _dataset(stage, dataset), stage.accelerator.device
    _seed_init(stage)
    vae = build_vae(recipe.vae_config)
    if recipe.vae_initial_logvar is not None:
        start_nearly_deterministic(vae, recipe.vae_initial_logvar)
    latent_shape = latent_shape_of(vae)

    def batch_loss(model: nn.Module, step: int) -> torch.Tensor:
        generator = stage.generator(step)
        indices = torch.randint(0, len(data), (stage.local_batch,), generator=generator)
        eps = torch.randn((stage.local_batch, *latent_shape), generator=generator)
        images, _ = batch_of(data, indices)
        return model(images.to(device), eps.to(device))

    info = _info(stage, recipe.vae_config, {"loss": recipe.vae_loss, "initial_logvar": recipe.vae_initial_logvar},
                 dataset)
    result = run_stage(stage, VAEObjective(vae, recipe.vae_loss), batch_loss, info,
                       resume=resume, stop_at=stop_at, progress=progress)
    if result.finished and stage.accelerator.is_main_process:
        vae = result.model.eval()
        save_component(vae, stage.folder / FINAL_FOLDER)
        psnr = {split: round(vae_psnr(vae, count=recipe.eval_images, seed=stage.seed, split=split), 2)
                for split in ("train", "held_out")}
        _report(stage, result, psnr=psnr)
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


def latent_shape_of(vae: nn.Module, image_size: int = 64) -> tuple[int, int, int]:
    """The latent's (channels, height, width) for an ``image_size`` square image."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return (vae.config.latent_channels, image_size // factor, image_size // factor)


def build_clip(recipe: Recipe = TINYSD_RECIPE) -> ContrastiveCLIP:
    """An untrained :class:`~sdhelpers.objectives.ContrastiveCLIP` with the recipe's configs."""
    return ContrastiveCLIP(recipe.text_config, recipe.image_tower_config)


def train_clip(work, *, recipe: Recipe = TINYSD_RECIPE, seed: int = 0, steps: int | None = None,
               batch_size: int | None = None, dataset: Any = None, resume: bool = False,
               stop_at: int | None = None, progress: bool = True) -> StageResult:
    """Stage 2: contrastive pre-training of the text encoder; it goes to ``work/clip/final``.

    With several processes each computes InfoNCE over its own share of the batch (no all-gather):
    simpler, and the shapes world has few enough captions that a share still holds most of them.
    """
    from sdhelpers.evaluate import clip_accuracy

    stage = prepare_stage("clip", work, recipe, seed, steps, batch_size)
    data, device = _dataset(stage, dataset), stage.accelerator.device
    tokens = TokenCache(load_tokenizer())
    _seed_init(stage)

    def batch_loss(model: nn.Module, step: int) -> torch.Tensor:
        indices = torch.randint(0, len(data), (stage.local_batch,), generator=stage.generator(step))
        images, texts = batch_of(data, indices)
        ids = {text: i for i, text in enumerate(dict.fromkeys(texts))}
        caption_ids = torch.tensor([ids[text] for text in texts])
        return model(tokens(texts).to(device), images.to(device), caption_ids.to(device))

    info = _info(stage, {"text": recipe.text_config, "image": recipe.image_tower_config}, None, dataset)
    result = run_stage(stage, build_clip(recipe), batch_loss, info, resume=resume, stop_at=stop_at,
                       progress=progress)
    if result.finished and stage.accelerator.is_main_process:
        clip = result.model.eval()
        save_component(clip.text_model, stage.folder / FINAL_FOLDER)
        accuracy = {split: round(clip_accuracy(clip, tokens, count=recipe.eval_images, seed=stage.seed,
                                               split=split), 3) for split in ("train", "held_out")}
        _report(stage, result, caption_accuracy=accuracy)
    return result


def train_unet(work, vae: nn.Module, text_encoder: nn.Module, *, recipe: Recipe = TINYSD_RECIPE, seed: int = 0,
               steps: int | None = None, batch_size: int | None = None, dataset: Any = None,
               resume: bool = False, stop_at: int | None = None, progress: bool = True) -> StageResult:
    """Stage 3: the UNet on cached latents, with the VAE and text encoder frozen: chapter 4's loop.

    Sets ``vae.config.scaling_factor`` to 1/std of the cached latents (SD's 0.18215 recipe).
    The dataset is the recipe's ``unet.dataset_size`` shapes-world items unless one is given.
    """
    from diffusers import DDPMScheduler

    stage = prepare_stage("unet", work, recipe, seed, steps, batch_size)
    if recipe.unet_config["cross_attention_dim"] != text_encoder.config.hidden_size:
        raise ValueError(
            f"recipe: the UNet's cross_attention_dim ({recipe.unet_config['cross_attention_dim']}) must equal the "
            f"text encoder's hidden_size ({text_encoder.config.hidden_size})"
        )
    data, device, main = _dataset(stage, dataset), stage.accelerator.device, stage.accelerator.is_main_process
    vae = vae.to(device).eval().requires_grad_(False)
    text_encoder = text_encoder.to(device).eval().requires_grad_(False)
    mean, std, captions = _posteriors(stage, vae, data, progress)
    sampled = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(stage.seed))
    vae.register_to_config(scaling_factor=compute_scaling_factor(sampled))
    cache = LatentCache.from_posteriors(mean, std, captions, text_encoder, load_tokenizer(),
                                        vae.config.scaling_factor)
    noise_scheduler = DDPMScheduler(**recipe.noise_scheduler_config)
    _seed_init(stage)

    def batch_loss(unet: nn.Module, step: int) -> torch.Tensor:
        generator = stage.generator(step)
        if not recipe.branch_consistency:
            latents, text = cache.sample(stage.local_batch, generator, recipe.caption_dropout)
            return diffusion_loss(unet, noise_scheduler, latents.to(device), text.to(device), generator)
        latents, text, captions, dropped = cache.sample(stage.local_batch, generator, recipe.caption_dropout,
                                                        with_captions=True)
        return consistent_diffusion_loss(unet, noise_scheduler, latents.to(device), text.to(device),
                                         captions.to(device), dropped, generator, recipe.branch_consistency,
                                         recipe.consistency_below_timestep, recipe.consistency_swaps)

    extra = {"caption_dropout": recipe.caption_dropout, "noise_scheduler": recipe.noise_scheduler_config,
             "open_captions": recipe.open_captions, "branch_consistency": recipe.branch_consistency,
             "consistency_below_timestep": recipe.consistency_below_timestep,
             "consistency_swaps": recipe.consistency_swaps,
             "vae": fingerprint(vae), "text_encoder": fingerprint(text_encoder)}
    result = run_stage(stage, build_unet(recipe.unet_config), batch_loss, _info(stage, recipe.unet_config, extra, dataset),
                       resume=resume, stop_at=stop_at, progress=progress)
    if result.finished and main:
        save_component(result.model, stage.folder / FINAL_FOLDER)
        save_component(vae, stage.folder / "vae")  # the VAE with its measured scaling_factor
        _report(stage, result, scaling_factor=round(cache.scaling_factor, 6), latent_dataset_size=len(cache),
                distinct_captions=cache.empty_id, caption_dropout=recipe.caption_dropout,
                open_captions=recipe.open_captions, branch_consistency=recipe.branch_consistency,
                consistency_below_timestep=recipe.consistency_below_timestep,
                consistency_swaps=recipe.consistency_swaps)
    return result


def _posteriors(stage: Stage, vae: nn.Module, data: Any, progress: bool):
    """The cached posteriors: encoded (and written) by the main process, then read by the others."""
    path, accelerator = stage.folder / "latents.safetensors", stage.accelerator
    if accelerator.is_main_process:
        posteriors = cached_posteriors(vae, data, path, progress=progress)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        posteriors = cached_posteriors(vae, data, path)
    return posteriors


def train_all(out, *, work=None, recipe: Recipe = TINYSD_RECIPE, seed: int = 0, resume: bool = False,
              progress: bool = True, preset: str | None = None) -> Path:
    """Run SD's recipe end to end (VAE, CLIP, UNet) and write the pipeline folder ``out``."""
    work = Path(work) if work is not None else default_work(out)
    common = dict(recipe=recipe, seed=seed, resume=resume, progress=progress)
    vae = train_vae(work, **common).model
    text_encoder = train_clip(work, **common).model.text_model
    train_unet(work, vae, text_encoder, **common)
    return finish_on_main_process(out, work, seed=seed, preset=preset)


def finish_on_main_process(out, work, *, seed: int, preset: str | None) -> Path:
    """Export the pipeline once (the main process), while the others wait; every process gets ``out``."""
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        finish(out, work, seed=seed, preset=preset)
    state.wait_for_everyone()
    return Path(out)


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
        torch.set_num_threads(checks.positive_int(args.threads, "threads"))
    work = args.work if args.work is not None else default_work(args.out)
    common = dict(recipe=PRESETS[args.preset], seed=args.seed, resume=args.resume, progress=not args.no_progress)
    if args.command == "all":
        return train_all(args.out, work=work, preset=args.preset, **common)
    overrides = dict(steps=args.steps, batch_size=args.batch_size)
    if args.command in ("vae", "clip"):
        (train_vae if args.command == "vae" else train_clip)(work, **common, **overrides)
        return work
    vae, text_encoder = load_component(work, "vae"), load_component(work, "clip")
    if not train_unet(work, vae, text_encoder, **common, **overrides).finished:
        return work
    return finish_on_main_process(args.out, work, seed=args.seed, preset=args.preset)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")

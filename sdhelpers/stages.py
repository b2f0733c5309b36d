"""One training stage: its settings, its work folder, and the loop that checkpoints and resumes it.

Why a module: every stage of TinySD's recipe (:mod:`sdhelpers.train`, :mod:`sdhelpers.unet_stages`)
runs the same way: arguments checked once, weights seeded from ``(seed, stage)``, the one loop of
:mod:`sdhelpers.fit` through Accelerate, an atomic checkpoint every ``checkpoint_every`` steps and a
``report.json`` at the end. The stages differ only in their networks and their loss.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sdhelpers import checks
from sdhelpers.checkpoint import atomic_write_json
from sdhelpers.export import LOSS_NAME, REPORT_NAME
from sdhelpers.fit import (
    STAGE_CODES,
    make_optimizer,
    read_training_state,
    restore_training_state,
    save_training_state,
    step_generator,
    train_steps,
)
from sdhelpers.recipe import Recipe, StageSettings, check_settings

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


def stage_info(stage: Stage, config: dict[str, Any], extra: dict[str, Any] | None, dataset: Any) -> dict[str, Any]:
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


def stage_dataset(stage: Stage, dataset: Any) -> Any:
    if dataset is not None:
        return checks.dataset(dataset)
    from sdhelpers.data import ShapesDataset

    open_captions = stage.recipe.open_captions if stage.name == stage.recipe.pull_stage else 0.0
    return ShapesDataset(stage.settings.dataset_size, seed=stage.seed, split="train", open_captions=open_captions)


def seed_init(stage: Stage) -> None:
    """Seed the weight initialisation of a stage's networks (so a seed decides the whole model)."""
    codes = [stage.seed, STAGE_CODES["init"], STAGE_CODES[stage.name]]
    torch.manual_seed(int(np.random.default_rng(codes).integers(2**62)))


def write_report(stage: Stage, result: StageResult, **extra: Any) -> None:
    tail = result.losses[-50:]
    atomic_write_json(stage.folder / REPORT_NAME, {
        "steps": result.step, "batch_size": stage.settings.batch_size, "seconds": round(result.seconds, 1),
        "seconds_per_step": round(result.seconds / max(1, len(result.losses)), 4) if result.losses else None,
        "final_loss": round(float(np.mean(tail)), 6) if tail else None,
        "settings": dataclasses.asdict(stage.settings), **extra,
    })

"""The one training loop: every model in the book is trained by :func:`train_steps`.

Why one: the TinySD stages (:mod:`sdhelpers.train`), chapter 4's loop and the decoder fine-tune
(:mod:`sdhelpers.finetune`) all do the same thing at each step: back-propagate a loss, clip the
gradient, step the optimizer and the learning-rate schedule, update the EMA weights, and stop at
once if the loss is no longer a number. Written once, the loop a chapter teaches is the loop that
trained the shipped model.

- :func:`make_optimizer`: AdamW and a linear warm-up + cosine learning-rate schedule;
- :func:`optimisation_step` and :func:`train_steps`: one step, and a run of them;
- :func:`save_training_state` / :func:`load_training_state`: the one checkpoint format, a single
  atomic safetensors file (:mod:`sdhelpers.checkpoint`) holding everything an exact resume needs;
- :func:`step_generator`: the random draws of a step, seeded by ``(seed, stage, step, rank)``
  alone, so a resumed run continues bit for bit and each process of a multi-process run draws
  its own share of the batch.

With an ``accelerator`` (Hugging Face Accelerate) the same loop runs on several processes or GPUs:
``accelerator.backward`` synchronises the gradients and the logged loss is averaged over processes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sdhelpers import checks
from sdhelpers.checkpoint import CheckpointError, compare_info, guarded, load_state, rng_state, save_state, set_rng_state
from sdhelpers.device import flush_denormals

STATE_KIND = "sdhelpers.fit/1"
"""Written into every state saved by :func:`save_training_state`; anything else is refused on load."""

STAGE_CODES = {"vae": 1, "clip": 2, "unet": 3, "init": 4, "eval": 5, "finetune": 6, "refine": 7}


def step_generator(seed: int, stage: str, step: int, rank: int = 0) -> torch.Generator:
    """The generator of one step's draws, seeded by ``(seed, stage, step, rank)`` alone.

    This is what makes resuming exact: the batch of step 1000 is the same whether the run got there
    straight or through a checkpoint, because nothing depends on how far an iterator had advanced.
    Each process (``rank``) draws its own share of the global batch.
    """
    code = np.random.default_rng([seed, STAGE_CODES[stage], step, rank]).integers(2**62)
    return torch.Generator().manual_seed(int(code))


def make_optimizer(
    model: nn.Module | Iterable[nn.Parameter],
    learning_rate: float = 1e-3,
    steps: int = 1000,
    warmup_steps: int = 0,
    weight_decay: float = 0.01,
):
    """AdamW (the source's optimizer) and a linear warm-up + cosine decay over ``steps`` steps."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    learning_rate = checks.positive_number(learning_rate, "learning_rate", example="1e-3")
    steps = checks.positive_int(steps, "steps")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps < steps:
        raise ValueError(f"warmup_steps: {warmup_steps!r} is not allowed; use an integer in [0, steps)")
    parameters = model.parameters() if isinstance(model, nn.Module) else model
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup_steps, steps)


def _parameters(optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def optimisation_step(loss: torch.Tensor, optimizer, lr_scheduler, *, step: int = 0,
                      max_grad_norm: float | None = None, accelerator=None, ema=None) -> float:
    """Back-propagate ``loss`` and take one step; return the loss (averaged over processes).

    In order: backward, clip the gradient norm to ``max_grad_norm`` (``None``: no clipping), step
    the optimizer and the schedule, clear the gradients, update ``ema``. A loss that is not finite
    stops the run with a message naming the knob to turn.
    """
    if accelerator is not None:
        accelerator.backward(loss)
    else:
        loss.backward()
    if max_grad_norm:
        clip = accelerator.clip_grad_norm_ if accelerator is not None else torch.nn.utils.clip_grad_norm_
        clip(_parameters(optimizer), max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.step(_parameters(optimizer))
    value = loss.detach().float()
    value = (accelerator.reduce(value, reduction="mean") if accelerator is not None else value).item()
    if not math.isfinite(value):
        raise FloatingPointError(f"learning_rate: the loss became {value} at step {step}; lower the learning rate")
    return value


def train_steps(
    model: nn.Module,
    optimizer,
    lr_scheduler,
    loss_fn: Callable[[int], torch.Tensor],
    steps: int,
    *,
    start: int = 0,
    max_grad_norm: float | None = 1.0,
    accelerator=None,
    ema=None,
    after_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Run the optimisation steps ``start`` to ``start + steps - 1``; return their losses.

    ``loss_fn(step)`` computes the loss of global step ``step`` (the source's loop body);
    ``after_step(step, loss)`` runs after each one (a progress bar, a checkpoint). ``model`` is put
    in training mode for the run and back in eval mode after it. Denormal floats are flushed on
    the CPU, where they slow training tenfold.
    """
    steps = checks.int_at_least(steps, "steps", 0)
    losses: list[float] = []
    model.train()
    with flush_denormals():
        for step in range(start, start + steps):
            value = optimisation_step(loss_fn(step), optimizer, lr_scheduler, step=step,
                                      max_grad_norm=max_grad_norm, accelerator=accelerator, ema=ema)
            losses.append(value)
            if after_step is not None:
                after_step(step, value)
    model.eval()
    return losses


# --------------------------------------------------------------------------- save, load, resume


def save_training_state(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer,
    lr_scheduler,
    generator: torch.Generator | None = None,
    *,
    step: int,
    losses: Sequence[float] = (),
    ema=None,
    info: dict[str, Any] | None = None,
    seconds: float | None = None,
) -> Path:
    """Everything an exact resume needs, in one safetensors file (no pickle), written atomically.

    Holds the weights, AdamW's state (its two moment tensors per parameter and its step count),
    the learning-rate schedule's position, the global RNGs, the step and the loss curve; and, when
    given, the data generator's state, the EMA weights, the run's description ``info`` (checked
    on resume) and the seconds spent so far. A crash mid-save leaves the previous file intact.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: {step!r} is not allowed; use a non-negative integer")
    state = {
        "kind": STATE_KIND, "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(), "rng": rng_state(), "losses": [float(v) for v in losses],
    }
    optional = {"generator": generator.get_state() if generator is not None else None,
                "ema": ema.state_dict() if ema is not None else None, "info": info, "seconds": seconds}
    state.update({key: value for key, value in optional.items() if value is not None})
    return save_state(path, state)


def read_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """The state :func:`save_training_state` wrote; a file of another kind raises ``CheckpointError``."""
    state = load_state(path)
    if state.get("kind") != STATE_KIND:
        raise CheckpointError(
            f"checkpoint: {path} was not written by save_training_state (kind {state.get('kind')!r})"
        )
    return state


def restore_training_state(state: dict[str, Any], path, model: nn.Module, optimizer, lr_scheduler,
                           generator: torch.Generator | None = None, *, ema=None,
                           info: dict[str, Any] | None = None) -> tuple[int, list[float]]:
    """Put a state read by :func:`read_training_state` into these objects; return ``(step, losses)``.

    A state of another run (its ``info`` differs from ``info``) or one that does not fit ``model``
    or ``optimizer`` raises :class:`sdhelpers.checkpoint.CheckpointError` naming ``path``.
    """
    name = str(path)
    if info is not None:
        compare_info(state.get("info", {}), info, name)
    guarded(lambda: model.load_state_dict(state["model"]), name)
    guarded(lambda: optimizer.load_state_dict(state["optimizer"]), name)
    guarded(lambda: lr_scheduler.load_state_dict(state["lr_scheduler"]), name)
    if ema is not None:
        guarded(lambda: ema.load_state_dict(state["ema"]), name)
    if generator is not None:
        checks.generator(generator).set_state(state["generator"])
    set_rng_state(state["rng"])
    return int(state["step"]), [float(v) for v in state["losses"]]


def load_training_state(path: str | os.PathLike, model: nn.Module, optimizer, lr_scheduler,
                        generator: torch.Generator | None = None) -> tuple[int, list[float]]:
    """Restore what :func:`save_training_state` wrote into these objects; return ``(step, losses)``.

    A file of another kind, or one that does not fit ``model`` or ``optimizer``, raises
    :class:`sdhelpers.checkpoint.CheckpointError` naming the file.
    """
    return restore_training_state(read_training_state(path), path, model, optimizer, lr_scheduler, generator)

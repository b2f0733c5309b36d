"""Freeing GPU memory, and what to try when it runs out under a preset of :mod:`sdhelpers.gpu`."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from sdhelpers.preset_checks import NEXT_PRESET, PRESET_DESCRIPTIONS, PRESETS, PresetError

def free_memory() -> int:
    """Collect garbage and return cached GPU memory to the driver; returns the CUDA bytes freed.

    Deleting a pipeline frees its tensors for PyTorch's caching allocator, not for other programs
    (or ``nvidia-smi``): ``torch.cuda.empty_cache`` hands the unused cached blocks back.
    """
    from diffusers.training_utils import free_memory as free_accelerator_memory

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    before = torch.cuda.memory_reserved() if cuda else 0
    free_accelerator_memory()  # gc.collect(), then empty the cache of whichever accelerator is there
    return max(before - torch.cuda.memory_reserved(), 0) if cuda else 0


def oom_advice(preset_name: str) -> str:
    """What to try after running out of memory under ``preset_name``: the next lighter preset, then smaller work."""
    if preset_name not in PRESETS:
        raise PresetError(f"preset_name: {preset_name!r} is not a preset; allowed: {', '.join(PRESETS)}")
    nxt = NEXT_PRESET[preset_name]
    if nxt is not None:
        return (f"Out of memory under preset {preset_name!r}: try preset {nxt!r} "
                f"({PRESET_DESCRIPTIONS[nxt]}); call sdhelpers.gpu.free_memory() first, "
                "and restart the kernel if another pipeline still holds the GPU.")
    return (f"Out of memory even under preset {preset_name!r}, the lightest one: make the work smaller: "
            "a smaller height/width (activation memory grows with the pixel count), a batch of 1 "
            "(num_images_per_prompt=1), or close the other programs using the GPU.")


@contextmanager
def explain_oom(preset_name: str) -> Iterator[None]:
    """Re-raise ``torch.OutOfMemoryError`` raised inside the block with :func:`oom_advice` appended.

    The exception keeps its type (so ``except torch.OutOfMemoryError`` still works) and chains the
    original as its cause. The preset name is checked on entry, not when memory runs out.
    """
    advice = oom_advice(preset_name)
    try:
        yield
    except torch.OutOfMemoryError as exc:
        raise type(exc)(f"{exc}\n{advice}") from exc

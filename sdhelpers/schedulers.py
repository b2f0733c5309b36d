"""Swapping the sampler: diffusers' schedulers by a short name, built from the pipeline's config.

A sampler (diffusers calls it a scheduler) is only the rule for taking the reverse steps; the
noise schedule it walks is the one the model was trained with, so every sampler here is built
with ``from_config(pipe.scheduler.config)`` and only its own options changed.
"""

from __future__ import annotations

SCHEDULERS = {
    "pndm": ("PNDMScheduler", {}),
    "ddim": ("DDIMScheduler", {"clip_sample": False}),
    "ddim-clipped": ("DDIMScheduler", {"clip_sample": True}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
}


def use_scheduler(pipe, name: str, **overrides):
    """Swap ``pipe.scheduler`` for another sampler built from the same training config, as the source does.

    ``X.from_config(pipe.scheduler.config, ...)`` keeps the training noise schedule (scaled_linear
    0.00085-0.012, 1000 steps) and changes only how the reverse steps are taken. ``"ddim"`` sets
    ``clip_sample=False``: latents are not images in [-1, 1], and clipping them ruins the result
    (``"ddim-clipped"`` shows that).
    """
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"name: {name!r} is not a known scheduler; use one of {', '.join(SCHEDULERS)}")
    class_name, defaults = SCHEDULERS[name]
    scheduler_class = getattr(diffusers, class_name)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **{**defaults, **overrides})
    return pipe.scheduler

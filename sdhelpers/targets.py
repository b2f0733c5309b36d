"""The quality bar TinySD is held to, and how each figure is read from what was measured.

Every target is a figure from ``quality.json`` (written by ``python -m sdhelpers.evaluate``) or
``training.json`` (written by ``python -m sdhelpers.train``), a bound and a direction. The model
card renders them as one table, and the tests of the shipped model check the same table, so the
card, the files and the tests cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

GUIDANCE_RANGE = (2.0, 12.0)
"""The guidance scales over which prompts must hold (SD's 7.5 sits in the middle)."""


@dataclass(frozen=True)
class Target:
    """One figure the model must reach: ``read`` takes (training, quality) and may give None (not measured)."""

    key: str
    label: str
    bound: float
    direction: str  # "≥" or "≤"
    kind: str  # "share" (shown as %), "number" or "count"
    read: Callable[[dict[str, Any], dict[str, Any]], float | None]

    def met(self, value: float | None) -> bool:
        if value is None:
            return False
        return value >= self.bound if self.direction == "≥" else value <= self.bound

    def show(self, value: float | None) -> str:
        if value is None:
            return "not measured"
        if self.kind == "share":
            return f"{100 * value:.1f}%"
        if self.kind == "count":
            return f"{value:.0f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def _get(quality: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(quality, dict) or key not in quality:
            return None
        quality = quality[key]
    return quality


def sweep_floor(quality: dict[str, Any]) -> float | None:
    """The lowest share of images right on colour and shape over the sweep's scales in :data:`GUIDANCE_RANGE`."""
    sweep = quality.get("guidance_sweep")
    if not sweep:
        return None
    low, high = GUIDANCE_RANGE
    return min(score["both"] for scale, score in sweep.items() if low <= float(scale) <= high)


def red_kept(quality: dict[str, Any]) -> float | None:
    """Red images with the negative prompt, as a share of those without it (None when none were red)."""
    negative = quality.get("negative_prompt")
    if not negative or not negative["colours_without"].get("red"):
        return None
    return negative["colours_with"].get("red", 0) / negative["colours_without"]["red"]


def _training_minutes(training: dict[str, Any], quality: dict[str, Any]) -> float | None:
    return training["total_seconds"] / 60 if "total_seconds" in training else None


def _score(*path: str) -> Callable[[dict[str, Any], dict[str, Any]], float | None]:
    return lambda training, quality: _get(quality, *path)


TARGETS: tuple[Target, ...] = (
    Target("train_colour", "colour, training compositions", 0.97, "≥", "share", _score("train", "colour")),
    Target("train_shape", "shape, training compositions", 0.97, "≥", "share", _score("train", "shape")),
    Target("train_background", "background, training compositions", 0.98, "≥", "share",
           _score("train", "background")),
    Target("train_50_colour", "colour, 50 PNDM steps", 0.97, "≥", "share", _score("pndm_50_steps", "colour")),
    Target("train_50_shape", "shape, 50 PNDM steps", 0.97, "≥", "share", _score("pndm_50_steps", "shape")),
    Target("train_50_background", "background, 50 PNDM steps", 0.98, "≥", "share",
           _score("pndm_50_steps", "background")),
    Target("held_out_both", "held-out compositions, colour and shape right", 0.90, "≥", "share",
           _score("held_out", "both")),
    Target("ddim_both", "DDIM, colour and shape right", 0.95, "≥", "share", _score("schedulers", "ddim", "both")),
    Target("dpm_both", "DPM-Solver++, colour and shape right", 0.95, "≥", "share",
           _score("schedulers", "dpm++", "both")),
    Target("sweep_floor", "lowest colour-and-shape share, guidance 2 to 12", 0.95, "≥", "share",
           lambda training, quality: sweep_floor(quality)),
    Target("branch_gap_200", "branch gap at t = 200 (rms)", 0.04, "≤", "number",
           _score("branch_gap", "200", "gap")),
    Target("open_colours", "colours drawn for an open prompt (of 8)", 5, "≥", "count",
           lambda training, quality: (len(quality["negative_prompt"]["colours_without"])
                                      if "negative_prompt" in quality else None)),
    Target("red_kept", "red left by the negative prompt (share of before)", 1 / 3, "≤", "share",
           lambda training, quality: red_kept(quality)),
    Target("negative_stated", "stated shape and background right with the negative", 0.90, "≥", "share",
           _score("negative_prompt", "stated_right_with")),
    Target("vae_psnr", "VAE reconstruction PSNR, held-out images (dB)", 30.0, "≥", "number", _score("vae_psnr")),
    Target("folder_megabytes", "pipeline folder (MB)", 25.0, "≤", "number", _score("folder_megabytes")),
    Target("seconds_per_image", "seconds per image, batch 1 (25 steps, CFG, CPU)", 0.45, "≤", "number",
           _score("seconds_per_image")),
    Target("seconds_per_image_batch8", "seconds per image, batch 8", 0.2, "≤", "number",
           _score("seconds_per_image_batch8")),
    Target("training_minutes", "full training recipe (minutes)", 45.0, "≤", "number", _training_minutes),
)
"""TinySD 2's targets, at SD's own settings: guidance 7.5, 25 PNDM steps unless the row says otherwise."""


def measured_values(training: dict[str, Any], quality: dict[str, Any]) -> dict[str, float | None]:
    """Each target's figure (None where it was not measured)."""
    return {target.key: target.read(training, quality) for target in TARGETS}


def missed(training: dict[str, Any], quality: dict[str, Any]) -> list[str]:
    """The keys of the targets not met (or not measured)."""
    values = measured_values(training, quality)
    return [target.key for target in TARGETS if not target.met(values[target.key])]


def quality_table(training: dict[str, Any], quality: dict[str, Any]) -> str:
    """A Markdown table: each target, the measured value and whether it is met."""
    values = measured_values(training, quality)
    rows = ["| figure | target | measured | met |", "|---|---|---|---|"]
    for target in TARGETS:
        value = values[target.key]
        rows.append(f"| {target.label} | {target.direction} {target.show(target.bound)} | {target.show(value)} | "
                    f"{'yes' if target.met(value) else '**no**'} |")
    return "\n".join(rows)

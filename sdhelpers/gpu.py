"""Speed and memory presets for any Stable Diffusion pipeline, and what to do when memory runs out.

The closing chapter compares four ways of running the same pipeline. Each preset is a short recipe of
documented diffusers and PyTorch switches, applied by :func:`apply_preset`, which returns a
:class:`PresetReport` that lists in words what it changed:

- ``"default"``: diffusers out of the box: the pipeline on the device in its dtype, attention through
  PyTorch's scaled-dot-product attention (``AttnProcessor2_0``, diffusers' default since torch 2).
- ``"fast"``: fp16 (or bf16 with ``dtype=torch.bfloat16``), SDPA, channels_last UNet and VAE, fused
  QKV projections, and ``torch.compile`` of the UNet.
- ``"low-memory"``: ``enable_model_cpu_offload`` (one whole model on the GPU at a time) plus VAE
  slicing and tiling.
- ``"lowest-memory"``: ``enable_sequential_cpu_offload`` (one layer at a time) plus VAE slicing.

Presets don't stack: applying one first undoes the previous one. :func:`restore_default` undoes
everything and puts the pipeline back where it was before the first preset (device, dtype and
attention processors included), and ``with preset(pipe, name): ...`` does it for a block. A preset
that can't work here (offload without an accelerator, fp16 or ``torch.compile`` on the CPU) is
refused by a one-line :class:`PresetError` *before* the pipeline is touched
(:mod:`sdhelpers.preset_checks`); out-of-memory advice is in :mod:`sdhelpers.gpu_memory`.

Why ``torch.compile(unet, mode="reduce-overhead", fullgraph=True)``: it is the recipe of diffusers'
own Stable Diffusion benchmarks (with a channels_last UNet). The "reduce-overhead" mode replays the
UNet as CUDA graphs, which removes the Python and kernel-launch overhead paid on each of the 50
steps, and it compiles in about a minute; "max-autotune" adds a search over matmul kernels that
takes many minutes for a few percent more. Pass ``compile="max-autotune"`` (or any
``torch.compile`` mode) to try another, ``compile=False`` to skip it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from sdhelpers.gpu_memory import explain_oom, free_memory, oom_advice
from sdhelpers.libraries import quiet_libraries
from sdhelpers.preset_checks import (
    COMPILE_MODE,
    COMPILE_MODES,
    DTYPES,
    NEXT_PRESET,
    PRESET_DESCRIPTIONS,
    PRESETS,
    PresetError,
    check_preset,
    compile_mode,
    dtype_name,
)

__all__ = [
    "COMPILE_MODE", "COMPILE_MODES", "DTYPES", "NEXT_PRESET", "PRESET_DESCRIPTIONS", "PRESETS", "PresetError",
    "PresetReport", "apply_checked_preset", "apply_preset", "check_preset", "compile_mode", "explain_oom",
    "free_memory", "oom_advice", "preset", "restore_default",
]

_STATE_ATTR = "_sdhelpers_default_state"


@dataclass
class PresetReport:
    """What :func:`apply_preset` did, in words, for a log line or a benchmark table."""

    name: str
    device: str
    dtype: str
    changes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"preset {self.name!r} on {self.device}: " + "; ".join(self.changes)


@dataclass
class _DefaultState:
    """The pipeline as it was before its first preset: what :func:`restore_default` goes back to."""

    device: torch.device
    dtype: torch.dtype
    unet_processors: dict
    vae_processors: dict


# --- applying and undoing ---------------------------------------------------------------------------

def _sdpa_processor():
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()


def _set_sdpa(pipe) -> str:
    pipe.unet.set_attn_processor(_sdpa_processor())
    if hasattr(pipe.vae, "set_attn_processor"):
        pipe.vae.set_attn_processor(_sdpa_processor())
    return "SDPA attention (AttnProcessor2_0) in the UNet and VAE"


def _fuse_qkv(pipe) -> str | None:
    """Fuse the q/k/v (self-attention) and k/v (cross-attention) projections into one matmul each."""
    from diffusers import AutoencoderKL

    if not hasattr(pipe, "fuse_qkv_projections"):
        return None
    fuse_vae = isinstance(pipe.vae, AutoencoderKL)  # diffusers refuses other VAE classes
    pipe.fuse_qkv_projections(unet=True, vae=fuse_vae)
    return "fused QKV projections (FusedAttnProcessor2_0) in the UNet" + (" and VAE" if fuse_vae else "")


def _save_default_state(pipe) -> None:
    if getattr(pipe, _STATE_ATTR, None) is None:
        state = _DefaultState(
            device=pipe.device, dtype=pipe.dtype,
            unet_processors=dict(pipe.unet.attn_processors),
            vae_processors=dict(getattr(pipe.vae, "attn_processors", {})),
        )
        object.__setattr__(pipe, _STATE_ATTR, state)


def apply_preset(
    pipe,
    name: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    compile: bool | str = True,
) -> PresetReport:
    """Set ``pipe`` up for preset ``name`` (one of :data:`PRESETS`) and say what changed.

    One-way, but reversible with :func:`restore_default` (or use ``with preset(...)``). A previous
    preset is undone first, so presets never stack. See :func:`check_preset` for the arguments;
    a preset that can't apply raises :class:`PresetError` and leaves ``pipe`` untouched.
    """
    return apply_checked_preset(pipe, name, *check_preset(name, device=device, dtype=dtype, compile=compile))


def apply_checked_preset(pipe, name: str, dev: torch.device, dtype: torch.dtype, mode: str | None) -> PresetReport:
    """:func:`apply_preset` for arguments :func:`check_preset` already returned (no second check)."""
    if getattr(pipe, _STATE_ATTR, None) is not None:
        restore_default(pipe, keep_state=True)
    _save_default_state(pipe)
    report = PresetReport(name=name, device=str(dev), dtype=dtype_name(dtype))
    changes = report.changes
    with quiet_libraries():
        if name in ("default", "fast"):
            pipe.to(dev, dtype)
            changes += [f"device {dev}", f"dtype {dtype_name(dtype)}", _set_sdpa(pipe)]
        if name == "fast":
            # Fuse before changing the memory format and before compiling: fusion makes new Linear layers.
            fused = _fuse_qkv(pipe)
            if fused:
                changes.append(fused)
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
            changes.append("channels_last memory format for the UNet and VAE")
            if mode is not None:
                pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=True)
                changes.append(f"torch.compile(unet, mode={mode!r}, fullgraph=True): compiled on the first call")
        if name in ("low-memory", "lowest-memory"):
            # The weights stay on the CPU in the chosen dtype; accelerate's hooks move them to `dev`.
            pipe.to("cpu", dtype, silence_dtype_warnings=True)
            changes += [f"dtype {dtype_name(dtype)}", _set_sdpa(pipe)]
            # diffusers 0.42 removed pipe.enable_vae_slicing()/enable_vae_tiling(): the switches live
            # on the VAE itself (AutoencoderMixin.enable_slicing / enable_tiling).
            pipe.vae.enable_slicing()
            if name == "low-memory":
                pipe.enable_model_cpu_offload(device=dev)
                pipe.vae.enable_tiling()
                changes += [f"model CPU offload to {dev} (enable_model_cpu_offload: one model on it at a time)",
                            "VAE slicing (vae.enable_slicing: one image of the batch decoded at a time)",
                            f"VAE tiling (vae.enable_tiling: images over {_tile_size(pipe.vae)} px are decoded in tiles)"]
            else:
                pipe.enable_sequential_cpu_offload(device=dev)
                changes += [f"sequential CPU offload to {dev} (enable_sequential_cpu_offload: one layer at a time)",
                            "VAE slicing (vae.enable_slicing: one image of the batch decoded at a time)"]
    return report


def _tile_size(vae) -> int | str:
    return getattr(vae, "tile_sample_min_size", None) or "the VAE's sample size"


def _unfuse_qkv(model) -> bool:
    """Drop the fused projections diffusers added; the original q/k/v layers were kept beside them."""
    from diffusers.models.attention_processor import Attention

    undone = False
    for module in model.modules():
        if isinstance(module, Attention) and getattr(module, "fused_projections", False):
            for attr in ("to_qkv", "to_kv", "to_added_qkv"):
                if hasattr(module, attr):
                    delattr(module, attr)
            module.fused_projections = False
            undone = True
    return undone


def restore_default(pipe, *, keep_state: bool = False) -> list[str]:
    """Undo every preset: offload hooks, compilation, fused QKV, memory format, VAE slicing/tiling.

    The pipeline goes back to the device, dtype and attention processors it had before its first
    preset (if none was applied: stays where it is, with diffusers' default SDPA processors).
    Returns what it undid, in words. ``keep_state`` is for :func:`apply_preset`, which re-applies.

    A dtype comes back as a dtype, not as the original bits: fp32 weights cast to fp16 and back keep
    fp16's rounding. Load the pipeline in the dtype the presets will use to avoid the round trip.
    """
    from diffusers.utils.torch_utils import is_compiled_module

    state: _DefaultState | None = getattr(pipe, _STATE_ATTR, None)
    undone = []
    with quiet_libraries():
        if getattr(pipe, "_all_hooks", None) or any(hasattr(m, "_hf_hook") for m in pipe.components.values()):
            # accelerate puts offloaded weights back where they were (the CPU) when a hook is removed
            pipe.remove_all_hooks()
            undone.append("CPU offload hooks removed")
        if is_compiled_module(pipe.unet):
            pipe.unet = pipe.unet._orig_mod
            torch._dynamo.reset()  # drops compiled code and CUDA graph memory pools
            undone.append("torch.compile undone (original UNet back)")
        fused = [_unfuse_qkv(m) for m in (pipe.unet, pipe.vae)]
        if any(fused):
            for attr in ("fusing_unet", "fusing_vae"):
                if hasattr(pipe, attr):
                    setattr(pipe, attr, False)
            undone.append("QKV projections unfused")
        if state is not None:  # copies: set_attn_processor empties the dict it is given
            pipe.unet.set_attn_processor(dict(state.unet_processors))
            if state.vae_processors:
                pipe.vae.set_attn_processor(dict(state.vae_processors))
        else:
            _set_sdpa(pipe)
        undone.append("attention processors restored")
        for part in (pipe.unet, pipe.vae):
            part.to(memory_format=torch.contiguous_format)
        if getattr(pipe.vae, "use_slicing", False) or getattr(pipe.vae, "use_tiling", False):
            pipe.vae.disable_slicing()
            pipe.vae.disable_tiling()
            undone.append("VAE slicing and tiling off")
        if state is not None:
            pipe.to(state.device, state.dtype)
            undone.append(f"back on {state.device} in {dtype_name(state.dtype)}")
    if state is not None and not keep_state:
        object.__delattr__(pipe, _STATE_ATTR)
    return undone


@contextmanager
def preset(
    pipe,
    name: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    compile: bool | str = True,
) -> Iterator[PresetReport]:
    """``with preset(pipe, "fast") as report: ...``: apply a preset for a block, then restore the pipeline."""
    report = apply_preset(pipe, name, device=device, dtype=dtype, compile=compile)
    try:
        yield report
    finally:
        restore_default(pipe)

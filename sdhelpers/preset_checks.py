"""Whether a speed or memory preset of :mod:`sdhelpers.gpu` can run here, decided before a pipeline is touched.

Why a module of its own: the benchmark lists the presets that can't apply on this machine, with
the reason, without loading a pipeline; :func:`check_preset` is that decision, and
:func:`sdhelpers.gpu.apply_preset` calls it first so that a refused preset changes nothing.
"""

from __future__ import annotations

import torch

from sdhelpers.device import get_device, get_dtype

PRESETS = ("default", "fast", "low-memory", "lowest-memory")
PRESET_DESCRIPTIONS = {
    "default": "diffusers out of the box: the device and dtype, SDPA attention",
    "fast": "fp16/bf16, SDPA, channels_last, fused QKV, torch.compile of the UNet",
    "low-memory": "model CPU offload (one model on the GPU at a time), VAE slicing and tiling",
    "lowest-memory": "sequential CPU offload (one layer on the GPU at a time), VAE slicing",
}
COMPILE_MODE = "reduce-overhead"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# What to try after running out of memory under each preset; None: no lighter preset is left.
NEXT_PRESET = {"default": "low-memory", "fast": "low-memory", "low-memory": "lowest-memory", "lowest-memory": None}


class PresetError(ValueError):
    """A preset can't be applied here; the one-line message names the argument and why.

    ``reasons`` holds each reason alone (without the "preset ... can't apply" prefix), for tables.
    """

    def __init__(self, message: str, reasons: list[str] | None = None) -> None:
        super().__init__(message)
        self.reasons = reasons if reasons is not None else [message]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _can_offload(device: torch.device) -> bool:
    """CPU offload moves weights from the CPU to an accelerator at each forward: it needs one."""
    return device.type in ("cuda", "mps")


def _can_compile(device: torch.device) -> bool:
    """torch.compile is offered on CUDA only: on the CPU Inductor builds C++ for minutes and gains
    little for a UNet already running oneDNN kernels, and on MPS it is still experimental."""
    return device.type == "cuda"


def _dtype_problem(dtype: torch.dtype, device: torch.device) -> str | None:
    if dtype == torch.float16 and device.type == "cpu":
        return (f"dtype: float16 is refused on {device.type} (its fp16 kernels are slow or missing); "
                "use torch.bfloat16 or torch.float32")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"dtype: bfloat16 is not supported by this GPU ({torch.cuda.get_device_name(device)}); use torch.float16"
    return None


def compile_mode(compile: bool | str) -> str | None:
    if isinstance(compile, bool):
        return COMPILE_MODE if compile else None
    if isinstance(compile, str) and compile in COMPILE_MODES:
        return compile
    raise PresetError(f"compile: {compile!r} is not allowed; use True, False or a mode: {', '.join(COMPILE_MODES)}")


def check_preset(
    name: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    compile: bool | str = True,
) -> tuple[torch.device, torch.dtype, str | None]:
    """Check that preset ``name`` can run here, without a pipeline: ``(device, dtype, compile mode)``.

    ``dtype=None`` means the preset's own choice: fp16 for ``"fast"``, else the device's
    (:func:`sdhelpers.device.get_dtype`: fp16 on a GPU, fp32 on the CPU). ``compile`` only matters
    for ``"fast"``. Every reason to refuse is gathered into one line of :class:`PresetError`.
    """
    if name not in PRESETS:
        raise PresetError(f"name: {name!r} is not a preset; allowed: {', '.join(PRESETS)}")
    try:
        dev = get_device(device)
    except ValueError as exc:
        raise PresetError(str(exc)) from None
    if dtype is not None and dtype not in DTYPES:
        allowed = ", ".join(f"torch.{dtype_name(d)}" for d in DTYPES)
        raise PresetError(f"dtype: {dtype!r} is not allowed; use {allowed} or None")
    if dtype is None:
        dtype = torch.float16 if name == "fast" else get_dtype(dev)
    mode = compile_mode(compile) if name == "fast" else None

    problems = []
    if name in ("low-memory", "lowest-memory") and not _can_offload(dev):
        problems.append(f"device: {name!r} offloads weights from the CPU to an accelerator and {dev.type} is not one "
                        "(use a CUDA or MPS device)")
    dtype_problem = _dtype_problem(dtype, dev)
    if dtype_problem:
        problems.append(dtype_problem)
    if mode is not None and not _can_compile(dev):
        problems.append(f"compile: torch.compile is only applied on CUDA, not on {dev.type}; pass compile=False")
    if problems:
        raise PresetError(f"preset {name!r} can't apply on {dev}: " + "; ".join(problems), problems)
    return dev, dtype, mode

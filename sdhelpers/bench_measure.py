"""Measuring one preset of :mod:`sdhelpers.gpu` on one model: the rows of :mod:`sdhelpers.bench`'s table.

Why a module of its own: what a number in the benchmark table means is decided here, apart from
which models and presets a run covers and the command line around it.

For each preset the pipeline is loaded afresh (so one preset's leftovers never weigh on the next),
the preset applied, one warm-up call made (the ``torch.compile`` of ``"fast"`` happens there) and
``--repeats`` timed calls follow. Measured, with the GPU synchronised:

- ``it_per_s``: UNet-loop iterations per second. ``callback_on_step_end`` stamps the end of every
  denoising step (CUDA events on a GPU, so nothing is synchronised inside the loop); the rate is
  (stamps - 1) / (last stamp - first stamp). This excludes the first step, which carries one-off
  costs (offload moves the UNet onto the GPU), and everything outside the loop (text encoding,
  VAE decoding). With classifier-free guidance (``--guidance`` > 1) each iteration runs the UNet
  on a batch of 2 x ``--batch``. PNDM, SD 1.5's scheduler, runs ``steps + 1`` iterations.
- ``s_per_image``: the whole pipeline call (text encoding, loop, VAE decoding, PIL images) / batch.
- peak memory of the timed calls: CUDA peak allocated and reserved (what decides an OOM); on a CPU
  the peak resident set size of the process (RSS; also recorded on a GPU: offload moves weights there).
- ``load_s`` (model load + preset), ``apply_s`` (the preset alone), ``warmup_s`` (the warm-up call).
- ``ratio_vs_default``: it/s and peak memory divided by those of ``"default"`` for the same model.
"""

from __future__ import annotations

import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from sdhelpers.bench_report import peak_memory_gib
from sdhelpers.device import MemoryTracker, Timer, synchronize
from sdhelpers.gpu import COMPILE_MODE, PresetError, apply_checked_preset, check_preset, explain_oom, free_memory
from sdhelpers.models import ModelUnavailableError

PROMPT = "a photograph of an astronaut riding a horse"
GIB = 2**30
DTYPE_NAMES = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
RESULT_FIELDS = (
    "model", "preset", "status", "size", "steps", "batch", "it_per_s", "s_per_image",
    "peak_allocated_gib", "peak_reserved_gib", "peak_rss_gib", "load_s", "apply_s", "warmup_s",
    "ratio_vs_default", "changes",
)

Loader = Callable[[torch.device], Any]


# --- measuring one preset ------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchSettings:
    """The work measured for one model: image size, steps, batch, guidance, and how to run it."""

    size: int
    steps: int
    batch: int = 1
    guidance: float = 7.5
    repeats: int = 2
    device: str = "cpu"
    dtype: str | None = None  # None: each preset's own choice (see sdhelpers.gpu.check_preset)
    compile: bool | str = COMPILE_MODE
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return DTYPE_NAMES[self.dtype] if self.dtype else None


def check_settings(size: int, steps: int, batch: int, repeats: int, guidance: float) -> None:
    """One-line ``ValueError`` for work the harness can't measure."""
    if not isinstance(size, int) or size <= 0 or size % 8:
        raise ValueError(f"size: {size!r} is not allowed; use a positive multiple of 8 "
                         "(the VAE turns 8x8 pixels into one latent), e.g. 64, 128 or 512")
    if not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps: {steps!r} is too few; use 2 or more (it/s is timed from the first to the last step)")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch: {batch!r} is not allowed; use 1 or more images per call")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats: {repeats!r} is not allowed; use 1 or more timed calls")
    if not isinstance(guidance, (int, float)) or guidance < 0:
        raise ValueError(f"guidance: {guidance!r} is not allowed; use 0 or more (above 1 turns on classifier-free guidance)")


class StepClock:
    """A ``callback_on_step_end`` that stamps the end of each denoising step.

    On CUDA it records events on the current stream, so the loop is never synchronised and the
    stamps are GPU times; elsewhere it synchronises and reads ``time.perf_counter``.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.events: list[torch.cuda.Event] = []
        self.times: list[float] = []

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            self.events.append(event)
        else:
            synchronize(self.device)
            self.times.append(time.perf_counter())
        return {}

    @property
    def stamps(self) -> int:
        return len(self.events) or len(self.times)

    def iterations_per_second(self) -> float | None:
        """(stamps - 1) / seconds from the first stamp to the last; None with fewer than 2 stamps."""
        if self.stamps < 2:
            return None
        if self.events:
            self.events[-1].synchronize()
            seconds = self.events[0].elapsed_time(self.events[-1]) / 1000
        else:
            seconds = self.times[-1] - self.times[0]
        return (self.stamps - 1) / seconds if seconds > 0 else None


def _pipe_kwargs(settings: BenchSettings) -> dict:
    return dict(
        prompt=PROMPT, height=settings.size, width=settings.size, num_inference_steps=settings.steps,
        guidance_scale=settings.guidance, num_images_per_prompt=settings.batch, output_type="pil",
        generator=torch.Generator("cpu").manual_seed(settings.seed),  # same noise on every device
    )


def _call(pipe, settings: BenchSettings, clock: StepClock | None = None):
    with warnings.catch_warnings():
        # random weights can give NaN pixels: numpy warns when casting them to uint8
        warnings.simplefilter("ignore", RuntimeWarning)
        return pipe(**_pipe_kwargs(settings), callback_on_step_end=clock, callback_on_step_end_tensor_inputs=[])


def _empty_row(model: str, preset_name: str, settings: BenchSettings) -> dict:
    row = dict.fromkeys(RESULT_FIELDS)
    row.update(model=model, preset=preset_name, size=settings.size, steps=settings.steps, batch=settings.batch,
               changes=[])
    return row


def _discard(pipe) -> None:
    """Forget a measured pipeline and its compiled code (CUDA graphs keep memory pools)."""
    from diffusers.utils.torch_utils import is_compiled_module

    if pipe is not None and is_compiled_module(getattr(pipe, "unet", None)):
        torch._dynamo.reset()


def measure_preset(load: Loader, model: str, preset_name: str, settings: BenchSettings) -> dict:
    """Load a fresh pipeline, apply ``preset_name``, warm up, time ``settings.repeats`` calls: one result row.

    A preset that can't apply here gives ``status = "n/a: <reason>"`` without loading anything;
    running out of GPU memory gives ``status = "oom: <advice>"``. ``ModelUnavailableError`` from
    ``load`` propagates: the caller skips the model. Any other failure is printed to stderr and
    becomes ``status = "error: <type>: <message>"``, so the other presets are still measured.
    """
    row = _empty_row(model, preset_name, settings)
    try:
        checked = check_preset(preset_name, device=settings.device, dtype=settings.torch_dtype,
                               compile=settings.compile)
        device = checked[0]
    except PresetError as exc:
        row["status"] = "n/a: " + "; ".join(exc.reasons)
        return row
    offloads = preset_name in ("low-memory", "lowest-memory")
    pipe = None
    free_memory()
    try:
        with explain_oom(preset_name):
            with Timer(device) as load_timer:
                pipe = load(torch.device("cpu") if offloads else device)
                pipe.set_progress_bar_config(disable=True)
                with Timer(device) as apply_timer:
                    report = apply_checked_preset(pipe, preset_name, *checked)
            with Timer(device) as warmup_timer:
                _call(pipe, settings)
            free_memory()
            seconds, rates = [], []
            with MemoryTracker(device) as memory:
                for _ in range(settings.repeats):
                    clock = StepClock(device)
                    with Timer(device) as call_timer:
                        _call(pipe, settings, clock)
                    seconds.append(call_timer.seconds)
                    rates.append(clock.iterations_per_second())
    except torch.OutOfMemoryError as exc:
        row["status"] = "oom: " + str(exc).strip().splitlines()[-1]
        return row
    except ModelUnavailableError:
        raise
    except Exception as exc:  # one preset failing (a compiler error, a driver problem) must not lose the others
        traceback.print_exc(file=sys.stderr)
        first_line = (str(exc).strip().splitlines() or [""])[0]
        row["status"] = f"error: {type(exc).__name__}: {first_line}"
        return row
    finally:
        _discard(pipe)
        del pipe
        free_memory()
    valid_rates = [r for r in rates if r is not None]
    row.update(
        status="ok",
        it_per_s=_round(statistics.median(valid_rates)) if valid_rates else None,
        s_per_image=_round(statistics.median(seconds) / settings.batch),
        peak_rss_gib=_round(memory.peak_rss / GIB),
        load_s=_round(load_timer.seconds), apply_s=_round(apply_timer.seconds), warmup_s=_round(warmup_timer.seconds),
        changes=list(report.changes),
    )
    if device.type == "cuda":
        row.update(peak_allocated_gib=_round(memory.peak_allocated / GIB),
                   peak_reserved_gib=_round(memory.peak_reserved / GIB))
    return row


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def add_ratios(rows: list[dict]) -> list[dict]:
    """Fill ``ratio_vs_default`` (it/s and peak memory over the same model's ``"default"`` row) in place."""
    for model in dict.fromkeys(r["model"] for r in rows):
        base = next((r for r in rows if r["model"] == model and r["preset"] == "default" and r["status"] == "ok"), None)
        for row in rows:
            if row["model"] != model or row["status"] != "ok" or base is None:
                continue
            speed = row["it_per_s"] / base["it_per_s"] if row["it_per_s"] and base["it_per_s"] else None
            memory = peak_memory_gib(row) / peak_memory_gib(base) if peak_memory_gib(row) and peak_memory_gib(base) else None
            row["ratio_vs_default"] = {"it_per_s": _round(speed, 3), "peak_memory": _round(memory, 3)}
    return rows


def compare_presets(load: Loader, model: str, presets: Sequence[str], settings: BenchSettings,
                    log: Callable[[str], None] | None = None) -> list[dict]:
    """One row per preset for one model, with ratios against ``"default"``."""
    rows = []
    for name in presets:
        row = measure_preset(load, model, name, settings)
        if log:
            log(f"{model}/{name}: {row['status']}" + (f", {row['it_per_s']} it/s, {row['s_per_image']} s/image"
                                                       if row["status"] == "ok" else ""))
        rows.append(row)
    return add_ratios(rows)

"""The benchmark harness: the presets of :mod:`sdhelpers.gpu` side by side, on a CPU or a GPU.

Run ``python -m sdhelpers.bench`` (``make bench``). With no arguments on a CPU it prints a Markdown
table in about a minute on two free cores: both models at a small size, the ``"default"`` preset
measured, the GPU-only presets listed as "n/a" with the reason. (On cores shared with other work,
two torch threads can wait on each other for several times longer: ``--threads 1`` helps there.)
On a GPU the same command measures every preset, at 512x512 and 50 steps for SD 1.5.

Two models:

- ``tinysd``: the book's own small model, :func:`sdhelpers.models.load_pipeline` with no argument
  (skipped in one line if this installation doesn't ship it).
- ``sd15-arch``: Stable Diffusion 1.5's exact architecture (UNet, VAE and text encoder built from
  ``SD15_*_CONFIG``), the real CLIP tokenizer and PNDM configured as SD 1.5 does, with *random*
  weights: nothing to download, and the speed and memory of the real model (only the pictures
  are noise).

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

GPU runner: the book's stored results are made on a GPU with (one command per dtype)::

    python -m sdhelpers.bench --model sd15-arch --size 512 --steps 50 --batch 1 \\
        --preset default,fast,low-memory,lowest-memory --dtype float16 \\
        --json sdhelpers/bench_results/bench_sd15_512_fp16.json --markdown sdhelpers/bench_results/bench_sd15_512_fp16.md
    python -m sdhelpers.bench --model sd15-arch --size 512 --steps 50 --batch 1 \\
        --preset default,fast,low-memory,lowest-memory --dtype bfloat16 \\
        --json sdhelpers/bench_results/bench_sd15_512_bf16.json --markdown sdhelpers/bench_results/bench_sd15_512_bf16.md

Each takes a few minutes on an A100 or H100: "fast" spends about a minute compiling in its
warm-up, and "lowest-memory" (sequential offload) is the slowest to run, since every layer's
weights cross the PCIe bus at every step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from sdhelpers.device import MemoryTracker, Timer, get_device, hardware_summary, synchronize
from sdhelpers.gpu import (
    COMPILE_MODE,
    COMPILE_MODES,
    PRESETS,
    PresetError,
    apply_checked_preset,
    compile_mode,
    check_preset,
    explain_oom,
    free_memory,
)
from sdhelpers import checks
from sdhelpers.architectures import build_networks
from sdhelpers.bench_report import peak_memory_gib, to_markdown
from sdhelpers.libraries import library_versions, quiet_libraries
from sdhelpers.models import ModelUnavailableError, assemble_pipeline, load_pipeline

MODELS = ("tinysd", "sd15-arch")
PROMPT = "a photograph of an astronaut riding a horse"
GIB = 2**30
# (size, steps) per model when --size/--steps are not given: small on a CPU (about two minutes in
# all on two cores), the book's real settings on a GPU.
DEFAULT_WORK = {
    "tinysd": {"cpu": (64, 25), "gpu": (64, 25)},
    "sd15-arch": {"cpu": (64, 3), "gpu": (512, 50)},
}
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


# --- the two models ------------------------------------------------------------------------------

def build_sd15_arch_pipeline(device: str | torch.device = "cpu", seed: int = 0):
    """A StableDiffusionPipeline with SD 1.5's exact architecture and random weights (no safety checker).

    Built directly on ``device`` (initialising 1.07 B parameters takes a few seconds on a CPU, a
    fraction of one on a GPU); ``"meta"`` builds it without memory. The weights are fp32;
    :func:`sdhelpers.gpu.apply_preset` casts them.
    """
    torch.manual_seed(seed)
    networks = {name: net.eval() for name, net in build_networks("sd15", device=device).items()}
    return assemble_pipeline(networks["vae"], networks["text_encoder"], networks["unet"])


def load_tinysd(device: str | torch.device = "cpu"):
    """The shipped TinySD in fp32 on ``device``; raises ``ModelUnavailableError`` where it isn't shipped."""
    return load_pipeline(device=device, dtype=torch.float32)


LOADERS: dict[str, Loader] = {"tinysd": load_tinysd, "sd15-arch": build_sd15_arch_pipeline}


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


# --- a whole run -----------------------------------------------------------------------------------

def default_work(model: str, device: torch.device) -> tuple[int, int]:
    """(size, steps) for ``model`` when not given: small on a CPU, the real thing on a GPU."""
    return DEFAULT_WORK.get(model, DEFAULT_WORK["tinysd"])["cpu" if device.type == "cpu" else "gpu"]


def run_benchmark(
    models: Sequence[str] = MODELS,
    presets: Sequence[str] = PRESETS,
    *,
    device: str | torch.device | None = None,
    dtype: str | None = None,
    size: int | None = None,
    steps: int | None = None,
    batch: int = 1,
    guidance: float = 7.5,
    repeats: int | None = None,
    compile: bool | str = COMPILE_MODE,
    seed: int = 0,
    loaders: dict[str, Loader] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Measure every preset on every model; returns the JSON document (hardware, versions, arguments, results).

    ``size``/``steps`` default per model (:data:`DEFAULT_WORK`), ``repeats`` to 2 on a CPU and 3 on a
    GPU. A model whose loader raises ``ModelUnavailableError`` is listed under ``"skipped"``.
    """
    loaders = LOADERS if loaders is None else loaders
    dev = get_device(device)
    for model in models:
        checks.choice(model, tuple(loaders), "model")
    for name in presets:
        checks.choice(name, PRESETS, "preset")
    if dtype is not None:
        checks.choice(dtype, tuple(DTYPE_NAMES), "dtype")
    compile_mode(compile)
    repeats = repeats if repeats is not None else (2 if dev.type == "cpu" else 3)
    # what was given is checked; what wasn't comes from DEFAULT_WORK, valid by construction
    check_settings(64 if size is None else size, 25 if steps is None else steps, batch, repeats, guidance)
    settings_by_model = {}
    for model in models:
        model_size, model_steps = default_work(model, dev)
        settings_by_model[model] = BenchSettings(
            size=size or model_size, steps=steps or model_steps, batch=batch, guidance=guidance, repeats=repeats,
            device=str(dev), dtype=dtype, compile=compile, seed=seed,
        )
    results, skipped = [], []
    for model in models:
        try:
            results += compare_presets(loaders[model], model, presets, settings_by_model[model], log=log)
        except ModelUnavailableError as exc:
            skipped.append({"model": model, "reason": str(exc)})
            if log:
                log(f"{model}: skipped: {exc}")
    return {
        "hardware": hardware_summary(dev),
        "versions": library_versions(),
        "arguments": {
            "models": list(models), "presets": list(presets), "device": str(dev), "dtype": dtype,
            "size": size, "steps": steps, "batch": batch, "guidance": guidance, "repeats": repeats,
            "compile": compile, "seed": seed, "threads": torch.get_num_threads(),
            "settings": {m: asdict(s) for m, s in settings_by_model.items()},
        },
        "results": results,
        "skipped": skipped,
    }


# --- command line ----------------------------------------------------------------------------------

OPTIONS = {"compile": "--compile-mode"}
"""The command-line option of each argument of :func:`run_benchmark` whose name differs from it."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line: ``bench: error: --size: ...``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m sdhelpers.bench",
        description="Compare the sdhelpers.gpu presets on Stable Diffusion pipelines: speed, memory, load and warm-up.",
    )
    parser.add_argument("--model", action="append", metavar="NAME",
                        help=f"{', '.join(MODELS)}; repeatable or comma-separated (default: both)")
    parser.add_argument("--preset", action="append", metavar="NAME",
                        help=f"{', '.join(PRESETS)}; repeatable or comma-separated (default: all)")
    parser.add_argument("--size", type=int, help="image side in pixels, a multiple of 8 "
                        "(default: sd15-arch 64 on a CPU / 512 on a GPU, tinysd 64)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: sd15-arch 3 on a CPU / 50 on a GPU, tinysd 25)")
    parser.add_argument("--batch", type=int, default=1, help="images per call (default: 1)")
    parser.add_argument("--guidance", type=float, default=7.5,
                        help="guidance scale; above 1 classifier-free guidance doubles the UNet batch (default: 7.5)")
    parser.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: the best available)")
    parser.add_argument("--dtype", help="float16, bfloat16 or float32 (default: fp16 on a GPU, fp32 on a CPU)")
    parser.add_argument("--repeats", type=int, help="timed calls per preset after the warm-up (default: 2 on a CPU, 3 on a GPU)")
    parser.add_argument("--compile-mode", default=COMPILE_MODE,
                        help=f"torch.compile mode of the 'fast' preset: {', '.join(COMPILE_MODES)} or none "
                             f"(default: {COMPILE_MODE})")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the noise (default: 0)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="also write the table as Markdown")
    return parser


def _names(values: list[str] | None, every: Sequence[str]) -> list[str]:
    """``--x a,b --x c`` -> ``[a, b, c]``; None -> all of ``every`` (run_benchmark checks the names)."""
    if not values:
        return list(every)
    return list(dict.fromkeys(v.strip() for value in values for v in value.split(",") if v.strip()))


def parse_args(argv: Sequence[str] | None = None) -> dict:
    """The command line as :func:`run_benchmark`'s arguments (it checks them), plus the outputs."""
    args = build_parser().parse_args(argv)
    return {
        "models": _names(args.model, MODELS), "presets": _names(args.preset, PRESETS), "device": args.device,
        "dtype": args.dtype, "size": args.size, "steps": args.steps, "batch": args.batch,
        "guidance": args.guidance, "repeats": args.repeats,
        "compile": False if args.compile_mode == "none" else args.compile_mode, "seed": args.seed,
        "threads": args.threads, "json": args.json, "markdown": args.markdown,
    }


def main(argv: Sequence[str] | None = None, loaders: dict[str, Loader] | None = None) -> int:
    """``python -m sdhelpers.bench``: print the Markdown table, optionally write it and the JSON.

    Every bad argument ends the run at once with one line naming the option (status 2).
    """
    opts = parse_args(argv)
    run = {k: v for k, v in opts.items() if k not in ("models", "presets", "threads", "json", "markdown")}

    def log(message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    try:
        if opts["threads"] is not None:
            torch.set_num_threads(checks.positive_int(opts["threads"], "threads"))
        doc = run_benchmark(opts["models"], opts["presets"], loaders=loaders, log=log, **run)
    except ValueError as exc:  # run_benchmark checks its arguments before any work
        name, _, problem = str(exc).partition(":")
        build_parser().error(f"{OPTIONS.get(name, '--' + name)}:{problem}")
    table = to_markdown(doc)
    print(table, end="")
    if opts["markdown"]:
        _write(opts["markdown"], table)
    if opts["json"]:
        _write(opts["json"], json.dumps(doc, indent=2) + "\n")
    return 0


def _write(path: str, text: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    with quiet_libraries():
        status = main()
    sys.exit(status)

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

How one preset is measured, and what each column means: :mod:`sdhelpers.bench_measure`.

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
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import torch

from sdhelpers import checks
from sdhelpers.architectures import build_networks
from sdhelpers.bench_measure import (
    DTYPE_NAMES,
    BenchSettings,
    Loader,
    check_settings,
    compare_presets,
)
from sdhelpers.bench_report import to_markdown
from sdhelpers.device import get_device, hardware_summary
from sdhelpers.gpu import COMPILE_MODE, COMPILE_MODES, PRESETS, compile_mode
from sdhelpers.libraries import library_versions, quiet_libraries
from sdhelpers.models import ModelUnavailableError, assemble_pipeline, load_pipeline

MODELS = ("tinysd", "sd15-arch")
# (size, steps) per model when --size/--steps are not given: small on a CPU (about two minutes in
# all on two cores), the book's real settings on a GPU.
DEFAULT_WORK = {
    "tinysd": {"cpu": (64, 25), "gpu": (64, 25)},
    "sd15-arch": {"cpu": (64, 3), "gpu": (512, 50)},
}


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

"""Turning a training work folder into a diffusers pipeline folder that plain ``from_pretrained`` loads.

Why a module: the exported folder is the book's contract with its readers. Whatever the trainer
does, what ships must be a standard Stable Diffusion pipeline folder (safetensors weights, SD 1.5's
PNDM, the real CLIP tokenizer's files), small enough to ship, and written so that a failed export
never leaves a half-written model behind.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdhelpers import checks
from sdhelpers.checkpoint import atomic_write_json
from sdhelpers.libraries import library_versions, quiet_libraries
from sdhelpers.models import TOKENIZER_DIR, assemble_pipeline
from sdhelpers.recipe import STAGES

FINAL_FOLDER = "final"
LOSS_NAME = "loss.json"
REPORT_NAME = "report.json"


KEPT_FILES = ("levers.json",)
"""Files of a model folder that a rebuild carries over: the measured record of earlier recipes."""


def save_component(model: nn.Module, folder: Path) -> None:
    """``save_pretrained`` into a fresh folder (safetensors), replacing an older copy."""
    if folder.exists():
        shutil.rmtree(folder)
    with quiet_libraries():
        model.save_pretrained(folder, safe_serialization=True)


def load_component(work: str | os.PathLike, stage: str):
    """The finished model of a stage from the work folder (``vae``: AutoencoderKL, ``clip``: CLIPTextModel)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    classes = {"vae": AutoencoderKL, "clip": CLIPTextModel, "unet": UNet2DConditionModel,
               "refine": UNet2DConditionModel}
    folder = Path(work) / checks.choice(stage, STAGES, "stage") / FINAL_FOLDER
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"work: {folder} holds no finished {stage} model; "
            f"run `python -m sdhelpers.train {stage} --out OUT --work {work}` first"
        )
    with quiet_libraries():
        return classes[stage].from_pretrained(folder, dtype=torch.float32)


def load_scaled_vae(work: str | os.PathLike):
    """The VAE as the UNet stage left it: with the scaling factor measured on its latents."""
    from diffusers import AutoencoderKL

    vae_folder = Path(work) / "unet" / "vae"
    if not (vae_folder / "config.json").is_file():
        raise FileNotFoundError(f"work: {work} has no finished UNet stage; run the unet stage first")
    with quiet_libraries():
        return AutoencoderKL.from_pretrained(vae_folder, dtype=torch.float32)


def folder_megabytes(folder: Path) -> float:
    """Size of every file under ``folder`` in MB (10^6 bytes): what the model's 25 MB cap counts."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def parameter_megabytes(modules: Sequence[nn.Module], bytes_per_value: int) -> float:
    return sum(t.numel() for m in modules for t in m.state_dict().values()) * bytes_per_value / 1e6


def export_pipeline(
    out: str | os.PathLike,
    vae: nn.Module,
    text_encoder: nn.Module,
    unet: nn.Module,
    *,
    extra_files: dict[str, Any] | None = None,
    max_megabytes: float = 25.0,
) -> Path:
    """Write a diffusers pipeline folder that plain ``StableDiffusionPipeline.from_pretrained`` loads.

    Weights are stored in fp16 when fp32 would not fit ``max_megabytes`` (TinySD's 49,408-token
    embedding alone is 12.6 MB in fp32). The text encoder's config then still says float32, because
    transformers 5 otherwise loads a checkpoint in the dtype it was saved in; diffusers models
    load in fp32 by default. ``extra_files`` (name → JSON value) are written beside the model.

    The folder is built under a temporary name and swapped in at the end, so a failed export
    leaves the previous model in place. An existing ``out`` must be a pipeline folder or empty.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "model_index.json").is_file():
        raise ValueError(f"out: {out} exists and is not a diffusers pipeline folder; refusing to overwrite it")
    modules = [vae, text_encoder, unet]
    overhead = folder_megabytes(TOKENIZER_DIR) + 1.0  # tokenizer files, configs, curves, training.json
    half = parameter_megabytes(modules, 4) + overhead > max_megabytes
    dtype = torch.float16 if half else torch.float32
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with quiet_libraries():
            copies = [copy.deepcopy(m).to("cpu", dtype) for m in modules]
            assemble_pipeline(*copies).save_pretrained(staging, safe_serialization=True)
        _ship_slow_tokenizer_files(staging / "tokenizer")
        _drop_build_paths(staging)
        config_path = staging / "text_encoder" / "config.json"
        config = json.loads(config_path.read_text())
        config["dtype"] = "float32"
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, value in (extra_files or {}).items():
            atomic_write_json(staging / name, value)
        size = folder_megabytes(staging)
        if size > max_megabytes:
            raise ValueError(f"max_megabytes: the pipeline takes {size:.1f} MB even in fp16, more than {max_megabytes} MB")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _drop_build_paths(folder: Path) -> None:
    """Remove ``_name_or_path`` from the components' configs: where the build machine loaded them from."""
    for config_path in folder.glob("*/config.json"):
        config = json.loads(config_path.read_text())
        if config.pop("_name_or_path", None) is not None:
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _ship_slow_tokenizer_files(folder: Path) -> None:
    """Replace the saved tokenizer by the package's ``vocab.json`` + ``merges.txt`` (SD 1.5's own layout).

    transformers 5 saves a single ``tokenizer.json`` of 3.6 MB; the two classic files hold the same
    BPE in 1.5 MB, and ``CLIPTokenizer.from_pretrained`` builds the identical tokenizer from them.
    """
    shutil.rmtree(folder)
    folder.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "LICENSE", "README.md"):
        if (TOKENIZER_DIR / name).is_file():
            shutil.copyfile(TOKENIZER_DIR / name, folder / name)


def finish(out: str | os.PathLike, work: str | os.PathLike, *, seed: int, preset: str | None = None) -> Path:
    """Export the pipeline from a work folder whose stages are done, with curves and ``training.json``."""
    from sdhelpers.device import hardware_summary

    from sdhelpers.recipe import PRESETS

    work = Path(work)
    vae = load_scaled_vae(work)
    text_encoder = load_component(work, "clip")
    refined = PRESETS[preset].refine is not None if preset in PRESETS else (work / "refine" / FINAL_FOLDER).is_dir()
    unet = load_component(work, "refine" if refined else "unet")
    reports = {s: json.loads((work / s / REPORT_NAME).read_text()) for s in STAGES if (work / s / REPORT_NAME).is_file()}
    curves = {f"loss_{s}.json": json.loads((work / s / LOSS_NAME).read_text()) for s in STAGES
              if (work / s / LOSS_NAME).is_file()}
    training = {
        "seed": seed,
        "preset": preset,
        "stages": reports,
        "total_seconds": round(sum(r.get("seconds", 0) for r in reports.values()), 1),
        "scaling_factor": vae.config.scaling_factor,
        "configs": {"vae": dict(vae.config), "unet": dict(unet.config), "text_encoder": text_encoder.config.to_diff_dict()},
        "versions": library_versions(),
        "hardware": hardware_summary("cpu") if not torch.cuda.is_available() else hardware_summary(),
        "threads": torch.get_num_threads(),
    }
    for config in training["configs"].values():
        config.pop("_name_or_path", None)
    training = json.loads(json.dumps(training, default=str))
    kept = {name: json.loads((Path(out) / name).read_text()) for name in KEPT_FILES if (Path(out) / name).is_file()}
    return export_pipeline(out, vae, text_encoder, unet, extra_files={"training.json": training, **curves, **kept})


def default_work(out: str | os.PathLike) -> Path:
    """Where checkpoints go when ``--work`` isn't given: ``<out>.work`` beside the model folder.

    Not inside it: checkpoints hold optimizer moments (three times the weights) and would be shipped.
    """
    out = Path(out)
    return out.with_name(out.name + ".work")

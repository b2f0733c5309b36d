"""LoRA and DreamBooth-LoRA on the UNet's attention, with peft, in the files diffusers loads.

**LoRA** (Hu et al., 2021) freezes a weight ``W`` and learns a low-rank update beside it:
``W x + (alpha / r) · B A x`` with ``A`` of shape (r, in) and ``B`` (out, r), ``B`` starting at
zero. On the UNet's attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) that is
43,008 numbers at rank 4 for TinySD (about 0.8 M for SD 1.5), against 4.2 M in the UNet. The
scale can be turned at inference (``cross_attention_kwargs={"scale": s}``), and the update folded
into ``W`` (``fuse_lora``) or taken out again (``unfuse_lora``).

**DreamBooth** (Ruiz et al., 2022) names the concept with a rare token and its class
(``"a red sks shape ..."``) and, with *prior preservation*, trains on the model's own pictures
of the class (``"a red shape ..."``) at the same time. Without them, the class word drifts towards
the examples. Done with LoRA, as diffusers' ``train_dreambooth_lora.py`` does, what ships stays small.

:func:`save_lora` writes diffusers' own file through ``StableDiffusionPipeline.save_lora_weights``,
into a temporary folder first and then moved into place, so a crash never leaves half a file.
:func:`load_lora` checks that the file fits the pipeline's UNet before diffusers touches it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sdhelpers import checks
from sdhelpers.adapters import ExampleLatents, TeachResult, check_examples, example_loss, noise_scheduler, teach
from sdhelpers.loop import encode_text

LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
"""The attention projections LoRA adapts, as in diffusers' LoRA training scripts."""

LORA_FILE = "pytorch_lora_weights.safetensors"
"""The name ``save_lora_weights`` writes and ``load_lora_weights`` looks for in a folder."""


def add_lora(unet: Any, rank: int = 4, alpha: float | None = None,
             targets: Sequence[str] = LORA_TARGETS) -> list[torch.nn.Parameter]:
    """Freeze ``unet`` and add rank-``rank`` adapters to its attention; return the trainable parameters.

    ``alpha`` defaults to ``rank`` (scale 1). ``B`` starts at zero, so the UNet is unchanged until
    training moves it.
    """
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank: {rank!r} is not allowed; use a positive integer such as 4")
    alpha = float(rank) if alpha is None else checks.positive_number(alpha, "alpha", example="4")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=list(targets)))
    parameters = [p for p in unet.parameters() if p.requires_grad]
    for p in parameters:  # adapters train in fp32 even when the UNet runs in fp16
        p.data = p.data.float()
    return parameters


def lora_parameter_count(unet: Any, rank: int, targets: Sequence[str] = LORA_TARGETS) -> int:
    """The numbers rank-``rank`` LoRA on ``targets`` adds, counted from shapes alone.

    ``r · (in + out)`` for a linear layer, ``r · (in · k · k + out)`` for a k×k convolution, on
    every module whose name is a target or ends with ``"." + target`` (peft's rule). Works on a
    UNet built on the meta device, so it sizes SD 1.5's adapters without its weights.
    """
    total = 0
    for name, module in unet.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(module, torch.nn.Linear):
            total += rank * (module.in_features + module.out_features)
        elif isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += rank * (module.in_channels * k + module.out_channels)
    return total


def train_lora(pipe: Any, images: Sequence[Image.Image], prompts: Sequence[str], *, rank: int = 4,
               steps: int = 400, learning_rate: float = 1e-3, seed: int = 0,
               prior_images: Sequence[Image.Image] = (), prior_prompts: Sequence[str] = (),
               prior_weight: float = 1.0, targets: Sequence[str] = LORA_TARGETS,
               method: str = "LoRA") -> TeachResult:
    """Train LoRA adapters on ``pipe.unet`` from ``images`` and ``prompts``; ``pipe`` keeps them.

    With ``prior_images`` (and their ``prior_prompts``), each step adds ``prior_weight`` × the same
    loss on as many of them as there are examples, drawn afresh: DreamBooth's prior preservation.
    """
    images, prompts = check_examples(images, prompts)
    prior = bool(prior_images)
    if prior:
        prior_images, prior_prompts = check_examples(prior_images, prior_prompts, "prior_images")
    parameters = add_lora(pipe.unet, rank, targets=targets)
    scheduler = noise_scheduler(pipe)
    examples = ExampleLatents(pipe.vae, images)
    embeddings = encode_text(pipe.text_encoder, pipe.tokenizer, prompts)
    if prior:
        prior_latents = ExampleLatents(pipe.vae, prior_images)
        prior_embeddings = encode_text(pipe.text_encoder, pipe.tokenizer, prior_prompts)
        weight = checks.positive_number(prior_weight, "prior_weight", example="1.0")

    def loss(generator: torch.Generator) -> torch.Tensor:
        value = example_loss(pipe.unet, scheduler, examples, embeddings, generator)
        if prior:
            index = torch.randperm(len(prior_latents), generator=generator)[: len(examples)]
            value = value + weight * example_loss(pipe.unet, scheduler, prior_latents, prior_embeddings,
                                                  generator, index.to(prior_latents.mean.device))
        return value

    return teach(method, pipe.unet, parameters, loss, steps=steps, learning_rate=learning_rate, seed=seed)


def class_images(pipe: Any, prompts: Sequence[str], *, seed: int = 10_000, **generate_kwargs: Any) -> list[Image.Image]:
    """DreamBooth's prior: the model's own pictures of the class, before any fine-tuning."""
    from sdhelpers.evaluate import generate

    return generate(pipe, prompts, seed=seed, **generate_kwargs)


def save_lora(pipe: Any, folder: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
    """Write the UNet's adapters as diffusers' ``pytorch_lora_weights.safetensors`` in ``folder``.

    Stored in ``dtype``, half precision by default, as the Hub's LoRA files usually are: half
    the bytes, and ``load_lora_weights`` casts them to the pipeline's dtype.
    """
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    if not getattr(pipe.unet, "peft_config", None):
        raise ValueError("pipe: its UNet has no LoRA adapters; train some with train_lora first")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".lora-") as scratch:
        layers = {k: v.to(dtype) for k, v in get_peft_model_state_dict(pipe.unet).items()}
        StableDiffusionPipeline.save_lora_weights(scratch, unet_lora_layers=layers, safe_serialization=True)
        os.replace(Path(scratch) / LORA_FILE, folder / LORA_FILE)
    return folder / LORA_FILE


def _in_out(layer: Any) -> tuple[int, int] | None:
    if isinstance(layer, torch.nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, torch.nn.Conv2d):
        return layer.in_channels, layer.out_channels
    return None


def check_lora_file(unet: Any, path: str | os.PathLike) -> Path:
    """Refuse a LoRA file made for another UNet: every adapted layer must exist and fit in shape."""
    from safetensors import safe_open

    path = Path(path)
    file = path / LORA_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"path: {str(path)!r} holds no {LORA_FILE}")
    modules = dict(unet.named_modules())
    with safe_open(str(file), framework="pt") as handle:
        for key in handle.keys():
            name, _, part = key.removeprefix("unet.").rpartition(".lora_")
            sizes, shape = _in_out(modules.get(name)), handle.get_slice(key).get_shape()
            fits = sizes is not None and (shape[1] == sizes[0] if part.startswith("A") else shape[0] == sizes[1])
            if not fits:
                raise ValueError(
                    f"path: {str(path)!r} is a LoRA for another architecture: its {key} {tuple(shape)} "
                    "does not fit this pipeline's UNet"
                )
    return file


def load_lora(pipe: Any, path: str | os.PathLike, adapter_name: str | None = None) -> None:
    """``pipe.load_lora_weights``, after :func:`check_lora_file` has made sure the file fits."""
    from sdhelpers.libraries import quiet_libraries

    file = check_lora_file(pipe.unet, path)
    with quiet_libraries():  # diffusers notes that the file has no text-encoder part
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=adapter_name)

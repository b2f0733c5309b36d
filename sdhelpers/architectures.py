"""Stable Diffusion's architectures and TinySD's, built from their configs (:mod:`sdhelpers.configs`) without weights.

Why a module of its own: every chapter that shows a real model's size or shape, the benchmark that
times SD 1.5's architecture with random weights, and the trainer that builds TinySD's networks all
need the same configs and one way to turn a config into networks. :func:`build_networks` is that
way: under ``torch.device(device)``, so ``"meta"`` gives every parameter a shape and no memory
(even SDXL's 2.6B-parameter UNet builds in seconds, offline), and a real device gives random
weights of the real model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sdhelpers import checks
from sdhelpers.configs import (  # re-exported: callers read the configs from here too
    SD15_INPAINT_UNET_CONFIG,
    SD15_SCHEDULER_CONFIG,
    SD15_TEXT_ENCODER_CONFIG,
    SD15_UNET_CONFIG,
    SD15_VAE_CONFIG,
    SD21_TEXT_ENCODER_CONFIG,
    SD21_UNET_CONFIG,
    SD21_VAE_CONFIG,
    SDXL_TEXT_ENCODER_2_CONFIG,
    SDXL_TEXT_ENCODER_CONFIG,
    SDXL_UNET_CONFIG,
    SDXL_VAE_CONFIG,
    TINYSD_IMAGE_TOWER_CONFIG,
    TINYSD_TEXT_CONFIG,
    TINYSD_UNET_CONFIG,
    TINYSD_VAE_CONFIG,
)
from sdhelpers.libraries import quiet_libraries

__all__ = [
    "SD15_INPAINT_UNET_CONFIG",
    "SD15_SCHEDULER_CONFIG",
    "SD15_TEXT_ENCODER_CONFIG",
    "SD15_UNET_CONFIG",
    "SD15_VAE_CONFIG",
    "SD21_TEXT_ENCODER_CONFIG",
    "SD21_UNET_CONFIG",
    "SD21_VAE_CONFIG",
    "SDXL_TEXT_ENCODER_2_CONFIG",
    "SDXL_TEXT_ENCODER_CONFIG",
    "SDXL_UNET_CONFIG",
    "SDXL_VAE_CONFIG",
    "TINYSD_IMAGE_TOWER_CONFIG",
    "TINYSD_TEXT_CONFIG",
    "TINYSD_UNET_CONFIG",
    "TINYSD_VAE_CONFIG",
    "FAMILIES", "NETWORK_CONFIGS", "PREDICTION_TYPES", "Architecture", "architecture_sizes", "build_networks",
    "build_text_encoder", "build_unet", "build_vae", "count_parameters", "family_architecture", "sd15_architecture",
]

FAMILIES = ("sd15", "sd21", "sdxl")
"""The model families whose architectures :func:`family_architecture` builds: SD 1.5, SD 2.1 (768-v), SDXL base 1.0."""

# What each family's UNet is trained to predict (the scheduler's ``prediction_type``).
PREDICTION_TYPES = {"sd15": "epsilon", "sd21": "v_prediction", "sdxl": "epsilon"}

NETWORK_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "sd15": {"unet": SD15_UNET_CONFIG, "text_encoder": SD15_TEXT_ENCODER_CONFIG, "vae": SD15_VAE_CONFIG},
    "sd15-inpainting": {
        "unet": SD15_INPAINT_UNET_CONFIG, "text_encoder": SD15_TEXT_ENCODER_CONFIG, "vae": SD15_VAE_CONFIG,
    },
    "sd21": {"unet": SD21_UNET_CONFIG, "text_encoder": SD21_TEXT_ENCODER_CONFIG, "vae": SD21_VAE_CONFIG},
    "sdxl": {
        "unet": SDXL_UNET_CONFIG, "text_encoder": SDXL_TEXT_ENCODER_CONFIG,
        "text_encoder_2": SDXL_TEXT_ENCODER_2_CONFIG, "vae": SDXL_VAE_CONFIG,
    },
    "tinysd": {"unet": TINYSD_UNET_CONFIG, "text_encoder": TINYSD_TEXT_CONFIG, "vae": TINYSD_VAE_CONFIG},
}
"""The configs of each network of each model, in pipeline order: what :func:`build_networks` builds."""


# --- building networks from configs ----------------------------------------------------------------


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters; works on the meta device, where no memory is allocated."""
    return sum(p.numel() for p in module.parameters())


def build_unet(config: dict[str, Any]):
    """An untrained ``UNet2DConditionModel`` with ``config``."""
    from diffusers import UNet2DConditionModel

    with quiet_libraries():
        return UNet2DConditionModel(**config)


def build_vae(config: dict[str, Any]):
    """An untrained ``AutoencoderKL`` with ``config``."""
    from diffusers import AutoencoderKL

    with quiet_libraries():
        return AutoencoderKL(**config)


def build_text_encoder(config: dict[str, Any], with_projection: bool = False):
    """An untrained ``CLIPTextModel`` (or ``CLIPTextModelWithProjection``) with ``config``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with quiet_libraries():
        return model_class(CLIPTextConfig(**config))


def build_networks(model: str, device: str | torch.device = "meta") -> dict[str, torch.nn.Module]:
    """The networks of ``model`` (a key of :data:`NETWORK_CONFIGS`), built on ``device``.

    Keys in pipeline order: ``"unet"``, ``"text_encoder"``, ``"text_encoder_2"`` (SDXL only),
    ``"vae"``. On ``"meta"`` nothing is allocated and a forward pass on meta tensors checks shapes
    without computing anything; on a real device the weights are random (seed torch first).
    """
    configs = NETWORK_CONFIGS[checks.choice(model, tuple(NETWORK_CONFIGS), "model")]
    builders = {
        "unet": build_unet, "vae": build_vae, "text_encoder": build_text_encoder,
        "text_encoder_2": lambda config: build_text_encoder(config, with_projection=True),
    }
    with torch.device(device):
        return {name: builders[name](config) for name, config in configs.items()}


@dataclass
class Architecture:
    """The three networks of a Stable Diffusion 1.x model, built without weights on the meta device."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    vae: torch.nn.Module

    def parameter_counts(self) -> dict[str, int]:
        return {name: count_parameters(getattr(self, name)) for name in ("unet", "text_encoder", "vae")}


def sd15_architecture(inpainting: bool = False) -> Architecture:
    """SD 1.5's UNet, VAE and text encoder from their configs, on the meta device: no weights, no download.

    Sizes, block lists and shapes of the real model can be inspected on a machine that can't
    fetch 5 GB. ``inpainting=True`` gives the inpainting model's 9-channel UNet.
    """
    return Architecture(**build_networks("sd15-inpainting" if inpainting else "sd15"))


def family_architecture(family: str) -> dict[str, torch.nn.Module]:
    """The networks of SD 1.5 (``"sd15"``), SD 2.1 (``"sd21"``) or SDXL (``"sdxl"``) on the meta device.

    Keys, in pipeline order: ``"unet"``, ``"text_encoder"``, ``"text_encoder_2"`` (SDXL only) and
    ``"vae"``.
    """
    return build_networks(checks.choice(family, FAMILIES, "family"))


def architecture_sizes(family: str) -> dict[str, int]:
    """Parameter count of each network of ``family`` (see :func:`family_architecture`), without weights."""
    return {name: count_parameters(module) for name, module in family_architecture(family).items()}

"""The model registry, the offline CLIP tokenizer, ``load_pipeline`` and SD 1.5's architecture.

The source text loads everything from ``runwayml/stable-diffusion-v1-5``, a repository deleted in
2024. The book names every real model once, here, with its current mirror, so a chapter never
hard-codes a hub id. ``load_pipeline()`` with no model gives the book's own small model, TinySD,
shipped inside this package; with a registry name, a hub id or a local folder it loads that
model the same way, so the chapters run unchanged on real SD 1.5 with a GPU.
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from sdhelpers.device import get_device, get_dtype

PACKAGE_DIR = Path(__file__).resolve().parent
TOKENIZER_DIR = PACKAGE_DIR / "tokenizer"
TINYSD_DIR = PACKAGE_DIR / "tinysd"
TINYSD_GUIDANCE = 3.0
"""The guidance scale the book uses with TinySD, where SD 1.5's default is 7.5.

Measured (its model card): at 3.0 TinySD draws the asked colour and shape 94% of the time on training
compositions; at 7.5 guidance drives its 8×8×4 latents far outside the range of real images (std
about 1.8 instead of 1) and the decoder answers with the wrong colours. Chapter 5 shows the effect.
"""
TASKS = ("txt2img", "img2img", "inpaint")


class ModelUnavailableError(RuntimeError):
    """A model can't be loaded here (hub unreachable, folder missing): the message says what to do."""


@dataclass(frozen=True)
class ModelEntry:
    """One real model: its hub id, what it is, and where it went if the original was removed."""

    name: str
    repo_id: str
    kind: str  # "pipeline", "vae" or "text_encoder"
    description: str
    download_gb: float
    replaces: str | None = None


REGISTRY: dict[str, ModelEntry] = {
    entry.name: entry
    for entry in (
        ModelEntry(
            "sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "pipeline",
            "Stable Diffusion 1.5 (the source text's model), 512x512", 5.2,
            replaces="runwayml/stable-diffusion-v1-5",
        ),
        ModelEntry(
            "sd15-inpainting", "stable-diffusion-v1-5/stable-diffusion-inpainting", "pipeline",
            "SD 1.5 fine-tuned for inpainting: a 9-channel UNet (latents + mask + masked image)", 5.2,
            replaces="runwayml/stable-diffusion-inpainting",
        ),
        ModelEntry(
            "sd-vae-ft-mse", "stabilityai/sd-vae-ft-mse", "vae",
            "SD's autoencoder with its decoder fine-tuned on an MSE loss (sharper reconstructions)", 0.33,
        ),
        ModelEntry(
            "clip-vit-large-patch14", "openai/clip-vit-large-patch14", "text_encoder",
            "The CLIP model whose text tower is SD 1.x's text encoder", 1.7,
        ),
    )
}
# Ids the source text uses that no longer exist on the hub, mapped to their mirrors.
REMOVED_IDS = {e.replaces: e.repo_id for e in REGISTRY.values() if e.replaces}


def load_tokenizer():
    """The real CLIP tokenizer of SD 1.x, from the files shipped in this package (no download).

    ``model_max_length`` is 77, CLIP's context: prompts are padded with 49407 or truncated to it.
    """
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=77)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers a TCP connection within ``timeout`` seconds.

    Checked before any download so that an offline machine gets one clear error at once, not a
    long retry loop and a stack of hub internals.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_model(model: str | os.PathLike | None) -> tuple[str, ModelEntry | None]:
    """Turn what a reader passes as ``model`` into a local folder or hub id, plus its registry entry."""
    if model is None:
        return str(TINYSD_DIR), None
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model: expected None, a registry name, a hub id or a folder, got {type(model).__name__}")
    text = os.fspath(model)
    if text in REGISTRY:
        return REGISTRY[text].repo_id, REGISTRY[text]
    if text in REMOVED_IDS:
        mirror = REMOVED_IDS[text]
        warnings.warn(f"model: {text!r} was deleted from the hub in 2024; using its mirror {mirror!r}", stacklevel=3)
        text = mirror
    if Path(text).expanduser().is_dir():
        return str(Path(text).expanduser()), None
    entry = next((e for e in REGISTRY.values() if e.repo_id == text), None)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        names = ", ".join(REGISTRY)
        raise ValueError(f"model: {text!r} is not a registry name ({names}), a hub id 'owner/name' or an existing folder")
    return text, entry


def _offline_message(repo_id: str, entry: ModelEntry | None) -> str:
    mirror = f" (mirror of the deleted {entry.replaces})" if entry and entry.replaces else ""
    return (
        f"model: {repo_id!r}{mirror} can't be downloaded because the Hugging Face Hub is not reachable "
        f"from this machine (offline). On a connected machine run `hf download {repo_id} --local-dir DIR`, "
        f"then pass that folder: load_pipeline('DIR'). With no argument, load_pipeline() uses the shipped TinySD."
    )


def _pipeline_class(task: str):
    from diffusers import (
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
    )

    classes = {
        "txt2img": StableDiffusionPipeline,
        "img2img": StableDiffusionImg2ImgPipeline,
        "inpaint": StableDiffusionInpaintPipeline,
    }
    if task not in classes:
        raise ValueError(f"task: {task!r} is not allowed; use one of {', '.join(TASKS)}")
    return classes[task]


def load_pipeline(
    model: str | os.PathLike | None = None,
    task: str = "txt2img",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **kwargs,
):
    """Load a Stable Diffusion pipeline for ``task`` on the best device, in the matching dtype.

    - ``model=None``: TinySD, the book's small model shipped in this package (runs on any CPU).
    - a registry name (``"sd15"``, ``"sd15-inpainting"``), a hub id, or a local folder.

    ``device`` and ``dtype`` default to :func:`sdhelpers.device.get_device` / ``get_dtype``.
    Extra keyword arguments go to diffusers' ``from_pretrained``.
    """
    with quiet_libraries():  # importing the pipelines makes transformers warn about torchvision
        cls = _pipeline_class(task)
    source, entry = resolve_model(model)
    if entry is not None and entry.kind != "pipeline":
        raise ValueError(f"model: {model!r} is a {entry.kind}, not a pipeline; load it with its own class")
    device = get_device(device)
    dtype = dtype or get_dtype(device)
    if model is None and not (TINYSD_DIR / "model_index.json").is_file():
        raise ModelUnavailableError(
            "model: the embedded TinySD is not in this installation (sdhelpers/tinysd/ is missing); "
            "rebuild it with `python -m sdhelpers.train all --out sdhelpers/tinysd` or pass a model folder"
        )
    is_local = Path(source).is_dir()
    if not is_local:
        _check_hub_id(source, entry)
    with quiet_libraries():
        pipe = cls.from_pretrained(source, dtype=dtype, local_files_only=is_local, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _check_hub_id(repo_id: str, entry: ModelEntry | None) -> None:
    """Fail fast with one clear line when a hub id is neither cached nor downloadable."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "model_index.json")
    if isinstance(cached, str):
        return
    if not hub_reachable():
        raise ModelUnavailableError(_offline_message(repo_id, entry))


class quiet_libraries:
    """Silence the import-time and load-time chatter of transformers and diffusers.

    Their warnings (a missing optional torchvision) and progress bars ("Loading weights") are noise in a
    chapter and, worse, they make the notebooks' stored outputs depend on the installed extras. Both
    libraries are imported first, because importing them resets their loggers' levels.
    """

    def __enter__(self):
        import diffusers.utils.logging as diffusers_logging
        import transformers.utils.logging as transformers_logging

        self._libraries = (diffusers_logging, transformers_logging)
        self._levels = [lib.get_verbosity() for lib in self._libraries]
        self._bars = [lib.is_progress_bar_enabled() for lib in self._libraries]
        for lib in self._libraries:
            lib.set_verbosity_error()
            lib.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        for lib, level, bars in zip(self._libraries, self._levels, self._bars):
            lib.set_verbosity(level)
            if bars:
                lib.enable_progress_bar()


def assemble_pipeline(vae, text_encoder, unet):
    """A ``StableDiffusionPipeline`` from three networks, the real CLIP tokenizer and SD 1.5's PNDM sampler.

    No safety checker: the book's models (TinySD, random-weight SD 1.5 for benchmarks) have none.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    with quiet_libraries():
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=load_tokenizer(), unet=unet,
            scheduler=PNDMScheduler(**SD15_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- SD 1.5's architecture, from its published configs (no weights needed) -----------------------

SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
}
# The dedicated inpainting UNet: 4 noisy-latent + 1 mask + 4 masked-image-latent input channels.
SD15_INPAINT_UNET_CONFIG = {**SD15_UNET_CONFIG, "in_channels": 9}

SD15_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

SD15_TEXT_ENCODER_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    # SD 1.5's text_encoder/config.json really says 0/2/1 here (a quirk of the original export):
    # with eos_token_id == 2, CLIPTextModel pools at the highest token id, i.e. the first 49407.
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

SD15_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "skip_prk_steps": True,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "trained_betas": None,
}


@dataclass
class Architecture:
    """The three networks of a Stable Diffusion model, built without weights on the meta device."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module

    def parameter_counts(self) -> dict[str, int]:
        return {name: count_parameters(getattr(self, name)) for name in ("unet", "text_encoder", "vae")}


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters; works on the meta device, where no memory is allocated."""
    return sum(p.numel() for p in module.parameters())


def sd15_architecture(inpainting: bool = False) -> Architecture:
    """SD 1.5's UNet, VAE and text encoder from their configs, on the meta device: no weights, no download.

    Sizes, block lists and shapes of the real model can be inspected (and benchmarks can
    materialise random weights) on a machine that can't fetch 5 GB.
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_config = SD15_INPAINT_UNET_CONFIG if inpainting else SD15_UNET_CONFIG
    with init_empty_weights(), quiet_libraries():
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG))
    return Architecture(unet=unet, vae=vae, text_encoder=text_encoder)


# --- SD 2.1 and SDXL: what came after SD 1.5, from their published configs -----------------------
# The fields that shape the networks, transcribed from the diffusers-format config.json files of
# stabilityai/stable-diffusion-2-1 (unet/, text_encoder/, vae/) and
# stabilityai/stable-diffusion-xl-base-1.0 (unet/, text_encoder/, text_encoder_2/, vae/). Token ids,
# dropout and initialisation settings, which change no parameter, are left out. The parameter counts
# these give are those of the published weights (asserted in tests/test_models.py).

SD21_UNET_CONFIG = {
    **SD15_UNET_CONFIG,
    "sample_size": 96,  # 768 px / 8: SD 2.1 (768-v) is trained at 768x768
    "cross_attention_dim": 1024,  # the width of its OpenCLIP ViT-H text encoder
    # diffusers' historical name: these are numbers of heads per block, each head 64 wide
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,  # the transformer blocks' proj_in/proj_out are Linear, not 1x1 Conv
    "upcast_attention": True,  # attention scores in fp32, against fp16 overflow
}

SD21_VAE_CONFIG = {**SD15_VAE_CONFIG, "sample_size": 768}

# OpenCLIP ViT-H/14's text tower less its last layer: SD 2.x conditions on the penultimate layer's
# output, so the exported text encoder keeps 23 of the 24 layers.
SD21_TEXT_ENCODER_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 512,
}

SDXL_UNET_CONFIG = {
    "sample_size": 128,  # 1024 px / 8
    "in_channels": 4,
    "out_channels": 4,
    # three levels instead of four, no attention at the highest resolution
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),  # most of the 2.6B parameters sit in the 10-deep level
    "attention_head_dim": (5, 10, 20),  # numbers of heads again, 64 wide each
    "cross_attention_dim": 2048,  # 768 (CLIP ViT-L) + 1280 (OpenCLIP ViT-bigG), concatenated
    "use_linear_projection": True,
    # micro-conditioning: the pooled bigG text embedding (1280) and six size/crop numbers, each
    # embedded in 256 sinusoidal features (6 x 256 = 1536), are added to the timestep embedding
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 + 6 x 256
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
}

# SDXL's VAE has SD's architecture, retrained: a different latent scale, and fp32 decoding advised.
SDXL_VAE_CONFIG = {**SD15_VAE_CONFIG, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

# text_encoder: the same CLIP ViT-L/14 text tower as SD 1.x (CLIPTextModel).
SDXL_TEXT_ENCODER_CONFIG = {
    k: v for k, v in SD15_TEXT_ENCODER_CONFIG.items() if k not in ("bos_token_id", "eos_token_id", "pad_token_id")
}

# text_encoder_2: OpenCLIP ViT-bigG/14's text tower with its projection (CLIPTextModelWithProjection):
# its pooled, projected 1280-d embedding is the "text_embeds" of the micro-conditioning.
SDXL_TEXT_ENCODER_2_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 1280,
}

FAMILIES = ("sd15", "sd21", "sdxl")
"""The model families whose architectures :func:`family_architecture` builds: SD 1.5, SD 2.1 (768-v), SDXL base 1.0."""

# What each family's UNet is trained to predict (the scheduler's ``prediction_type``).
PREDICTION_TYPES = {"sd15": "epsilon", "sd21": "v_prediction", "sdxl": "epsilon"}


def _check_family(family: object) -> str:
    if family not in FAMILIES:
        raise ValueError(f"family: {family!r} is not allowed; use one of {', '.join(FAMILIES)}")
    return family


def family_architecture(family: str) -> dict[str, torch.nn.Module]:
    """The networks of SD 1.5 (``"sd15"``), SD 2.1 (``"sd21"``) or SDXL (``"sdxl"``) on the meta device.

    Keys, in pipeline order: ``"unet"``, ``"text_encoder"``, ``"text_encoder_2"`` (SDXL only) and
    ``"vae"``. Built inside ``torch.device("meta")``: every parameter and buffer has a shape and no
    memory, so even SDXL's 2.6B-parameter UNet builds in seconds, offline, and a forward pass on
    meta tensors checks shapes without computing anything.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    _check_family(family)
    configs = {
        "sd15": (SD15_UNET_CONFIG, SD15_TEXT_ENCODER_CONFIG, None, SD15_VAE_CONFIG),
        "sd21": (SD21_UNET_CONFIG, SD21_TEXT_ENCODER_CONFIG, None, SD21_VAE_CONFIG),
        "sdxl": (SDXL_UNET_CONFIG, SDXL_TEXT_ENCODER_CONFIG, SDXL_TEXT_ENCODER_2_CONFIG, SDXL_VAE_CONFIG),
    }
    unet_config, text_config, text_2_config, vae_config = configs[family]
    with torch.device("meta"), quiet_libraries():
        networks = {"unet": UNet2DConditionModel(**unet_config)}
        networks["text_encoder"] = CLIPTextModel(CLIPTextConfig(**text_config))
        if text_2_config is not None:
            networks["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**text_2_config))
        networks["vae"] = AutoencoderKL(**vae_config)
    return networks


def architecture_sizes(family: str) -> dict[str, int]:
    """Parameter count of each network of ``family`` (see :func:`family_architecture`), without weights."""
    return {name: count_parameters(module) for name, module in family_architecture(family).items()}

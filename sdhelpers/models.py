"""The model registry, the offline CLIP tokenizer and ``load_pipeline``.

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

from sdhelpers.architectures import SD15_SCHEDULER_CONFIG
from sdhelpers.device import get_device, get_dtype
from sdhelpers.libraries import quiet_libraries

PACKAGE_DIR = Path(__file__).resolve().parent
TINYSD_DIR = PACKAGE_DIR / "tinysd"
TOKENIZER_DIR = TINYSD_DIR / "tokenizer"
"""The CLIP tokenizer's one copy: TinySD's own, which SD 1.5 shares (49,408 tokens, 77 positions)."""
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
            "SD's autoencoder with its decoder fine-tuned, loss MSE + 0.1 LPIPS (closer reconstructions)", 0.33,
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


def tokenize(tokenizer, texts) -> "torch.Tensor":
    """Token ids ``(len(texts), 77)``: each text padded with end-of-text tokens or truncated, as SD does."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


class TokenCache:
    """:func:`tokenize`, computed once per distinct text: the slow Python BPE runs only for new strings.

    Training draws the shapes world's 75 captions again and again; caching their ids saves most of a
    text step's time.
    """

    def __init__(self, tokenizer=None) -> None:
        self.tokenizer = tokenizer or load_tokenizer()
        self.ids: dict[str, torch.Tensor] = {}

    def __call__(self, texts) -> torch.Tensor:
        new = [text for text in dict.fromkeys(texts) if text not in self.ids]
        if new:
            self.ids.update(zip(new, tokenize(self.tokenizer, new)))
        return torch.stack([self.ids[text] for text in texts])


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


def assemble_pipeline(vae, text_encoder, unet):
    """A ``StableDiffusionPipeline`` from three networks, the real CLIP tokenizer and SD 1.5's PNDM sampler.

    No safety checker: the book's models (TinySD, random-weight SD 1.5 for benchmarks) have none.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    with quiet_libraries():
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=load_tokenizer(), unet=unet,
            scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe

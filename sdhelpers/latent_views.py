"""Looking at latents without the decoder: one tile per channel, and SD 1.x's RGB preview."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch

from sdhelpers import checks
from sdhelpers.pixels import Image, tensor_to_pil

def _single_latent(latents: torch.Tensor | np.ndarray, name: str = "latents") -> torch.Tensor:
    if isinstance(latents, np.ndarray):
        latents = torch.from_numpy(latents)
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(latents).__name__}")
    if latents.dim() == 4 and latents.shape[0] == 1:
        latents = latents[0]
    if latents.dim() != 3:
        raise ValueError(
            f"{name}: expected one latent of shape (C, h, w) or (1, C, h, w), got {tuple(latents.shape)}; "
            "pass latents[i] to view one image of a batch"
        )
    latents = latents.detach().to("cpu", torch.float32)
    if not torch.isfinite(latents).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return latents


def latent_channels_image(latents: torch.Tensor | np.ndarray, scale: int = 8) -> Image:
    """Show each latent channel as a grayscale tile, side by side, enlarged ``scale`` times.

    A latent is 8x smaller than the image and has 4 channels (any count is accepted
    here), which is not something an eye can read directly. Each channel is
    normalised on its own by min-max, ``round(255 * (x - min) / (max - min))``, so
    each tile uses the full gray range (brightness is therefore *not* comparable
    between tiles); a constant channel has no contrast and shows mid-gray 128.
    Tiles are enlarged with NEAREST so every latent value stays a visible square.
    Returns an ``"L"`` image of size ``(C * w * scale, h * scale)``.
    """
    channels = _single_latent(latents)
    scale = checks.positive_int(scale, "scale")
    low = channels.amin(dim=(1, 2), keepdim=True)
    span = channels.amax(dim=(1, 2), keepdim=True) - low
    normalised = torch.where(span > 0, (channels - low) / span.clamp_min(1e-30), torch.full_like(channels, 128 / 255))
    tiles = (normalised * 255).round().to(torch.uint8)
    strip = torch.cat(list(tiles), dim=1).numpy()  # (h, C*w)
    image = PIL.Image.fromarray(np.ascontiguousarray(strip))
    return image.resize((image.width * scale, image.height * scale), PIL.Image.Resampling.NEAREST)


#: Latent -> RGB linear factors for Stable Diffusion 1.x only: a least-squares fit
#: published by the community (also used for "cheap" previews in popular UIs).
#: Row ``c`` holds channel ``c``'s contribution to (R, G, B).
SD15_LATENT_RGB_FACTORS: tuple[tuple[float, float, float], ...] = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)


def latents_to_rgb_preview(latents: torch.Tensor | np.ndarray, scale: int = 8) -> Image:
    """A rough RGB preview of one SD 1.x latent, without running the VAE decoder.

    Each pixel's colour is a fixed linear mix of its 4 latent values
    (:data:`SD15_LATENT_RGB_FACTORS`), giving roughly [-1, 1], then mapped like a
    VAE output (``(x/2 + 0.5)`` clamped, times 255, rounded). Costs nothing, so it
    suits live previews during sampling; colours are approximate and there is no
    fine detail. The factors are only an approximation fitted for **SD 1.x's VAE**
    on latents as the UNet sees them (already multiplied by the scaling factor
    0.18215); for other VAEs (SDXL, SD3...) the colours will be wrong. Enlarged
    ``scale`` times with NEAREST (8 gives the decoded image's size).
    """
    channels = _single_latent(latents)
    if channels.shape[0] != 4:
        raise ValueError(f"latents: the SD 1.x preview needs 4 channels, got {channels.shape[0]}")
    scale = checks.positive_int(scale, "scale")
    factors = torch.tensor(SD15_LATENT_RGB_FACTORS, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->rhw", channels, factors)
    image = tensor_to_pil(rgb)[0]
    return image.resize((image.width * scale, image.height * scale), PIL.Image.Resampling.NEAREST)

"""Pixels in and out of Stable Diffusion: Pillow images and [-1, 1] tensors.

Stable Diffusion's VAE reads and writes images as float tensors in [-1, 1] with
shape (B, 3, H, W); people and files deal in 8-bit RGB Pillow images. This module
is the border crossing between the two, written so that each rule (how a pixel
value maps, how a mode is converted, which resampling filter is used) is stated
once, here, and matches what diffusers does where diffusers has a rule.
:mod:`sdhelpers.images` re-exports everything public here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from PIL import UnidentifiedImageError

from sdhelpers import checks

Image = PIL.Image.Image

# --------------------------------------------------------------------------- modes

_ALPHA_MODES = ("RGBA", "LA", "La", "PA", "RGBa", "P")
_PILLOW_CONVERT_MODES = ("1", "L", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
_WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")

#: Every mode :func:`to_rgb` knows how to turn into RGB (all of Pillow's modes).
SUPPORTED_MODES: tuple[str, ...] = tuple(
    sorted(("RGB",) + _ALPHA_MODES + _PILLOW_CONVERT_MODES + _WIDE_GRAY_MODES)
)

_I16_MAX = 65535


def _check_background(background: object) -> tuple[int, int, int]:
    ok = (
        isinstance(background, (tuple, list))
        and len(background) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in background)
    )
    if not ok:
        raise ValueError(
            f"background: expected 3 integers in [0, 255] (an RGB colour), got {background!r}"
        )
    return tuple(background)  # type: ignore[return-value]


def _wide_gray_to_uint8(image: Image) -> np.ndarray:
    """Map a 16/32-bit grayscale image to uint8 by the full range of its type.

    Pillow's own ``convert("L")`` clips these modes at 255, so a 16-bit PNG turns
    almost entirely white; scaling by the type's range keeps the picture.
    """
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        values = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * 255.0
    else:  # I;16* and I: the 16-bit range, 65535 -> 255 (I is clipped to it first)
        values = np.clip(values, 0, _I16_MAX) / 257.0
    return np.round(values).astype(np.uint8)


def _composite(image: Image, background: tuple[int, int, int]) -> Image:
    rgba = image.convert("LA").convert("RGBA") if image.mode == "La" else image.convert("RGBA")
    canvas = PIL.Image.new("RGBA", rgba.size, (*background, 255))
    return PIL.Image.alpha_composite(canvas, rgba).convert("RGB")


def to_rgb(image: Image, *, background: tuple[int, int, int] = (255, 255, 255)) -> Image:
    """Return an 8-bit RGB copy of ``image``, whatever its mode.

    The VAE only reads 3 channels of 8-bit colour, and Pillow's ``convert("RGB")``
    silently does the wrong thing for some modes (it drops alpha, which reveals
    whatever colour hides under transparent pixels, and clips 16-bit values at
    255). The rule, mode by mode:

    * ``RGB``: returned unchanged (a copy, so editing the result never touches
      the caller's image).
    * ``RGBA``, ``LA``, ``La``, ``PA``, ``RGBa`` and ``P``: alpha-composited over
      ``background`` (``out = a*pixel + (1-a)*background``, rounded), so fully
      transparent pixels become ``background``. ``P`` goes through RGBA, which
      applies a palette's transparency if it has one and changes nothing if not.
    * ``1``, ``L``, ``RGBX``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's
      ``convert("RGB")`` (``1`` gives 0/255; CMYK uses Pillow's naive formula,
      ignoring any ICC profile). A single transparent colour key on an ``L``
      image (rare PNG ``tRNS``) is ignored.
    * ``I;16`` (and ``I;16B``, ``I;16L``, ``I;16N``): ``round(value / 257)``, so
      0..65535 maps onto 0..255; gray replicated to 3 channels.
    * ``I`` (32-bit signed): treated as 16-bit data, which is what it holds when
      Pillow reads 16-bit PNG/TIFF files: clipped to [0, 65535], then as ``I;16``.
    * ``F`` (32-bit float): treated as intensities in [0, 1]: clipped to [0, 1]
      (NaN -> 0), ``round(value * 255)``.

    Raises TypeError if ``image`` is not a PIL image, ValueError for a mode not in
    :data:`SUPPORTED_MODES`.
    """
    checks.pil_image(image, "image")
    background = _check_background(background)
    mode = image.mode
    if mode not in SUPPORTED_MODES:
        raise ValueError(
            f"image: mode {mode!r} can't be converted to RGB; allowed modes: {', '.join(SUPPORTED_MODES)}"
        )
    try:
        if mode == "RGB":
            return image.copy()
        if mode in _ALPHA_MODES:
            return _composite(image, background)
        if mode in _WIDE_GRAY_MODES:
            gray = _wide_gray_to_uint8(image)
            return PIL.Image.fromarray(np.ascontiguousarray(np.stack([gray] * 3, axis=-1)))
        return image.convert("RGB")
    except (ValueError, OSError) as error:  # never let a Pillow internal error escape unexplained
        raise ValueError(f"image: Pillow could not convert mode {mode!r} to RGB ({error})") from error


# --------------------------------------------------------------------------- loading


def load_image(source: str | Path | Image, *, name: str = "image") -> Image:
    """Load ``source`` (a file path or a PIL image) as an 8-bit RGB PIL image.

    ``diffusers.utils.load_image`` does the loading: the EXIF orientation is applied, so
    a phone photo stands the way it is displayed. Local files only (no URLs), and every
    mode goes through :func:`to_rgb` (alpha over white, 16-bit scaled). ``name`` is
    the argument name used in error messages, so a notebook's ``load_image(path,
    name="init_image")`` reports errors about ``init_image``. Errors are one line:
    a missing file, a directory or a file Pillow can't decode raise ValueError.
    """
    from diffusers.utils import load_image as diffusers_load_image

    if isinstance(source, Image):
        return diffusers_load_image(source, convert_method=to_rgb)
    if not isinstance(source, (str, Path)):
        raise TypeError(f"{name}: expected a file path (str or Path) or a PIL image, got {type(source).__name__}")
    path = Path(source)
    shown = repr(str(source))
    if not path.exists():
        raise ValueError(f"{name}: {shown} does not exist")
    if path.is_dir():
        raise ValueError(f"{name}: {shown} is a directory, not an image file")
    try:
        return diffusers_load_image(str(path), convert_method=to_rgb)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{name}: {shown} is not an image file Pillow can read") from error


# --------------------------------------------------------------------------- tensors


def pil_to_tensor(images: Image | Sequence[Image]) -> torch.Tensor:
    """Turn one PIL image or a list of them into a (B, 3, H, W) float32 tensor in [-1, 1].

    This is the VAE's input format, computed exactly like diffusers'
    ``VaeImageProcessor.preprocess`` (``uint8 / 255`` then ``2x - 1``, in float32)
    but without its resizing: the image keeps its size, so what you see is what the
    VAE gets. Non-RGB images go through :func:`to_rgb`. A batch needs one size,
    since a tensor can't hold ragged images: a mismatch is a ValueError.
    """
    batch = [images] if isinstance(images, Image) else images
    if not isinstance(batch, Sequence) or isinstance(batch, str) or len(batch) == 0:
        raise ValueError(f"images: expected a PIL image or a non-empty list of them, got {images!r:.80}")
    for index, image in enumerate(batch):
        checks.pil_image(image, f"images[{index}]")
    size = batch[0].size
    for index, image in enumerate(batch):
        if image.size != size:
            raise ValueError(
                f"images: all images of a batch must share a size; images[0] is {size[0]}x{size[1]}, "
                f"images[{index}] is {image.size[0]}x{image.size[1]} (width x height)"
            )
    arrays = np.stack([np.asarray(to_rgb(image)).astype(np.float32) / 255.0 for image in batch])
    return 2.0 * torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous() - 1.0


def tensor_to_pil(tensor: torch.Tensor) -> list[Image]:
    """Turn a (3, H, W) or (B, 3, H, W) tensor in [-1, 1] into a list of RGB PIL images.

    The rule is diffusers' ``VaeImageProcessor.postprocess``: ``(x/2 + 0.5)`` clamped
    to [0, 1], times 255, rounded to the nearest integer; values outside [-1, 1]
    (the VAE overshoots a little) are clamped. Half-precision inputs are computed
    in float32. A NaN raises ValueError instead of becoming an arbitrary (usually
    black) pixel: NaNs mean something upstream overflowed, often an fp16 VAE.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor: expected a torch.Tensor, got {type(tensor).__name__}")
    batch = tensor.unsqueeze(0) if tensor.dim() == 3 else tensor
    if batch.dim() != 4 or batch.shape[1] != 3:
        raise ValueError(f"tensor: expected shape (3, H, W) or (B, 3, H, W), got {tuple(tensor.shape)}")
    values = batch.detach().to("cpu", torch.float32)
    if torch.isnan(values).any():
        raise ValueError("tensor: contains NaN values (often an fp16 overflow in the VAE); can't make an image")
    values = (values / 2 + 0.5).clamp(0, 1)
    arrays = (values.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [PIL.Image.fromarray(array) for array in arrays]

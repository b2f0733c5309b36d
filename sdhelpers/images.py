"""Images in and out of Stable Diffusion: conversions, grids, latent viewers, masks, metrics.

Stable Diffusion's VAE reads and writes images as float tensors in [-1, 1] with
shape (B, 3, H, W); people and files deal in 8-bit RGB Pillow images. This module
is the border crossing between the two, written so that each rule (how a pixel
value maps, how a mode is converted, which resampling filter is used) is stated
once, here, and matches what diffusers does where diffusers has a rule.

Conventions used throughout:

* sizes are ``(width, height)`` and boxes ``(left, top, right, bottom)`` with
  ``right``/``bottom`` exclusive: Pillow's order, so ``image.crop(box)`` agrees;
* masks are ``"L"`` images where 255 means *repaint* and 0 means *keep*, the
  convention of the diffusers inpainting pipelines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from PIL import ImageDraw, ImageFilter, ImageOps, UnidentifiedImageError
from diffusers.utils import make_image_grid

__all__ = [
    "SUPPORTED_MODES",
    "SD15_LATENT_RGB_FACTORS",
    "pil_to_tensor",
    "tensor_to_pil",
    "to_rgb",
    "load_image",
    "image_grid",
    "latent_channels_image",
    "latents_to_rgb_preview",
    "box_mask",
    "ellipse_mask",
    "binarize_mask",
    "resize_mask",
    "blur_mask",
    "dilate_mask",
    "mask_distance",
    "paste_back",
    "seam_energy",
    "psnr",
    "enlarge",
    "zoom",
    "blob_sketch",
]

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


def _check_image(image: object, name: str) -> Image:
    if not isinstance(image, Image):
        raise TypeError(f"{name}: expected a PIL.Image.Image, got {type(image).__name__}")
    return image


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
    _check_image(image, "image")
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

    Like ``diffusers.utils.load_image`` the EXIF orientation is applied, so a phone
    photo stands the way it is displayed, but local files only (no URLs), and every
    mode goes through :func:`to_rgb` (alpha over white, 16-bit scaled). ``name`` is
    the argument name used in error messages, so a notebook's ``load_image(path,
    name="init_image")`` reports errors about ``init_image``. Errors are one line:
    a missing file, a directory or a file Pillow can't decode raise ValueError.
    """
    if isinstance(source, Image):
        return to_rgb(ImageOps.exif_transpose(source))
    if not isinstance(source, (str, Path)):
        raise TypeError(f"{name}: expected a file path (str or Path) or a PIL image, got {type(source).__name__}")
    path = Path(source)
    shown = repr(str(source))
    if not path.exists():
        raise ValueError(f"{name}: {shown} does not exist")
    if path.is_dir():
        raise ValueError(f"{name}: {shown} is a directory, not an image file")
    try:
        with PIL.Image.open(path) as opened:
            opened.load()
            upright = ImageOps.exif_transpose(opened)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{name}: {shown} is not an image file Pillow can read") from error
    return to_rgb(upright)


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
        _check_image(image, f"images[{index}]")
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


# --------------------------------------------------------------------------- grids


def _positive_int(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


def _grid_shape(count: int, rows: int | None, cols: int | None) -> tuple[int, int]:
    if rows is None and cols is None:
        return 1, count
    if rows is not None and cols is not None:
        rows, cols = _positive_int(rows, "rows"), _positive_int(cols, "cols")
        if rows * cols != count:
            raise ValueError(
                f"rows, cols: a {rows}x{cols} grid has {rows * cols} cells but {count} images were given"
            )
        return rows, cols
    if rows is not None:
        rows = _positive_int(rows, "rows")
        return rows, math.ceil(count / rows)
    cols = _positive_int(cols, "cols")
    return math.ceil(count / cols), cols


def image_grid(images: Sequence[Image], rows: int | None = None, cols: int | None = None) -> Image:
    """Lay images out in a grid, row by row, with ``diffusers.utils.make_image_grid``.

    Layout: by default one row. If you give both ``rows`` and ``cols`` you state the
    layout, so ``rows * cols`` must equal ``len(images)`` (a mismatch is a
    ValueError, as it is almost always a mistake). If you give only one, the other
    is ``ceil(len(images) / given)`` and the last row is padded with white tiles.

    Sizes: every cell has the first image's size; an image of another size is
    resized to it with LANCZOS (diffusers' default resampling), aspect ratio not
    kept, so mixing sizes never silently overlaps tiles. Every image goes through
    :func:`to_rgb`.
    """
    if isinstance(images, Image) or not isinstance(images, Sequence) or len(images) == 0:
        raise ValueError(f"images: expected a non-empty list of PIL images, got {images!r:.80}")
    for index, image in enumerate(images):
        _check_image(image, f"images[{index}]")
    rows, cols = _grid_shape(len(images), rows, cols)
    size = images[0].size
    tiles = [to_rgb(image) for image in images]
    tiles = [tile if tile.size == size else tile.resize(size, PIL.Image.Resampling.LANCZOS) for tile in tiles]
    tiles += [PIL.Image.new("RGB", size, (255, 255, 255))] * (rows * cols - len(tiles))
    return make_image_grid(tiles, rows=rows, cols=cols)


# --------------------------------------------------------------------------- latents


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
    scale = _positive_int(scale, "scale")
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
    scale = _positive_int(scale, "scale")
    factors = torch.tensor(SD15_LATENT_RGB_FACTORS, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->rhw", channels, factors)
    image = tensor_to_pil(rgb)[0]
    return image.resize((image.width * scale, image.height * scale), PIL.Image.Resampling.NEAREST)


# --------------------------------------------------------------------------- masks


def _check_size(size: object) -> tuple[int, int]:
    ok = isinstance(size, (tuple, list)) and len(size) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size
    )
    if not ok:
        raise ValueError(f"size: expected (width, height) as two positive integers, got {size!r}")
    return tuple(size)  # type: ignore[return-value]


def _check_box(box: object) -> tuple[int, int, int, int]:
    ok = isinstance(box, (tuple, list)) and len(box) == 4 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in box
    )
    if not ok or not (box[0] < box[2] and box[1] < box[3]):
        raise ValueError(
            f"box: expected (left, top, right, bottom) integers with left < right and top < bottom, got {box!r}"
        )
    return tuple(box)  # type: ignore[return-value]


def _shape_mask(size: object, box: object, draw_shape: str) -> Image:
    width, height = _check_size(size)
    left, top, right, bottom = _check_box(box)
    mask = PIL.Image.new("L", (width, height), 0)
    # ImageDraw includes the last pixel; our boxes exclude right/bottom like Image.crop
    getattr(ImageDraw.Draw(mask), draw_shape)((left, top, right - 1, bottom - 1), fill=255)
    return mask


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image:
    """An ``"L"`` mask of ``size`` with 255 (repaint) inside ``box``, 0 (keep) elsewhere.

    255 = repaint, 0 = keep is the diffusers inpainting convention. ``box`` is
    ``(left, top, right, bottom)`` with right/bottom exclusive, as for
    ``Image.crop``; parts of the box outside the image are simply cut off.
    """
    return _shape_mask(size, box, "rectangle")


def ellipse_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image:
    """An ``"L"`` mask with the ellipse inscribed in ``box`` at 255 (repaint), 0 (keep) elsewhere.

    Same conventions as :func:`box_mask`; an ellipse has no corners, so the repaint
    region blends in more naturally around round objects.
    """
    return _shape_mask(size, box, "ellipse")


def _mask_values(mask: object, name: str = "mask") -> np.ndarray:
    """Any mask as a float64 (H, W) array in [0, 1] (the scaling rule of :func:`binarize_mask`)."""
    if isinstance(mask, Image):
        gray = mask if mask.mode in ("L", "1") else to_rgb(mask)
        return np.asarray(gray.convert("L"), dtype=np.float64) / 255.0
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy() if mask.dtype != torch.bfloat16 else mask.detach().float().cpu().numpy()
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"{name}: expected a PIL image, numpy array or torch.Tensor, got {type(mask).__name__}")
    shape = mask.shape
    while mask.ndim > 2 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"{name}: expected shape (H, W), (1, H, W) or (1, 1, H, W), got {shape}")
    if mask.dtype == np.bool_:
        return mask.astype(np.float64)
    if mask.dtype == np.uint8:
        return mask.astype(np.float64) / 255.0
    if np.issubdtype(mask.dtype, np.floating):
        values = mask.astype(np.float64)
        if np.isnan(values).any() or values.min() < 0 or values.max() > 1:
            raise ValueError(
                f"{name}: float masks must hold values in [0, 1], got range "
                f"[{np.nanmin(values):.3g}, {np.nanmax(values):.3g}]" + (" with NaN" if np.isnan(values).any() else "")
            )
        return values
    raise TypeError(f"{name}: expected dtype bool, uint8 or float, got {mask.dtype}")


def _mask_image(mask: object) -> Image:
    return PIL.Image.fromarray(np.round(_mask_values(mask) * 255).astype(np.uint8))


def binarize_mask(mask: Image | np.ndarray | torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Turn a mask into a float32 tensor of shape (1, 1, H, W) holding only 0 and 1.

    Values are first scaled to [0, 1]: PIL masks and uint8 arrays/tensors are
    divided by 255 (other modes go through :func:`to_rgb`, so transparent pixels
    count as white, then Pillow's luma ``L``), bool
    gives 0/1, float masks must already be in [0, 1]. Then ``value >= threshold``
    becomes 1 (repaint) and the rest 0 (keep), the same rule as diffusers'
    ``VaeImageProcessor.binarize``. A soft, blurred mask thus becomes hard again.
    """
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold: expected a number in [0, 1], got {threshold!r}")
    values = _mask_values(mask)
    binary = (values >= threshold).astype(np.float32)
    return torch.from_numpy(binary)[None, None]


def resize_mask(mask: Image | np.ndarray | torch.Tensor, size: tuple[int, int]) -> Image:
    """Resize a mask to ``size`` = (width, height) with NEAREST, returning an ``"L"`` image.

    NEAREST copies existing values and invents none, so a binary mask stays
    binary (smooth filters would add gray edges that later thresholding turns
    into a shifted border). Accepts the same inputs as :func:`binarize_mask`.
    """
    size = _check_size(size)
    return _mask_image(mask).resize(size, PIL.Image.Resampling.NEAREST)


def blur_mask(mask: Image | np.ndarray | torch.Tensor, radius: float) -> Image:
    """Soften a mask's edges with Pillow's ``GaussianBlur(radius)``, returning ``"L"``.

    A hard mask edge leaves a visible seam after inpainting; a blurred edge gives a
    gradual blend between kept and repainted pixels. ``radius`` (>= 0) is the
    Gaussian's standard deviation in pixels; 0 returns the mask unchanged.
    """
    if not isinstance(radius, (int, float)) or isinstance(radius, bool) or not radius >= 0:
        raise ValueError(f"radius: expected a number >= 0, got {radius!r}")
    return _mask_image(mask).filter(ImageFilter.GaussianBlur(radius))


def dilate_mask(mask: Image | np.ndarray | torch.Tensor, pixels: int) -> Image:
    """Grow the repaint (white) region by ``pixels`` in every direction, returning ``"L"``.

    Repainting a little beyond the object's outline covers its halo, and leaves
    room for :func:`blur_mask` to blend without biting into the object. Uses
    Pillow's ``MaxFilter(3)`` applied ``pixels`` times, equal to one square
    ``MaxFilter(2 * pixels + 1)`` but much faster; 0 returns the mask unchanged.
    """
    if not isinstance(pixels, int) or isinstance(pixels, bool) or pixels < 0:
        raise ValueError(f"pixels: expected an integer >= 0, got {pixels!r}")
    image = _mask_image(mask)
    for _ in range(pixels):
        image = image.filter(ImageFilter.MaxFilter(3))
    return image


def _binary_mask(mask: object, name: str = "mask") -> np.ndarray:
    """A mask as a bool (H, W) array, True = repaint (value >= 0.5, the rule of :func:`binarize_mask`)."""
    return _mask_values(mask, name) >= 0.5


def _chebyshev_distance(seeds: np.ndarray) -> np.ndarray:
    """Steps of 8-neighbour growth from the True pixels of ``seeds`` to every pixel (0 on the seeds)."""
    distance = np.where(seeds, 0, -1)
    reached, step = seeds.copy(), 0
    while not reached.all():
        step += 1
        padded = np.pad(reached, 1)
        h, w = reached.shape
        grown = np.zeros_like(reached)
        for dy in range(3):
            for dx in range(3):
                grown |= padded[dy : dy + h, dx : dx + w]
        distance[grown & ~reached] = step
        reached = grown
    return distance


def mask_distance(mask: Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """How far each pixel lies from the repaint region, in pixels, as an int (H, W) array.

    0 inside the repaint region (mask value >= 0.5, as in :func:`binarize_mask`), 1 for the
    kept pixels touching it (also diagonally), 2 for the next ring, and so on: the chessboard
    (Chebyshev) distance, the distance that :func:`dilate_mask` grows by. Handy to measure how
    an inpainting result changes the kept pixels near the border versus far from it.
    ValueError if the mask has no repaint pixel.
    """
    repaint = _binary_mask(mask)
    if not repaint.any():
        raise ValueError("mask: has no repaint pixel (no value >= 0.5), so there is no region to measure from")
    return _chebyshev_distance(repaint)


def paste_back(original: Image, generated: Image, mask: Image | np.ndarray | torch.Tensor,
               feather: float = 0.0) -> Image:
    """Put ``original``'s pixels back outside the mask, keeping ``generated`` inside it.

    Latent inpainting regenerates *every* pixel through the VAE decoder, so even the kept
    region comes back slightly changed; pasting the original back makes it exact. The
    weight of ``generated`` is ``w = clip(2 * blur(mask, feather) - 1, 0, 1)`` (the mask
    binarised at 0.5, then :func:`blur_mask`): 0 everywhere outside the mask, so the kept
    pixels are *exactly* ``original``'s, rising to 1 inside the mask over about
    ``2 * feather`` pixels, which softens the seam where the two images meet. ``feather=0``
    is a hard paste (what diffusers' ``VaeImageProcessor.apply_overlay`` does with a binary
    mask). Each pixel is ``round(w * generated + (1 - w) * original)``, in RGB.
    The three inputs must have one size.
    """
    _check_image(original, "original")
    _check_image(generated, "generated")
    if not isinstance(feather, (int, float)) or isinstance(feather, bool) or not feather >= 0:
        raise ValueError(f"feather: expected a number >= 0, got {feather!r}")
    repaint = _binary_mask(mask)
    size = (repaint.shape[1], repaint.shape[0])
    for name, image in (("original", original), ("generated", generated)):
        if image.size != size:
            raise ValueError(f"{name}: size {image.size[0]}x{image.size[1]} differs from the mask's {size[0]}x{size[1]}")
    weight = repaint.astype(np.float64)
    if feather > 0:
        blurred = np.asarray(blur_mask(repaint.astype(np.uint8) * 255, feather), dtype=np.float64) / 255.0
        weight = np.clip(2.0 * blurred - 1.0, 0.0, 1.0) * repaint
    weight = weight[..., None]
    mixed = weight * np.asarray(to_rgb(generated), dtype=np.float64) + (1 - weight) * np.asarray(to_rgb(original), dtype=np.float64)
    return PIL.Image.fromarray(np.round(mixed).astype(np.uint8))


def seam_energy(image: Image, mask: Image | np.ndarray | torch.Tensor, width: int = 2) -> float:
    """How sharp the edges are along the mask's border: the mean squared colour gradient there.

    The band is every pixel within ``width`` pixels of the border, on both sides (kept pixels
    at :func:`mask_distance` 1..width, repaint pixels as close to a kept one). At each pixel
    the gradient is the forward difference to the right and downwards neighbour, squared and
    summed over R, G, B (8-bit units). A hard seam (a step in colour along the border) scores
    high; the same step spread over ``n`` pixels scores about ``n`` times lower, so feathering
    a seam lowers the number while a smooth image scores near 0. Compare values for one
    image and mask only: the image's own edges inside the band count too.
    """
    _check_image(image, "image")
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ValueError(f"width: expected an integer >= 1, got {width!r}")
    repaint = _binary_mask(mask)
    if image.size != (repaint.shape[1], repaint.shape[0]):
        raise ValueError(f"image: size {image.size[0]}x{image.size[1]} differs from the mask's "
                         f"{repaint.shape[1]}x{repaint.shape[0]}")
    if repaint.all() or not repaint.any():
        raise ValueError("mask: needs both repaint (>= 0.5) and keep pixels to have a border")
    outside, inside = _chebyshev_distance(repaint), _chebyshev_distance(~repaint)
    band = ((outside >= 1) & (outside <= width)) | ((inside >= 1) & (inside <= width))
    rgb = np.asarray(to_rgb(image), dtype=np.float64)
    gx, gy = np.zeros_like(rgb), np.zeros_like(rgb)
    gx[:, :-1] = rgb[:, 1:] - rgb[:, :-1]
    gy[:-1] = rgb[1:] - rgb[:-1]
    return float((gx**2 + gy**2).sum(axis=-1)[band].mean())


# --------------------------------------------------------------------------- metrics and detail


def _metric_array(value: object, name: str) -> tuple[np.ndarray, float | None]:
    """The array PSNR compares, and its natural data range (None when unknown)."""
    if isinstance(value, Image):
        return np.asarray(to_rgb(value), dtype=np.float64), 255.0
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu")
        value = value.float().numpy() if value.is_floating_point() else value.numpy()
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name}: expected a PIL image, numpy array or torch.Tensor, got {type(value).__name__}")
    if value.dtype == np.uint8:
        return value.astype(np.float64), 255.0
    if np.issubdtype(value.dtype, np.floating):
        return value.astype(np.float64), 2.0
    return value.astype(np.float64), None


def psnr(a: object, b: object, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB: ``10 * log10(data_range**2 / MSE)``.

    Higher means closer; identical inputs give ``float('inf')``. Used to put a
    number on how lossy the VAE's round trip is. ``data_range`` is the span of
    possible values: by default 255 for PIL images (compared as RGB) and uint8
    arrays/tensors, 2.0 for float arrays/tensors (taken as [-1, 1], the VAE's
    range). Both inputs must have the same shape and, unless ``data_range`` is
    given, the same default range, so a PIL image is never compared with a
    [-1, 1] tensor by accident.
    """
    array_a, range_a = _metric_array(a, "a")
    array_b, range_b = _metric_array(b, "b")
    if array_a.shape != array_b.shape:
        raise ValueError(f"a, b: shapes differ: {array_a.shape} vs {array_b.shape}")
    if data_range is None:
        if range_a is None or range_b is None:
            raise ValueError("data_range: can't be inferred for dtypes other than uint8 and float; pass it")
        if range_a != range_b:
            raise ValueError(
                f"a, b: different scales (data range {range_a:g} vs {range_b:g}); "
                "convert one (pil_to_tensor / tensor_to_pil) or pass data_range"
            )
        data_range = range_a
    elif isinstance(data_range, bool) or not isinstance(data_range, (int, float)) or not data_range > 0:
        raise ValueError(f"data_range: expected a positive number, got {data_range!r}")
    mse = float(np.mean((array_a - array_b) ** 2))
    if mse == 0.0:
        return float("inf")
    return 10.0 * math.log10(data_range**2 / mse)


def enlarge(image: Image, scale: int = 2) -> Image:
    """The whole image ``scale`` times larger with NEAREST: 64×64 pixels stay visible squares.

    The book's figures show TinySD's 64×64 images this way; a smoothing resize would hide exactly
    the pixel-level detail (edges, seams, decoder artefacts) the chapters point at.
    """
    _check_image(image, "image")
    return zoom(image, (0, 0, image.width, image.height), scale)


def zoom(image: Image, box: tuple[int, int, int, int], scale: int = 4) -> Image:
    """Crop ``box`` out of ``image`` and enlarge it ``scale`` times with NEAREST.

    NEAREST shows the pixels as they are, as sharp squares, so reconstruction
    artefacts (smeared small text, ringing) are seen rather than smoothed over by
    the enlargement. ``box`` is ``(left, top, right, bottom)``, right/bottom
    exclusive, and must lie inside the image. The image keeps its mode.
    """
    _check_image(image, "image")
    left, top, right, bottom = _check_box(box)
    scale = _positive_int(scale, "scale")
    if left < 0 or top < 0 or right > image.width or bottom > image.height:
        raise ValueError(f"box: {box!r} goes outside the {image.width}x{image.height} image")
    detail = image.crop((left, top, right, bottom))
    return detail.resize((detail.width * scale, detail.height * scale), PIL.Image.Resampling.NEAREST)


# --------------------------------------------------------------------------- sketches


def blob_sketch(
    size: tuple[int, int] = (64, 64),
    colour: tuple[int, int, int] = (230, 30, 30),
    background: tuple[int, int, int] = (30, 80, 230),
    centre: tuple[float, float] | None = None,
    radius: float | None = None,
    wobble: float = 0.35,
    corners: int = 9,
    seed: int = 0,
) -> Image:
    """A crude "hand-drawn" colour-block sketch: one irregular blob of ``colour`` on a plain ``background``.

    The kind of input image-to-image (SDEdit) cleans up: the layout and the colours are right, the
    shape is not. The blob is a polygon of ``corners`` points around ``centre`` (default: the image's
    middle); point ``k`` sits at angle ``2*pi*k/corners`` (plus a jitter of up to a third of the
    spacing) and at distance ``radius * (1 + wobble * u)`` with ``u`` uniform in [-1, 1]. ``radius``
    defaults to a quarter of the shorter side. Drawn without anti-aliasing, so every pixel is exactly
    ``colour`` or ``background``. The same ``seed`` gives the same blob.
    """
    width, height = _check_size(size)
    colour, background = _check_colour(colour, "colour"), _check_colour(background, "background")
    cx, cy = (width / 2, height / 2) if centre is None else _check_point(centre)
    radius = min(width, height) / 4 if radius is None else radius
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not radius > 0:
        raise ValueError(f"radius: expected a positive number of pixels, got {radius!r}")
    if isinstance(wobble, bool) or not isinstance(wobble, (int, float)) or not 0 <= wobble < 1:
        raise ValueError(f"wobble: expected a number in [0, 1), got {wobble!r}")
    if isinstance(corners, bool) or not isinstance(corners, int) or corners < 3:
        raise ValueError(f"corners: expected an integer >= 3, got {corners!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an integer, got {seed!r}")
    rng = np.random.default_rng(seed)
    step = 2 * math.pi / corners
    angles = step * np.arange(corners) + rng.uniform(-step / 3, step / 3, corners)
    radii = radius * (1 + wobble * rng.uniform(-1, 1, corners))
    points = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a, r in zip(angles, radii)]
    sketch = PIL.Image.new("RGB", (width, height), background)
    ImageDraw.Draw(sketch).polygon(points, fill=colour)
    return sketch


def _check_colour(value: object, name: str) -> tuple[int, int, int]:
    try:
        return _check_background(value)
    except ValueError:
        raise ValueError(f"{name}: expected 3 integers in [0, 255] (an RGB colour), got {value!r}") from None


def _check_point(point: object) -> tuple[float, float]:
    ok = isinstance(point, (tuple, list)) and len(point) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in point
    )
    if not ok:
        raise ValueError(f"centre: expected (x, y) as two numbers of pixels, got {point!r}")
    return float(point[0]), float(point[1])

"""Images in and out of Stable Diffusion: conversions, grids, latent viewers, metrics.

Stable Diffusion's VAE reads and writes images as float tensors in [-1, 1] with
shape (B, 3, H, W); people and files deal in 8-bit RGB Pillow images. This module
is the border crossing between the two, written so that each rule (how a pixel
value maps, how a mode is converted, which resampling filter is used) is stated
once, here, and matches what diffusers does where diffusers has a rule.

Conventions used throughout:

* sizes are ``(width, height)`` and boxes ``(left, top, right, bottom)`` with
  ``right``/``bottom`` exclusive: Pillow's order, so ``image.crop(box)`` agrees;
* masks (:mod:`sdhelpers.masks`) are ``"L"`` images where 255 means *repaint* and
  0 means *keep*, the convention of the diffusers inpainting pipelines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from PIL import ImageDraw, UnidentifiedImageError
from diffusers.utils import make_image_grid

from sdhelpers import checks

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


# --------------------------------------------------------------------------- grids


def _grid_shape(count: int, rows: int | None, cols: int | None) -> tuple[int, int]:
    if rows is None and cols is None:
        return 1, count
    if rows is not None and cols is not None:
        rows, cols = checks.positive_int(rows, "rows"), checks.positive_int(cols, "cols")
        if rows * cols != count:
            raise ValueError(
                f"rows, cols: a {rows}x{cols} grid has {rows * cols} cells but {count} images were given"
            )
        return rows, cols
    if rows is not None:
        rows = checks.positive_int(rows, "rows")
        return rows, math.ceil(count / rows)
    cols = checks.positive_int(cols, "cols")
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
        checks.pil_image(image, f"images[{index}]")
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
    checks.pil_image(image, "image")
    return zoom(image, (0, 0, image.width, image.height), scale)


def zoom(image: Image, box: tuple[int, int, int, int], scale: int = 4) -> Image:
    """Crop ``box`` out of ``image`` and enlarge it ``scale`` times with NEAREST.

    NEAREST shows the pixels as they are, as sharp squares, so reconstruction
    artefacts (smeared small text, ringing) are seen rather than smoothed over by
    the enlargement. ``box`` is ``(left, top, right, bottom)``, right/bottom
    exclusive, and must lie inside the image. The image keeps its mode.
    """
    checks.pil_image(image, "image")
    left, top, right, bottom = checks.box(box)
    scale = checks.positive_int(scale, "scale")
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
    width, height = checks.image_size(size)
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

"""Inpainting masks: drawing them, reading them in any form, and judging the seams they leave.

Masks are ``"L"`` images where 255 means *repaint* and 0 means *keep*, the convention of the
diffusers inpainting pipelines; sizes are ``(width, height)`` and boxes ``(left, top, right,
bottom)`` with ``right``/``bottom`` exclusive, as in :mod:`sdhelpers.images`. Every function
takes a mask as a PIL image, a numpy array or a torch tensor, checked once by the same reader.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from PIL import ImageDraw, ImageFilter

from sdhelpers import checks
from sdhelpers.images import Image, to_rgb

__all__ = [
    "box_mask",
    "ellipse_mask",
    "binarize_mask",
    "resize_mask",
    "blur_mask",
    "dilate_mask",
    "mask_distance",
    "paste_back",
    "seam_energy",
]


def _shape_mask(size: object, box: object, draw_shape: str) -> Image:
    width, height = checks.image_size(size)
    left, top, right, bottom = checks.box(box)
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
    size = checks.image_size(size)
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
    checks.pil_image(original, "original")
    checks.pil_image(generated, "generated")
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
    checks.pil_image(image, "image")
    width = checks.positive_int(width, "width")
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

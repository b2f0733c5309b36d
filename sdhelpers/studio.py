"""One studio for the three tasks: text to image, image to image and inpainting, the logic of its tabs.

The book's answer to the Stable Diffusion 2.1 GUI notebook the source points to. Each tab runs a
stock diffusers pipeline (``StableDiffusionPipeline``, ``StableDiffusionImg2ImgPipeline``,
``StableDiffusionInpaintPipeline``) built with ``from_pipe`` from the given pipeline's components,
so it shares the weights and leaves the reader's pipeline (its scheduler too) as it was.

The logic needs no browser: :class:`Studio` takes the settings and returns a :class:`Result`, the
image and its settings as text; the app (:func:`sdhelpers.studio_app.studio`) only gathers the
controls' values and calls it. A bad setting raises :class:`StudioError`, whose message starts with the field's name;
the app shows that message in its tab instead of a traceback.
"""

from __future__ import annotations

import io
from typing import NamedTuple

import PIL.Image
import PIL.ImageOps

from sdhelpers.data import BACKGROUNDS, COLOURS
from sdhelpers.device import make_generator
from sdhelpers.masks import binarize_mask, box_mask, ellipse_mask, resize_mask
from sdhelpers.pixels import to_rgb
from sdhelpers.schedulers import SCHEDULERS, use_scheduler
from sdhelpers.sketches import blob_sketch
from sdhelpers.widgets import _working_copy

TASKS = ("txt2img", "img2img", "inpaint")
TAB_TITLES = {"txt2img": "text to image", "img2img": "image to image", "inpaint": "inpainting"}
MAX_STEPS, MAX_GUIDANCE, MAX_SEED = 100, 20.0, 2**32 - 1
UPLOAD = "(uploaded file)"

# Chapter 6's three sketches: (shape colour, background, centre on a 64-px canvas, seed).
_SKETCHES = {
    "red sketch on blue": ("red", "blue", (22, 24), 0),
    "yellow sketch on black": ("yellow", "black", (42, 40), 1),
    "white sketch on gray": ("white", "gray", (40, 24), 2),
}
SKETCHES = tuple(_SKETCHES)
# Mask presets as boxes on a 64-px canvas, scaled to the image: (shape, left, top, right, bottom).
_MASKS = {
    "centre square": ("box", 16, 16, 48, 48),
    "centre circle": ("ellipse", 14, 14, 50, 50),
    "left half": ("box", 0, 0, 32, 64),
    "top half": ("box", 0, 0, 64, 32),
}
MASK_PRESETS = tuple(_MASKS)


class StudioError(ValueError):
    """A setting the studio can't use; ``field`` names it, and the message starts with it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class Result(NamedTuple):
    """What one generation gives: the image, and its settings as text (the caption)."""

    image: PIL.Image.Image
    caption: str


def sketch(name: str, side: int = 64) -> PIL.Image.Image:
    """One of chapter 6's sketches (:data:`SKETCHES`) drawn on a ``side``-pixel square."""
    if name not in _SKETCHES:
        raise StudioError("image", f"{name!r} is not a sketch; use one of {', '.join(SKETCHES)}")
    colour, background, (x, y), seed = _SKETCHES[name]
    scale = side / 64
    return blob_sketch((side, side), COLOURS[colour], BACKGROUNDS[background],
                       centre=(x * scale, y * scale), radius=12 * scale, seed=seed)


def mask_preset(name: str, side: int = 64) -> PIL.Image.Image:
    """One of the :data:`MASK_PRESETS` as an ``"L"`` mask (255 = repaint) on a ``side``-pixel square."""
    if name not in _MASKS:
        raise StudioError("mask", f"{name!r} is not a preset; use one of {', '.join(MASK_PRESETS)}")
    shape, *box = _MASKS[name]
    draw = box_mask if shape == "box" else ellipse_mask
    return draw((side, side), tuple(round(v * side / 64) for v in box))


def read_upload(content: bytes | memoryview, field: str, name: str = "the upload"):
    """The bytes of an uploaded file as a PIL image, or a :class:`StudioError` naming ``field``."""
    try:
        image = PIL.Image.open(io.BytesIO(bytes(content)))
        image.load()
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise StudioError(field, f"{name} is not an image file Pillow can read") from None
    return image


def _number(value, field, low, high, integer=False):
    kind = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise StudioError(field, f"{value!r} is not allowed; use {what} from {low} to {high}")
    return value


class Studio:
    """The three tasks on one pipeline's components; each method returns a :class:`Result`."""

    def __init__(self, pipe) -> None:
        from diffusers import (StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                               StableDiffusionPipeline)

        classes = (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline,
                   StableDiffusionInpaintPipeline)
        self.pipelines = {task: _working_copy(pipe, cls) for task, cls in zip(TASKS, classes)}
        self.scheduler = pipe.scheduler  # every call starts from this one's configuration
        self.side = pipe.unet.config.sample_size * pipe.vae_scale_factor

    def _check(self, prompt, negative_prompt, steps, guidance_scale, seed, scheduler):
        if not isinstance(prompt, str) or not prompt.strip():
            raise StudioError("prompt", "is empty; describe the picture you want")
        if not isinstance(negative_prompt, str):
            raise StudioError("negative prompt", f"expected text, got {negative_prompt!r}")
        _number(steps, "steps", 1, MAX_STEPS, integer=True)
        _number(guidance_scale, "guidance", 1, MAX_GUIDANCE)
        _number(seed, "seed", 0, MAX_SEED, integer=True)
        if scheduler not in SCHEDULERS:
            raise StudioError("scheduler", f"{scheduler!r} is not known; use one of "
                              f"{', '.join(SCHEDULERS)}")

    def _image(self, image, field="image"):
        """An input image as (RGB square at the model's size, its name for the caption)."""
        if isinstance(image, str):
            return sketch(image, self.side), image
        if isinstance(image, tuple) and len(image) == 2 and isinstance(image[1], (bytes, memoryview)):
            name, content = image  # (file name, bytes): what the upload button gives
            return self._image(read_upload(content, field, repr(name)))[0], name
        if not isinstance(image, PIL.Image.Image):
            raise StudioError(field, f"expected a sketch name, an upload or a PIL image, got "
                              f"{type(image).__name__}")
        square = PIL.ImageOps.fit(to_rgb(image), (self.side, self.side), PIL.Image.Resampling.LANCZOS)
        return square, f"your image ({image.width}x{image.height})"

    def _mask(self, mask):
        if isinstance(mask, str):
            return mask_preset(mask, self.side), mask
        if isinstance(mask, tuple) and len(mask) == 2 and isinstance(mask[1], (bytes, memoryview)):
            name, content = mask
            return self._mask(read_upload(content, "mask", repr(name)))[0], name
        if isinstance(mask, PIL.Image.Image):  # cropped to a square as the image is
            gray = mask.convert("L") if mask.mode in ("L", "1") else to_rgb(mask).convert("L")
            mask = PIL.ImageOps.fit(gray, (self.side, self.side), PIL.Image.Resampling.NEAREST)
        try:
            resized = resize_mask(mask, (self.side, self.side))
        except (TypeError, ValueError) as error:
            raise StudioError("mask", str(error).removeprefix("mask: ")) from None
        if not binarize_mask(resized).any():
            raise StudioError("mask", "has no white (repaint) pixel; white marks what to repaint")
        return resized, "your mask"

    def _run(self, task, prompt, negative_prompt, steps, guidance_scale, seed, scheduler, lines,
             **inputs) -> Result:
        work = self.pipelines[task]
        work.scheduler = self.scheduler
        use_scheduler(work, scheduler)
        image = work(prompt, negative_prompt=negative_prompt.strip() or None,
                     num_inference_steps=steps, guidance_scale=guidance_scale,
                     generator=make_generator(seed, work.device), **inputs).images[0]
        if "strength" in inputs:
            strength = float(inputs["strength"])
            lines.append(f"strength {strength!r} ({int(steps * strength)} of {steps} steps)")
        caption = [f'{task}: "{prompt}"', f"negative prompt: {negative_prompt.strip() or 'none'}",
                   *lines, f"steps {steps}, guidance {float(guidance_scale)!r}",
                   f"seed {seed}, scheduler {scheduler}"]
        return Result(image, "\n".join(caption))

    def txt2img(self, prompt, negative_prompt="", steps=25, guidance_scale=7.5, seed=0,
                scheduler="pndm") -> Result:
        """Text to image with ``StableDiffusionPipeline``."""
        settings = (prompt, negative_prompt, steps, guidance_scale, seed, scheduler)
        self._check(*settings)
        return self._run("txt2img", *settings, [])

    def _strength(self, strength, steps):
        _number(strength, "strength", 0.01, 1.0)
        if int(steps * strength) < 1:
            raise StudioError("strength", f"{strength:g} x {steps} steps runs no denoising step "
                              "(int(steps x strength) = 0); raise strength or steps")

    def img2img(self, prompt, image=SKETCHES[0], strength=0.6, negative_prompt="", steps=25,
                guidance_scale=7.5, seed=0, scheduler="pndm") -> Result:
        """Image to image (SDEdit) with ``StableDiffusionImg2ImgPipeline``.

        ``image``: a name of :data:`SKETCHES`, a PIL image, or ``(file name, bytes)`` from an
        upload; it is cropped to a square and resized to the model's size.
        """
        settings = (prompt, negative_prompt, steps, guidance_scale, seed, scheduler)
        self._check(*settings)
        self._strength(strength, steps)
        start, name = self._image(image)
        lines = [f"image: {name}"]
        return self._run("img2img", *settings, lines, image=start, strength=strength)

    def inpaint(self, prompt, image=SKETCHES[0], mask=MASK_PRESETS[0], strength=1.0,
                negative_prompt="", steps=25, guidance_scale=7.5, seed=0,
                scheduler="pndm") -> Result:
        """Inpainting with ``StableDiffusionInpaintPipeline``: repaint where ``mask`` is white.

        ``image`` as for :meth:`img2img`; ``mask``: a name of :data:`MASK_PRESETS`, a mask (PIL
        image, array or tensor) or ``(file name, bytes)``; white (>= 0.5) marks what to repaint.
        A PIL mask is cropped to a square as the image is; every mask is then resized to the
        model's size with NEAREST.
        """
        settings = (prompt, negative_prompt, steps, guidance_scale, seed, scheduler)
        self._check(*settings)
        self._strength(strength, steps)
        start, name = self._image(image)
        mask_image, mask_name = self._mask(mask)
        lines = [f"image: {name}", f"mask: {mask_name}"]
        return self._run("inpaint", *settings, lines, image=start, mask_image=mask_image,
                         strength=strength, height=self.side, width=self.side)

    def generate(self, task: str, **settings) -> Result:
        """The method for ``task`` (one of :data:`TASKS`), called with ``settings``."""
        if task not in TASKS:
            raise StudioError("task", f"{task!r} is not a tab; use one of {', '.join(TASKS)}")
        return getattr(self, task)(**settings)


# --- the app ---------------------------------------------------------------------------------

"""Text-to-image, image-to-image and inpainting written out by hand, step for step like diffusers.

Each function is the readable core of a diffusers pipeline, with the options stripped away, and
the test suite checks that it gives the same latents and pixels as the pipeline for the same seed,
scheduler and inputs. The three tasks share one denoising loop (:func:`denoise`) and one
classifier-free-guidance step (:func:`predict_noise`); they differ only in how the first latent is
made and, for inpainting, in what happens after each step:

- ``txt2img``: the first latent is pure noise (``StableDiffusionPipeline``).
- ``img2img``: the image's latent plus noise at the level ``strength`` asks for, then only the
  remaining steps (SDEdit, ``StableDiffusionImg2ImgPipeline``).
- ``inpaint``: as img2img, and after every step the region outside the mask is replaced by the
  real image's latent noised to the same level (the source text's ``StableDiffusionInpaintPipelineLegacy``;
  today ``StableDiffusionInpaintPipeline`` does this with a 4-channel UNet).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from sdhelpers import checks
from sdhelpers.images import to_rgb
from sdhelpers.masks import resize_mask
from sdhelpers.models import tokenize
from sdhelpers.schedulers import SCHEDULERS, use_scheduler  # noqa: F401  (re-exported)

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step index, timestep, latents)


def _as_list(prompt: str | list[str], name: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"{name}: expected a string or a non-empty list of strings, got {prompt!r}")


def _embed(pipe, texts: list[str]) -> torch.Tensor:
    """Tokenize to CLIP's 77 tokens (truncating, with a warning) and take the last hidden state."""
    tok = pipe.tokenizer
    ids = tokenize(tok, texts)
    full = tok(texts, padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] > ids.shape[-1]:
        lost = tok.batch_decode(full[:, tok.model_max_length - 1 : -1])
        warnings.warn(f"prompt: truncated to {tok.model_max_length} tokens; this part was dropped: {lost}", stacklevel=3)
    with torch.no_grad():
        return pipe.text_encoder(ids.to(pipe.device))[0].to(pipe.text_encoder.dtype)


def encode_prompt(pipe, prompt, negative_prompt=None, num_images_per_prompt: int = 1):
    """Conditional and unconditional text embeddings, each (batch x images per prompt, 77, d).

    The unconditional prompt is the empty string unless ``negative_prompt`` is given: CFG then
    steers *away* from it. Mirrors ``StableDiffusionPipeline.encode_prompt``.
    """
    prompts = _as_list(prompt, "prompt")
    negatives = [""] * len(prompts) if negative_prompt is None else _as_list(negative_prompt, "negative_prompt")
    if len(negatives) == 1 and len(prompts) > 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise ValueError(f"negative_prompt: {len(negatives)} given for {len(prompts)} prompts; pass one, or one per prompt")
    checks.positive_int(num_images_per_prompt, "num_images_per_prompt")
    cond, uncond = _embed(pipe, prompts), _embed(pipe, negatives)
    return cond.repeat_interleave(num_images_per_prompt, 0), uncond.repeat_interleave(num_images_per_prompt, 0)


def predict_noise(pipe, latents, t, cond, uncond, guidance_scale: float) -> torch.Tensor:
    """One UNet call with classifier-free guidance: ``uncond + g * (cond - uncond)``.

    Both halves go through the UNet as one doubled batch, as in diffusers. With ``g <= 1`` diffusers
    turns guidance off and uses the conditional prediction alone, and so does this function: exact
    for ``g = 1`` (the formula gives ``cond``), and for ``g < 1`` the value of ``g`` is then ignored.
    """
    guided = guidance_scale > 1
    model_input = torch.cat([latents] * 2) if guided else latents
    model_input = pipe.scheduler.scale_model_input(model_input, t)
    context = torch.cat([uncond, cond]) if guided else cond
    noise = pipe.unet(model_input, t, encoder_hidden_states=context, return_dict=False)[0]
    if not guided:
        return noise
    noise_uncond, noise_cond = noise.chunk(2)
    return noise_uncond + guidance_scale * (noise_cond - noise_uncond)


def initial_latents(pipe, batch: int, height: int, width: int, generator=None) -> torch.Tensor:
    """Text-to-image's first latent: Gaussian noise of the latent's shape, times the sampler's sigma.

    ``(batch, 4, height / 8, width / 8)``, drawn from ``generator`` as the pipeline draws it, then
    scaled by ``scheduler.init_noise_sigma`` (1 for DDPM-style samplers, larger for Euler's): call
    ``scheduler.set_timesteps`` first, since some samplers set that sigma there.
    """
    shape = (checks.positive_int(batch, "batch"), pipe.unet.config.in_channels,
             height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    latents = randn_tensor(shape, generator=generator, device=pipe.device, dtype=pipe.text_encoder.dtype)
    return latents * pipe.scheduler.init_noise_sigma


def denoise_step(pipe, latents, t, cond, uncond, guidance_scale, generator=None) -> torch.Tensor:
    """One denoising step: the guided noise prediction at ``t``, then the scheduler's step to ``t - 1``.

    The scheduler turns "the noise in this latent" into the latent of the next, less noisy level;
    how it does so (PNDM's multistep formula, DDIM's deterministic jump) is all that differs
    between samplers.
    """
    with torch.no_grad():
        noise = predict_noise(pipe, latents, t, cond, uncond, guidance_scale)
    step_kwargs = _step_kwargs(pipe.scheduler, generator)
    return pipe.scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]


def denoise(pipe, latents, timesteps, cond, uncond, guidance_scale, generator=None, after_step=None, callback=None):
    """The loop shared by all three tasks: predict the noise, let the scheduler take one step.

    ``after_step(i, t, latents) -> latents`` lets inpainting paste the known region back;
    ``callback(i, t, latents)`` sees every intermediate latent (for previews).
    """
    for i, t in enumerate(timesteps):
        latents = denoise_step(pipe, latents, t, cond, uncond, guidance_scale, generator)
        if after_step is not None:
            latents = after_step(i, t, latents)
        if callback is not None:
            callback(i, t, latents)
    return latents


def decode(pipe, latents, output_type: str = "pil"):
    """Undo the latent scaling and decode with the VAE: PIL images, a numpy array or the latents."""
    if output_type == "latent":
        return latents
    with torch.no_grad():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)


def txt2img(pipe, prompt, negative_prompt=None, steps: int = 50, guidance_scale: float = 7.5, height=None,
            width=None, generator=None, num_images_per_prompt: int = 1, callback=None, output_type="pil"):
    """Text to image: pure noise, denoised for ``steps`` steps. Same result as ``StableDiffusionPipeline``."""
    height, width = _check_size(pipe, height, width)
    checks.positive_int(steps, "steps")
    cond, uncond = encode_prompt(pipe, prompt, negative_prompt, num_images_per_prompt)
    pipe.scheduler.set_timesteps(steps, device=pipe.device)
    latents = initial_latents(pipe, cond.shape[0], height, width, generator)
    latents = denoise(pipe, latents, pipe.scheduler.timesteps, cond, uncond, guidance_scale, generator, callback=callback)
    return decode(pipe, latents, output_type)


def img2img(pipe, prompt, image, strength: float = 0.8, negative_prompt=None, steps: int = 50,
            guidance_scale: float = 7.5, generator=None, num_images_per_prompt: int = 1, callback=None,
            output_type="pil"):
    """SDEdit: noise the image's latent to the level ``strength`` asks for, then denoise from there.

    Only the last ``int(steps * strength)`` steps of the schedule run (PNDM: one UNet call more, see
    :func:`strength_timesteps`). Noise is added even at ``strength=1.0``, so the image still leaks
    through a little. Same as ``StableDiffusionImg2ImgPipeline``.
    """
    cond, uncond = encode_prompt(pipe, prompt, negative_prompt, num_images_per_prompt)
    start = sdedit_start(pipe, image, strength, steps, generator, batch=cond.shape[0])
    latents = denoise(pipe, start.latents, start.timesteps, cond, uncond, guidance_scale, generator, callback=callback)
    return decode(pipe, latents, output_type)


def inpaint(pipe, prompt, image, mask, strength: float = 1.0, negative_prompt=None, steps: int = 50,
            guidance_scale: float = 7.5, generator=None, num_images_per_prompt: int = 1, callback=None,
            output_type="pil"):
    """Latent-blending inpainting: repaint where the mask is white, keep the rest of ``image``.

    After every step the region outside the mask is replaced by the real image's latent noised to
    the level of the *next* step (clean after the last one), so only the masked region is generated.
    At ``strength=1.0`` the start is pure noise. Same as ``StableDiffusionInpaintPipeline`` on a 4-channel UNet
    called with ``height``/``width`` equal to the image's size (the pipeline's default is the model's native size).
    """
    image = to_rgb(image)
    mask = resize_mask(mask, image.size)  # stated rule: a mask of another size is resized with NEAREST
    cond, uncond = encode_prompt(pipe, prompt, negative_prompt, num_images_per_prompt)
    start = sdedit_start(pipe, image, strength, steps, generator, batch=cond.shape[0])
    image_latents, noise, timesteps = start.image_latents, start.noise, start.timesteps
    latent_mask = latent_mask_from(pipe, mask, [n * pipe.vae_scale_factor for n in image_latents.shape[-2:]])
    latents = noise * pipe.scheduler.init_noise_sigma if strength == 1.0 else start.latents

    def keep_outside_mask(i, t, latents):
        known = image_latents
        if i < len(timesteps) - 1:
            known = pipe.scheduler.add_noise(image_latents, noise, timesteps[i + 1 : i + 2])
        return (1 - latent_mask) * known + latent_mask * latents

    latents = denoise(pipe, latents, timesteps, cond, uncond, guidance_scale, generator, keep_outside_mask, callback)
    return decode(pipe, latents, output_type)


# --- the pieces the three tasks share ------------------------------------------------------------


def encode_image(pipe, image: torch.Tensor, generator=None) -> torch.Tensor:
    """The image's latent, *sampled* from the VAE's posterior and multiplied by the scaling factor."""
    with torch.no_grad():
        posterior = pipe.vae.encode(image.to(pipe.device, pipe.vae.dtype)).latent_dist
    return posterior.sample(generator) * pipe.vae.config.scaling_factor


@dataclass
class SDEditStart:
    """Where image-to-image starts: see :func:`sdedit_start`."""

    image_latents: torch.Tensor  # the image's latent, one copy per image to generate
    noise: torch.Tensor  # the Gaussian noise added to it
    timesteps: torch.Tensor  # the tail of the schedule that remains to run
    latents: torch.Tensor  # image_latents noised to the level of timesteps[0]: the first latent


def sdedit_start(pipe, image, strength: float, steps: int, generator=None, batch: int = 1) -> SDEditStart:
    """SDEdit's first latent: the image's latent plus noise at the level of the first remaining step.

    ``latents = sqrt(abar_t) * image_latents + sqrt(1 - abar_t) * noise`` with ``t = timesteps[0]``
    (``scheduler.add_noise``): the forward diffusion done in one jump, instead of txt2img's pure noise.
    The generator is drawn from in the pipeline's order (the VAE's posterior sample, then the noise),
    so the result is ``StableDiffusionImg2ImgPipeline.prepare_latents``'s.
    """
    init_image = pipe.image_processor.preprocess(to_rgb(image))
    timesteps = strength_timesteps(pipe.scheduler, steps, strength, pipe.device)
    image_latents = encode_image(pipe, init_image, generator).repeat_interleave(checks.positive_int(batch, "batch"), 0)
    noise = randn_tensor(image_latents.shape, generator=generator, device=pipe.device, dtype=image_latents.dtype)
    latents = pipe.scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(batch))
    return SDEditStart(image_latents, noise, timesteps, latents)


class Trajectory:
    """A per-step callback that keeps every intermediate latent (a CPU copy), to look at afterwards.

    Pass it as ``callback=`` to the loops here, or its :meth:`on_step_end` as a diffusers pipeline's
    ``callback_on_step_end=``. Either way it is called once per entry of the schedule, i.e. once per
    UNet call, so ``len(trajectory)`` counts the denoising steps that really ran.
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.timesteps: list[int] = []
        self.latents: list[torch.Tensor] = []

    def __call__(self, i: int, t, latents: torch.Tensor) -> None:
        self.steps.append(int(i))
        self.timesteps.append(int(t))
        self.latents.append(latents.detach().to("cpu", copy=True))

    def on_step_end(self, pipe, i: int, t, callback_kwargs: dict) -> dict:
        """The ``callback_on_step_end(pipe, step, timestep, callback_kwargs)`` form diffusers calls."""
        self(i, t, callback_kwargs["latents"])
        return callback_kwargs

    def __len__(self) -> int:
        return len(self.latents)

    def previews(self, pipe, index: int = 0, every: int = 1) -> list[Image.Image]:
        """Image ``index`` of the batch decoded by the VAE after every ``every``-th step and after the last."""
        checks.positive_int(every, "every")
        if not self.latents:
            raise ValueError("trajectory: no step was recorded; pass it as a callback to a sampler first")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.latents[0].shape[0]:
            raise ValueError(f"index: {index!r} is not allowed; use 0 to {self.latents[0].shape[0] - 1}")
        picked = sorted(set(range(every - 1, len(self), every)) | {len(self) - 1})
        batch = torch.cat([self.latents[k][index : index + 1] for k in picked]).to(pipe.device, pipe.vae.dtype)
        return decode(pipe, batch)


def strength_timesteps(scheduler, steps: int, strength: float, device) -> torch.Tensor:
    """The tail of the schedule that img2img and inpainting run: ``int(steps * strength)`` steps.

    As in diffusers, the scheduler is first set up for all ``steps``, and the first
    ``(steps - int(steps * strength)) * scheduler.order`` entries are skipped; the UNet then runs once
    per remaining entry. PNDM (``skip_prk_steps``) is the exception to "one entry per step": its full
    list has ``steps + 1`` entries, the second timestep repeated for the PLMS warm-up, so its tail has
    ``int(steps * strength) + 1`` entries (the UNet runs once more) and starts one schedule level
    earlier, i.e. noisier, than DDIM's for the same ``strength``.
    """
    checks.positive_int(steps, "steps")
    if not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength: {strength!r} is not allowed; use a number in [0, 1]")
    kept = min(int(steps * strength), steps)
    if kept < 1:
        raise ValueError(f"strength: {strength} x steps {steps} leaves {kept} denoising steps; raise either so there is at least 1")
    scheduler.set_timesteps(steps, device=device)
    start = (steps - kept) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def latent_mask_from(pipe, mask: Image.Image, image_hw) -> torch.Tensor:
    """The mask at latent resolution: binarised at 0.5 (white = repaint), then nearest-downsampled 8x."""
    pixels = pipe.mask_processor.preprocess(mask, height=image_hw[0], width=image_hw[1])
    size = (image_hw[0] // pipe.vae_scale_factor, image_hw[1] // pipe.vae_scale_factor)
    return F.interpolate(pixels, size=size).to(pipe.device, pipe.unet.dtype)


def _step_kwargs(scheduler, generator) -> dict:
    """``eta=0`` (deterministic DDIM) and the generator, for the schedulers whose ``step`` takes them."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs = {"eta": 0.0} if "eta" in accepted else {}
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


def _check_size(pipe, height, width) -> tuple[int, int]:
    """Default to the model's native size; otherwise require multiples of the VAE's 8x downsampling."""
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height = native if height is None else height
    width = native if width is None else width
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % pipe.vae_scale_factor:
            raise ValueError(f"{name}: {value!r} is not allowed; use a positive multiple of {pipe.vae_scale_factor}")
    return height, width

"""Live explorers for the generation chapters, and the studio (:mod:`sdhelpers.studio`), built from ipywidgets.

Each explorer regenerates on every change of a control; TinySD takes about half a second per image on
a laptop CPU, so they feel live there. The picture is an ``ipywidgets.Image`` holding PNG bytes, so the
last image is saved with the notebook's widget state and the static book shows it too.
"""

from __future__ import annotations

import io

import ipywidgets as widgets
from PIL import Image

from sdhelpers.device import Timer, make_generator
from sdhelpers.libraries import quiet_libraries
from sdhelpers.schedulers import SCHEDULERS, use_scheduler


def _working_copy(pipe, pipeline_class):
    """A pipeline of ``pipeline_class`` sharing ``pipe``'s weights, quiet (no progress bar, no load chatter)."""
    with quiet_libraries():
        work = pipeline_class.from_pipe(pipe)
    work.set_progress_bar_config(disable=True)
    return work


def _png(image: Image.Image, scale: int = 4) -> bytes:
    buffer = io.BytesIO()
    image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST).save(buffer, format="PNG")
    return buffer.getvalue()


def _explorer(controls: dict[str, widgets.Widget], generate) -> widgets.Box:
    """Lay out ``controls`` beside an image, and re-run ``generate(**values) -> PIL image`` on every change."""
    picture = widgets.Image(format="png", width=256, height=256)
    status = widgets.Label()

    def refresh(_change=None) -> None:
        values = {name: control.value for name, control in controls.items()}
        with Timer() as timer:
            image = generate(**values)
        picture.value = _png(image)
        status.value = f"{timer.seconds:.2f} s"

    for control in controls.values():
        control.observe(refresh, names="value")
    refresh()
    return widgets.HBox([widgets.VBox([*controls.values(), status]), picture])


def _common_controls(prompt: str, seed: int, scheduler: str, steps: int,
                     guidance_scale: float) -> dict[str, widgets.Widget]:
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not 1 <= guidance_scale <= 15:
        raise ValueError(f"guidance_scale: {guidance_scale!r} is not allowed; use a number from 1 to 15 (the slider's range)")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler: {scheduler!r} is not a known scheduler; use one of {', '.join(SCHEDULERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 50:
        raise ValueError(f"steps: {steps!r} is not allowed; use an integer from 1 to 50 (the slider's range)")
    style = {"description_width": "80px"}
    return {
        "prompt": widgets.Text(value=prompt, description="prompt", continuous_update=False, style=style,
                               layout=widgets.Layout(width="420px")),
        "guidance_scale": widgets.FloatSlider(value=guidance_scale, min=1.0, max=15.0, step=0.5, description="guidance",
                                              continuous_update=False, style=style),
        "steps": widgets.IntSlider(value=steps, min=1, max=50, description="steps", continuous_update=False, style=style),
        "seed": widgets.IntText(value=seed, description="seed", style=style),
        "scheduler": widgets.Dropdown(options=list(SCHEDULERS), value=scheduler, description="scheduler", style=style),
    }


def txt2img_explorer(pipe, prompt: str = "a red circle on a blue background", seed: int = 0,
                     scheduler: str = "pndm", steps: int = 25, guidance_scale: float = 7.5) -> widgets.Box:
    """Prompt, guidance scale, steps, seed and scheduler, regenerating on every change.

    ``scheduler`` (a name of :data:`~sdhelpers.sampling.SCHEDULERS`), ``steps`` and ``guidance_scale``
    (SD's default 7.5 to start) set the controls' starting values; the first image is rendered at once, so a saved notebook shows it.

    It works on a copy of ``pipe`` that shares its weights, so swapping the scheduler here leaves
    the reader's pipeline as it was.
    """
    from diffusers import StableDiffusionPipeline

    work = _working_copy(pipe, StableDiffusionPipeline)

    def generate(prompt, guidance_scale, steps, seed, scheduler):
        use_scheduler(work, scheduler)
        generator = make_generator(seed, work.device)
        return work(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator).images[0]

    return _explorer(_common_controls(prompt, seed, scheduler, steps, guidance_scale), generate)


def img2img_explorer(pipe, image: Image.Image, prompt: str = "a red circle on a blue background",
                     seed: int = 0, scheduler: str = "pndm", steps: int = 25,
                     strength: float = 0.6, guidance_scale: float = 7.5) -> widgets.Box:
    """The same controls plus a ``strength`` slider: how much noise is added to ``image`` before denoising."""
    from diffusers import StableDiffusionImg2ImgPipeline

    work = _working_copy(pipe, StableDiffusionImg2ImgPipeline)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.05 <= strength <= 1.0:
        raise ValueError(f"strength: {strength!r} is not allowed; use a number from 0.05 to 1 (the slider's range)")
    controls = _common_controls(prompt, seed, scheduler, steps, guidance_scale)
    controls["strength"] = widgets.FloatSlider(value=strength, min=0.05, max=1.0, step=0.05, description="strength",
                                               continuous_update=False, style={"description_width": "80px"})

    def generate(prompt, guidance_scale, steps, seed, scheduler, strength):
        use_scheduler(work, scheduler)
        generator = make_generator(seed, work.device)
        if int(steps * strength) < 1:  # too little noise to take a single step: the input comes back
            return image
        return work(prompt, image=image, strength=strength, num_inference_steps=steps,
                    guidance_scale=guidance_scale, generator=generator).images[0]

    return _explorer(controls, generate)


def studio(pipe, **options) -> widgets.Tab:
    """The studio: text to image, image to image and inpainting in one app, a tab each.

    See :func:`sdhelpers.studio_app.studio` for the options; ``studio(pipe)`` opens it on ``pipe``.
    """
    from sdhelpers.studio_app import studio as open_studio

    return open_studio(pipe, **options)

"""Live explorers for the generation chapters, built from ipywidgets.

Each explorer regenerates on every change of a control; TinySD takes about half a second per image on
a laptop CPU, so they feel live there. The picture is an ``ipywidgets.Image`` holding PNG bytes, so the
last image is saved with the notebook's widget state and the static book shows it too.
"""

from __future__ import annotations

import io

import ipywidgets as widgets
from PIL import Image

from sdhelpers.device import Timer, make_generator
from sdhelpers.sampling import SCHEDULERS, use_scheduler


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


def _common_controls(prompt: str, seed: int) -> dict[str, widgets.Widget]:
    style = {"description_width": "80px"}
    return {
        "prompt": widgets.Text(value=prompt, description="prompt", continuous_update=False, style=style,
                               layout=widgets.Layout(width="420px")),
        "guidance_scale": widgets.FloatSlider(value=7.5, min=1.0, max=15.0, step=0.5, description="guidance",
                                              continuous_update=False, style=style),
        "steps": widgets.IntSlider(value=25, min=1, max=50, description="steps", continuous_update=False, style=style),
        "seed": widgets.IntText(value=seed, description="seed", style=style),
        "scheduler": widgets.Dropdown(options=list(SCHEDULERS), value="pndm", description="scheduler", style=style),
    }


def txt2img_explorer(pipe, prompt: str = "a red circle on a blue background", seed: int = 0) -> widgets.Box:
    """Prompt, guidance scale, steps, seed and scheduler, regenerating on every change.

    It works on a copy of ``pipe`` that shares its weights, so swapping the scheduler here leaves
    the reader's pipeline as it was.
    """
    from diffusers import StableDiffusionPipeline

    work = StableDiffusionPipeline.from_pipe(pipe)

    def generate(prompt, guidance_scale, steps, seed, scheduler):
        use_scheduler(work, scheduler)
        generator = make_generator(seed, work.device)
        return work(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator).images[0]

    return _explorer(_common_controls(prompt, seed), generate)


def img2img_explorer(pipe, image: Image.Image, prompt: str = "a red circle on a blue background",
                     seed: int = 0) -> widgets.Box:
    """The same controls plus a ``strength`` slider: how much noise is added to ``image`` before denoising."""
    from diffusers import StableDiffusionImg2ImgPipeline

    work = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    controls = _common_controls(prompt, seed)
    controls["strength"] = widgets.FloatSlider(value=0.6, min=0.05, max=1.0, step=0.05, description="strength",
                                               continuous_update=False, style={"description_width": "80px"})

    def generate(prompt, guidance_scale, steps, seed, scheduler, strength):
        use_scheduler(work, scheduler)
        generator = make_generator(seed, work.device)
        if int(steps * strength) < 1:  # too little noise to take a single step: the input comes back
            return image
        return work(prompt, image=image, strength=strength, num_inference_steps=steps,
                    guidance_scale=guidance_scale, generator=generator).images[0]

    return _explorer(controls, generate)

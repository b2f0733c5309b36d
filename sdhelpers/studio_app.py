"""The studio's app: ipywidgets tabs that gather the settings and call :class:`sdhelpers.studio.Studio`.

Split from the logic so that the logic is tested without widgets. Open it with
``sdhelpers.widgets.studio(pipe)``; in the HTML book the controls do nothing (they need a kernel),
so the chapter that opens it also shows its first results as a figure.
"""

from __future__ import annotations

import html

import ipywidgets as widgets

from sdhelpers.device import Timer
from sdhelpers.schedulers import SCHEDULERS
from sdhelpers.studio import (
    MASK_PRESETS,
    MAX_GUIDANCE,
    MAX_STEPS,
    SKETCHES,
    TAB_TITLES,
    TASKS,
    UPLOAD,
    Result,
    Studio,
    StudioError,
    read_upload,
)
from sdhelpers.widgets import _png


_STYLE = {"description_width": "110px"}


def _caption_html(caption: str, width: int) -> str:
    lines = "<br>".join(html.escape(line) for line in caption.splitlines())
    return f"<div style='width:{width}px;font-size:12px;line-height:1.3'>{lines}</div>"


class _Tab:
    """The controls and the result area of one task, wired to :meth:`Studio.generate`."""

    def __init__(self, session: Studio, task: str, defaults: dict) -> None:
        self.session, self.task = session, task
        self.controls: dict[str, widgets.Widget] = {
            "prompt": widgets.Textarea(value=defaults["prompt"], description="prompt",
                                       rows=2, style=_STYLE, layout={"width": "380px"}),
            "negative_prompt": widgets.Text(description="negative prompt", style=_STYLE,
                                            layout={"width": "380px"}),
        }
        self.uploads: dict[str, widgets.FileUpload] = {}
        if task != "txt2img":
            self._source("image", SKETCHES)
            if task == "inpaint":
                self._source("mask", MASK_PRESETS)
            self.controls["strength"] = widgets.FloatSlider(
                value=1.0 if task == "inpaint" else 0.6, min=0.05, max=1.0, step=0.05,
                description="strength", style=_STYLE)
        self.controls.update({
            "steps": widgets.IntSlider(value=defaults["steps"], min=1, max=MAX_STEPS,
                                       description="steps", style=_STYLE),
            "guidance_scale": widgets.FloatSlider(value=defaults["guidance_scale"], min=1.0,
                                                  max=MAX_GUIDANCE, step=0.5,
                                                  description="guidance", style=_STYLE),
            "seed": widgets.IntText(value=defaults["seed"], description="seed", style=_STYLE),
            "scheduler": widgets.Dropdown(options=list(SCHEDULERS), value=defaults["scheduler"],
                                          description="scheduler", style=_STYLE),
        })
        self.result: Result | None = None
        self.button = widgets.Button(description="Generate", button_style="primary")
        self.button.on_click(lambda _button: self.generate())
        self.message = widgets.HTML()
        self.picture = widgets.Image(format="png", width=256, height=256)
        self.caption = widgets.HTML()
        self.history = widgets.HBox()
        rows = [*self.controls.values(), *self.uploads.values(), self.button, self.message]
        result = widgets.VBox([self.picture, self.caption, self.history])
        self.box = widgets.HBox([widgets.VBox(rows), result])

    def _source(self, field: str, choices) -> None:
        self.controls[field] = widgets.Dropdown(options=[*choices, UPLOAD], description=field,
                                                style=_STYLE)
        upload = widgets.FileUpload(accept="image/*", multiple=False,
                                    description=f"upload {field}")
        upload.observe(lambda _change: self._uploaded(field), "value")
        self.uploads[field] = upload

    def _uploaded(self, field: str) -> None:
        """A new upload is chosen at once, and checked at once: a bad file is named right away."""
        self.controls[field].value = UPLOAD
        file = self.uploads[field].value[0] if self.uploads[field].value else None
        try:
            if file is not None:
                read_upload(file["content"], field, repr(file["name"]))
            self.message.value = ""
        except StudioError as error:
            self._error(error)

    def _error(self, error: StudioError) -> None:
        self.message.value = f"<b style='color:#b00020'>{html.escape(str(error))}</b>"

    def values(self) -> dict:
        values = {name: control.value for name, control in self.controls.items()}
        for field, upload in self.uploads.items():
            if values[field] == UPLOAD:
                if not upload.value:
                    raise StudioError(field, "choose a file with the upload button first")
                values[field] = (upload.value[0]["name"], upload.value[0]["content"])
        return values

    def generate(self) -> Result | None:
        """Run the task on the controls' values; show the result, or the error in the tab."""
        try:
            with Timer() as timer:
                result = self.session.generate(self.task, **self.values())
        except StudioError as error:
            self._error(error)
            return None
        if self.picture.value:  # the previous result moves into the history row
            old = widgets.VBox([widgets.Image(value=self.picture.value, width=128, height=128),
                                widgets.HTML(self.caption.value.replace("256px", "128px"))])
            self.history.children = (old, *self.history.children)[:3]
        scale = max(1, 256 // result.image.width)
        self.picture.value = _png(result.image, scale)
        self.caption.value = _caption_html(result.caption, 256)
        self.message.value = f"<span style='color:gray'>done in {timer.seconds:.1f} s</span>"
        self.result = result
        return result


def studio(pipe, prompt: str = "a red circle on a blue background", steps: int = 25,
           guidance_scale: float = 7.5, seed: int = 0, scheduler: str = "pndm",
           render: bool = True) -> widgets.Tab:
    """The studio app: a tab per task (:data:`TASKS`), each with a Generate button.

    ``prompt``, ``steps``, ``guidance_scale`` (SD's default 7.5), ``seed`` and ``scheduler`` set
    every tab's starting values. With ``render`` each tab generates once as the app opens, so a saved
    notebook shows a result in every tab. The returned ``Tab`` carries ``.session`` (the
    :class:`Studio`) and ``.tabs`` (task -> the tab's controls, ``.generate()`` and ``.result``).
    """
    session = Studio(pipe)
    defaults = dict(prompt=prompt, negative_prompt="", steps=steps,
                    guidance_scale=guidance_scale, seed=seed, scheduler=scheduler)
    session._check(prompt, "", steps, guidance_scale, seed, scheduler)
    tabs = {task: _Tab(session, task, defaults) for task in TASKS}
    if render:
        for tab in tabs.values():
            tab.generate()
    app = widgets.Tab(children=[tab.box for tab in tabs.values()],
                      titles=[TAB_TITLES[task] for task in TASKS])
    app.session, app.tabs = session, tabs
    return app

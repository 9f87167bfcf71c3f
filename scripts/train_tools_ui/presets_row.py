"""The Train page's presets row: fill every setting from a preset (built-in or the user's), or save the page's
settings as the user's own preset (lib_train.engine.presets; stored in the extension's data folder)."""

from __future__ import annotations

import html

import gradio as gr

from lib_train.common.errors import TrainToolsError
from lib_train.common.i18n import tr
from lib_train.engine.presets import PRESET_KEYS

from .webui_context import jobs

# The built-in presets' names as the list shows them (the API and the files keep the English names).
BUILTIN_LABELS = {"SD1.5 character": tr("SD1.5 character"), "SD1.5 style": tr("SD1.5 style"),
                  "SDXL character": tr("SDXL character"), "SDXL style": tr("SDXL style")}


def _choices() -> list[str]:
    return [BUILTIN_LABELS.get(p.name, p.name) if p.builtin else p.name for p in jobs().presets.all()]


def _name_of(label: str) -> str:
    return next((name for name, shown in BUILTIN_LABELS.items() if shown == label), label)


def _arguments_text(arguments: dict) -> str:
    """Optimizer arguments as the page's key=value field reads them back."""
    def value(v):
        return repr(v) if isinstance(v, str) else str(tuple(v)) if isinstance(v, list) else str(v)

    return " ".join(f"{key}={value(v)}" for key, v in arguments.items())


def _status(text: str, error: bool = False) -> str:
    return f"<div class='{'error' if error else ''}'>{html.escape(text)}</div>"


def build() -> dict:
    with gr.Row():
        choices = _choices()
        preset = gr.Dropdown(choices, value=choices[0], label=tr("Preset"), elem_id="train_tools_preset")
        apply = gr.Button(tr("Apply preset"), elem_id="train_tools_preset_apply")
        name = gr.Textbox(label=tr("Name for my preset"), placeholder=tr("e.g. my character"),
                          elem_id="train_tools_preset_name")
        save = gr.Button(tr("Save my settings as a preset"), elem_id="train_tools_preset_save")
    status = gr.HTML(elem_id="train_tools_preset_status")
    return {"preset": preset, "apply": apply, "name": name, "save": save, "status": status}


def wire(row: dict, settings: dict, shown_defaults: gr.State) -> None:
    """``settings``: the Train page's setting components by TrainConfig name; ``shown_defaults``: the family
    defaults the form shows (a preset brings its own family's, so a later model switch moves only untouched values)."""
    keys = list(settings)

    def apply(label: str):
        try:
            preset = jobs().presets.get(_name_of(label))
            values = jobs().preset_values(preset.name)
        except TrainToolsError as error:
            return [gr.update(), *[gr.update()] * len(keys), _status(str(error), error=True)]
        values["optimizer_args"] = _arguments_text(values["optimizer_args"])
        family = jobs().preset_defaults(preset.family)  # the defaults the form now shows
        note = tr("Settings filled from the preset {name}.", name=label)
        outside = preset.changed_outside(keys)
        if outside:
            note += tr(" This page has no field for its {keys}: a training from this page keeps their defaults (a "
                       "train body with this preset in the API uses them).", keys=", ".join(outside))
        if preset.family.value != jobs().loaded_family().value:
            note += tr(" It is meant for {family} models; the loaded model is {loaded}.",
                       family=preset.family.value.upper(), loaded=jobs().loaded_family().value.upper())
        return [family, *[gr.update(value=values[k]) if k in values else gr.update() for k in keys], _status(note)]

    def save(preset_name: str, *values):
        given = {k: v for k, v in zip(keys, values) if k in PRESET_KEYS}
        try:
            saved = jobs().presets.save(preset_name or "", jobs().loaded_family().value, given)
        except TrainToolsError as error:
            return gr.update(), _status(str(error), error=True)
        return (gr.update(choices=_choices(), value=saved.name),
                _status(tr("Saved the preset {name} ({count} settings).", name=saved.name, count=len(saved.settings))))

    row["apply"].click(fn=apply, inputs=[row["preset"]], outputs=[shown_defaults, *settings.values(), row["status"]])
    row["save"].click(fn=save, inputs=[row["name"], *settings.values()], outputs=[row["preset"], row["status"]])

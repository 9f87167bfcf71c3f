"""WebUI glue for Train Tools: the tab, the settings section and the HTTP API.

Everything that trains lives in ``lib_train`` (importable here because the WebUI puts the extension
root on sys.path while it loads this file). The tab's pages live in ``scripts/train_tools_ui/``, a package
the WebUI does not run as scripts; it is imported by path under the name ``train_tools_ui``.
"""

from __future__ import annotations

import importlib.util
import secrets
import sys
from pathlib import Path

import gradio as gr
from fastapi import Body, Depends, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from modules import script_callbacks, shared

from lib_train.common.errors import TrainToolsError
from lib_train.common.i18n import LANGUAGE_SETTINGS, choose_language, set_language, tr


def _apply_language() -> None:
    """Our words follow the WebUI's localization (read when the UI is built: the WebUI's Localization setting
    itself needs a Reload UI). Rendered here in Python, so no localization file of ours competes with the user's."""
    data = shared.opts.data
    bilingual = data.get("bilingual_localization_file") if data.get("bilingual_localization_enabled", True) else None
    set_language(choose_language(data.get("train_tools_language"), data.get("localization"), bilingual))


_apply_language()  # before the options and pages below are built with tr()

# Registered at import, not in on_ui_settings, so the options also exist under --nowebui.
shared.options_templates.update(shared.options_section(("train_tools", "Train Tools"), {
    "train_tools_verify_restore": shared.OptionInfo(
        True, tr("Prove after every training that the live model is unchanged (hashes UNet, text encoder and VAE)")),
    "train_tools_cache_limit_gb": shared.OptionInfo(
        4.0, tr("Cache of latents and caption embeddings: at most this many GB per training folder (least recently "
                "used removed first)"), gr.Number),  # the WebUI picks a component itself only for str, int and bool
    "train_tools_language": shared.OptionInfo(
        "Auto", tr("Language of the Train Tools tab (Auto: Chinese with a Simplified Chinese localization, else English)"),
        gr.Radio, {"choices": list(LANGUAGE_SETTINGS)}).needs_reload_ui(),
}))


def _import_ui_package():
    """Fresh on every (re)load of this script, so "Reload UI" picks up the pages again."""
    folder = Path(__file__).with_name("train_tools_ui")
    spec = importlib.util.spec_from_file_location("train_tools_ui", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    for name in [n for n in sys.modules if n == "train_tools_ui" or n.startswith("train_tools_ui.")]:
        del sys.modules[name]
    package = importlib.util.module_from_spec(spec)
    sys.modules["train_tools_ui"] = package
    spec.loader.exec_module(package)
    return package


_import_ui_package()
from train_tools_ui import dataset_page, grid_page, train_page  # noqa: E402
from train_tools_ui.webui_context import jobs  # noqa: E402


def on_ui_tabs():
    _apply_language()
    with gr.Blocks(analytics_enabled=False) as tab:
        name, trigger, base_model = train_page.build_header()
        with gr.Tabs(elem_id="train_tools_pages"):
            # The Dataset page comes first but sets the Train page's folder: its tab is placed now, filled below.
            dataset_tab = gr.Tab(tr("Dataset"), elem_id="train_tools_page_dataset")
            with gr.Tab(tr("Train"), elem_id="train_tools_page_train") as train_tab:
                train = train_page.build(name, trigger)
            with gr.Tab(tr("Preview grid"), elem_id="train_tools_page_grid"):
                grid_page.build(name, trigger, train["train_event"])
            with dataset_tab:
                dataset_page.build(name, trigger, train["train_dir"])
        train_page.wire_project_choice(name, trigger, train["train_dir"])
        tab.load(fn=train_page.project_choices, inputs=[], outputs=[name])  # the list as it is when the page loads
        train_page.wire_family_defaults(train, base_model, [tab.load, train_tab.select])
    return [(tab, "Train Tools", "train_tools")]


# -- HTTP API --------------------------------------------------------------------------------------

def _auth_dependencies() -> list:
    """The same HTTP Basic credentials as the WebUI's own API when --api-auth is set."""
    if not shared.cmd_opts.api_auth:
        return []
    credentials = dict(item.split(":", 1) for item in shared.cmd_opts.api_auth.split(",") if ":" in item)
    basic = HTTPBasic()

    def check(given: HTTPBasicCredentials = Depends(basic)) -> None:
        expected = credentials.get(given.username)
        if expected is None or not secrets.compare_digest(given.password, expected):
            raise HTTPException(status_code=401, detail=tr("Incorrect username or password"),
                                headers={"WWW-Authenticate": "Basic"})

    return [Depends(check)]


def on_app_started(demo, app) -> None:
    dependencies = _auth_dependencies()

    @app.post("/train-tools/v1/train", dependencies=dependencies)
    def start_training(settings: dict = Body(...)):
        """Start a training from the tab's settings as JSON (name, train_dir, trigger_words, epochs, ...)."""
        runner = jobs()
        try:
            job = runner.run_in_background(runner.prepare(settings))
        except TrainToolsError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        return job.to_dict()

    @app.post("/train-tools/v1/continue", dependencies=dependencies)
    def continue_training(body: dict = Body(...)):
        """Continue the project's run from its last saved epoch: {name, accept_changes?, ...settings to change}.
        Without accept_changes, changed settings or pictures stop the job before any step: its status is "failed",
        its error names them and "changes" lists them."""
        runner = jobs()
        settings = {key: value for key, value in body.items() if key != "accept_changes"}
        try:
            job = runner.run_in_background(runner.prepare_continue(settings), resume=True,
                                           accept_changes=body.get("accept_changes"))
        except TrainToolsError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        return job.to_dict()

    @app.post("/train-tools/v1/save-now", dependencies=dependencies)
    def save_now():
        """An extra file of the running training's network after its current step (name-stepNNNNNN); it goes on."""
        try:
            return jobs().save_now().to_dict()
        except TrainToolsError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None

    @app.get("/train-tools/v1/recommend", dependencies=dependencies)
    def recommend(name: str):
        """The saved epoch of lowest validation loss, and whether the loss was still falling ({} without two; epoch
        and file null when losses that are not numbers, named in not_finite_epochs, leave fewer than two)."""
        try:
            found = jobs().recommend(name)
        except TrainToolsError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        return found.to_dict() if found else {}

    @app.post("/train-tools/v1/prepare", dependencies=dependencies)
    def start_prepare(settings: dict = Body(...)):
        """Fill the training folder's cache for these settings (the train body), so the training starts at once."""
        runner = jobs()
        try:
            job = runner.prepare_in_background(runner.prepare(settings))
        except TrainToolsError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        return job.to_dict()

    @app.post("/train-tools/v1/find-lr", dependencies=dependencies)
    def start_find_lr(settings: dict = Body(...)):
        """Find the learning rate on the live model for these settings (the train body; lr_finder_steps steps).
        The status then has learning_rates (per part) and lr_history; nothing is saved."""
        runner = jobs()
        try:
            job = runner.find_lr_in_background(runner.prepare(settings, for_finder=True))
        except TrainToolsError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        return job.to_dict()

    @app.get("/train-tools/v1/cache", dependencies=dependencies)
    def cache_size(train_dir: str):
        try:
            size = jobs().cache_size(train_dir)
        except TrainToolsError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        return {"latents": size.latents, "captions": size.captions, "bytes": size.bytes} if size else {}

    @app.post("/train-tools/v1/cache/clear", dependencies=dependencies)
    def clear_cache(body: dict = Body(...)):
        try:
            return {"removed": jobs().clear_cache(str(body.get("train_dir", "")))}
        except TrainToolsError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None

    @app.post("/train-tools/v1/grid", dependencies=dependencies)
    def start_grid(settings: dict = Body(...)):
        """Render a preview grid: name, prompt, weights ("0.4, 0.6, 1" or a list), epochs, seeds, sampler, ..."""
        runner = jobs()
        try:
            job = runner.render_grid_in_background(runner.prepare_grid(settings))
        except TrainToolsError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        return job.to_dict()

    @app.post("/train-tools/v1/choose", dependencies=dependencies)
    def choose(body: dict = Body(...)):
        """Make a grid cell's epoch the LoRA's file: {name, grid_folder, x, y, delete_others?} (a pixel of grid.png)."""
        name = str(body.get("name", "")).strip()
        try:
            picked = jobs().pick(name, str(body.get("grid_folder", "")), body.get("x", -1), body.get("y", -1))
            if picked is None:
                raise HTTPException(status_code=400, detail=tr("No grid cell at that point."))
            result = jobs().choose(name, picked.file, picked.weight, picked.picture, body.get("delete_others"))
        except TrainToolsError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        return {"final": str(result.final_path), "epoch": result.chosen.epoch, "weight": result.weight,
                "preview": str(result.preview_path), "deleted": [str(p) for p in result.deleted]}

    @app.post("/train-tools/v1/class-pictures", dependencies=dependencies)
    def start_class_pictures(settings: dict = Body(...)):
        """Make class pictures for a regularization folder with the loaded model: class_prompt, count, folder (or
        name: the project's regularization/), seed (-1: drawn), negative_prompt, width, height, steps, cfg_scale,
        sampler, repeats. They go to <folder>/<repeats>_<class_prompt>; the status then has reg_folder."""
        runner = jobs()
        try:
            job = runner.class_pictures_in_background(runner.prepare_class_pictures(settings))
        except TrainToolsError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        return job.to_dict()

    @app.post("/train-tools/v1/sample-prompts", dependencies=dependencies)
    def sample_prompts(body: dict = Body(...)):
        """The sample prompt lines a run makes when none are written: {train_dir, trigger_words, sample_count}."""
        try:
            text = jobs().suggested_sample_prompts(str(body.get("train_dir", "")), str(body.get("trigger_words", "")),
                                                   body.get("sample_count", 2))
        except (TrainToolsError, ValueError) as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        return {"sample_prompts": text}

    @app.get("/train-tools/v1/presets", dependencies=dependencies)
    def list_presets():
        """The built-in presets and the user's: name, family, builtin, the settings each changes, and every
        setting it gives (``values``, what a train body with ``"preset": name`` starts from)."""
        runner = jobs()
        return {"presets": [{**p.to_dict(), "values": runner.preset_values(p.name)} for p in runner.presets.all()]}

    @app.post("/train-tools/v1/presets", dependencies=dependencies)
    def save_preset(body: dict = Body(...)):
        """Save the user's preset: {name, settings, family?} (family: the loaded model's when left out)."""
        runner = jobs()
        try:
            family = str(body.get("family") or runner.loaded_family().value)
            preset = runner.presets.save(str(body.get("name", "")), family, body.get("settings", {}))
        except TrainToolsError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        return preset.to_dict()

    @app.post("/train-tools/v1/presets/apply", dependencies=dependencies)
    def apply_preset(body: dict = Body(...)):
        """Every setting of the preset {name}, to send (changed or not) as a train body."""
        try:
            return {"name": str(body.get("name", "")), "settings": jobs().preset_values(str(body.get("name", "")))}
        except TrainToolsError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None

    @app.post("/train-tools/v1/presets/delete", dependencies=dependencies)
    def delete_preset(body: dict = Body(...)):
        try:
            jobs().presets.delete(str(body.get("name", "")))
        except TrainToolsError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        return {"deleted": str(body.get("name", ""))}

    @app.get("/train-tools/v1/status", dependencies=dependencies)
    def training_status():
        job = jobs().current
        return job.to_dict() if job else {"state": "idle"}

    @app.post("/train-tools/v1/stop", dependencies=dependencies)
    def stop_training():
        jobs().stop()
        job = jobs().current
        return job.to_dict() if job else {"state": "idle"}


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_app_started(on_app_started)

"""The Preview grid page: every saved epoch × Lora weight rendered on the training checkpoint, a click on a
cell to pick it, and "use this one" to make it the LoRA's file, preview and preferred weight."""

from __future__ import annotations

import html
import json
from pathlib import Path

import gradio as gr
from modules import call_queue, sd_samplers, shared

from lib_train.common.errors import TrainToolsError
from lib_train.common.i18n import tr
from lib_train.preview.grid_spec import default_prompt, epoch_files, read_lora_metadata
from lib_train.webui.grid import cell_of
from lib_train.webui.grid_render import check_base_model

from .webui_context import jobs

GRID_KEYS = ("prompt", "negative_prompt", "sampler", "steps", "cfg_scale", "width", "height", "seeds", "weights",
             "epochs", "third_axis", "cfg_values")


def _message(text: str, error: bool = False) -> str:
    return f"<div class='{'error' if error else ''}'>{html.escape(text)}</div>"


def _values(name: str, values: tuple) -> dict:
    return dict(zip(GRID_KEYS, values), name=name)


def _render(id_task: str, name: str, *values):
    """Runs inside wrap_gradio_gpu_call: the queue lock is held and shared.state has begun. Returns the grid, its
    folder, the recommended cell (pre-selected), its choice, its explanation and the status (last: the WebUI's
    wrapper appends its timing to the last output)."""
    runner = jobs()
    unpicked = (None, "", "")
    try:
        request = runner.prepare_grid(_values(name, values))
        job = runner.begin()
    except TrainToolsError as error:
        return None, "", *unpicked, _message(str(error), error=True)
    job.id = id_task
    runner.run_grid(job, request)
    grid = Path(job.grid_folder) / "grid.png" if job.grid_folder else None
    text = job.error or job.message
    if job.model_restored:
        text += tr(" The live model is unchanged (verified by hash).")
    picked = _recommended_cell(job) if grid else unpicked
    return (str(grid) if grid else None), job.grid_folder, *picked, _message(text, error=job.state == "failed")


def _recommended_cell(job) -> tuple:
    """The ★ epoch's cell at the weight nearest 1, pre-selected, with what Use would do; nothing without one."""
    if not job.recommended:
        return None, "", _message(tr("No ★ epoch: the files carry no validation loss to compare (or fewer than "
                                     "two)."))
    if not job.recommended["file"]:  # the validation losses were not numbers: the message names their epochs
        return None, "", _message(job.recommended["message"], error=True)
    cell = cell_of(Path(job.grid_folder), Path(job.recommended["file"]), 1.0)
    if cell is None:  # its epoch was not rendered in this grid
        return None, "", _message(job.recommended["message"] + tr(" Its row is not in this grid: add epoch {epoch} "
                                                                  "to Epochs to see it.",
                                                                  epoch=job.recommended["epoch"]))
    return str(cell.picture), _choice_json(cell), _message(tr("{recommendation} Pre-selected: {use}",
                                                              recommendation=job.recommended["message"],
                                                              use=_use_explanation(cell)))


# On an exception the wrapper returns these followed by the error as the last output (the status).
_render_in_queue = call_queue.wrap_gradio_gpu_call(_render, extra_outputs=[None, "", None, "", ""])


def _render_after_training(id_task: str, want: bool, name: str, *values):
    """Not wrapped itself: when the box is unticked nothing is queued and the page is left as it is."""
    if not want:
        return (gr.update(),) * 6
    job = jobs().current
    if job is None or job.kind not in ("train", "continue") or job.state not in ("done", "stopped") \
            or not job.saved_files:
        return (*(gr.update(),) * 5, _message(tr("No preview grid: the training saved no file.")))
    return _render_in_queue(id_task, name, *values)


def _fill_prompt(name: str, trigger: str) -> str:
    name = name.strip()
    files = epoch_files(jobs().folders.lora_dir / name, name) if name else []
    if not files:
        return trigger
    frequency = json.loads((read_lora_metadata(files[-1].path) or {}).get("ss_tag_frequency") or "{}")
    return default_prompt(trigger, frequency)


def _model_check(name: str):
    """Say which checkpoint the LoRA was trained on, and offer to switch back when another one is loaded."""
    name = name.strip()
    files = epoch_files(jobs().folders.lora_dir / name, name) if name else []
    if not files:
        return _message(tr("No saved files for this name yet.")), gr.update(visible=False), ""
    check = check_base_model(jobs().webui, read_lora_metadata(files[0].path) or {})
    if check.matches:
        return _message(tr("{count_files} file(s); trained on the loaded checkpoint.", count_files=len(files))), gr.update(visible=False), ""
    if check.switch_to is None:
        return _message(tr("Trained on {trained_on}, which is not in the WebUI's checkpoint list; {loaded} is "
                           "loaded.", trained_on=check.trained_on, loaded=check.loaded), error=True), gr.update(visible=False), ""
    return (_message(tr("Trained on {switch_to}, but {loaded} is loaded.", switch_to=check.switch_to,
                        loaded=check.loaded), error=True),
            gr.update(visible=True, value=tr("Switch back to {switch_to}", switch_to=check.switch_to)), check.switch_to)


def _switch_back(title: str) -> str:
    if not title:
        return ""
    shared.opts.set("sd_model_checkpoint", title)  # its onchange reloads the weights through the queue
    shared.opts.save(shared.config_filename)
    return _message(tr("Switched to {title}. The checkpoint box at the top shows it after a page reload.",
                       title=title))


def _pick(name: str, grid_folder: str, evt: gr.SelectData):
    if not grid_folder:
        return None, "", ""
    x, y = evt.index
    try:
        picked = jobs().pick(name, grid_folder, x, y)
    except TrainToolsError as error:
        return None, "", _message(str(error), error=True)
    if picked is None:
        return None, "", _message(tr("Click on a picture of the grid."))
    return str(picked.picture), _choice_json(picked), _message(_use_explanation(picked))


def _choice_json(picked) -> str:
    return json.dumps({"file": str(picked.file), "weight": picked.weight, "picture": str(picked.picture)})


def _use_explanation(picked) -> str:
    """What the Use button will do with this cell."""
    label = tr("the final file") if picked.is_final else tr("epoch {epoch}", epoch=picked.epoch)
    return tr("{label} at weight {weight:g} ({name}). Use makes it the LoRA's file {project}.safetensors, this "
              "picture its preview and {weight:g} its preferred weight.", label=label, weight=picked.weight,
              name=picked.file.name, project=picked.file.parent.name)


def _choose(name: str, choice: str, delete_others: bool) -> str:
    if not choice:
        return _message(tr("Click a cell of the grid first."), error=True)
    picked = json.loads(choice)
    try:
        result = jobs().choose(name, Path(picked["file"]), picked["weight"], Path(picked["picture"]), delete_others)
    except TrainToolsError as error:
        return _message(str(error), error=True)
    deleted = tr(" Deleted {count_deleted} other file(s).", count_deleted=len(result.deleted)) if result.deleted else ""
    return _message(tr("{name} is now {label} (preview and preferred weight {weight:g} on its card).{deleted} "
                       "Refresh the Lora cards to see it.", name=result.final_path.name, label=result.chosen.label,
                       weight=result.weight, deleted=deleted))


def build(name: gr.Dropdown, trigger: gr.Textbox, train_event) -> None:
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                prompt = gr.Textbox(label=tr("Prompt"), lines=2, elem_id="train_tools_grid_prompt")
                fill = gr.Button(tr("Fill from the training captions"), elem_id="train_tools_grid_fill")
            negative = gr.Textbox(label=tr("Negative prompt"), lines=1, elem_id="train_tools_grid_negative")
            with gr.Row():
                sampler = gr.Dropdown(sd_samplers.visible_sampler_names(), value="Euler a", label=tr("Sampler"),
                                      elem_id="train_tools_grid_sampler")
                steps = gr.Slider(1, 150, 20, step=1, label=tr("Steps"), elem_id="train_tools_grid_steps")
                cfg = gr.Slider(1, 30, 7, step=0.5, label=tr("CFG scale"), elem_id="train_tools_grid_cfg")
            with gr.Row():
                width = gr.Slider(64, 2048, 512, step=8, label=tr("Width"), elem_id="train_tools_grid_width")
                height = gr.Slider(64, 2048, 512, step=8, label=tr("Height"), elem_id="train_tools_grid_height")
            with gr.Row():
                weights = gr.Textbox("0.4, 0.6, 0.8, 1.0", label=tr("Lora weights (X axis)"), elem_id="train_tools_grid_weights")
                epochs = gr.Textbox("all", label=tr("Epochs (Y axis): all, or e.g. 2, 4, 6"), elem_id="train_tools_grid_epochs")
                seeds = gr.Textbox("1234", label=tr("Seed (several with the seed axis)"), elem_id="train_tools_grid_seeds")
            with gr.Row():
                third_axis = gr.Radio([(tr("none"), "none"), (tr("seed"), "seed"), ("CFG", "cfg")], value="none", label=tr("Third axis"),
                                      elem_id="train_tools_grid_third_axis")
                cfg_values = gr.Textbox("", label=tr("CFG scales (with the cfg axis)"), elem_id="train_tools_grid_cfg_values")
                after_training = gr.Checkbox(False, label=tr("Generate after training"), elem_id="train_tools_grid_after_training")
            with gr.Row():
                check = gr.Button(tr("Check base model"), elem_id="train_tools_grid_check")
                switch = gr.Button(tr("Switch back"), visible=False, elem_id="train_tools_grid_switch")
                render = gr.Button(tr("Render grid"), variant="primary", elem_id="train_tools_grid_render")
                stop = gr.Button(tr("Stop"), elem_id="train_tools_grid_stop")
        with gr.Column(scale=3):
            gr.HTML(elem_id="train_tools_grid_progress")  # written by javascript/train_tools.js
            status = gr.HTML(elem_id="train_tools_grid_status")
            grid = gr.Image(label=tr("Grid: click a cell"), type="filepath", interactive=False, elem_id="train_tools_grid_image")
            with gr.Row():
                cell = gr.Image(label=tr("Picked cell"), type="filepath", interactive=False, height=256,
                                elem_id="train_tools_grid_cell")
                with gr.Column():
                    picked_text = gr.HTML(elem_id="train_tools_grid_picked")
                    delete_others = gr.Checkbox(False, label=tr("Delete the other epoch files"),
                                                elem_id="train_tools_grid_delete_others")
                    use = gr.Button(tr("Use this epoch at this weight"), elem_id="train_tools_grid_use")
            choice_result = gr.HTML(elem_id="train_tools_grid_choice")

    grid_folder, switch_title, choice = gr.Textbox(visible=False), gr.Textbox(visible=False), gr.Textbox(visible=False)
    task_id = gr.Textbox(visible=False)
    settings = [prompt, negative, sampler, steps, cfg, width, height, seeds, weights, epochs, third_axis, cfg_values]
    rendered = [grid, grid_folder, cell, choice, picked_text, status]
    render.click(fn=_render_in_queue, _js="train_tools_grid_start", inputs=[task_id, name, *settings], outputs=rendered)
    train_event.then(fn=_render_after_training, _js="train_tools_grid_after_training",
                     inputs=[task_id, after_training, name, *settings], outputs=rendered)
    stop.click(fn=lambda: jobs().stop(), inputs=[], outputs=[])
    fill.click(fn=_fill_prompt, inputs=[name, trigger], outputs=[prompt])
    check.click(fn=_model_check, inputs=[name], outputs=[status, switch, switch_title])
    switch.click(fn=_switch_back, inputs=[switch_title], outputs=[status])
    grid.select(fn=_pick, inputs=[name, grid_folder], outputs=[cell, choice, picked_text])
    use.click(fn=_choose, inputs=[name, choice, delete_others], outputs=[choice_result])

"""The Train page: settings, Train/Stop, the WebUI's progress bar, loss plot and saved files."""

from __future__ import annotations

import html
import os
import shutil
import time
from functools import partial
from pathlib import Path

import gradio as gr

from modules import call_queue, sd_models, sd_samplers, shared, ui_common

from lib_train.common.errors import TrainToolsError
from lib_train.common.i18n import tr
from lib_train.dataset.training_data import IMAGE_EXTENSIONS
from lib_train.engine.config import MIXED_PRECISIONS, OPTIMIZERS, SCHEDULERS, TrainConfig
from lib_train.engine.optim import OPTIMIZER_KINDS
from lib_train.engine.family_defaults import defaults_switch
from lib_train.engine.loss import HUBER_SCHEDULES, LOSS_TYPES
from lib_train.engine.validation import loss_plot_title, smoothed

from . import presets_row
from .webui_context import jobs


def _setting_components() -> tuple[dict[str, gr.components.Component], dict[str, gr.components.Component]]:
    """The training settings, keyed by their TrainConfig name, with TrainConfig's defaults: the common ones first,
    samples and regularization, the rest in an Advanced accordion grouped by what they change. Also returns the
    controls beside them that are no setting (buttons, the class-picture request)."""
    d = TrainConfig()
    c: dict[str, gr.components.Component] = {}
    extras: dict[str, gr.components.Component] = {}
    with gr.Row():
        c["resolution"] = gr.Slider(256, 2048, d.resolution, step=64, label=tr("Resolution"), elem_id="train_tools_resolution")
        c["epochs"] = gr.Number(d.epochs, label=tr("Epochs"), precision=0, elem_id="train_tools_epochs")
        c["repeats"] = gr.Number(d.repeats, label=tr("Repeats (flat folder or uploads)"), precision=0, elem_id="train_tools_repeats")
        c["batch_size"] = gr.Number(d.batch_size, label=tr("Batch size"), precision=0, elem_id="train_tools_batch_size")
    with gr.Row():
        c["rank"] = gr.Number(d.rank, label=tr("Rank"), precision=0, elem_id="train_tools_rank")
        c["alpha"] = gr.Number(d.alpha, label=tr("Alpha"), elem_id="train_tools_alpha")
        c["unet_lr"] = gr.Number(d.unet_lr, label=tr("UNet learning rate"), elem_id="train_tools_unet_lr")
        c["text_encoder_lr"] = gr.Number(d.text_encoder_lr, label=tr("Text encoder learning rate (0: UNet only, "
                                                                     "each caption then encoded once)"), elem_id="train_tools_text_encoder_lr")
        c["optimizer"] = gr.Dropdown(list(OPTIMIZERS), value=d.optimizer, label=tr("Optimizer"), elem_id="train_tools_optimizer")
    with gr.Row():
        c["save_every_n_epochs"] = gr.Number(d.save_every_n_epochs, label=tr("Save every N epochs"), precision=0, elem_id="train_tools_save_every_n_epochs")
        c["seed"] = gr.Number(d.seed, label=tr("Seed"), precision=0, elem_id="train_tools_seed")
        c["overwrite"] = gr.Checkbox(d.overwrite, label=tr("Overwrite existing files"), elem_id="train_tools_overwrite")
        c["skip_unusable_files"] = gr.Checkbox(d.skip_unusable_files, label=tr("Skip unusable files (listed, left "
                                                                               "untouched)"),
                                               elem_id="train_tools_skip_unusable_files")
        c["validation_loss"] = gr.Checkbox(d.validation_loss, label=tr("Validation loss after each epoch (every "
                                                                       "picture at fixed noise; ★ in the Preview grid)"),
                                           elem_id="train_tools_validation_loss")
    with gr.Row():
        c["initial_lora"] = gr.Textbox(d.initial_lora, label=tr("Start from an existing LoRA file (optional: a path, "
                                                                "or name/name-000004.safetensors in the Lora folder; "
                                                                "same network type, rank and alpha)"),
                                       elem_id="train_tools_initial_lora")
    _sample_settings(c, extras, d)
    _regularization_settings(c, extras, d)
    with gr.Accordion(tr("Advanced"), open=False, elem_id="train_tools_advanced"):
        _network_settings(c, d)
        _optimizer_settings(c, d)
        _loss_settings(c, d)
        _data_settings(c, d)
        _memory_settings(c, d)
    return c, extras


def _sample_settings(c: dict, extras: dict, d: TrainConfig) -> None:
    with gr.Accordion(tr("Samples during training"), open=False, elem_id="train_tools_sample_settings"):
        with gr.Row():
            c["sample_every_n_epochs"] = gr.Number(d.sample_every_n_epochs, label=tr("Sample every N epochs (0: off; "
                                                   "on by default on a GPU)"), precision=0,
                                                   elem_id="train_tools_sample_every_n_epochs")
            c["sample_every_n_steps"] = gr.Number(d.sample_every_n_steps, label=tr("…or every N steps (0: off)"),
                                                  precision=0, elem_id="train_tools_sample_every_n_steps")
            c["sample_count"] = gr.Number(d.sample_count, label=tr("Prompts made when none are written"), precision=0,
                                          elem_id="train_tools_sample_count")
        c["sample_prompts"] = gr.Textbox(d.sample_prompts, lines=3, elem_id="train_tools_sample_prompts",
                                         label=tr("Sample prompts, one per line, with kohya's options --n negative, "
                                                  "--w width, --h height, --d seed, --s steps, --l CFG scale, --ss "
                                                  "sampler, and --m Lora multiplier. Empty: the trigger words with "
                                                  "the most frequent tags"))
        with gr.Row():
            c["sample_sampler"] = gr.Dropdown(sd_samplers.visible_sampler_names(), value=d.sample_sampler,
                                              label=tr("Sampler"), elem_id="train_tools_sample_sampler")
            c["sample_steps"] = gr.Number(d.sample_steps, label=tr("Steps"), precision=0,
                                          elem_id="train_tools_sample_steps")
            c["sample_cfg_scale"] = gr.Number(d.sample_cfg_scale, label=tr("CFG scale"),
                                              elem_id="train_tools_sample_cfg_scale")
            extras["suggest_prompts"] = gr.Button(tr("Write the prompts a run would make"),
                                                  elem_id="train_tools_suggest_prompts")


def _regularization_settings(c: dict, extras: dict, d: TrainConfig) -> None:
    with gr.Accordion(tr("Regularization (class pictures)"), open=False, elem_id="train_tools_reg_settings"):
        with gr.Row():
            c["reg_dir"] = gr.Textbox(d.reg_dir, label=tr("Regularization folder: <N>_<class> subfolders of class "
                                                          "pictures, as kohya's (the folder's name is their caption). "
                                                          "Empty: none"),
                                      elem_id="train_tools_reg_dir")
            c["prior_loss_weight"] = gr.Number(d.prior_loss_weight, label=tr("Prior-loss weight (a class picture's "
                                                                             "loss counts this much; 1: like a "
                                                                             "training picture)"),
                                               elem_id="train_tools_prior_loss_weight")
        with gr.Row():
            extras["class_prompt"] = gr.Textbox(label=tr("Class prompt: what the pictures show in general ('woman', "
                                                         "'dog')"), elem_id="train_tools_class_prompt")
            extras["class_count"] = gr.Number(10, label=tr("Class pictures to make"), precision=0,
                                              elem_id="train_tools_class_count")
            extras["class_seed"] = gr.Number(-1, label=tr("First seed (-1: random; every seed is recorded)"),
                                             precision=0, elem_id="train_tools_class_seed")
        extras["make_class_pictures"] = gr.Button(
            tr("Make class pictures with the loaded model (into the regularization folder above, else the project's)"),
            elem_id="train_tools_make_class_pictures")


def _network_settings(c: dict, d: TrainConfig) -> None:
    from lib_train.engine.config import NETWORK_TYPES  # here: the rest of the page needs no network names

    with gr.Row():
        c["network_type"] = gr.Dropdown(
            list(NETWORK_TYPES), value=d.network_type, elem_id="train_tools_network_type",
            label=tr("Network type: lora (kohya LoRA; LoCon when the conv rank is above 0), locon (LoRA + 3x3 "
                     "convs), loha / lokr (LyCORIS LoHa, LoKr: more expressive per parameter, larger layer set)"))
        c["dora"] = gr.Checkbox(d.dora, label=tr("DoRA: weight decomposition, a trained magnitude per input channel "
                                                 "(LoRA/LoCon only; slower steps)"), elem_id="train_tools_dora")
    with gr.Row():
        c["conv_rank"] = gr.Number(d.conv_rank, label=tr("Conv rank (0: off)"), precision=0, elem_id="train_tools_conv_rank")
        c["conv_alpha"] = gr.Number(d.conv_alpha, label=tr("Conv alpha"), elem_id="train_tools_conv_alpha")
        c["lokr_factor"] = gr.Number(d.lokr_factor, label=tr("LoKr factor (-1: balanced split, smallest file; 4-16: "
                                                             "more capacity; LoKr only)"), precision=0, elem_id="train_tools_lokr_factor")
        c["decompose_both"] = gr.Checkbox(d.decompose_both, label=tr("LoKr: low-rank small factor too (decompose "
                                                                     "both)"),
                                          elem_id="train_tools_decompose_both")


def _optimizer_settings(c: dict, d: TrainConfig) -> None:
    hint = gr.Markdown(_optimizer_hint(d.optimizer), elem_id="train_tools_optimizer_hint")
    c["optimizer"].change(fn=_optimizer_hint, inputs=[c["optimizer"]], outputs=[hint])
    with gr.Row():
        c["optimizer_args"] = gr.Textbox("", label=tr("Optimizer arguments (key=value, as kohya's --optimizer_args: "
                                                      "d_coef=0.5 betas=(0.9, 0.99))"), elem_id="train_tools_optimizer_args")
        c["weight_decay"] = gr.Number(d.weight_decay, label=tr("Weight decay"), elem_id="train_tools_weight_decay")
        c["lr_finder_steps"] = gr.Number(d.lr_finder_steps, label=tr("Learning-rate finder steps"), precision=0,
                                         elem_id="train_tools_lr_finder_steps")
    with gr.Row():
        c["lr_scheduler"] = gr.Dropdown(list(SCHEDULERS), value=d.lr_scheduler, label=tr("Scheduler"), elem_id="train_tools_lr_scheduler")
        c["lr_warmup_steps"] = gr.Number(d.lr_warmup_steps, label=tr("Warmup steps"), precision=0, elem_id="train_tools_lr_warmup_steps")
        c["lr_warmup_ratio"] = gr.Number(d.lr_warmup_ratio, label=tr("…or warmup as a ratio of all steps (0.05)"),
                                         elem_id="train_tools_lr_warmup_ratio")
        c["lr_scheduler_num_cycles"] = gr.Number(d.lr_scheduler_num_cycles, label=tr("Cycles (cosine_with_restarts)"),
                                                 precision=0, elem_id="train_tools_lr_scheduler_num_cycles")
        c["lr_scheduler_power"] = gr.Number(d.lr_scheduler_power, label=tr("Power (polynomial)"),
                                            elem_id="train_tools_lr_scheduler_power")


def _optimizer_hint(name: str) -> str:
    """What is special about the chosen optimizer (adaptive ones take learning rates ≈1.0)."""
    kind = OPTIMIZER_KINDS.get(name)
    return f"*{kind.hint}*" if kind and kind.hint else ""


def _loss_settings(c: dict, d: TrainConfig) -> None:
    with gr.Row():
        c["min_snr_gamma"] = gr.Number(d.min_snr_gamma, label=tr("Min-SNR gamma (0: off)"), elem_id="train_tools_min_snr_gamma")
        c["noise_offset"] = gr.Number(d.noise_offset, label=tr("Noise offset"), elem_id="train_tools_noise_offset")
        c["zero_terminal_snr"] = gr.Checkbox(d.zero_terminal_snr, label=tr("Zero terminal SNR (v-prediction models)"),
                                             elem_id="train_tools_zero_terminal_snr")
    with gr.Row():
        c["loss_type"] = gr.Dropdown(list(LOSS_TYPES), value=d.loss_type, label=tr("Loss (l2: the usual; huber, "
                                                                                   "smooth_l1: pictures far from the rest "
                                                                                   "pull less)"), elem_id="train_tools_loss_type")
        c["huber_schedule"] = gr.Dropdown(list(HUBER_SCHEDULES), value=d.huber_schedule, label=tr("Huber c over the timesteps (snr: like "
                                                                                                  "L2 on the clean steps)"), elem_id="train_tools_huber_schedule")
        c["huber_c"] = gr.Number(d.huber_c, label=tr("Huber c (errors below it count squared, above it linearly)"),
                                 elem_id="train_tools_huber_c")
        c["huber_scale"] = gr.Number(d.huber_scale, label=tr("Huber scale (exponential and constant schedules)"),
                                     elem_id="train_tools_huber_scale")
    with gr.Row():
        c["debiased_estimation_loss"] = gr.Checkbox(d.debiased_estimation_loss, label=tr("Debiased estimation (weigh steps by "
                                                                                         "1/√SNR: more detail, less colour "
                                                                                         "shift)"),
                                                    elem_id="train_tools_debiased_estimation_loss")
        c["multires_noise_iterations"] = gr.Number(d.multires_noise_iterations, label=tr("Multi-resolution noise levels (0: "
                                                                                         "off; 6-10)"), precision=0,
                                                   elem_id="train_tools_multires_noise_iterations")
        c["multires_noise_discount"] = gr.Number(d.multires_noise_discount, label=tr("Multi-resolution noise discount "
                                                                                     "(weight per coarser level)"), elem_id="train_tools_multires_noise_discount")
        c["ip_noise_gamma"] = gr.Number(d.ip_noise_gamma, label=tr("Input perturbation noise (0: off; 0.1 "
                                                                   "regularises)"),
                                        elem_id="train_tools_ip_noise_gamma")
    with gr.Row():
        c["masked_loss"] = gr.Checkbox(d.masked_loss, label=tr("Masked loss: transparent parts of the pictures do "
                                                               "not count"), elem_id="train_tools_masked_loss")
        c["loraplus_lr_ratio"] = gr.Number(d.loraplus_lr_ratio, label=tr("LoRA+ ratio: up weights learn ratio × "
                                                                         "faster (0: off; 16)"), elem_id="train_tools_loraplus_lr_ratio")
        c["loraplus_unet_lr_ratio"] = gr.Number(d.loraplus_unet_lr_ratio, label=tr("LoRA+ ratio of the UNet only (0: the "
                                                                                   "LoRA+ ratio)"), elem_id="train_tools_loraplus_unet_lr_ratio")
        c["loraplus_text_encoder_lr_ratio"] = gr.Number(d.loraplus_text_encoder_lr_ratio, label=tr("LoRA+ ratio of the text encoder only "
                                                                                                   "(0: the LoRA+ ratio)"),
                                                        elem_id="train_tools_loraplus_text_encoder_lr_ratio")


def _data_settings(c: dict, d: TrainConfig) -> None:
    with gr.Row():
        c["enable_buckets"] = gr.Checkbox(d.enable_buckets, label=tr("Aspect-ratio buckets"), elem_id="train_tools_enable_buckets")
        c["min_bucket_reso"] = gr.Number(d.min_bucket_reso, label=tr("Smallest bucket side"), precision=0, elem_id="train_tools_min_bucket_reso")
        c["max_bucket_reso"] = gr.Number(d.max_bucket_reso, label=tr("Largest bucket side"), precision=0, elem_id="train_tools_max_bucket_reso")
        c["flip_aug"] = gr.Checkbox(d.flip_aug, label=tr("Flip augmentation"), elem_id="train_tools_flip_aug")
    with gr.Row():
        c["shuffle_caption"] = gr.Checkbox(d.shuffle_caption, label=tr("Shuffle tags (captions are then encoded at "
                                                                       "every step: slower, more VRAM on SDXL)"), elem_id="train_tools_shuffle_caption")
        c["keep_tokens"] = gr.Number(d.keep_tokens, label=tr("Keep first N tags"), precision=0, elem_id="train_tools_keep_tokens")
        c["caption_tag_dropout_rate"] = gr.Number(d.caption_tag_dropout_rate, label=tr("Tag dropout (each tag after the kept "
                                                                                       "ones left out this often; encoded at "
                                                                                       "every step too)"),
                                                  elem_id="train_tools_caption_tag_dropout_rate")


def _memory_settings(c: dict, d: TrainConfig) -> None:
    with gr.Row():
        c["mixed_precision"] = gr.Dropdown(list(MIXED_PRECISIONS), value=d.mixed_precision, label=tr("Mixed precision"), elem_id="train_tools_mixed_precision")
        c["gradient_checkpointing"] = gr.Checkbox(d.gradient_checkpointing, label=tr("Gradient checkpointing (less VRAM)"), elem_id="train_tools_gradient_checkpointing")


def _base_model_text() -> str:
    model = sd_models.model_data.sd_model  # no load is triggered here
    info = getattr(model, "sd_checkpoint_info", None)
    if info is None:
        return tr("{sd_model_checkpoint} (not loaded yet)", sd_model_checkpoint=shared.opts.sd_model_checkpoint)
    kind = "SD1" if getattr(model, "is_sd1", False) else "SD2" if getattr(model, "is_sd2", False) else \
        "SDXL" if getattr(model, "is_sdxl", False) else "?"
    return tr("{title} — {kind}, hash {hash}", title=info.title, kind=kind, hash=info.shorthash or info.hash)


def _import_uploads(files: list, name: str) -> str:
    """Copies of the uploaded pictures and captions in the project's folder; the originals stay untouched."""
    folder = jobs().folders.projects_dir / name / "pictures"
    folder.mkdir(parents=True, exist_ok=True)
    for upload in files:
        source = Path(getattr(upload, "name", upload))
        original = Path(getattr(upload, "orig_name", None) or source.name).name
        if Path(original).suffix.lower() in IMAGE_EXTENSIONS | {".txt", ".caption"}:
            shutil.copyfile(source, folder / original)
    return str(folder)


def _status_html(job) -> str:
    if job is None:
        return ""
    text = html.escape(job.error or job.message or _STATES.get(job.state, job.state))
    css = "error" if job.state == "failed" or job.model_restored is False else ""
    restored = {True: tr("The live model is unchanged (verified by hash)."), False: "", None: ""}[job.model_restored]
    return f"<div class='{css}'><b>{html.escape(_STATES.get(job.state, job.state))}</b>: {text}<br>{restored}</div>"


def _files_html(job) -> str:
    if job is None or not job.saved_files:
        return ""
    rows = "".join(f"<li>{html.escape(path)} ({os.path.getsize(path) / 2**20:.1f} MB)</li>"
                   for path in job.saved_files if os.path.exists(path))
    return f"<ul class='train-tools-files'>{rows}</ul>"


def _samples_update(job):
    """The run's samples, a row per render (newest first), a column per prompt."""
    if job is None or job.kind not in ("train", "continue") or not job.samples:
        return gr.Gallery.update(value=None)
    columns = max(sample["index"] for sample in job.samples) + 1
    rows = sorted(job.samples, key=lambda sample: (-sample["step"], sample["index"]))
    value = [(sample["file"], tr("epoch {epoch}, step {step}: {prompt}", epoch=sample["epoch"], step=sample["step"],
                                 prompt=job.sample_prompts[sample["index"]]))
             for sample in rows if os.path.exists(sample["file"])]
    return gr.Gallery.update(value=value, columns=columns)


def _loss_frame(job):
    """The training loss, its smoothed curve and the validation loss after each epoch, as the plot's series."""
    import pandas as pd

    history = job.loss_history if job else []
    validation = job.validation_history if job else []
    training, smoothed_training, validated = tr("training"), tr("training, smoothed"), tr("validation")
    rows = [(step, loss, training) for step, loss in history]
    rows += [(step, loss, smoothed_training) for (step, _), loss in zip(history, smoothed([v for _, v in history]))]
    rows += [(step, loss, validated) for _, step, loss in validation]
    return pd.DataFrame(rows, columns=["step", "loss", "series"])


def _loss_title(job) -> str:
    return loss_plot_title(job.validation_history if job else [])


_PARTS = {"unet": "UNet", "text_encoder": tr("text encoder")}
# A job's state as the status line shows it (the API keeps the English words).
_STATES = {"queued": tr("queued"), "running": tr("running"), "done": tr("done"), "stopped": tr("stopped"),
           "failed": tr("failed")}


def _plot_update(job):
    """The loss; for a learning-rate search, its estimate per part as it grows, the rates found in the title."""
    if job is None or job.kind != "find-lr" or not job.lr_history:
        return gr.LinePlot.update(value=_loss_frame(job), x="step", y="loss", color="series", title=_loss_title(job))
    import pandas as pd

    rows = [(step, _PARTS[part], rate) for step, rates in job.lr_history for part, rate in rates.items()]
    frame = pd.DataFrame(rows, columns=["step", "part", "d·lr"])
    found = ", ".join(f"{_PARTS[part]} {rate:.1e}" for part, rate in job.learning_rates.items())
    title = tr("Learning rate found: {found}", found=found) if found else tr("Learning-rate estimate (d·lr)")
    return gr.LinePlot.update(value=frame, x="step", y="d·lr", color="part", title=title, width=420, height=260)


# The last Train click that was refused before it became a job (bad name, folder, settings): the periodic
# refresh shows it instead of the finished job before it, until a new job starts; a running job is shown.
_refusal: tuple[float, str] | None = None


def _refresh():
    job = jobs().current
    running = job is not None and job.state in ("queued", "running")
    if _refusal is not None and not running and (job is None or job.started_at < _refusal[0]):
        return _plot_update(None), _samples_update(None), "", _refusal[1]
    return _plot_update(job), _samples_update(job), _files_html(job), _status_html(job)


def _train(keys: list[str], id_task: str, name: str, trigger_words: str, train_dir: str, uploads, shown: dict,
           *values, prepare_only: bool = False, find_lr: bool = False, resume: tuple[bool, bool] | None = None):
    """Runs inside wrap_gradio_gpu_call: the WebUI queue lock is held and shared.state has begun. With
    ``prepare_only`` it fills the cache (Prepare for training), with ``find_lr`` it finds the learning rate,
    instead of training; with ``resume`` = (use this page's settings, accept changes) it continues the saved run."""
    runner = jobs()
    try:
        settings = dict(zip(keys, values), name=name, trigger_words=trigger_words, train_dir=train_dir)
        # A checkpoint of another family loaded since the page showed its defaults: untouched values follow it.
        settings.update(defaults_switch(settings, shown, runner.family_defaults(shared.sd_model)))
        if resume is not None and not resume[0]:
            config = runner.prepare_continue({"name": name})  # the saved run's settings, whatever the page shows
        else:
            if uploads:
                settings["train_dir"] = _import_uploads(uploads, name.strip() or "unnamed")
            config = (runner.prepare_continue(settings) if resume is not None else
                      runner.prepare(settings, for_finder=find_lr))
        job = runner.begin()
    except TrainToolsError as error:
        global _refusal
        _refusal = (time.time(), f"<div class='error'>{html.escape(str(error))}</div>")
        return "", _refusal[1]
    job.id = id_task
    if resume is not None:
        runner.run(job, config, resume=True, accept_changes=resume[1])
    else:
        (runner.run_find_lr if find_lr else runner.run_prepare if prepare_only else runner.run)(job, config)
    return _files_html(job), _status_html(job)


def _make_class_pictures(id_task: str, name: str, reg_dir: str, class_prompt: str, count, seed):
    """Runs inside wrap_gradio_gpu_call (queue lock held): the class pictures, then their folder as the
    regularization folder. The status HTML comes last (the WebUI's wrapper appends its timing to it)."""
    runner = jobs()
    try:
        request = runner.prepare_class_pictures(dict(name=name, folder=reg_dir, class_prompt=class_prompt,
                                                     count=count, seed=seed))
        job = runner.begin()
    except TrainToolsError as error:
        return gr.update(), f"<div class='error'>{html.escape(str(error))}</div>"
    job.id = id_task
    runner.run_class_pictures(job, request)
    return (gr.update(value=job.reg_folder) if job.reg_folder else gr.update()), _status_html(job)


def _suggest_prompts(train_dir: str, trigger_words: str, count) -> tuple:
    try:
        return gr.update(value=jobs().suggested_sample_prompts(train_dir or "", trigger_words or "", int(count or 2))), ""
    except TrainToolsError as error:
        return gr.update(), f"<div class='error'>{html.escape(str(error))}</div>"


def _continue(keys: list[str], id_task: str, use_page: bool, accept_changes: bool, *inputs):
    """Continue: the saved run's settings, or this page's (their differences are named and need the second box)."""
    return _train(keys, id_task, *inputs, resume=(use_page, accept_changes))


def _save_now() -> str:
    try:
        jobs().save_now()
    except TrainToolsError as error:
        return f"<div class='error'>{html.escape(str(error))}</div>"
    return f"<div>{html.escape(tr('Save now: the network is written after the current step (name-stepNNNNNN); training goes on.'))}</div>"


def _find_lr(keys: list[str], id_task: str, *inputs) -> list:
    """The learning-rate finder, then its rates in the learning-rate fields (2 significant digits) and AdamW in place
    of an adaptive optimizer, which would read them as multipliers. The status HTML comes last (the WebUI's wrapper
    appends its timing to the last output)."""
    files, status = _train(keys, id_task, *inputs, find_lr=True)
    job = jobs().current
    found = job.learning_rates if job is not None and job.id == id_task and job.state == "done" else {}
    optimizer = inputs[5 + keys.index("optimizer")]
    fields = [gr.update(value=float(f"{found[part]:.2g}")) if part in found else gr.update() for part in _PARTS]
    switch = gr.update(value="AdamW") if found and OPTIMIZER_KINDS[optimizer].adaptive else gr.update()
    return [*fields, switch, files, status]


def _follow_loaded_family(keys: list[str], shown: dict, *values) -> list:
    """When the loaded model's family changed (an SDXL checkpoint picked after SD1.5, or back), the settings still
    at the old family's defaults take the new family's; what the user typed stays."""
    wanted = jobs().family_defaults(sd_models.model_data.sd_model)
    changes = defaults_switch(dict(zip(keys, values)), shown, wanted)
    return [wanted, _base_model_text(), *[gr.update(value=changes[k]) if k in changes else gr.update() for k in keys]]


def wire_family_defaults(train: dict, base_model: gr.Textbox, events: list) -> None:
    """``events``: the listeners (page load, opening the Train page) after which the form follows the model."""
    settings = train["settings"]
    for event in events:
        event(fn=partial(_follow_loaded_family, list(settings)), inputs=[train["shown_defaults"], *settings.values()],
              outputs=[train["shown_defaults"], base_model, *settings.values()])


def _cache_html(train_dir: str, done: str = "") -> str:
    """The training folder's cache: what it holds and its bound (Settings → Train Tools)."""
    try:
        size = jobs().cache_size(train_dir or "")
    except TrainToolsError as error:
        return f"<div class='error'>{html.escape(str(error))}</div>"
    if size is None:
        return ""
    limit = jobs().cache_folder(train_dir).limit_bytes / 2**30
    return html.escape(tr("{done}Cache of this folder: {value} (at most {limit:g} GB).", done=done,
                          value=size.describe(), limit=limit))


def _clear_cache(train_dir: str) -> str:
    try:
        removed = jobs().clear_cache(train_dir or "")
    except TrainToolsError as error:
        return f"<div class='error'>{html.escape(str(error))}</div>"
    return _cache_html(train_dir, tr("Removed {removed} cached entries. ", removed=removed))


def build_header() -> tuple[gr.Dropdown, gr.Textbox, gr.Textbox]:
    """What every page shares: the loaded checkpoint, the LoRA (= project) name and its trigger words.
    The name lists the projects already there (newest first) and takes a new one typed in."""
    with gr.Row():
        name = gr.Dropdown(jobs().project_names(), value="", allow_custom_value=True,
                           label=tr("LoRA name (also the project's name): pick a project or type a new name"),
                           elem_id="train_tools_name")
        ui_common.create_refresh_button(name, lambda: None, lambda: {"choices": jobs().project_names()},
                                        "train_tools_name_refresh")
        # Built when the WebUI started: the list is read again on each page load (see on_ui_tabs) and each focus
        # (shown from the next opening: gradio 3 does not redraw a list that is open).
        name.focus(fn=project_choices, inputs=[], outputs=[name])
        trigger = gr.Textbox(label=tr("Trigger words"), placeholder=tr("mychar"), elem_id="train_tools_trigger")
        base_model = gr.Textbox(_base_model_text, label=tr("Base model: training and previews use the checkpoint "
                                                           "and VAE loaded in the WebUI"), interactive=False, elem_id="train_tools_base_model")
    return name, trigger, base_model


def project_choices() -> dict:
    return gr.update(choices=jobs().project_names())


def _project_chosen(name: str, trigger: str, train_dir: str) -> tuple[str, str]:
    """A project picked again brings back its trigger words and its pictures folder; a new name changes nothing."""
    runner = jobs()
    if not name or name not in runner.project_names():
        return trigger, train_dir
    defaults = runner.project_defaults(name)
    return defaults["trigger_words"] or trigger, defaults["train_dir"] or train_dir


def wire_project_choice(name: gr.Dropdown, trigger: gr.Textbox, train_dir: gr.Textbox) -> None:
    name.change(fn=_project_chosen, inputs=[name, trigger, train_dir], outputs=[trigger, train_dir])


def build(name: gr.Dropdown, trigger: gr.Textbox) -> dict[str, gr.components.Component]:
    """Lay out the page inside the caller's Blocks; returns the components other pages link to."""
    with gr.Row():
        with gr.Column(scale=3):
            train_dir = gr.Textbox(label=tr("Training folder on this server (subfolders <N>_<name> repeat N times; "
                                            "captions in <image>.txt)"), elem_id="train_tools_train_dir")
            uploads = gr.File(label=tr("…or upload pictures and their .txt captions"), file_count="multiple",
                              elem_id="train_tools_uploads")
            with gr.Accordion(tr("Settings"), open=True):
                preset_row = presets_row.build()
                components, extras = _setting_components()
            with gr.Row():
                train = gr.Button(tr("Train"), variant="primary", elem_id="train_tools_train")
                stop = gr.Button(tr("Stop"), elem_id="train_tools_stop")
                save_now = gr.Button(tr("Save now (extra file, training goes on)"), elem_id="train_tools_save_now")
            with gr.Row():
                resume = gr.Button(tr("Continue from the last saved epoch"), elem_id="train_tools_continue")
                use_page = gr.Checkbox(False, label=tr("with this page's settings (else the saved run's)"),
                                       elem_id="train_tools_continue_use_page")
                accept_changes = gr.Checkbox(False, label=tr("even if settings or pictures changed (named first; no "
                                                             "longer identical to an uninterrupted run)"),
                                             elem_id="train_tools_continue_accept")
            with gr.Row():
                prepare = gr.Button(tr("Prepare for training (encode pictures and captions ahead)"),
                                    elem_id="train_tools_prepare")
                find_lr = gr.Button(tr("Find learning rate"), elem_id="train_tools_find_lr")
                clear_cache = gr.Button(tr("Clear cache"), elem_id="train_tools_clear_cache")
            cache_info = gr.HTML(elem_id="train_tools_cache_info")
        with gr.Column(scale=2):
            gr.HTML(elem_id="train_tools_progress")  # step text, written by javascript/train_tools.js
            output = gr.HTML(elem_id="train_tools_output")
            loss_plot = gr.LinePlot(_loss_frame(None), x="step", y="loss", color="series", title=tr("Loss"), width=420,
                                    height=260, elem_id="train_tools_loss")
            samples = gr.Gallery(label=tr("Samples: a row per epoch (newest first), a column per prompt"), columns=2,
                                 height=420, elem_id="train_tools_samples")
            files = gr.HTML(elem_id="train_tools_files")
            refresh = gr.Button(tr("Refresh"), elem_id="train_tools_refresh", visible=False)

    task_id = gr.Textbox(visible=False)
    # The family whose defaults the form shows ({}: TrainConfig's, SD1.5), so switching only moves untouched values.
    shown_defaults = gr.State({})
    presets_row.wire(preset_row, components, shown_defaults)
    train_event = train.click(
        fn=call_queue.wrap_gradio_gpu_call(partial(_train, list(components)), extra_outputs=[""]),
        _js="train_tools_start",
        inputs=[task_id, name, trigger, train_dir, uploads, shown_defaults, *components.values()],
        outputs=[files, output],
    )
    prepare.click(
        fn=call_queue.wrap_gradio_gpu_call(partial(_train, list(components), prepare_only=True), extra_outputs=[""]),
        _js="train_tools_start",
        inputs=[task_id, name, trigger, train_dir, uploads, shown_defaults, *components.values()],
        outputs=[files, output],
    ).then(fn=_cache_html, inputs=[train_dir], outputs=[cache_info])
    find_lr.click(
        fn=call_queue.wrap_gradio_gpu_call(partial(_find_lr, list(components)),
                                           extra_outputs=[gr.update(), gr.update(), gr.update(), ""]),
        _js="train_tools_start",
        inputs=[task_id, name, trigger, train_dir, uploads, shown_defaults, *components.values()],
        outputs=[components["unet_lr"], components["text_encoder_lr"], components["optimizer"], files, output],
    )
    resume.click(
        fn=call_queue.wrap_gradio_gpu_call(partial(_continue, list(components)), extra_outputs=[""]),
        _js="train_tools_start",
        inputs=[task_id, use_page, accept_changes, name, trigger, train_dir, uploads, shown_defaults,
                *components.values()],
        outputs=[files, output],
    )
    save_now.click(fn=_save_now, inputs=[], outputs=[output])
    train_event.then(fn=_cache_html, inputs=[train_dir], outputs=[cache_info])
    clear_cache.click(fn=_clear_cache, inputs=[train_dir], outputs=[cache_info])
    train_dir.change(fn=_cache_html, inputs=[train_dir], outputs=[cache_info])
    stop.click(fn=lambda: jobs().stop(), inputs=[], outputs=[])
    refresh.click(fn=_refresh, inputs=[], outputs=[loss_plot, samples, files, output])
    extras["make_class_pictures"].click(
        fn=call_queue.wrap_gradio_gpu_call(_make_class_pictures, extra_outputs=[gr.update()]),
        _js="train_tools_start",
        inputs=[task_id, name, components["reg_dir"], extras["class_prompt"], extras["class_count"], extras["class_seed"]],
        outputs=[components["reg_dir"], output],
    )
    extras["suggest_prompts"].click(fn=_suggest_prompts, inputs=[train_dir, trigger, components["sample_count"]],
                                    outputs=[components["sample_prompts"], output])
    return {"train_dir": train_dir, "train_event": train_event, "settings": components, "shown_defaults": shown_defaults}

"""The Dataset page: import pictures into the project, auto-tag them, curate the tags, check the dataset.

Everything happens in the project ``<projects_dir>/<name>/`` (lib_train.dataset.project_folders): imports are copies,
captions are edited only in its ``pictures/`` folder. Handlers are stateless: each reloads the captions from
disk (the undo history lives in ``caption_history/``), so a reload of the page loses nothing.
"""

from __future__ import annotations

import html
import importlib
import importlib.util
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import gradio as gr
from PIL import Image, ImageDraw

from modules import call_queue, deepbooru, devices, paths, shared

from lib_train.common.errors import ConfigError, DatasetError, TrainToolsError
from lib_train.common.i18n import is_chinese, tr
from lib_train.dataset.health import check_dataset
from lib_train.dataset.image_clean import open_clean
from lib_train.dataset.image_import import ImportReport, PrepareOptions, clean_in_project, import_pictures, original_of
from lib_train.dataset.project_folders import ProjectFolders
from lib_train.dataset.training_data import pictures_in
from lib_train.engine.config import TrainConfig
from lib_train.tagging.auto_tag import MODES, TagOptions, tag_pictures
from lib_train.tagging.caption_editing import CaptionSet, EditSummary
from lib_train.tagging.feature_tags import propose_feature_tags
from lib_train.tagging.tag_glosses import gloss
from lib_train.tagging.wd14 import (WD14Tagger, available_models, download_model, execution_providers,
                                  import_onnxruntime, onnxruntime_package)
from lib_train.webui.path_policy import confine
from lib_train.webui.taggers import (blip_captioner, deepbooru_tagger, wd14_extension_interrogators,
                                     wd14_extension_tagger)

from .webui_context import jobs

CROP_KEEP = tr("Keep each size (aspect-ratio buckets)")
CROP_SQUARE = tr("Square (resolution × resolution)")
CROP_SIZE = tr("Width × height")
NO_UPSCALER = tr("None: only warn about small pictures")
WD14_PREFIX = "WD14: "
EXTENSION_PREFIX = tr("wd14-tagger extension: ")
DEEPBOORU = tr("DeepBooru (WebUI)")
BLIP = tr("BLIP caption (WebUI)")
PREVIEW_SIDE = 640  # the crop-focus preview; clicks are read as fractions of it
LISTED_NAMES = 12  # file names listed in a message before "and N more"
TAG_HEADERS = [tr("Tag"), tr("Images")]
# A Chinese UI shows a gloss of common Danbooru tags beside each tag (the captions keep the English tags).
TAG_COLUMNS = ([TAG_HEADERS[0], tr("Chinese"), TAG_HEADERS[1]], ["str", "str", "number"]) if is_chinese() else \
    (TAG_HEADERS, ["str", "number"])
FINDING_HEADERS = [tr("Severity"), tr("File"), tr("Finding")]
# Radio choices are (shown, value): the value stays the word the tagger (and the API) reads.
MODE_LABELS = {"append": tr("append"), "prepend": tr("prepend"), "overwrite": tr("overwrite")}
# Report and finding kinds: also the rows' CSS classes, so only their shown text is translated.
KIND_LABELS = {"failed": tr("failed"), "skipped": tr("skipped"), "warning": tr("warning"), "error": tr("error"),
               "info": tr("info")}

_tagging = threading.Event()  # set while this page tags, so Stop never interrupts someone else's generation


# -- small helpers ---------------------------------------------------------------------------------

def _project(name: str) -> ProjectFolders:
    if not name.strip():
        raise ConfigError(tr("Give the LoRA a name at the top of the tab: the project (pictures, captions) is named "
                             "after it."))
    return ProjectFolders.for_name(jobs().folders.projects_dir, name)


def _server_folder(path: str, what: str) -> Path:
    """A folder on the server, confined to the WebUI's folders when the WebUI is shared on the network."""
    folders = jobs().folders
    if folders.exposed:
        return confine(path.strip(), [folders.data_dir, folders.projects_dir], what)
    return Path(path.strip()).expanduser()


def _error(error: Exception | str) -> str:
    return f"<div class='train-tools-error'>{html.escape(str(error))}</div>"


def _ok(text: str) -> str:
    return f"<div class='train-tools-ok'>{html.escape(text)}</div>"


def _names(items: list[str] | tuple[str, ...]) -> str:
    shown = ", ".join(items[:LISTED_NAMES])
    return shown + (tr(" and {count} more", count=len(items) - LISTED_NAMES) if len(items) > LISTED_NAMES else "")


def _notes_table(rows: list[tuple[str, str, str]]) -> str:
    """(kind, file, message) rows; the kind is also the row's CSS class (failed rows are red)."""
    if not rows:
        return ""
    body = "".join(f"<tr class='{html.escape(kind)}'><td>{html.escape(KIND_LABELS.get(kind, kind))}</td><td>{html.escape(file)}</td>"
                   f"<td>{html.escape(message)}</td></tr>" for kind, file, message in rows)
    return f"<table class='train-tools-notes'><tr><th></th><th>{html.escape(tr('File'))}</th><th>{html.escape(tr('What happened'))}</th></tr>{body}</table>"


def _gallery(project: ProjectFolders) -> tuple[list[tuple[str, str]], list[str]]:
    """The pictures as gallery items (path, name) and their names, in the same order."""
    pictures = pictures_in(project.pictures) if project.pictures.is_dir() else []
    names = [p.relative_to(project.pictures).as_posix() for p in pictures]
    return [(str(p), n) for p, n in zip(pictures, names)], names


# -- 1. import ----------------------------------------------------------------------------------------

def _colour(value: str) -> tuple[int, int, int]:
    """'#rrggbb' (what gr.ColorPicker gives) as three 0..255 values."""
    text = (value or "").strip().lstrip("#")
    try:
        if len(text) == 6:
            return int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16)
    except ValueError:
        pass
    raise ConfigError(tr("The background colour {value!r} is not a colour like #ffffff.", value=value))


def _prepare_options(background: str, crop: str, resolution: float, width: float, height: float,
                     upscaler: str, focus: dict | None = None) -> PrepareOptions:
    side = int(resolution or 0)
    target = {CROP_KEEP: None, CROP_SQUARE: (side, side), CROP_SIZE: (int(width or 0), int(height or 0))}[crop]
    return PrepareOptions(background=_colour(background), target_size=target, crop_focus=focus or {},
                          training_resolution=side, upscale_small=upscaler != NO_UPSCALER)


def _upscaler(name: str) -> Callable[[Image.Image, int, int], Image.Image] | None:
    """The WebUI upscaler as the import wants it: (picture, width, height) -> picture."""
    if name == NO_UPSCALER:
        return None
    data = next((u for u in shared.sd_upscalers if u.name == name), None)
    if data is None:
        raise ConfigError(tr("The upscaler {name!r} is not available in this WebUI; choose another.", name=name))

    def upscale(image: Image.Image, width: int, height: int) -> Image.Image:
        with call_queue.queue_lock:  # upscalers run on the GPU: never beside a generation or a training
            return data.scaler.upscale(image, max(width / image.width, height / image.height), data.data_path)

    return upscale


def _shown(path: Path, roots: list[Path]) -> str:
    """A reported path without the server's temporary upload folders: relative to the source it came from."""
    for root in roots:
        if path.is_relative_to(root):
            return path.relative_to(root).as_posix()
    return str(path)


def _without_roots(text: str, roots: list[Path]) -> str:
    for root in roots:
        text = text.replace(f"{root}{os.sep}", "")
    return text


def _import_report(report: ImportReport, project: ProjectFolders, roots: list[Path]) -> str:
    notes = [("failed", report.failed), ("skipped", report.skipped), ("warning", report.warnings)]
    rows = [(kind, _shown(n.path, roots), _without_roots(n.reason, roots)) for kind, found in notes for n in found]
    imported = [p.name for p in report.imported]
    css = "train-tools-error" if report.failed else "train-tools-ok"
    into = tr("into {folder}", folder=project.pictures)
    head = f"<div class='{css}'><b>{html.escape(report.summary())}</b> {html.escape(into)}</div>"
    listed = f"<p>{html.escape(tr('Imported: {names}', names=_names(imported)))}</p>" if imported else ""
    return head + _notes_table(rows) + listed


def _import(name, uploads, folder, background, crop, resolution, width, height, upscaler):
    """Returns the report, the training folder for the Train page, the gallery, its names and the uploads
    (emptied once copied, so that a second Import does not bring them in again)."""
    try:
        project = _project(name)
        files = [Path(upload.name) for upload in uploads or []]
        sources = files + ([_server_folder(folder, tr("pictures folder"))] if (folder or "").strip() else [])
        if not sources:
            raise DatasetError(tr("Choose pictures to upload (images, .txt captions, .zip) or give a folder on this "
                                  "server."))
        options = _prepare_options(background, crop, resolution, width, height, upscaler)
        report = import_pictures(sources, project, options, upscale=_upscaler(upscaler))
    except TrainToolsError as error:
        return _error(error), gr.update(), gr.update(), gr.update(), gr.update()
    roots = sorted({f.parent for f in files} | {s.parent for s in sources if s.is_dir()}, key=lambda p: -len(p.parts))
    items, names = _gallery(project)
    return _import_report(report, project, roots), str(project.pictures), items, names, None


# -- crop focus -------------------------------------------------------------------------------------

def _thumbnail(path: Path) -> Image.Image:
    """A small copy for the page (the file is closed again; a 4 MP picture needs no 4 MP preview)."""
    with Image.open(path) as image:
        image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
        return image.convert("RGB")


def _focus_preview(project: ProjectFolders, picture: str, focus: tuple[float, float] | None = None) -> Image.Image:
    """The original, upright and small, with the focus point marked."""
    preview = open_clean(original_of(project, picture))
    preview.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    if focus is not None:
        x, y, r = focus[0] * preview.width, focus[1] * preview.height, max(4, preview.width // 60)
        draw = ImageDraw.Draw(preview)
        draw.ellipse((x - r, y - r, x + r, y + r), outline=(255, 0, 0), width=max(2, r // 2))
        draw.line((x - 3 * r, y, x + 3 * r, y), fill=(255, 0, 0), width=2)
        draw.line((x, y - 3 * r, x, y + 3 * r), fill=(255, 0, 0), width=2)
    return preview


def _set_focus(name, picture, background, crop, resolution, width, height, upscaler, evt: gr.SelectData):
    """A click on the original: re-make that picture cropped around the point (its caption stays)."""
    no_change = (gr.update(),) * 5
    try:
        if not picture:
            raise DatasetError(tr("Select a picture in the gallery first."))
        if crop == CROP_KEEP:
            raise ConfigError(tr("A crop focus needs a crop: choose Square or Width × height under Import, then "
                                 "click again."))
        project = _project(name)
        preview = _focus_preview(project, picture)
        focus = (min(max(evt.index[0] / preview.width, 0.0), 1.0), min(max(evt.index[1] / preview.height, 0.0), 1.0))
        options = _prepare_options(background, crop, resolution, width, height, upscaler, {picture: focus})
        report = clean_in_project(project, options, names=[picture], upscale=_upscaler(upscaler))
    except TrainToolsError as error:
        return (_error(error),) + no_change
    if not report.imported:
        problems = [f"{n.path.name}: {n.reason}" for n in report.failed + report.skipped]
        return (_error("; ".join(problems) or tr("{picture} was not re-made.", picture=picture)),) + no_change
    made = report.imported[0].relative_to(project.pictures).as_posix()
    items, names = _gallery(project)
    message = _ok(tr("{made}: cropped around ({value:.2f}, {value2:.2f}) of the original.", made=made, value=focus[0],
                     value2=focus[1]))
    return message, _focus_preview(project, made, focus), _thumbnail(report.imported[0]), made, items, names


# -- 2. auto-tag --------------------------------------------------------------------------------------

def _tagger_choices() -> list[str]:
    wd14 = [WD14_PREFIX + model for model in available_models(_models_dir())]
    extension = [EXTENSION_PREFIX + name for name in wd14_extension_interrogators()]
    return wd14 + [DEEPBOORU, BLIP] + extension


def _models_dir() -> Path:
    return Path(paths.models_path)


@contextmanager
def _open_tagger(choice: str, general: float, character: float) -> Iterator[Callable]:
    """The chosen tagger, loaded; a model that cannot load becomes a message saying which and what to do."""
    if choice.startswith(WD14_PREFIX):
        use_gpu = getattr(devices.device_interrogate, "type", "cpu") == "cuda"
        tagger = WD14Tagger(download_model(choice[len(WD14_PREFIX):], _models_dir()), execution_providers(use_gpu))
        opened = tagger.session(general, character)
    elif choice.startswith(EXTENSION_PREFIX):
        opened = wd14_extension_tagger(choice[len(EXTENSION_PREFIX):], general, character)
    elif choice == DEEPBOORU:
        opened = deepbooru_tagger(deepbooru)
    elif choice == BLIP:
        opened = blip_captioner(shared.interrogator)
    else:
        raise ConfigError(tr("Unknown tagger {choice!r}.", choice=choice))
    with ExitStack() as stack:
        try:
            tag = stack.enter_context(opened)
        except TrainToolsError:
            raise
        except Exception as error:  # the WebUI's loaders fail in many ways: no network, missing files, memory
            raise TrainToolsError(tr("{choice} could not load its model ({kind}: {error}). {value}", choice=choice,
                                     kind=type(error).__name__, error=error, value=_download_hint(choice))) from None
        yield tag


def _download_hint(choice: str) -> str:
    """Where the WebUI's taggers get their models on first use, for a failed load."""
    models = _models_dir()
    if choice == DEEPBOORU:
        return (tr("The WebUI downloads model-resnet_custom_v3.pt from github.com/AUTOMATIC1111/TorchDeepDanbooru "
                   "(release v1) into {value} on first use; without internet, put it there by hand.",
                   value=models / 'torch_deepdanbooru'))
    if choice == BLIP:
        return (tr("The WebUI downloads BLIP into {value}, CLIP ViT-L/14 and the bert-base-uncased tokenizer on "
                   "first use; without internet they must already be in place.", value=models / 'BLIP'))
    return tr("The wd14-tagger extension downloads its models from Hugging Face on first use; check the connection.")


def _check_tagger(name: str, choice: str):
    """Before the queue lock: the project has pictures, onnxruntime is there, a WD14 model is on disk (downloaded
    now if needed, so that a download never holds up generation). Returns (message, ready, install button)."""
    try:
        pictures = _project(name).pictures
        if not pictures.is_dir():
            raise DatasetError(tr("There are no pictures in {pictures} yet: import some first.", pictures=pictures))
        if choice.startswith(WD14_PREFIX):
            import_onnxruntime()
            download_model(choice[len(WD14_PREFIX):], _models_dir())
    except TrainToolsError as error:
        missing_runtime = choice.startswith(WD14_PREFIX) and importlib.util.find_spec("onnxruntime") is None
        return _error(error), False, gr.update(visible=missing_runtime)
    return _ok(tr("Tagging with {choice}…", choice=choice)), True, gr.update(visible=False)


def _tag(id_task, name, choice, general, character, mode, use_trigger, trigger, blacklist) -> tuple[str]:
    """Runs inside wrap_gradio_gpu_call: the WebUI queue lock is held and shared.state has begun."""
    state = shared.state
    state.textinfo = tr("Loading {choice}…", choice=choice)

    def progress(done: int, total: int, path: Path) -> None:
        state.job_count, state.job_no, state.textinfo = total, done, tr("Tagging {done}/{total}: {name}", done=done,
                                                                         total=total, name=path.name)

    _tagging.set()
    try:
        options = TagOptions(mode=mode, prefix=trigger if use_trigger else "", blacklist=blacklist or "",
                             general_threshold=general, character_threshold=character)
        with _open_tagger(choice, general, character) as tagger:
            report = tag_pictures(_project(name).pictures, tagger, options, lambda: state.interrupted, progress)
    except TrainToolsError as error:
        return (_error(error),)
    finally:
        _tagging.clear()
    summary = tr("{choice}: {count} picture(s) tagged", choice=choice, count=len(report.tagged)) + \
        (tr(", stopped.") if report.stopped else ".")
    rows = [("failed", path.name, reason) for path, reason in report.failed]
    css = "train-tools-error" if report.failed else "train-tools-ok"
    failed = tr(" {count} failed:", count=len(report.failed)) if report.failed else ""
    return (f"<div class='{css}'>{html.escape(summary + failed)}</div>" + _notes_table(rows),)


def _tag_when_ready(locked_tag: Callable) -> Callable:
    def start(id_task, ready, *values):
        return locked_tag(id_task, *values) if ready else gr.update()  # the check showed why not

    return start


def _stop_tagging() -> None:
    if _tagging.is_set():
        shared.state.interrupt()


def _install_onnxruntime() -> str:
    from modules.launch_utils import run_pip

    package = onnxruntime_package(getattr(devices.device_interrogate, "type", "cpu") == "cuda")
    try:
        run_pip(f'install "{package}"', "onnxruntime")  # quoted: the version range has a "<"
    except Exception as error:  # run_pip raises RuntimeError with pip's output
        return _error(tr("Installing {package} failed: {error}", package=package, error=error))
    importlib.invalidate_caches()
    if importlib.util.find_spec("onnxruntime") is None:
        return _error(tr("{package} was not installed: the WebUI runs with --skip-install, which turns pip off. "
                         "Install it yourself: \"{executable}\" -m pip install \"{package}\"", package=package,
                         executable=sys.executable))
    return _ok(tr("{package} is installed. Press Tag pictures again.", package=package))


# -- 3. curate ----------------------------------------------------------------------------------------

def _captions(name: str) -> CaptionSet:
    project = _project(name)
    if not project.pictures.is_dir():
        raise DatasetError(tr("There are no pictures in {pictures} yet: import some first.",
                              pictures=project.pictures))
    return CaptionSet.load(project.pictures, project.caption_history)


def _curation(captions: CaptionSet | None, selected: str, chosen: list[str], message: str) -> tuple:
    """message, frequency table, its tags, images to add to, the selected image's tags, undo button, refused."""
    if captions is None:
        return (message, {"headers": TAG_COLUMNS[0], "data": []}, [], gr.update(choices=[], value=[]), "",
                gr.update(value=tr("Undo"), interactive=False), "")
    frequency = captions.tag_frequency()
    editable = [image for image in captions.images if image not in captions.refused]
    table = {"headers": TAG_COLUMNS[0], "data": [_tag_row(tag, count) for tag, count in frequency]}
    images = gr.update(choices=editable, value=[image for image in chosen or [] if image in editable])
    selected_tags = ", ".join(captions.tags_of(selected)) if selected in editable else ""
    undo_text = tr("Undo: {action}", action=captions.undo_label) if captions.can_undo else tr("Undo")
    refused = "".join(_error(reason) for reason in captions.refused.values())
    return (message, table, [tag for tag, _ in frequency], images, selected_tags,
            gr.update(value=undo_text, interactive=captions.can_undo), refused)


def _tag_row(tag: str, count: int) -> list:
    return [tag, gloss(tag), count] if is_chinese() else [tag, count]


def _with_gloss(tag: str) -> str:
    meaning = gloss(tag)
    return f"{tag}（{meaning}）" if meaning else tag


def _changed(summary: EditSummary) -> str:
    text = str(summary)
    return text + (tr(" Changed: {names}.", names=_names(summary.images)) if summary.images else "")


def _edit(action: Callable[..., EditSummary]) -> Callable:
    """A handler applying one edit and saving it: inputs (name, selected, chosen, *action arguments)."""
    def handler(name, selected, chosen, *values):
        try:
            captions = _captions(name)
            summary = action(captions, *values)
            captions.save()
        except TrainToolsError as error:
            return (_error(error),) + (gr.update(),) * 6
        return _curation(captions, selected, chosen, _ok(_changed(summary)))

    return handler


def _add(captions: CaptionSet, tag: str, images: list[str]) -> EditSummary:
    if not images:
        raise DatasetError(tr("Choose the images to add the tag to."))
    return captions.add_tag(tag or "", images)


def _save_image_tags(captions: CaptionSet, picture: str, text: str) -> EditSummary:
    if not picture:
        raise DatasetError(tr("Select a picture in the gallery first."))
    return captions.set_tags(picture, text or "")


def _refresh(name, selected, chosen):
    """The gallery and the tag views as on disk; an empty project is not an error."""
    try:
        project = _project(name)
        captions = _captions(name) if project.pictures.is_dir() else None
    except TrainToolsError as error:
        return (gr.update(), gr.update()) + _curation(None, "", [], _error(error))
    items, names = _gallery(project)
    note = "" if captions else _ok(tr("No pictures in {pictures} yet: import some above.", pictures=project.pictures))
    return (items, names) + _curation(captions, selected, chosen, note)


def _attempt(make: Callable):
    """(what make() returns, "") or (None, the error as HTML): one part of a view failing leaves the others."""
    try:
        return make(), ""
    except (TrainToolsError, OSError) as error:
        return None, _error(error)


def _select_picture(name, names, evt: gr.SelectData):
    """A gallery click: its name, tags, the training picture and the original to click a crop focus on."""
    picture = names[evt.index] if 0 <= evt.index < len(names) else ""
    project, note = _attempt(lambda: _project(name))
    if project is None:
        return picture, "", None, None, note
    tags, tags_note = _attempt(lambda: ", ".join(_captions(name).tags_of(picture)))
    preview, preview_note = _attempt(lambda: _focus_preview(project, picture))
    prepared, prepared_note = _attempt(lambda: _thumbnail(project.pictures / picture))
    return picture, tags or "", preview, prepared, tags_note + preview_note + prepared_note


def _pick_tag(tags: list[str], evt: gr.SelectData) -> str:
    row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    return tags[row] if 0 <= row < len(tags) else gr.update()


def _propose(name: str, trigger: str):
    """The feature tags to bind to the trigger, all checked; nothing is changed yet."""
    try:
        captions = _captions(name)
        count = len(captions.images) - len(captions.refused)
        proposals = propose_feature_tags(captions.tag_frequency(), count, trigger or "")
    except TrainToolsError as error:
        return _error(error), gr.update(choices=[], value=[], visible=False), gr.update(visible=False)
    if not proposals:
        return (_ok(tr("No intrinsic-feature tags (eyes, hair, face, skin, body…) are in most of the images: "
                       "nothing to bind.")), gr.update(choices=[], value=[], visible=False), gr.update(visible=False))
    choices = [(f"{_with_gloss(p.tag)} — {p.reason}", p.tag) for p in proposals]
    message = _ok(tr("{count_proposals} tag(s) describe the subject itself. Untick those to keep, then Confirm: the "
                     "rest are removed so that the trigger words carry them.", count_proposals=len(proposals)))
    return message, gr.update(choices=choices, value=[p.tag for p in proposals], visible=True), gr.update(visible=True)


def _bind(captions: CaptionSet, checked: list[str]) -> EditSummary:
    if not checked:
        raise DatasetError(tr("No tag is ticked: nothing was removed."))
    return captions.remove_tags(checked)


# -- 4. health check -----------------------------------------------------------------------------------

def _health(name, train_dir, resolution, repeats, batch_size):
    try:
        folder = _server_folder(train_dir, tr("training folder")) if (train_dir or "").strip() else _project(name).pictures
        report = check_dataset(folder, int(resolution or 0), int(repeats or 0), int(batch_size or 0))
    except TrainToolsError as error:
        return _error(error), {"headers": FINDING_HEADERS, "data": []}
    rows = [[KIND_LABELS.get(f.severity, f.severity), _shown(f.path, [folder]) if f.path != folder else ".", f.message] for f in report.findings]
    css = "train-tools-error" if report.with_severity("error") else "train-tools-ok"
    summary = f"<div class='{css}'>{html.escape(str(folder))}: {html.escape(report.summary)}</div>"
    return summary, {"headers": FINDING_HEADERS, "data": rows}


# -- layout ---------------------------------------------------------------------------------------------

def _import_section() -> dict:
    c: dict = {}
    with gr.Row():
        c["uploads"] = gr.File(label=tr("Upload pictures, their .txt captions, or a .zip"), file_count="multiple",
                               file_types=["image", ".txt", ".caption", ".zip"], elem_id="train_tools_ds_uploads")
        with gr.Column():
            c["folder"] = gr.Textbox(label=tr("…and/or a folder on this server (copied, never changed)"),
                                     elem_id="train_tools_ds_folder")
            c["background"] = gr.ColorPicker("#ffffff", label=tr("Background behind transparent parts"),
                                             elem_id="train_tools_ds_background")
    with gr.Row():
        c["crop"] = gr.Radio([CROP_KEEP, CROP_SQUARE, CROP_SIZE], value=CROP_KEEP, label=tr("Crop"),
                             elem_id="train_tools_ds_crop")
        c["resolution"] = gr.Number(TrainConfig().resolution, label=tr("Training resolution"), precision=0,
                                    elem_id="train_tools_ds_resolution")
        c["width"] = gr.Number(512, label=tr("Crop width"), precision=0, elem_id="train_tools_ds_width")
        c["height"] = gr.Number(768, label=tr("Crop height"), precision=0, elem_id="train_tools_ds_height")
        c["upscaler"] = gr.Dropdown([NO_UPSCALER, *[u.name for u in shared.sd_upscalers if u.name != "None"]],
                                    value=NO_UPSCALER, label=tr("Upscale small pictures with"), elem_id="train_tools_ds_upscaler")
    c["import"] = gr.Button(tr("Import"), variant="primary", elem_id="train_tools_ds_import")
    c["report"] = gr.HTML(elem_id="train_tools_ds_import_report")
    return c


def _tagging_section() -> dict:
    c: dict = {}
    choices = _tagger_choices()
    with gr.Row():
        c["tagger"] = gr.Dropdown(choices, value=choices[0], label=tr("Tagger"), elem_id="train_tools_ds_tagger")
        c["general"] = gr.Slider(0.0, 1.0, 0.35, step=0.01, label=tr("General tag threshold (WD14)"),
                                 elem_id="train_tools_ds_general_threshold")
        c["character"] = gr.Slider(0.0, 1.0, 0.85, step=0.01, label=tr("Character tag threshold (WD14)"),
                                   elem_id="train_tools_ds_character_threshold")
    with gr.Row():
        c["mode"] = gr.Radio([(MODE_LABELS.get(m, m), m) for m in MODES], value="append", label=tr("Existing captions"), elem_id="train_tools_ds_tag_mode")
        c["use_trigger"] = gr.Checkbox(True, label=tr("Put the trigger words first"), elem_id="train_tools_ds_tag_prefix")
        c["blacklist"] = gr.Textbox(label=tr("Never write these tags (comma-separated)"), elem_id="train_tools_ds_blacklist")
    with gr.Row():
        c["run"] = gr.Button(tr("Tag pictures"), variant="primary", elem_id="train_tools_ds_tag_run")
        c["stop"] = gr.Button(tr("Stop"), elem_id="train_tools_ds_tag_stop")
        c["install"] = gr.Button(tr("Install onnxruntime"), visible=False, elem_id="train_tools_ds_install_onnxruntime")
    with gr.Column(elem_id="train_tools_ds_progress_box"):  # the WebUI's progress bar goes in here
        gr.HTML(elem_id="train_tools_ds_progress")  # step text, written by javascript/train_tools.js
    c["status"] = gr.HTML(elem_id="train_tools_ds_tag_status")
    c["ready"] = gr.Checkbox(False, visible=False)  # a component, not a State: the start script reads it
    c["task_id"] = gr.Textbox(visible=False)
    return c


def _curation_section() -> dict:
    c: dict = {}
    with gr.Row():
        with gr.Column(scale=2):
            c["table"] = gr.Dataframe(headers=TAG_COLUMNS[0], datatype=TAG_COLUMNS[1], interactive=False,
                                      label=tr("Tags (click one to pick it)"), elem_id="train_tools_ds_tag_table")
            c["tags"] = gr.State([])
            with gr.Row():
                c["tag"] = gr.Textbox(label=tr("Tag"), elem_id="train_tools_ds_tag")
                c["remove"] = gr.Button(tr("Remove everywhere"), elem_id="train_tools_ds_remove")
            with gr.Row():
                c["new_tag"] = gr.Textbox(label=tr("Replace with"), elem_id="train_tools_ds_new_tag")
                c["replace"] = gr.Button(tr("Replace / rename"), elem_id="train_tools_ds_replace")
            with gr.Row():
                c["add_images"] = gr.Dropdown([], multiselect=True, label=tr("Images to add the tag to"),
                                              elem_id="train_tools_ds_add_images")
                c["add"] = gr.Button(tr("Add tag"), elem_id="train_tools_ds_add")
            with gr.Row():
                c["dedupe"] = gr.Button(tr("Remove duplicate tags"), elem_id="train_tools_ds_dedupe")
                c["undo"] = gr.Button(tr("Undo"), interactive=False, elem_id="train_tools_ds_undo")
                c["refresh"] = gr.Button(tr("Reload from disk"), elem_id="train_tools_ds_refresh")
            with gr.Group():
                c["propose"] = gr.Button(tr("★ Bind features to trigger: propose"), elem_id="train_tools_ds_bind_propose")
                c["proposals"] = gr.CheckboxGroup([], label=tr("Tick the tags to remove"), visible=False,
                                                  elem_id="train_tools_ds_bind_tags")
                c["confirm"] = gr.Button(tr("Confirm: remove the ticked tags"), visible=False, variant="primary",
                                         elem_id="train_tools_ds_bind_confirm")
            c["message"] = gr.HTML(elem_id="train_tools_ds_tag_message")
            c["refused"] = gr.HTML(elem_id="train_tools_ds_refused")
        with gr.Column(scale=3):
            c["gallery"] = gr.Gallery(label=tr("Pictures (click one)"), columns=6, height=360, allow_preview=False,
                                      elem_id="train_tools_ds_gallery")
            c["names"] = gr.State([])
            c["selected"] = gr.Textbox(label=tr("Selected picture"), interactive=False, elem_id="train_tools_ds_selected")
            with gr.Row():
                c["image_tags"] = gr.Textbox(label=tr("Its tags"), lines=3, elem_id="train_tools_ds_image_tags", scale=4)
                c["save"] = gr.Button(tr("Save tags"), elem_id="train_tools_ds_image_save", scale=1)
            with gr.Row():
                c["focus"] = gr.Image(label=tr("Original: click the point to keep in view when cropping"), type="pil",
                                      interactive=False, elem_id="train_tools_ds_focus")
                c["prepared"] = gr.Image(label=tr("Training picture"), type="pil", interactive=False,
                                         elem_id="train_tools_ds_prepared")
            c["focus_message"] = gr.HTML(elem_id="train_tools_ds_focus_message")
    return c


def _health_section() -> dict:
    c: dict = {}
    d = TrainConfig()
    with gr.Row():
        c["resolution"] = gr.Number(d.resolution, label=tr("Resolution (as on the Train page)"), precision=0,
                                    elem_id="train_tools_ds_health_resolution")
        c["repeats"] = gr.Number(d.repeats, label=tr("Repeats (flat folder)"), precision=0,
                                 elem_id="train_tools_ds_health_repeats")
        c["batch_size"] = gr.Number(d.batch_size, label=tr("Batch size (as on the Train page)"), precision=0,
                                    elem_id="train_tools_ds_health_batch")
        c["check"] = gr.Button(tr("Check the dataset"), variant="primary", elem_id="train_tools_ds_health_check")
        # Encodes the pictures and captions ahead with the Train page's settings, where its progress shows.
        c["prepare"] = gr.Button(tr("Prepare for training (on the Train page)"), elem_id="train_tools_ds_prepare")
    c["summary"] = gr.HTML(elem_id="train_tools_ds_health_summary")
    c["findings"] = gr.Dataframe(headers=FINDING_HEADERS, interactive=False, wrap=True,
                                 elem_id="train_tools_ds_health_findings")
    return c


# -- wiring ---------------------------------------------------------------------------------------------

def _wire(name, trigger, train_dir, imp: dict, tag: dict, cur: dict, health: dict) -> None:
    crop_inputs = [imp[k] for k in ("background", "crop", "resolution", "width", "height", "upscaler")]
    view = [cur[k] for k in ("message", "table", "tags", "add_images", "image_tags", "undo", "refused")]
    view_inputs = [name, cur["selected"], cur["add_images"]]
    refresh = dict(fn=_refresh, inputs=view_inputs, outputs=[cur["gallery"], cur["names"], *view])

    imp["import"].click(_import, inputs=[name, imp["uploads"], imp["folder"], *crop_inputs],
                        outputs=[imp["report"], train_dir, cur["gallery"], cur["names"], imp["uploads"]]).then(**refresh)
    name.blur(**refresh)
    name.select(**refresh)  # a project picked from the list
    cur["refresh"].click(**refresh)

    tag["run"].click(_check_tagger, inputs=[name, tag["tagger"]], outputs=[tag["status"], tag["ready"], tag["install"]]).then(
        _tag_when_ready(call_queue.wrap_gradio_gpu_call(_tag, extra_outputs=[])), _js="train_tools_ds_tag_start",
        inputs=[tag["task_id"], tag["ready"], name, tag["tagger"], tag["general"], tag["character"], tag["mode"],
                tag["use_trigger"], trigger, tag["blacklist"]],
        outputs=[tag["status"]]).then(**refresh)
    tag["stop"].click(_stop_tagging, inputs=[], outputs=[])
    tag["install"].click(_install_onnxruntime, inputs=[], outputs=[tag["status"]])

    edits = {
        "remove": (lambda captions, t: captions.remove_tag(t or ""), [cur["tag"]]),
        "replace": (lambda captions, old, new: captions.replace_tag(old or "", new or ""), [cur["tag"], cur["new_tag"]]),
        "dedupe": (lambda captions: captions.remove_duplicate_tags(), []),
        "undo": (lambda captions: captions.undo(), []),
        "add": (_add, [cur["tag"], cur["add_images"]]),
        "save": (_save_image_tags, [cur["selected"], cur["image_tags"]]),
    }
    for button, (action, inputs) in edits.items():
        cur[button].click(_edit(action), inputs=[*view_inputs, *inputs], outputs=view)
    cur["table"].select(_pick_tag, inputs=[cur["tags"]], outputs=[cur["tag"]])
    cur["propose"].click(_propose, inputs=[name, trigger], outputs=[cur["message"], cur["proposals"], cur["confirm"]])
    cur["confirm"].click(_edit(_bind), inputs=[*view_inputs, cur["proposals"]], outputs=view).then(
        lambda: (gr.update(visible=False), gr.update(visible=False)), inputs=[], outputs=[cur["proposals"], cur["confirm"]])

    cur["gallery"].select(_select_picture, inputs=[name, cur["names"]],
                          outputs=[cur["selected"], cur["image_tags"], cur["focus"], cur["prepared"], cur["focus_message"]])
    cur["focus"].select(_set_focus, inputs=[name, cur["selected"], *crop_inputs],
                        outputs=[cur["focus_message"], cur["focus"], cur["prepared"], cur["selected"], cur["gallery"], cur["names"]])

    health["check"].click(_health, inputs=[name, train_dir, health["resolution"], health["repeats"], health["batch_size"]],
                          outputs=[health["summary"], health["findings"]])
    health["prepare"].click(fn=None, _js="train_tools_ds_prepare", inputs=[], outputs=[])


def build(name: gr.Dropdown, trigger: gr.Textbox, train_dir: gr.Textbox) -> None:
    """Lay out the page inside the caller's Blocks; an import sets the Train page's ``train_dir``."""
    with gr.Accordion(tr("1. Import pictures into the project"), open=True):
        imp = _import_section()
    with gr.Accordion(tr("2. Auto-tag"), open=True):
        tag = _tagging_section()
    with gr.Accordion(tr("3. Tags"), open=True):
        cur = _curation_section()
    with gr.Accordion(tr("4. Health check"), open=True):
        health = _health_section()
    _wire(name, trigger, train_dir, imp, tag, cur, health)

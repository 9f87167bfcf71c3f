"""Jobs inside the WebUI (a training, or a preview grid): one at a time, under the WebUI's queue lock, with a
status the tab and the HTTP API both read, and proof that the live model is exactly as it was afterwards."""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..common.errors import ConfigError, TrainToolsError
from ..common.files import check_output_name
from ..common.i18n import tr
from ..common.memory import return_freed_memory
from ..common.tensor_store import DEFAULT_LIMIT_BYTES, CacheFolder, CacheReport, CacheSize
from ..dataset.project_folders import ProjectFolders, cache_folder_for
from ..dataset.training_data import pictures_in
from ..engine.config import TrainConfig
from ..engine.family_defaults import family_overrides
from ..engine.lr_finder import LearningRateFinding, find_learning_rate, probe_config, probe_optimizer
from ..engine.model_guard import fingerprint
from ..engine.presets import PresetStore
from ..engine.sample_prompts import folder_tag_counts, made_prompts
from ..engine.samples import TrainingSamples
from ..engine.save import OutputPlan
from ..engine.save_now import SaveNow
from ..engine.train import prepare_caches, train_lora
from ..engine.training_state import ResumeChanged, load_state, state_path
from ..hosts.protocol import ModelFamily, PredictionType, Progress
from ..preview.epoch_choice import ChoiceResult, choose_epoch
from ..preview.epoch_recommendation import Recommendation, recommend_epoch
from ..preview.grid_spec import GridSpec, epoch_files, epoch_suffix_pattern, parse_number_list, read_lora_metadata
from .grid import GridRequest, PickedCell, cell_at, new_grid_folder, render_grid
from .grid_render import check_base_model, lora_family
from .host import WebUI, WebUIHost, model_family, text_path_clip_skip, webui_host
from .sample_render import ClassPicturesRequest, WebUISampleRenderer, generate_class_pictures

from .path_policy import confine


@dataclass
class JobStatus:
    id: str
    kind: str = "train"  # train, continue, prepare (fill the cache), find-lr (the learning-rate finder), grid or
    # class-pictures
    state: str = "queued"  # queued, running, done, stopped, failed
    phase: str = ""
    message: str = ""
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    total_epochs: int = 0
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    validation_history: list[tuple[int, int, float]] = field(default_factory=list)  # (epoch, step, validation loss)
    continued_from_epoch: int = 0  # continue: the saved epoch it started after
    changes: list[str] = field(default_factory=list)  # continue: settings or pictures that differ from the saved run
    saved_files: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)  # unusable pictures left out, with the reason
    error: str = ""
    grid_folder: str = ""  # a preview grid's folder (grid.png, grid.json, cells/)
    recommended: dict = field(default_factory=dict)  # grid: the epoch of lowest validation loss (see recommend)
    model_restored: bool | None = None  # None until checked
    cache: dict = field(default_factory=dict)  # CacheReport's fields: latents/captions reused and total, problems
    setup_seconds: float = 0.0  # from the click to the end of the first training step (encoding included)
    first_step_seconds: float | None = None  # that first step alone, once the job has ended
    learning_rates: dict = field(default_factory=dict)  # find-lr: the rates to train with ("unet", "text_encoder")
    lr_history: list[tuple[int, dict]] = field(default_factory=list)  # find-lr: (step, that estimate) per step
    sample_prompts: list[str] = field(default_factory=list)  # train: the samples' prompt lines, all fields resolved
    samples: list[dict] = field(default_factory=list)  # train: {"epoch", "step", "index", "file"} per sample picture
    samples_folder: str = ""
    sample_error: str = ""  # why samples stopped (the training went on)
    reg_folder: str = ""  # class-pictures: the regularization folder to train with
    started_at: float = 0.0
    finished_at: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def read_flag(value: object, key: str) -> bool:
    """A yes/no field of an API body, read strictly: true or false (also as text); missing (None) is false. A JSON
    string "false" or "0" is truthy to ``bool()``, and a ``delete_others`` read that way deletes epoch files."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(tr("{key} must be true or false, got {value!r}.", key=key, value=value))


def _setting_number(key: str, value: object, integers: bool) -> int | float:
    """A number of an API body or the tab (text or a number): never a bool, nor a whole number rounded from 20.5."""
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        number = float(value)
        if integers:
            if not number.is_integer():
                raise ValueError
            return int(number)
        return number
    except (ValueError, OverflowError):
        kind = tr("a whole number") if integers else tr("a number")
        raise ConfigError(tr("Setting '{key}' must be {kind}, got {value!r}.", key=key, kind=kind, value=value)) from None


def _holds_own_files(folder: Path) -> bool:
    """A Lora subfolder with ``<folder>.safetensors`` or its epoch files, found by name alone: the list is read
    at every page load, so no file is opened."""
    epoch_stem = epoch_suffix_pattern(folder.name)
    return any(path.stem == folder.name or epoch_stem.fullmatch(path.stem) for path in folder.glob("*.safetensors"))


@dataclass
class Folders:
    lora_dir: Path  # the WebUI's Lora folder (--lora-dir); each project writes into a subfolder
    projects_dir: Path  # where uploaded pictures are kept
    data_dir: Path  # the WebUI's data folder
    exposed: bool  # --listen/--share without --enable-insecure-extension-access


class TrainingJobs:
    """The one running (or last) training job of this WebUI process."""

    def __init__(self, webui: WebUI, folders: Folders, verify_restore: bool = True):
        self.webui = webui
        self.folders = folders
        self.verify_restore = verify_restore
        self.current: JobStatus | None = None
        self._stop = threading.Event()
        self._save_now = SaveNow()
        self._guard = threading.Lock()

    # -- preparing ------------------------------------------------------------------------------

    def family_defaults(self, sd_model) -> dict:
        """The settings whose default differs for the loaded model's family (SDXL: 1024², UNet only, …; SD2 768-v:
        768²) and device (samples on a GPU); none when no model is loaded or it is one Train Tools refuses (the
        Train click names that)."""
        try:
            family = model_family(sd_model) if sd_model is not None else None
        except ConfigError:
            family = None
        prediction = PredictionType.V if getattr(sd_model, "parameterization", "eps") == "v" else PredictionType.EPSILON
        return self.preset_defaults(family, prediction)

    def preset_defaults(self, family: ModelFamily | None,
                        prediction: PredictionType = PredictionType.EPSILON) -> dict:
        """The settings whose default differs for ``family`` on this WebUI's device: what a preset of that family
        gives for the settings it leaves out, and what the form's defaults are after it is applied."""
        on_cuda, has_bitsandbytes = self.device_facts()
        overrides = family_overrides(family, on_cuda, has_bitsandbytes, prediction)
        # Samples cost seconds on a GPU and minutes on the CPU: on by default where they are cheap.
        return {**overrides, "sample_every_n_epochs": 1} if on_cuda else overrides

    def device_facts(self) -> tuple[bool, bool]:
        """(training on CUDA, bitsandbytes installed): what the family defaults' optimizer depends on."""
        on_cuda = getattr(self.webui.devices.device, "type", "cpu") == "cuda"
        return on_cuda, importlib.util.find_spec("bitsandbytes") is not None

    @property
    def presets(self) -> PresetStore:
        """The built-in presets and the user's, saved in ``<projects dir>/.presets/`` (not listed as a project)."""
        return PresetStore(self.folders.projects_dir / ".presets")

    def loaded_family(self) -> ModelFamily:
        """The loaded model's family, SD1 when none (or one Train Tools refuses) is loaded: what a saved preset is for."""
        sd_model = self.webui.shared.sd_model
        try:
            return model_family(sd_model) if sd_model is not None else ModelFamily.SD1
        except ConfigError:
            return ModelFamily.SD1

    def preset_values(self, name: str) -> dict:
        """Every Train page setting as the preset ``name`` sets it (samples every epoch on a GPU, as without one)."""
        preset = self.presets.get(name)
        return preset.values_over(self.preset_defaults(preset.family))

    def prepare(self, values: dict, *, for_finder: bool = False) -> TrainConfig:
        """Validate settings from the tab or the API into a config; the output folder is always the project's
        subfolder of the Lora folder, and server paths are confined when the WebUI is exposed. Settings the
        API leaves out take the loaded model's family defaults (the tab sends all of them). ``for_finder``: the
        settings of a learning-rate search, which probes with its own optimizer and rates, so the form's
        (e.g. Prodigy at an AdamW rate) are no reason to refuse it."""
        values = dict(values)
        preset = str(values.pop("preset", "") or "")
        values = {**(self._preset_for_loaded(preset) if preset else self.family_defaults(self.webui.shared.sd_model)),
                  **values}
        if "output_dir" in values:
            raise ConfigError(tr("The output folder is not a setting: files go to the Lora folder, in a subfolder "
                                 "per project."))
        if "state_dir" in values:
            raise ConfigError(tr("The state folder is not a setting: the training state goes to the project's "
                                 "folder."))
        name = check_output_name(str(values.get("name", "")))
        values["output_dir"] = str(self.folders.lora_dir / name)
        values["state_dir"] = str(ProjectFolders.for_name(self.folders.projects_dir, name).training_state)
        if str(values.get("initial_lora", "")).strip():
            values["initial_lora"] = str(self._lora_file(str(values["initial_lora"]).strip()))
        train_dir = str(values.get("train_dir", "")).strip()
        if not train_dir:
            raise ConfigError(tr("Choose the training folder (a folder on this server) or upload pictures."))
        if self.folders.exposed:
            train_dir = str(confine(train_dir, [self.folders.data_dir, self.folders.projects_dir], tr("training folder")))
        values["train_dir"] = train_dir
        reg_dir = str(values.get("reg_dir", "") or "").strip()
        if reg_dir and self.folders.exposed:
            reg_dir = str(confine(reg_dir, [self.folders.data_dir, self.folders.projects_dir], tr("regularization folder")))
        values["reg_dir"] = reg_dir
        # Captions go through the WebUI's text path, which applies its own clip skip: record that one.
        values["clip_skip"] = text_path_clip_skip(self.webui)
        config = TrainConfig.from_dict(values)
        config = (probe_config(config, probe_optimizer()) if for_finder else config).validate()
        self._refuse_alias_clashes(config)
        return config

    def _preset_for_loaded(self, name: str) -> dict:
        """An API request's ``preset``: its settings, refused when it is meant for another family than the loaded
        model's (an SDXL preset's 1024² on SD1.5 would quietly train at the wrong size)."""
        preset = self.presets.get(name)
        sd_model = self.webui.shared.sd_model
        loaded = model_family(sd_model) if sd_model is not None else None
        if loaded is not None and loaded is not preset.family:
            raise ConfigError(tr("The preset {name} is for {family} models and the loaded model is {loaded}: load "
                                 "a matching checkpoint or choose another preset.", name=name,
                                 family=preset.family.value.upper(), loaded=loaded.value.upper()))
        return self.preset_values(name)

    def prepare_continue(self, values: dict) -> TrainConfig:
        """The settings to continue a project's run with: the saved run's, with what ``values`` gives beside the
        name (any difference is named before the run goes on, see ``check_continuation``)."""
        name = check_output_name(str(values.get("name", "")))
        saved = load_state(state_path(ProjectFolders.for_name(self.folders.projects_dir, name).training_state, name))
        # The folders are the project's; the starting LoRA file mattered only for the first epoch.
        settings = {key: value for key, value in saved.settings.items()
                    if key not in ("output_dir", "state_dir", "initial_lora")}
        return self.prepare({**settings, **values})

    def _lora_file(self, given: str) -> Path:
        """A LoRA file to start from: a path, or one relative to the Lora folder (``name/name-000004.safetensors``);
        inside the Lora folder or the projects when the WebUI is exposed."""
        path = Path(given).expanduser()
        path = path if path.is_absolute() else self.folders.lora_dir / path
        if self.folders.exposed:
            path = confine(path, [self.folders.lora_dir, self.folders.projects_dir], tr("LoRA file to start from"))
        if not path.is_file():
            raise ConfigError(tr("The LoRA file to start from was not found: {path}", path=path))
        return path

    def _refuse_alias_clashes(self, config: TrainConfig) -> None:
        """The WebUI names a Lora by its file stem across all subfolders: a clash would hide one of them."""
        networks = self.webui.networks
        if networks is None:
            return
        plan = OutputPlan(Path(config.output_dir), config.name, config.epochs, config.save_every_n_epochs, config.overwrite)
        for path in plan.all_paths():
            if path.suffix != ".safetensors":
                continue
            existing = networks.available_networks.get(path.stem)
            if existing is not None and Path(existing.filename).resolve() != path.resolve():
                raise ConfigError(tr("A Lora named '{stem}' already exists ({filename}); choose another project "
                                     "name.", stem=path.stem, filename=existing.filename))

    # -- projects -------------------------------------------------------------------------------

    def project_names(self) -> list[str]:
        """What a returning user has worked on, newest first: project folders (imports, grids) and Lora
        subfolders holding files of their own name (trainings of a server folder)."""
        found: dict[str, float] = {}
        for parent, owns in ((self.folders.projects_dir, lambda folder: True), (self.folders.lora_dir, _holds_own_files)):
            if not parent.is_dir():
                continue
            for folder in parent.iterdir():
                if folder.is_dir() and not folder.name.startswith(".") and owns(folder):
                    found[folder.name] = max(found.get(folder.name, 0.0), folder.stat().st_mtime)
        return sorted(found, key=lambda name: (-found[name], name))

    def project_defaults(self, name: str) -> dict[str, str]:
        """For a project chosen again: its trigger words (from its newest file's card) and its training folder
        (the project's pictures, when it has some); empty strings where there is nothing to offer."""
        name = check_output_name(name)
        pictures = ProjectFolders.for_name(self.folders.projects_dir, name).pictures
        trigger = ""
        saved = sorted(epoch_files(self.folders.lora_dir / name, name), key=lambda f: f.path.stat().st_mtime)
        for file in reversed(saved):
            card = file.path.with_suffix(".json")
            try:
                trigger = str(json.loads(card.read_text("utf-8")).get("activation text", ""))
            except (OSError, ValueError, AttributeError):
                continue
            break
        return {"trigger_words": trigger, "train_dir": str(pictures) if pictures.is_dir() and pictures_in(pictures) else ""}

    # -- running --------------------------------------------------------------------------------

    def begin(self) -> JobStatus:
        """Claim the single job slot (the caller then runs it under the queue lock)."""
        with self._guard:
            self._refuse_while_running()
            self._stop.clear()
            self._save_now = SaveNow()  # a request left from the last job is not this one's
            self.current = JobStatus(id=f"task(train-tools-{uuid.uuid4().hex[:8]})", started_at=time.time())
            return self.current

    def _refuse_while_running(self) -> None:
        if self.current is not None and self.current.state in ("queued", "running"):
            what = {"grid": tr("A preview grid"), "prepare": tr("A preparation for training"),
                    "find-lr": tr("A learning-rate search"), "class-pictures": tr("A class-pictures job")
                    }.get(self.current.kind, tr("A training"))
            raise ConfigError(tr("{what} is already running; stop it or wait for it to finish.", what=what))

    def run(self, job: JobStatus, config: TrainConfig, resume: bool = False, accept_changes: bool = False) -> JobStatus:
        """Train on the live model, or with ``resume`` continue the project's saved run (``accept_changes``: even
        when settings or pictures changed, which are named in the status). The caller holds the WebUI queue lock
        and has begun ``shared.state``."""

        def work() -> None:
            job.kind = "continue" if resume else "train"
            host = self._training_host(job, config)
            samples = self._samples(job, config, host)
            try:
                result = self._on_live_model(job, host, lambda: train_lora(
                    host, config, self.cache_folder(config.train_dir), samples, resume=resume,
                    accept_changes=accept_changes, save_now=self._save_now))
            except ResumeChanged as refused:
                job.changes = refused.changes
                raise
            job.state = "stopped" if result.stopped else "done"
            job.continued_from_epoch, job.changes = result.continued_from_epoch, result.changes
            # A continued run's histories begin at its first epoch, before the part trained now.
            job.loss_history, job.validation_history = list(result.loss_history), list(result.validation_history)
            job.skipped_files = result.skipped_files
            job.cache = asdict(result.cache)
            job.first_step_seconds = result.step_seconds[0] if result.step_seconds else None
            job.message = (tr("Continued after epoch {epoch}. ", epoch=result.continued_from_epoch) if resume else "") + \
                (tr("Stopped after {steps} steps", steps=result.steps) if result.stopped else
                 tr("Done: {steps} steps", steps=result.steps)) + \
                (tr("; saved {count} file(s).", count=len(result.saved_files)) if result.saved_files else
                 tr("; nothing saved.")) + \
                f" {result.cache.summary()}" + "".join(f" {note}" for note in result.notes) + \
                (tr(" Skipped {count_skipped_files} unusable file(s):\n",
                    count_skipped_files=len(result.skipped_files)) + "\n".join(f"- {s}" for s in result.skipped_files)
                 if result.skipped_files else "")

        return self._guarded(job, "Train Tools", work)

    def run_prepare(self, job: JobStatus, config: TrainConfig) -> JobStatus:
        """Fill the training folder's cache with what a training on these settings encodes first, so it starts
        at once. The caller holds the WebUI queue lock and has begun ``shared.state``."""

        def work() -> None:
            job.kind = "prepare"
            host = self._host(job, config)
            report: CacheReport = self._on_live_model(
                job, host, lambda: prepare_caches(host, config, self.cache_folder(config.train_dir)))
            job.state = "stopped" if host.should_stop() else "done"
            job.cache = asdict(report)
            job.message = (tr("Stopped. ") if job.state == "stopped" else tr("Prepared for training: ")) + report.summary()

        return self._guarded(job, "Train Tools prepare", work)

    def run_find_lr(self, job: JobStatus, config: TrainConfig) -> JobStatus:
        """Find the learning rate on the live model (a short probe, nothing saved; the cache is filled as a
        Prepare would). The caller holds the WebUI queue lock and has begun ``shared.state``."""

        def work() -> None:
            job.kind = "find-lr"
            host = self._training_host(job, config)
            finding: LearningRateFinding = self._on_live_model(
                job, host, lambda: find_learning_rate(host, config, self.cache_folder(config.train_dir)))
            job.state = "stopped" if finding.stopped else "done"
            job.learning_rates = finding.found
            job.cache = asdict(finding.cache)
            job.message = finding.summary()

        return self._guarded(job, "Train Tools learning-rate finder", work)

    def _samples(self, job: JobStatus, config: TrainConfig, host: WebUIHost) -> TrainingSamples | None:
        """The run's samples through the WebUI's txt2img, in a new folder under the project's samples/."""
        if not (config.sample_every_n_epochs or config.sample_every_n_steps):
            return None
        folder = new_grid_folder(ProjectFolders.for_name(self.folders.projects_dir, config.name).samples)
        samples = TrainingSamples.for_config(config, WebUISampleRenderer(self.webui, host), folder)
        job.sample_prompts = [prompt.as_line() for prompt in samples.prompts]
        job.samples_folder = str(folder)
        return samples

    def suggested_sample_prompts(self, train_dir: str, trigger_words: str, count: int) -> str:
        """The prompt lines a run makes when none are written: the trigger words with the frequent tags."""
        try:
            count = int(count)
        except (TypeError, ValueError, OverflowError):  # an API body's sample_count may be anything
            raise ConfigError(tr("The number of sample prompts must be a whole number, not {count!r}.",
                                 count=count)) from None
        folder = self._checked_folder(train_dir)
        prompts = made_prompts(trigger_words, folder_tag_counts(folder), max(1, min(16, count)))
        return "\n".join(prompt.as_line() for prompt in prompts)

    def _training_host(self, job: JobStatus, config: TrainConfig) -> WebUIHost:
        host = self._host(job, config)
        if host.medvram and config.train_text_encoder:
            raise ConfigError(tr("Under --medvram only the UNet can be trained: set the text-encoder learning rate "
                                 "to 0."))
        return host

    def _host(self, job: JobStatus, config: TrainConfig) -> WebUIHost:
        return webui_host(self.webui, seed=config.seed, on_progress=lambda p: self._track(job, p),
                          stop_requested=self._stop.is_set)

    def _on_live_model(self, job: JobStatus, host: WebUIHost, work: Callable[[], Any]) -> Any:
        """``work`` in the host's training session, with the proof that the live model is unchanged afterwards."""
        with host.training_session():
            before = self._fingerprints() if self.verify_restore else None
            try:
                return work()
            finally:
                if before is not None:
                    self._check_restored(job, before)

    def run_grid(self, job: JobStatus, request: GridRequest) -> JobStatus:
        """Render a preview grid on the live model. The caller holds the queue lock and has begun ``shared.state``."""

        def work() -> None:
            job.kind = "grid"
            host = webui_host(self.webui, stop_requested=self._stop.is_set)
            metadata = read_lora_metadata(request.rows[0].path) or {}
            trained_family = lora_family(metadata)
            if trained_family is not None and trained_family is not host.family:
                names = {ModelFamily.SD1: "SD1.x", ModelFamily.SD2: "SD2.x", ModelFamily.SDXL: "SDXL"}
                raise ConfigError(tr("{name} is an {value} LoRA and the loaded model is {value2}: load the "
                                     "checkpoint it was trained on for its preview grid.", name=request.name,
                                     value=names[trained_family], value2=names[host.family]))
            check = check_base_model(self.webui, metadata)
            if not check.matches:
                hint = (tr(" Switch back to {switch_to} first.", switch_to=check.switch_to) if check.switch_to else
                        tr(" That checkpoint is not in the WebUI's list; the grid would not show what you trained."))
                raise ConfigError(tr("{name} was trained on {trained_on}, but {loaded} is loaded.{hint}",
                                     name=request.name, trained_on=check.trained_on, loaded=check.loaded, hint=hint))
            host.unmerge_builtin_lora()  # as the WebUI's next plain txt2img would, so the base is the checkpoint's
            before = self._fingerprints() if self.verify_restore else None
            try:
                result = render_grid(self.webui, host, request, lambda done, total, text: self._track_grid(job, done, total, text),
                                     host.should_stop)
            finally:
                host.clear_conditioning_caches()
                self.webui.devices.torch_gc()
                if before is not None:
                    self._check_restored(job, before)
            job.grid_folder = str(request.out_dir) if result.grid_path else ""
            job.recommended = request.recommended.to_dict() if request.recommended else {}
            job.saved_files = [str(p) for p in result.cell_paths]
            job.state = "done" if result.complete else "stopped"
            job.message = (tr("Preview grid: {count} pictures.", count=len(result.cell_paths)) if result.complete else
                           tr("Stopped: {count} pictures rendered.", count=len(result.cell_paths)))

        return self._guarded(job, "Train Tools preview", work)

    def prepare_class_pictures(self, values: dict) -> ClassPicturesRequest:
        """A class-pictures request from the tab or the API: ``folder`` (default: the project's regularization/),
        class_prompt, count, seed (-1: drawn), negative_prompt, width/height (default: the family's resolution),
        steps, cfg_scale, sampler, repeats."""
        folder = str(values.get("folder", "") or "").strip()
        if not folder:
            if not str(values.get("name", "")).strip():
                raise ConfigError(tr("Choose the folder for the class pictures, or give the project's name to use "
                                     "its regularization folder."))
            folder = str(ProjectFolders.for_name(self.folders.projects_dir, str(values["name"])).regularization)
        if self.folders.exposed:
            folder = str(confine(folder, [self.folders.data_dir, self.folders.projects_dir], tr("regularization folder")))
        resolution = self.family_defaults(self.webui.shared.sd_model).get("resolution", TrainConfig.resolution)
        return ClassPicturesRequest.from_values(values, Path(folder), resolution)

    def run_class_pictures(self, job: JobStatus, request: ClassPicturesRequest) -> JobStatus:
        """Render class pictures with the live model's txt2img. The caller holds the queue lock and has begun
        ``shared.state``."""

        def work() -> None:
            job.kind = "class-pictures"
            host = webui_host(self.webui, stop_requested=self._stop.is_set)
            host.unmerge_builtin_lora()  # the checkpoint's own pictures, not a Lora left merged by the last prompt
            result = generate_class_pictures(self.webui, host, request,
                                             lambda done, total, text: self._track_grid(job, done, total, text, titled=False))
            job.reg_folder = str(result.folder)
            job.saved_files = [str(path) for path in result.paths]
            job.state = "done" if result.complete else "stopped"
            job.message = tr("{count} class pictures in {subfolder} (seeds from {seed}); train with the "
                             "regularization folder {folder}.", count=len(result.paths), subfolder=request.subfolder,
                             seed=request.seed, folder=result.folder)

        return self._guarded(job, "Train Tools class pictures", work)

    def class_pictures_in_background(self, request: ClassPicturesRequest) -> JobStatus:
        job = self.begin()
        job.kind = "class-pictures"
        self._in_background(job, lambda: self.run_class_pictures(job, request))
        return job

    def _guarded(self, job: JobStatus, title: str, work: Callable[[], None]) -> JobStatus:
        job.state = "running"
        self.webui.shared.state.job = title
        try:
            work()
        except TrainToolsError as error:
            job.state, job.error = "failed", str(error)
        except Exception as error:  # out of memory and any other failure: reported, never a dirty WebUI
            job.state, job.error = "failed", f"{type(error).__name__}: {error}"
            traceback.print_exc()
        finally:
            job.finished_at = time.time()
            gc.collect()  # the run's tensors may sit in reference cycles; free them before trimming
            return_freed_memory()
        if job.model_restored is False:
            job.error = (job.error + " " if job.error else "") + (
                tr("THE LIVE MODEL CHANGED: reload the checkpoint before generating, and please report this."))
        return job

    def run_in_background(self, config: TrainConfig, resume: bool = False, accept_changes: object = False) -> JobStatus:
        """For the HTTP API: train (or continue) under the queue lock on a thread, registered with the WebUI's
        progress. ``accept_changes`` as an API body gives it (see ``read_flag``)."""
        accept_changes = read_flag(accept_changes, "accept_changes")
        job = self.begin()
        job.kind = "continue" if resume else "train"
        self._in_background(job, lambda: self.run(job, config, resume, accept_changes))
        return job

    def save_now(self) -> JobStatus:
        """Ask the running training for an extra file of its network after the current step; it goes on."""
        job = self.current
        if job is None or job.kind not in ("train", "continue") or job.state not in ("queued", "running"):
            raise ConfigError(tr("No training is running: Save now writes the network of a running training."))
        if not self._save_now.request():
            raise ConfigError(tr("The training has already finished its steps: nothing more is saved now. Its saved "
                                 "epoch files are what there is."))
        return job

    def prepare_in_background(self, config: TrainConfig) -> JobStatus:
        """For the HTTP API and the tab: fill the cache under the queue lock on a thread."""
        job = self.begin()
        job.kind = "prepare"
        self._in_background(job, lambda: self.run_prepare(job, config))
        return job

    def find_lr_in_background(self, config: TrainConfig) -> JobStatus:
        """For the HTTP API: the learning-rate finder under the queue lock on a thread."""
        job = self.begin()
        job.kind = "find-lr"
        self._in_background(job, lambda: self.run_find_lr(job, config))
        return job

    def render_grid_in_background(self, request: GridRequest) -> JobStatus:
        job = self.begin()
        job.kind = "grid"
        self._in_background(job, lambda: self.run_grid(job, request))
        return job

    def _in_background(self, job: JobStatus, work: Callable[[], JobStatus]) -> None:
        progress = self.webui.progress

        def locked() -> None:
            progress.add_task_to_queue(job.id)
            with self.webui.call_queue.queue_lock:
                self.webui.shared.state.begin(job=job.id)
                progress.start_task(job.id)
                try:
                    work()
                finally:
                    progress.finish_task(job.id)
                    self.webui.shared.state.end()

        threading.Thread(target=locked, name="train-tools", daemon=True).start()

    # -- cache --------------------------------------------------------------------------------------

    def cache_folder(self, train_dir: str | Path) -> CacheFolder:
        """The training folder's cache (see ``cache_folder_for``), bounded by the setting in GB."""
        limit_gb = getattr(self.webui.shared.opts, "train_tools_cache_limit_gb", DEFAULT_LIMIT_BYTES / 2**30)
        return CacheFolder(cache_folder_for(self.folders.projects_dir, train_dir), int(float(limit_gb) * 2**30))

    def cache_size(self, train_dir: str) -> CacheSize | None:
        """The size of the folder's cache; None before a folder is chosen."""
        return self.cache_folder(self._checked_folder(train_dir)).size() if train_dir.strip() else None

    def clear_cache(self, train_dir: str) -> int:
        """Delete the training folder's cache (never its pictures); refused while a job may be reading it."""
        folder = self.cache_folder(self._checked_folder(train_dir))
        if self.current is not None and self.current.state in ("queued", "running"):
            raise ConfigError(tr("A job is running: clear the cache when it has finished."))
        return folder.clear()

    def _checked_folder(self, train_dir: str) -> str:
        train_dir = train_dir.strip()
        if not train_dir:
            raise ConfigError(tr("Choose the training folder first."))
        if self.folders.exposed:
            return str(confine(train_dir, [self.folders.data_dir, self.folders.projects_dir], tr("training folder")))
        return train_dir

    # -- preview grid ---------------------------------------------------------------------------

    def prepare_grid(self, values: dict) -> GridRequest:
        """A grid request from the tab or the API, which send the same values: numbers may come as text
        ("0.4, 0.6, 1"), epochs as "all" (or nothing) for every epoch file, the third axis as "none"."""
        name = check_output_name(str(values.get("name", "")))
        third_axis = values.get("third_axis") or None
        given: dict = {"prompt": str(values.get("prompt") or ""), "third_axis": None if third_axis == "none" else third_axis}
        if isinstance(values.get("epochs"), str) and values["epochs"].strip().lower() == "all":
            values = dict(values, epochs="")
        for key in ("negative_prompt", "sampler"):
            if key in values:
                given[key] = str(values[key] or "")  # JSON null: empty, not the text "None"
        for key, integers in (("steps", True), ("cfg_scale", False), ("width", True), ("height", True)):
            if key in values:
                given[key] = _setting_number(key, values[key], integers)
        for key, label, integers in (("seeds", tr("seeds"), True), ("weights", tr("weights"), False),
                                     ("cfg_values", tr("CFG scales"), False), ("epochs", tr("epochs"), True)):
            value = values.get(key)
            # An API body may give a list or a single number: read as the tab's text, so each gets its checks.
            if isinstance(value, (list, tuple)):
                value = ", ".join(str(item) for item in value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)
            if isinstance(value, str):
                given[key] = parse_number_list(value, label, integers) if value.strip() else []
            elif value is not None:
                kind = tr("a whole number") if integers else tr("a number")
                raise ConfigError(tr("'{part}' in the {label} is not {kind}.", part=value, label=label, kind=kind))
        given["epochs"] = given.get("epochs") or None  # none given: every epoch file
        spec = GridSpec(**given).validate()  # what is not given keeps GridSpec's defaults
        available = epoch_files(self.folders.lora_dir / name, name)
        rows = spec.select_epochs(available)
        grids = ProjectFolders.for_name(self.folders.projects_dir, name).grids
        # Also when its epoch is not among the grid's rows: no row is marked, and the page still names it.
        recommended = recommend_epoch(available)
        return GridRequest(name, spec, rows, new_grid_folder(grids), recommended)

    def recommend(self, name: str) -> Recommendation | None:
        """The saved epoch of lowest validation loss of the LoRA ``name``; None without two epochs to compare, one
        without a file when losses that are not numbers left fewer than two (its message names their epochs)."""
        name = check_output_name(name)
        return recommend_epoch(epoch_files(self.folders.lora_dir / name, name))

    def stop(self) -> None:
        self._stop.set()
        if self.current is not None and self.current.state in ("queued", "running"):
            self.webui.shared.state.interrupt()

    # -- bookkeeping ------------------------------------------------------------------------------

    def _track(self, job: JobStatus, progress: Progress) -> None:
        job.phase = progress.phase
        job.message = progress.message or job.message
        job.step, job.total_steps = progress.step, progress.total_steps
        job.epoch, job.total_epochs = progress.epoch or job.epoch, progress.total_epochs or job.total_epochs
        if progress.phase == "training" and progress.loss is not None:
            job.loss_history.append((progress.step, progress.loss))
            if progress.step == 1:
                job.setup_seconds = time.time() - job.started_at
        if progress.phase == "training" and progress.learning_rates:
            job.lr_history.append((progress.step, dict(progress.learning_rates)))
        if progress.phase == "validated" and progress.validation_loss is not None:
            job.validation_history.append((progress.epoch, progress.step, progress.validation_loss))
        if progress.phase == "saved":
            job.saved_files.extend(progress.saved_files)
        if progress.phase in ("sampled", "samples-failed"):
            job.samples.extend({"epoch": progress.epoch, "step": progress.step, "index": index, "file": path}
                               for index, path in enumerate(progress.saved_files))
        if progress.phase == "samples-failed":
            job.sample_error = progress.message

    def pick(self, name: str, grid_folder: str | Path, x: float, y: float) -> PickedCell | None:
        """The cell under a click on one of this project's grids (no other folder is read)."""
        try:
            x, y = float(x), float(y)
        except (TypeError, ValueError):  # an API body's x, y may be anything
            x = y = math.nan
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ConfigError(tr("The point on the grid must be two numbers (x, y: a pixel of grid.png)."))
        grids = ProjectFolders.for_name(self.folders.projects_dir, name).grids.resolve()
        folder = Path(grid_folder).resolve()
        if folder.parent != grids or not folder.is_dir():
            raise ConfigError(tr("{grid_folder} is not one of the preview grids of {name}.", grid_folder=grid_folder,
                                 name=name))
        try:
            return cell_at(folder, x, y)
        except (OSError, ValueError, KeyError, TypeError):  # cut short before its index, or the index edited
            raise ConfigError(tr("The preview grid {grid_folder} has no readable grid.json: render the grid again.",
                                 grid_folder=grid_folder)) from None

    def choose(self, name: str, file: Path, weight: float, picture: Path, delete_others: object = False) -> ChoiceResult:
        """Make a grid cell's epoch the LoRA's file, preview and preferred weight, then un-merge the built-in
        Lora's weights: it re-merges only when a prompt's (name, weight) changes, so a `<lora:name:w>` used
        before would keep the replaced file's weights merged. ``delete_others`` as an API body gives it (see
        ``read_flag``)."""
        delete_others = read_flag(delete_others, "delete_others")
        # The un-merge below needs the queue lock, which a running job holds: refused before any file is written,
        # not written and then waiting for the job's end (the files may also be the running grid's rows).
        self._refuse_while_running()
        name = check_output_name(name)
        folder = self.folders.lora_dir / name
        epoch = next((f for f in epoch_files(folder, name) if f.path == Path(file)), None)
        if epoch is None:
            raise ConfigError(tr("{file} is not a saved file of {name} any more.", file=file, name=name))
        if not Path(picture).is_file():
            raise ConfigError(tr("The picture of that cell ({picture}) is missing: render the grid again.",
                                 picture=picture))
        with Image.open(picture) as cell:
            result = choose_epoch(folder, name, epoch, weight, cell.convert("RGB"), delete_others=delete_others)
        with self.webui.call_queue.queue_lock:
            WebUIHost(self.webui).unmerge_builtin_lora()
        if self.webui.networks is not None:
            self.webui.networks.list_available_networks()
        return result

    def _track_grid(self, job: JobStatus, done: int, total: int, text: str, titled: bool = True) -> None:
        state = self.webui.shared.state
        state.job_count, state.job_no, state.textinfo = total, done, tr("Preview grid: {text}", text=text) if titled else text
        job.phase, job.step, job.total_steps, job.message = "rendering", done, total, text

    def _fingerprints(self) -> dict[str, str]:
        model = self.webui.shared.sd_model
        return {"unet": fingerprint(model.model.diffusion_model),
                "text encoder": fingerprint(model.cond_stage_model),
                "vae": fingerprint(model.first_stage_model)}

    def _check_restored(self, job: JobStatus, before: dict[str, str]) -> None:
        after = self._fingerprints()
        changed = [part for part in before if before[part] != after[part]]
        job.model_restored = not changed
        if changed:
            print(f"[Train Tools] the live model's {', '.join(changed)} changed during training!")

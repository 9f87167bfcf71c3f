"""The WebUI's txt2img for what training needs rendered: the samples during a run (the training network is
attached to the live model, so a plain txt2img renders it; the engine sets its multiplier and keeps the
training's state apart) and the class pictures of a regularization folder (the checkpoint alone).

Both run inside a job, which holds the WebUI's queue lock and ``shared.state``; the WebUI's sampler, schedule,
VAE, seeds and infotext are its own."""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..common.errors import ConfigError
from ..common.files import png_bytes, write_atomically
from ..common.i18n import tr
from ..engine.sample_prompts import SamplePrompt
from ..engine.samples import RenderedSample
from .host import WebUI, WebUIHost

SEEDS_FILE = "train_tools_class_pictures.json"  # beside the class pictures: how each one was made
_FOLDER_FORBIDDEN = re.compile(r'[\\/:*?"<>|\x00-\x1f]')


class WebUISampleRenderer:
    """Renders one sample prompt with txt2img on the live model as it is (the training network attached)."""

    def __init__(self, webui: WebUI, host: WebUIHost):
        self.webui = webui
        self.host = host

    def __call__(self, prompt: SamplePrompt) -> RenderedSample | None:
        # The WebUI caches conditioning by prompt text; the text encoder's Lora has learned since (or its
        # multiplier changed), so every sample is encoded afresh, and nothing of it is left for the user's next one.
        self.host.clear_conditioning_caches()
        state = self.webui.shared.state
        job_title = state.job  # txt2img names its batch there; the training's job keeps its name
        try:
            with self._text_encoders_on_device():
                images, infotexts = _txt2img(self.webui, prompt.prompt, prompt.negative_prompt, prompt.seed,
                                             prompt.sampler, prompt.steps, prompt.cfg_scale, prompt.width,
                                             prompt.height)
        finally:
            state.job = job_title
            self.host.clear_conditioning_caches()
        if not images or self.host.should_stop():
            return None
        return RenderedSample(images[0], infotexts[0] if infotexts else "")

    @contextmanager
    def _text_encoders_on_device(self) -> Iterator[None]:
        """Text encoders parked in RAM for the run (cached captions) come to the GPU for the sample's prompt."""
        # By device type: the WebUI's device is "cuda", a parameter's "cuda:0".
        parked = [encoder.module for encoder in self.host.text_encoders if not self.host.medvram
                  and self.host.device.type != "cpu" and next(encoder.module.parameters()).device.type == "cpu"]
        for module in parked:
            module.to(self.host.device)
        try:
            yield
        finally:
            for module in parked:
                module.to("cpu")


def _txt2img(webui: WebUI, prompt: str, negative_prompt: str, seed: int, sampler: str, steps: int,
             cfg_scale: float, width: int, height: int) -> tuple[list, list[str]]:
    processing = webui.processing
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=webui.shared.sd_model, prompt=prompt, negative_prompt=negative_prompt, seed=seed,
        sampler_name=sampler, batch_size=1, n_iter=1, steps=steps, cfg_scale=cfg_scale, width=width, height=height,
        do_not_save_samples=True, do_not_save_grid=True)
    with closing(p):
        processed = processing.process_images(p)
    return list(processed.images[:1]), list(processed.infotexts[:1])


# -- class pictures for a regularization folder -------------------------------------------------------------


@dataclass(frozen=True)
class ClassPicturesRequest:
    """``count`` pictures of ``class_prompt`` into ``<folder>/<repeats>_<class_prompt>`` (kohya's convention:
    the folder's name is the class caption), seeds ``seed``, ``seed + 1`` …"""

    class_prompt: str
    folder: Path
    count: int
    seed: int
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "Euler a"
    repeats: int = 1

    @classmethod
    def from_values(cls, values: dict, folder: Path, resolution: int) -> "ClassPicturesRequest":
        """From the tab or the API; a seed of -1 (or none) draws one, which the seeds file records."""
        try:
            given = {key: convert(values[key]) for key, convert in (
                ("negative_prompt", str), ("steps", int), ("cfg_scale", float), ("sampler", str), ("repeats", int),
                ("width", int), ("height", int)) if values.get(key) not in (None, "")}
            count, seed = int(values.get("count", 10)), int(values.get("seed", -1))
        except (TypeError, ValueError) as error:
            raise ConfigError(tr("Class pictures: {error}", error=error)) from None
        if seed < 0:
            seed = random.randint(0, 2**31 - 1)
        request = cls(str(values.get("class_prompt", "")).strip(), Path(folder), count, seed,
                      **{"width": resolution, "height": resolution, **given})
        return request.validate()

    def validate(self) -> "ClassPicturesRequest":
        if not self.class_prompt:
            raise ConfigError(tr("Give the class prompt: what the pictures show in general (e.g. 'woman', 'dog')."))
        if _FOLDER_FORBIDDEN.search(self.class_prompt) or self.class_prompt.startswith(".") or len(self.class_prompt) > 120:
            raise ConfigError(tr("The class prompt {class_prompt!r} names the pictures' folder (kohya's <N>_<class>): "
                                 "keep it under 120 characters, without / \\ : * ? \" < > | or a leading dot.",
                                 class_prompt=self.class_prompt))
        if not 1 <= self.count <= 1000:
            raise ConfigError(tr("Make from 1 to 1000 class pictures (got {count}).", count=self.count))
        if not self.repeats >= 1:
            raise ConfigError(tr("Repeats of the class folder must be at least 1 (got {repeats}).",
                                 repeats=self.repeats))
        for label, size in ((tr("Width"), self.width), (tr("Height"), self.height)):
            if not (64 <= size <= 4096 and size % 8 == 0):
                raise ConfigError(tr("{label} of the class pictures must be a multiple of 8 from 64 to 4096 "
                                     "(got {size}).", label=label, size=size))
        if not 1 <= self.steps <= 1000:
            raise ConfigError(tr("Steps of the class pictures must be from 1 to 1000 (got {steps}).", steps=self.steps))
        if not (math.isfinite(self.cfg_scale) and self.cfg_scale >= 0):
            raise ConfigError(tr("CFG scale of the class pictures must be 0 or more (got {cfg_scale}).",
                                 cfg_scale=self.cfg_scale))
        read_seed_records(self.subfolder / SEEDS_FILE)  # refused before the job, not after the first picture
        return self

    @property
    def subfolder(self) -> Path:
        return self.folder / f"{self.repeats}_{self.class_prompt}"


def read_seed_records(path: Path) -> list:
    """The seeds file's list of pictures ([] when there is none); a damaged one is named, and neither it nor the
    pictures are touched."""
    if not path.is_file():
        return []
    try:
        records = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as error:
        records = error
    if not isinstance(records, list):
        raise ConfigError(tr("{path} cannot be read as the list of class pictures (it is damaged: {error}). Your "
                             "pictures are not touched: move it out of the folder (or delete it) and make the class "
                             "pictures again, and a new list is started.", path=path,
                             error=records if isinstance(records, Exception) else tr("not a list")))
    return records


@dataclass
class ClassPicturesResult:
    folder: Path  # the regularization folder to train with
    paths: list[Path] = field(default_factory=list)
    complete: bool = False


def generate_class_pictures(webui: WebUI, host: WebUIHost, request: ClassPicturesRequest,
                            on_picture: Callable[[int, int, str], None]) -> ClassPicturesResult:
    """Render the pictures one by one (Stop keeps the finished ones); each PNG has its infotext, and the seeds
    file lists every picture's seed and settings. Pictures already in the folder are kept, numbering goes on."""
    out = request.subfolder
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / SEEDS_FILE
    records = read_seed_records(record_path)
    first = 1 + max((int(p.stem.split("_")[0]) for p in out.glob("*.png") if p.stem.split("_")[0].isdigit()), default=0)
    result = ClassPicturesResult(request.folder)
    settings = {k: v for k, v in asdict(request).items() if k not in ("folder", "count", "seed")}
    for index in range(request.count):
        if host.should_stop():
            return result
        seed = request.seed + index
        on_picture(index, request.count, tr("Class picture {number}/{count}, seed {seed}", number=index + 1,
                                            count=request.count, seed=seed))
        host.clear_conditioning_caches()
        images, infotexts = _txt2img(webui, request.class_prompt, request.negative_prompt, seed, request.sampler,
                                     request.steps, request.cfg_scale, request.width, request.height)
        if not images or host.should_stop():  # interrupted: the half-sampled picture is not kept
            return result
        path = out / f"{first + index:04d}_{seed}.png"
        write_atomically(path, png_bytes(images[0], infotexts[0] if infotexts else ""), overwrite=False)
        records.append({"file": path.name, "seed": seed, **settings})
        write_atomically(record_path, json.dumps(records, indent=1, ensure_ascii=False).encode("utf-8"), overwrite=True)
        result.paths.append(path)
    on_picture(request.count, request.count, tr("done"))
    result.complete = True
    return result

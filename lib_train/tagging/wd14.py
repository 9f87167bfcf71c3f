"""SmilingWolf's WD14 / WD v3 booru taggers (ONNX), run with onnxruntime.

A model is a folder with ``model.onnx`` and ``selected_tags.csv``. Known models are downloaded once from
Hugging Face into ``<WebUI models>/TrainTools-taggers/<name>/`` and used from disk afterwards; a folder the
user made with the same two files works the same way.
"""

from __future__ import annotations

import csv
import gc
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

from ..common.errors import CheckpointError, ConfigError, TrainToolsError
from ..common.i18n import tr
from .auto_tag import ImageTagger

KNOWN_MODELS: dict[str, str] = {
    name: f"SmilingWolf/{name}"
    for name in (
        "wd-v1-4-vit-tagger-v2",
        "wd-v1-4-convnext-tagger-v2",
        "wd-v1-4-convnextv2-tagger-v2",
        "wd-v1-4-swinv2-tagger-v2",
        "wd-v1-4-moat-tagger-v2",
        "wd-vit-tagger-v3",
        "wd-convnext-tagger-v3",
        "wd-swinv2-tagger-v3",
        "wd-vit-large-tagger-v3",
        "wd-eva02-large-tagger-v3",
    )
}
MODELS_SUBFOLDER = "TrainTools-taggers"
MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"

RATING_CATEGORY = 9
CHARACTER_CATEGORY = 4

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"

# Used when the model's input size is symbolic; every published WD model is 448.
_DEFAULT_INPUT_SIZE = 448
_PARENTHESES = re.compile(r"([()])")
_ALPHANUMERIC = re.compile(r"[^\W_]")


# ---------------------------------------------------------------------------------------------
# onnxruntime


# From 1.25 on, onnxruntime requires protobuf 4+, and pip would upgrade the WebUI's pinned protobuf 3.20.
ONNXRUNTIME_VERSIONS = ">=1.17,<1.25"


def onnxruntime_package(cuda_available: bool) -> str:
    """The pip requirement to offer: the GPU build runs on CUDA and falls back to the CPU by itself."""
    return ("onnxruntime-gpu" if cuda_available else "onnxruntime") + ONNXRUNTIME_VERSIONS


def import_onnxruntime() -> ModuleType:
    """The onnxruntime module, or a message saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise TrainToolsError(
            tr("The WD14 tagger needs onnxruntime, which is not installed. Install it into the WebUI's Python (`pip "
               "install onnxruntime-gpu` with an NVIDIA GPU, else `pip install onnxruntime`) and restart the WebUI, "
               "or use DeepBooru or BLIP instead.")
        ) from None
    return onnxruntime


def execution_providers(use_gpu: bool, available: Sequence[str] | None = None) -> list[str]:
    """CUDA first when asked for and present in this onnxruntime build, the CPU always as the fallback."""
    if available is None:
        available = import_onnxruntime().get_available_providers()
    if use_gpu and CUDA_PROVIDER in available:
        return [CUDA_PROVIDER, CPU_PROVIDER]
    return [CPU_PROVIDER]


# ---------------------------------------------------------------------------------------------
# Model folders


def is_model_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / MODEL_FILE).is_file() and (folder / TAGS_FILE).is_file()


def available_models(models_dir: str | Path) -> list[str]:
    """The known models, then folders the user put under ``TrainTools-taggers`` with the two files."""
    root = Path(models_dir) / MODELS_SUBFOLDER
    own = sorted(p.name for p in root.iterdir() if p.name not in KNOWN_MODELS and is_model_folder(p)) if root.is_dir() else []
    return list(KNOWN_MODELS) + own


def download_model(name: str, models_dir: str | Path) -> Path:
    """The folder of model ``name``: a folder path holding the two files, a folder already under
    ``<models_dir>/TrainTools-taggers/``, or a known model downloaded there now."""
    if Path(name).is_absolute():
        if is_model_folder(name):
            return Path(name)
        raise ConfigError(tr("Tagger folder {name} needs both {MODEL_FILE} and {TAGS_FILE}.", name=name,
                             MODEL_FILE=MODEL_FILE, TAGS_FILE=TAGS_FILE))
    if Path(name).name != name or name in ("", ".", ".."):
        raise ConfigError(tr("Tagger name '{name}' must be a model name or the full path of a folder.", name=name))
    folder = Path(models_dir) / MODELS_SUBFOLDER / name
    if is_model_folder(folder):
        return folder
    repo_id = KNOWN_MODELS.get(name)
    if repo_id is None:
        raise ConfigError(
            tr("Unknown tagger '{name}'. Known: {value}; or put {MODEL_FILE} and {TAGS_FILE} in {folder}.", name=name,
               value=', '.join(KNOWN_MODELS), MODEL_FILE=MODEL_FILE, TAGS_FILE=TAGS_FILE, folder=folder)
        )
    from huggingface_hub import hf_hub_download  # only here: loading a model from disk needs no hub client

    try:
        # The tag list first: the folder counts as complete only once model.onnx is there too.
        for filename in (TAGS_FILE, MODEL_FILE):
            hf_hub_download(repo_id=repo_id, filename=filename, local_dir=folder)
    except Exception as error:  # network, proxy, offline mode, disk: the hub raises many types
        raise CheckpointError(
            tr("Cannot download the tagger {name} from huggingface.co/{repo_id} ({error}). Download {MODEL_FILE} "
               "and {TAGS_FILE} from that page into {folder} by hand, or check the connection.", name=name,
               repo_id=repo_id, error=error, MODEL_FILE=MODEL_FILE, TAGS_FILE=TAGS_FILE, folder=folder)
        ) from None
    return folder


@dataclass(frozen=True)
class TagTable:
    """The rows of ``selected_tags.csv``, in the model's output order."""

    names: list[str]
    categories: list[int]

    @classmethod
    def read(cls, path: Path) -> "TagTable":
        try:
            with open(path, encoding="utf-8-sig", newline="") as file:
                rows = list(csv.DictReader(file))
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise CheckpointError(tr("Cannot read the tag list {path}: {error}", path=path, error=error)) from None
        if not rows or "name" not in rows[0] or "category" not in rows[0]:
            raise CheckpointError(tr("Tag list {path} needs the columns name and category "
                                     "(tag_id,name,category,count).", path=path))
        try:
            categories = [int(row["category"]) for row in rows]
        except (TypeError, ValueError):
            raise CheckpointError(tr("Tag list {path} has a category that is not a number.", path=path)) from None
        return cls([row["name"] for row in rows], categories)

    def names_in(self, category: int) -> frozenset[str]:
        return frozenset(name for name, c in zip(self.names, self.categories) if c == category)


# ---------------------------------------------------------------------------------------------
# Tag selection and formatting (shared with the wd14-tagger extension's adapter)


def is_kaomoji(tag: str) -> bool:
    """Emoticon tags such as ``^_^``, ``>_<``, ``o_o``, ``(o)_(o)``: the underscore is part of the face."""
    parts = tag.split("_")
    return len(parts) > 1 and all(len(_ALPHANUMERIC.findall(part)) <= 1 for part in parts)


def format_tag(tag: str) -> str:
    """A booru tag as a caption word: spaces for underscores (faces kept), parentheses escaped so that
    the WebUI does not read ``hat (object)`` as emphasis."""
    if not is_kaomoji(tag):
        tag = tag.replace("_", " ")
    return _PARENTHESES.sub(r"\\\1", tag)


def pick_tags(
    scores: Mapping[str, float],
    *,
    general_threshold: float,
    character_threshold: float,
    character_tags: Collection[str] = (),
    rating_tags: Collection[str] = (),
) -> list[str]:
    """Formatted tags above their category's threshold, most confident first; ratings dropped."""
    chosen = []
    for name, score in scores.items():
        if name in rating_tags:
            continue
        threshold = character_threshold if name in character_tags else general_threshold
        if score > threshold:
            chosen.append((float(score), name))
    chosen.sort(key=lambda item: -item[0])
    return [format_tag(name) for _, name in chosen]


# ---------------------------------------------------------------------------------------------
# The tagger


def _on_white(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """What the WD models were trained on: RGB on white, padded to a centred white square, resized, BGR,
    float32 0..255, shape (1, size, size, 3)."""
    image = _on_white(image)
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    if side != size:
        # Pillow's bicubic filter spans the whole source footprint when shrinking, i.e. it area-averages.
        square = square.resize((size, size), Image.BICUBIC)
    pixels = np.asarray(square, dtype=np.float32)[:, :, ::-1]
    return np.ascontiguousarray(pixels)[np.newaxis]


class WD14Tagger:
    """One WD model folder; the ONNX session is created on first use and freed by ``unload()``."""

    def __init__(self, folder: str | Path, providers: Sequence[str] | None = None):
        self.folder = Path(folder)
        self.providers = list(providers) if providers else [CPU_PROVIDER]
        self._session = None
        self._names: list[str] = []
        self._characters: frozenset[str] = frozenset()
        self._ratings: frozenset[str] = frozenset()
        self._input_name = ""
        self.input_size = 0
        # What onnxruntime really uses: it falls back to the CPU silently when CUDA cannot start.
        self.active_providers: list[str] = []

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def load(self) -> None:
        """Create the session now (it happens on first use otherwise), so that problems show up front."""
        if self._session is not None:
            return
        if not is_model_folder(self.folder):
            raise CheckpointError(tr("Tagger folder {folder} needs both {MODEL_FILE} and {TAGS_FILE}.",
                                     folder=self.folder, MODEL_FILE=MODEL_FILE, TAGS_FILE=TAGS_FILE))
        onnxruntime = import_onnxruntime()
        table = TagTable.read(self.folder / TAGS_FILE)
        present = onnxruntime.get_available_providers()
        providers = [p for p in self.providers if p in present] or [CPU_PROVIDER]
        try:
            session = onnxruntime.InferenceSession(str(self.folder / MODEL_FILE), providers=providers)
        except Exception as error:  # onnxruntime reports bad files with its own exception types
            raise CheckpointError(tr("Cannot load the tagger model {value}: {error}", value=self.folder / MODEL_FILE,
                                     error=error)) from None
        model_input, model_output = session.get_inputs()[0], session.get_outputs()[0]
        if len(model_input.shape) != 4 or model_input.shape[3] != 3:
            raise CheckpointError(tr("Tagger model {value} does not take NHWC RGB images (input shape {shape}).",
                                     value=self.folder / MODEL_FILE, shape=model_input.shape))
        outputs = model_output.shape[-1]
        if isinstance(outputs, int) and outputs != len(table.names):
            raise CheckpointError(tr("Tagger model {value} predicts {outputs} tags but {value2} lists {count_names}.",
                                     value=self.folder / MODEL_FILE, outputs=outputs, value2=self.folder / TAGS_FILE,
                                     count_names=len(table.names)))
        height = model_input.shape[1]
        self.input_size = height if isinstance(height, int) and height > 0 else _DEFAULT_INPUT_SIZE
        self._input_name = model_input.name
        self.active_providers = session.get_providers()
        self._names = table.names
        self._characters = table.names_in(CHARACTER_CATEGORY)
        self._ratings = table.names_in(RATING_CATEGORY)
        self._session = session

    def unload(self) -> None:
        """Free the session (and its GPU memory); the next call loads it again."""
        self._session = None
        gc.collect()

    def predict(self, image: Image.Image) -> dict[str, float]:
        """Every tag of the model, ratings included, with its confidence."""
        self.load()
        confidences = self._session.run(None, {self._input_name: preprocess(image, self.input_size)})[0][0]
        return {name: float(value) for name, value in zip(self._names, confidences)}

    def tags(self, image: Image.Image, general_threshold: float = 0.35, character_threshold: float = 0.85) -> list[str]:
        """Caption-ready tags above the thresholds, most confident first, without the rating tags."""
        scores = self.predict(image)
        return pick_tags(
            scores,
            general_threshold=general_threshold,
            character_threshold=character_threshold,
            character_tags=self._characters,
            rating_tags=self._ratings,
        )

    @contextmanager
    def session(self, general_threshold: float = 0.35, character_threshold: float = 0.85) -> Iterator[ImageTagger]:
        """Like the WebUI adapters: loaded on entry, freed on exit whatever happens, yielding ``tags``."""
        self.load()
        try:
            yield lambda image: self.tags(image, general_threshold, character_threshold)
        finally:
            self.unload()

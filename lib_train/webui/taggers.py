"""Taggers the WebUI already has, as ``Callable[[PIL.Image], list[str]]`` for ``tagging.tag_pictures``.

The WebUI objects are handed in (``modules.deepbooru``, ``shared.interrogator``), so this package imports no
WebUI module. Each adapter is a context manager: the model is loaded on entry and released on exit, whatever
happens in between.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from PIL import Image

from ..common.errors import ConfigError
from ..common.i18n import tr
from ..dataset.captions import split_tags
from ..tagging.auto_tag import ImageTagger
from ..tagging.wd14 import CHARACTER_CATEGORY, pick_tags

# The module where the wd14-tagger extension (picobyte's fork) keeps its interrogators by name.
WD14_EXTENSION_MODULE = "tagger.utils"


@contextmanager
def deepbooru_tagger(deepbooru: Any) -> Iterator[ImageTagger]:
    """The WebUI's DeepBooru (``modules.deepbooru``); its own settings (threshold, spaces, escaping, filtered
    tags) apply. Weights such as ``(tag:0.93)`` are never written into captions."""
    model = deepbooru.model
    model.start()
    try:
        yield lambda image: split_tags(model.tag_multi(image.convert("RGB"), force_disable_ranks=True))
    finally:
        model.stop()


@contextmanager
def blip_captioner(interrogator: Any) -> Iterator[ImageTagger]:
    """BLIP captions through ``shared.interrogator``. ``interrogate()`` is avoided on purpose: it calls
    ``shared.state.begin/end``, which would reset the progress of the job that runs the tagging."""
    interrogator.load()
    try:
        yield lambda image: split_tags(interrogator.generate_caption(image.convert("RGB")))
    finally:
        interrogator.unload()


def wd14_extension_interrogators() -> list[str]:
    """Names of the wd14-tagger extension's interrogators, or none when that extension is not loaded."""
    utils = sys.modules.get(WD14_EXTENSION_MODULE)
    return sorted(getattr(utils, "interrogators", {})) if utils is not None else []


def _character_names(interrogator: Any) -> set[str]:
    # WD interrogators keep selected_tags.csv as a table with name and category columns once loaded;
    # other kinds (DeepDanbooru, ML-Danbooru) have plain tag lists and no characters to tell apart.
    table = getattr(interrogator, "tags", None)
    try:
        if table is None or "category" not in table or "name" not in table:
            return set()
        return {name for name, category in zip(table["name"], table["category"]) if int(category) == CHARACTER_CATEGORY}
    except (TypeError, ValueError):
        return set()


@contextmanager
def wd14_extension_tagger(
    name: str, general_threshold: float = 0.35, character_threshold: float = 0.85
) -> Iterator[ImageTagger]:
    """An interrogator of the wd14-tagger extension, with our thresholds and tag formatting. A model the
    extension already had loaded stays loaded; one loaded here is unloaded on exit."""
    utils = sys.modules.get(WD14_EXTENSION_MODULE)
    interrogators = getattr(utils, "interrogators", {}) if utils is not None else {}
    if name not in interrogators:
        available = ", ".join(sorted(interrogators)) or tr("none (the wd14-tagger extension is not loaded)")
        raise ConfigError(tr("The wd14-tagger extension has no interrogator '{name}'. Available: {available}.",
                             name=name, available=available))
    interrogator = interrogators[name]
    loaded_here = getattr(interrogator, "model", None) is None
    if loaded_here:
        interrogator.load()
    characters = _character_names(interrogator)

    def tag(image: Image.Image) -> list[str]:
        _ratings, scores = interrogator.interrogate(image.convert("RGB"))
        return pick_tags(scores, general_threshold=general_threshold, character_threshold=character_threshold,
                         character_tags=characters)

    try:
        yield tag
    finally:
        if loaded_here:
            interrogator.unload()

"""The WebUI tagger adapters against stand-ins that follow the real signatures (modules/deepbooru.py,
modules/interrogate.py, the wd14-tagger extension's tagger/interrogator.py). The real calls are checked in a
running WebUI; these tests pin the call order, the unloading and what reaches the captions."""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from lib_train.common.errors import ConfigError
from lib_train.dataset.captions import read_caption
from lib_train.tagging.auto_tag import TagOptions, tag_pictures
from lib_train.tagging.wd14 import WD14Tagger
from lib_train.webui.taggers import blip_captioner, deepbooru_tagger, wd14_extension_interrogators, wd14_extension_tagger
from tests.tiny_wd14 import write_tiny_wd14

RED, BLUE = (255, 0, 0), (0, 0, 255)


class DeepDanbooruStandIn:
    """``modules.deepbooru.DeepDanbooru``: start()/stop() move the model, tag_multi() applies the WebUI's options
    (threshold 0.5, spaces, escaping, ranks when ``interrogate_return_ranks`` is on) and drops ``rating:*``."""

    def __init__(self, events: list[str]):
        self.events = events
        self.on_device = False

    def start(self) -> None:
        self.events.append("start")
        self.on_device = True

    def stop(self) -> None:
        self.events.append("stop")
        self.on_device = False

    def tag_multi(self, pil_image, force_disable_ranks=False):
        assert self.on_device, "tag_multi before start()"
        self.events.append("tag")
        red = pil_image.convert("RGB").getpixel((0, 0))[0] / 255
        probabilities = {"rating:safe": 0.99, "red_background": 0.95 * red, "hat_(object)": 0.7 * red, "solo": 0.3}
        kept = sorted(((p, t) for t, p in probabilities.items() if p >= 0.5 and not t.startswith("rating:")), reverse=True)
        include_ranks = not force_disable_ranks  # the user's interrogate_return_ranks is on
        result = []
        for probability, tag in kept:
            tag = re.sub(r"([\\()])", r"\\\1", tag.replace("_", " "))
            result.append(f"({tag}:{probability:.3f})" if include_ranks else tag)
        return ", ".join(result)


class InterrogatorStandIn:
    """``modules.interrogate.InterrogateModels``: load() loads BLIP and CLIP, generate_caption() needs a
    3-channel image (torchvision's Normalize), unload() sends them to RAM; interrogate() wraps it all in
    ``shared.state.begin/end``."""

    def __init__(self, events: list[str]):
        self.events = events
        self.blip_model = None
        self.state = SimpleNamespace(begin=lambda job="": events.append("state.begin"), end=lambda: events.append("state.end"))

    def load(self) -> None:
        self.events.append("load")
        self.blip_model = "on device"

    def unload(self) -> None:
        self.events.append("unload")
        self.blip_model = "in RAM"

    def generate_caption(self, pil_image) -> str:
        assert self.blip_model == "on device", "generate_caption before load()"
        assert pil_image.mode == "RGB", "Normalize expects 3 channels"
        self.events.append("caption")
        return "a red square, on a table" if pil_image.getpixel((0, 0))[0] > 128 else "a blue square"

    def interrogate(self, pil_image) -> str:
        self.state.begin(job="interrogate")
        self.load()
        caption = self.generate_caption(pil_image)
        self.unload()
        self.state.end()
        return caption


class WaifuDiffusionStandIn:
    """The extension's ``WaifuDiffusionInterrogator`` over the tiny ONNX model: ``tags`` is the CSV as columns
    (pandas in the extension), ``interrogate`` returns (ratings = first 4 rows, every other tag) with raw names."""

    def __init__(self, folder: Path, events: list[str]):
        self.folder = folder
        self.events = events
        self.model = None
        self.tags = None

    def load(self) -> None:
        self.events.append("load")
        self.model = WD14Tagger(self.folder)
        with open(self.folder / "selected_tags.csv", encoding="utf-8", newline="") as file:
            rows = list(csv.DictReader(file))
        self.tags = {column: [row[column] for row in rows] for column in rows[0]}
        self.tags["category"] = [int(c) for c in self.tags["category"]]

    def unload(self) -> bool:
        self.events.append("unload")
        self.model = self.tags = None
        return True

    def interrogate(self, image):
        if self.model is None:
            self.load()
        self.events.append("interrogate")
        scores = list(self.model.predict(image).items())
        return dict(scores[:4]), dict(scores[4:])


def square(colour, mode="RGB") -> Image.Image:
    return Image.new(mode, (32, 32), colour)


def test_deepbooru_started_once_stopped_always_and_never_writes_weights(tmp_path):
    events: list[str] = []
    deepbooru = SimpleNamespace(model=DeepDanbooruStandIn(events))  # the shape of `modules.deepbooru`
    for name, colour in (("a.png", RED), ("b.png", BLUE)):
        square(colour).save(tmp_path / name)
    with deepbooru_tagger(deepbooru) as tag:
        report = tag_pictures(tmp_path, tag, TagOptions(prefix="ttlora"))
    assert events == ["start", "tag", "tag", "stop"]
    assert report.tagged == [tmp_path / "a.png", tmp_path / "b.png"]
    assert read_caption(tmp_path / "a.txt") == "ttlora, red background, hat \\(object\\)"
    assert read_caption(tmp_path / "b.txt") == "ttlora"

    events.clear()
    with pytest.raises(KeyboardInterrupt), deepbooru_tagger(deepbooru) as tag:
        tag(square(RED))
        raise KeyboardInterrupt
    assert events == ["start", "tag", "stop"] and not deepbooru.model.on_device


def test_blip_captions_without_touching_the_jobs_state():
    events: list[str] = []
    interrogator = InterrogatorStandIn(events)
    with blip_captioner(interrogator) as caption:
        assert caption(square(RED + (255,), mode="RGBA")) == ["a red square", "on a table"]
        assert caption(square(BLUE)) == ["a blue square"]
    assert events == ["load", "caption", "caption", "unload"]  # no state.begin/end: a running job keeps its progress

    events.clear()
    with pytest.raises(RuntimeError), blip_captioner(interrogator):
        raise RuntimeError("out of memory")
    assert events == ["load", "unload"]


@pytest.fixture
def wd14_extension(tmp_path, monkeypatch):
    """The extension's ``tagger.utils`` module, as it sits in sys.modules once the extension is loaded."""
    events: list[str] = []
    interrogator = WaifuDiffusionStandIn(write_tiny_wd14(tmp_path / "tiny"), events)
    monkeypatch.setitem(sys.modules, "tagger.utils", SimpleNamespace(interrogators={"wd14-vit.v2": interrogator}))
    return interrogator, events


def test_wd14_extension_with_our_thresholds_and_formatting(wd14_extension):
    interrogator, events = wd14_extension
    assert wd14_extension_interrogators() == ["wd14-vit.v2"]
    green = square((0, 255, 0))
    with wd14_extension_tagger("wd14-vit.v2", general_threshold=0.35, character_threshold=0.85) as tag:
        assert tag(square(RED)) == ["red background", "hat \\(object\\)"]  # the "general" rating is dropped
        assert tag(square(BLUE)) == ["^_^", "long hair"]
        assert tag(green) == ["o_o", "hatsune miku"]  # kagamine_rin (0.82) is held to the character threshold
    with wd14_extension_tagger("wd14-vit.v2", general_threshold=0.4, character_threshold=0.8) as tag:
        assert tag(green) == ["o_o", "hatsune miku", "kagamine rin"]
    assert events == ["load", "interrogate", "interrogate", "interrogate", "unload", "load", "interrogate", "unload"]


def test_wd14_extension_model_loaded_by_the_user_stays_loaded(wd14_extension):
    interrogator, events = wd14_extension
    interrogator.load()
    with pytest.raises(RuntimeError), wd14_extension_tagger("wd14-vit.v2") as tag:
        tag(square(RED))
        raise RuntimeError("stop")
    assert events == ["load", "interrogate"] and interrogator.model is not None


def test_wd14_extension_missing(wd14_extension, monkeypatch):
    with pytest.raises(ConfigError, match="no interrogator 'wd14-moat'. Available: wd14-vit.v2"):
        with wd14_extension_tagger("wd14-moat"):
            pass
    monkeypatch.delitem(sys.modules, "tagger.utils")
    assert wd14_extension_interrogators() == []
    with pytest.raises(ConfigError, match="extension is not loaded"):
        with wd14_extension_tagger("wd14-vit.v2"):
            pass

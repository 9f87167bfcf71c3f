"""The prompts of the samples rendered during training, one per line as in kohya's prompt file:
``prompt --n negative --w 512 --h 768 --d seed --s steps --l CFG scale --ss sampler``, plus ``--m`` for the
Lora multiplier (kohya always renders at 1). What a line leaves out comes from the run's sample settings; the
seed is the run's seed plus the prompt's position, so every epoch renders from the same noise. Without prompts,
they are made from the trigger words and the training captions' most frequent tags."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..common.errors import ConfigError, DatasetError
from ..common.i18n import N_, tr
from ..dataset.captions import find_caption, read_caption, split_tags
from ..dataset.training_data import REPEATS_PREFIX, pictures_in

TAGS_PER_PROMPT = 5


@dataclass(frozen=True)
class SamplePrompt:
    """One sample; None: the run's setting (resolution, seed + position, steps, CFG scale, sampler)."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    sampler: str | None = None
    multiplier: float = 1.0

    def resolved(self, index: int, *, resolution: int, seed: int, steps: int, cfg_scale: float,
                 sampler: str) -> "SamplePrompt":
        """Every field set, from the run's settings where the line gave none."""
        return dataclasses.replace(
            self, width=self.width or resolution, height=self.height or resolution,
            seed=seed + index if self.seed is None else self.seed, steps=self.steps or steps,
            cfg_scale=cfg_scale if self.cfg_scale is None else self.cfg_scale, sampler=self.sampler or sampler)

    def as_line(self) -> str:
        """The prompt line that gives this sample back (for the tab's text box and the status)."""
        flags = [("n", self.negative_prompt), ("w", self.width), ("h", self.height), ("d", self.seed),
                 ("s", self.steps), ("l", self.cfg_scale), ("ss", self.sampler),
                 ("m", None if self.multiplier == 1.0 else self.multiplier)]
        return self.prompt + "".join(f" --{flag} {value:g}" if isinstance(value, float) else f" --{flag} {value}"
                                     for flag, value in flags if value not in (None, ""))


def _size(text: str) -> int:
    value = int(text)
    if not (64 <= value <= 4096 and value % 8 == 0):
        raise ValueError(N_("a multiple of 8 from 64 to 4096"))
    return value


def _steps(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 1000:
        raise ValueError(N_("from 1 to 1000"))
    return value


def _seed(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(N_("0 or more"))
    return value


def _scale(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(N_("a number, 0 or more"))
    return value


def _multiplier(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(N_("a number"))
    return value


def _text(text: str) -> str:
    if not text.strip():
        raise ValueError(N_("some text"))
    return text.strip()


_FLAGS = {"n": ("negative_prompt", _text), "w": ("width", _size), "h": ("height", _size), "d": ("seed", _seed),
          "s": ("steps", _steps), "l": ("cfg_scale", _scale), "ss": ("sampler", _text), "m": ("multiplier", _multiplier)}


def parse_sample_prompts(text: str) -> list[SamplePrompt]:
    """One sample per line; blank lines and lines starting with # are skipped. A flag kohya knows but this
    cannot honour, or a bad value, is a ConfigError naming the line (kohya would skip it silently)."""
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        prompt, *options = f" {line}".split(" --")  # the space: a line may start with an option
        values: dict = {}
        for option in options:
            flag, _, value = option.strip().partition(" ")
            if flag.lower() not in _FLAGS:
                raise ConfigError(tr("Sample prompt line {number}: unknown option --{flag} (use --n negative prompt, "
                                     "--w width, --h height, --d seed, --s steps, --l CFG scale, --ss sampler, "
                                     "--m Lora multiplier).", number=number, flag=flag))
            field, convert = _FLAGS[flag.lower()]
            try:
                values[field] = convert(value.strip())
            except ValueError as error:
                raise ConfigError(tr("Sample prompt line {number}: --{flag} needs {expected}, got {value!r}.",
                                     number=number, flag=flag, expected=_expected(error),
                                     value=value.strip())) from None
        if not prompt.strip():
            raise ConfigError(tr("Sample prompt line {number} has options but no prompt.", number=number))
        prompts.append(SamplePrompt(prompt.strip(), **values))
    return prompts


def _expected(error: ValueError) -> str:
    """What the option needs: the checks' own words (marked N_ above), or "a number" for Python's int()/float()."""
    message = str(error)
    return tr(message) if not message.startswith(("invalid literal", "could not convert")) else tr("a number")


def made_prompts(trigger_words: str, tag_counts: Counter, count: int) -> list[SamplePrompt]:
    """``count`` prompts: the trigger words with the most frequent tags, five per prompt (the first five, the
    next five ..., round again when there are fewer), so the samples show the concept in its usual settings."""
    trigger = split_tags(trigger_words)
    own = {tag.lower() for tag in trigger}
    tags = [tag for tag, _ in sorted(tag_counts.items(), key=lambda item: (-item[1], item[0])) if tag not in own]
    chunks = [tags[start:start + TAGS_PER_PROMPT] for start in range(0, len(tags), TAGS_PER_PROMPT)] or [[]]
    if not trigger and not tags:
        raise ConfigError(tr("No sample prompt to make: the pictures have no captions and there are no trigger "
                             "words. Write the sample prompts (one per line) or turn samples off."))
    return [SamplePrompt(", ".join(trigger + chunks[index % len(chunks)])) for index in range(count)]


def folder_tag_counts(train_dir: str | Path) -> Counter:
    """How many training pictures carry each tag (lower-cased), captions read without opening any picture; a
    picture without caption counts its ``<N>_<name>`` folder's name. Unreadable captions are left to the
    training's own report."""
    counts: Counter = Counter()
    folder = Path(train_dir)
    if not folder.is_dir():
        return counts
    for picture in pictures_in(folder):
        caption_path = find_caption(picture)
        try:
            caption = read_caption(caption_path) if caption_path else ""
        except DatasetError:
            continue
        if not caption and picture.parent != folder:
            match = REPEATS_PREFIX.match(picture.parent.name)
            caption = match.group(2) if match else ""
        counts.update({tag.lower() for tag in split_tags(caption)})
    return counts

"""Auto-tagging a project's ``pictures/`` folder: run a tagger on every image and merge its tags into the caption.

The tagger is any ``Callable[[PIL.Image], list[str]]`` (WD14, DeepBooru, BLIP, the wd14-tagger extension), so
this file knows nothing about models. A bad image or caption is reported and skipped; the run goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..common.errors import ConfigError, TrainToolsError
from ..common.files import write_atomically
from ..common.i18n import tr
from ..dataset.captions import find_caption, read_caption, split_tags
from ..dataset.training_data import load_rgb, pictures_in  # the training folder's own rule for what counts as an image

MODES = ("append", "prepend", "overwrite")

ImageTagger = Callable[[Image.Image], list[str]]


@dataclass(frozen=True)
class TagOptions:
    """How new tags meet the existing caption.

    ``append``/``prepend`` put the tagger's tags after/before the caption's own, ``overwrite`` replaces them.
    ``prefix`` (trigger words, comma-separated) always comes first, once. ``blacklist`` tags are never written
    by the tagger. The thresholds are for the tagger the caller builds (WD14 and the wd14-tagger extension).
    """

    mode: str = "append"
    prefix: str = ""
    blacklist: str = ""
    general_threshold: float = 0.35
    character_threshold: float = 0.85

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(tr("Tagging mode '{mode}' is not one of {value}.", mode=self.mode,
                                 value=', '.join(MODES)))
        for label, value in ((tr("general"), self.general_threshold), (tr("character"), self.character_threshold)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(tr("The {label} tag threshold must be between 0 and 1, not {value}.", label=label,
                                     value=value))


@dataclass
class TagReport:
    tagged: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    stopped: bool = False


def tag_key(tag: str) -> str:
    """What makes two tags the same: ``Long_hair``, ``long hair`` and ``hat \\(object\\)``/``hat (object)``."""
    plain = tag.replace("\\(", "(").replace("\\)", ")").replace("_", " ").lower()
    return " ".join(plain.split())


def merge_tags(existing: list[str], new: list[str], options: TagOptions) -> list[str]:
    """The caption's tags after tagging: prefix first, then by mode, each tag once (first place wins)."""
    blocked = {tag_key(tag) for tag in split_tags(options.blacklist)}
    new = [tag for tag in new if tag_key(tag) not in blocked]
    if options.mode == "overwrite":
        body = new
    elif options.mode == "prepend":
        body = new + existing
    else:
        body = existing + new
    return _unique(split_tags(options.prefix) + body)


def _unique(tags: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    kept = []
    for tag in tags:
        key = tag_key(tag)
        if key and key not in seen:
            seen.add(key)
            kept.append(tag)
    return kept


def _lines_after_caption(path: Path) -> str:
    # Training reads only the first non-empty line; whatever the user keeps below it is carried over.
    lines = path.read_bytes().decode("utf-8-sig").splitlines(keepends=True)
    first = next((index for index, line in enumerate(lines) if line.strip()), len(lines))
    return "".join(lines[first + 1 :])


def tag_picture(image_path: Path, tagger: ImageTagger, options: TagOptions) -> None:
    """Tag one image; raises with a message for the report when it cannot be done."""
    caption_path = find_caption(image_path)
    # Read (and so validate) the old caption before the tagger runs: a caption we cannot read is never replaced.
    old_caption = read_caption(caption_path) if caption_path else None
    image = load_rgb(image_path)
    try:
        new_tags = list(tagger(image))
    except TrainToolsError:
        raise
    except Exception as error:  # a model can fail in many ways on one image; the run goes on
        raise TrainToolsError(tr("The tagger failed on {image_path}: {kind}: {error}", image_path=image_path,
                                 kind=type(error).__name__, error=error)) from None
    caption = ", ".join(merge_tags(split_tags(old_caption or ""), new_tags, options))
    if caption == (old_caption or ""):
        return  # unchanged (or nothing found for an uncaptioned image, which keeps its folder-name fallback)
    rest = _lines_after_caption(caption_path) if caption_path else ""
    text = caption + "\n" + rest
    write_atomically(caption_path or image_path.with_suffix(".txt"), text.encode("utf-8"), overwrite=True)


def tag_pictures(
    folder: str | Path,
    tagger: ImageTagger,
    options: TagOptions,
    should_stop: Callable[[], bool] = lambda: False,
    report: Callable[[int, int, Path], None] | None = None,
) -> TagReport:
    """Tag every image of ``folder`` (a project's ``pictures/``); ``report(done, total, path)`` after each."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(tr("Pictures folder {folder} does not exist.", folder=folder))
    images = pictures_in(folder)
    result = TagReport()
    for index, image_path in enumerate(images, start=1):
        if should_stop():
            result.stopped = True
            break
        try:
            tag_picture(image_path, tagger, options)
            result.tagged.append(image_path)
        except TrainToolsError as error:
            result.failed.append((image_path, str(error)))
        except OSError as error:
            result.failed.append((image_path, tr("Cannot write the caption of {image_path}: {value}",
                                                 image_path=image_path, value=error.strerror or error)))
        if report is not None:
            report(index, len(images), image_path)
    return result

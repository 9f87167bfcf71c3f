"""Caption files: finding, reading (strict UTF-8) and the per-step shuffle and (tag) dropout of kohya sd-scripts."""

from __future__ import annotations

import random
from pathlib import Path

from ..common.errors import DatasetError
from ..common.i18n import tr

# `.txt` is what taggers write; `.caption` is kohya's default. Checked in this order.
CAPTION_EXTENSIONS = (".txt", ".caption")

_TYPICAL_CP1252_PUNCTUATION = set("‘’‚“”„–—…€ \u00a0")


def _looks_western(text: str) -> bool:
    return all(c.isascii() or c.isalpha() or c in _TYPICAL_CP1252_PUNCTUATION for c in text)


# Legacy encodings a caption file may have been saved in, tried in this order to give a hint.
# GB2312 (common Chinese) comes first because its byte ranges rarely fit Japanese or Western text;
# Shift-JIS before full GBK because GBK accepts almost every Shift-JIS byte pair; cp1252 must look
# like Western text, since it decodes nearly any byte sequence.
_LEGACY_ENCODINGS = (
    ("gb2312", "GBK", lambda text: True),
    ("shift_jis", "Shift-JIS", lambda text: True),
    ("cp1252", "Windows-1252 (cp1252)", _looks_western),
    ("gbk", "GBK", lambda text: True),
)


def _guess_legacy_encoding(data: bytes) -> str | None:
    for codec, label, plausible in _LEGACY_ENCODINGS:
        try:
            text = data.decode(codec)
        except UnicodeDecodeError:
            continue
        if plausible(text):
            return label
    return None


def find_caption(image_path: Path) -> Path | None:
    """The caption file next to an image: `<stem>.txt`, else `<stem>.caption`, else None."""
    for extension in CAPTION_EXTENSIONS:
        candidate = image_path.with_suffix(extension)
        if candidate.is_file():
            return candidate
    return None


def read_caption(path: Path) -> str:
    """The first non-empty line of a UTF-8 caption file (BOM allowed), stripped.

    Anything else is refused rather than decoded loosely: garbled tags would be trained silently.
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DatasetError(tr("Cannot read caption file {path}: {value}", path=path, value=error.strerror or error)) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        guess = _guess_legacy_encoding(data)
        if guess:
            detail = tr("it looks like {guess}; re-save it as UTF-8", guess=guess)
        else:
            detail = tr("invalid byte 0x{value:02x} at position {start}; re-save it as UTF-8",
                        value=data[error.start], start=error.start)
        raise DatasetError(tr("Caption file {path} is not valid UTF-8 ({detail}).", path=path, detail=detail)) from None
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empty ones dropped."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def process_caption(
    caption: str,
    rng: random.Random,
    *,
    shuffle: bool,
    keep_tokens: int,
    dropout_rate: float,
    tag_dropout_rate: float = 0.0,
) -> str:
    """The caption as the text encoder sees it at one step, in kohya's order: the whole caption dropped, else
    its tags after the first ``keep_tokens`` shuffled, then each of those dropped with ``tag_dropout_rate``."""
    if dropout_rate > 0 and rng.random() < dropout_rate:
        return ""
    if not shuffle and tag_dropout_rate <= 0:
        return caption
    tags = split_tags(caption)
    fixed, flexible = tags[:keep_tokens], tags[keep_tokens:]
    if shuffle:
        rng.shuffle(flexible)
    if tag_dropout_rate > 0:
        flexible = [tag for tag in flexible if rng.random() >= tag_dropout_rate]
    return ", ".join(fixed + flexible)

"""The words Train Tools shows, in the language of the WebUI's localization: one catalogue, one lookup.

Every user-facing string is written in English in the code, wrapped in ``tr()``; the English text is the key
of the catalogue (``strings_zh.json``, English → Simplified Chinese). The WebUI glue (``scripts/``) chooses the
language from the WebUI's ``localization`` setting (``language_for_localization``) and sets it here with
``set_language``: labels built at UI build time and messages built at run time (errors, findings, job status)
then come out in the same language. A string missing from the catalogue falls back to English (and
``tests/test_i18n.py`` fails on it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path

ENGLISH = "en"
CHINESE = "zh_CN"
LANGUAGES = (ENGLISH, CHINESE)
CATALOGUE_FILES = {CHINESE: Path(__file__).with_name("strings_zh.json")}

# Localization names in use for Simplified Chinese: "zh_CN" (dtlnor's extension), "zh-Hans (Stable)",
# "zh-Hans (Testing)" and their "[vladmandic]" variants (hanamizuki-ai's), "zh_Hans", "chinese-all-1024" and
# "chinese-english-1024" (the bilingual packs). Traditional Chinese (zh_TW, zh-Hant, zh_HK) is not Simplified.
_TRADITIONAL = re.compile(r"zh[-_ ]?(tw|hk|mo|hant)|traditional|繁", re.IGNORECASE)
_SIMPLIFIED = re.compile(r"^zh([-_ ]?(cn|sg|hans))?\b|^zh$|chinese|简体|中文|汉化", re.IGNORECASE)

_language = ENGLISH
_scoped: ContextVar[str | None] = ContextVar("train_tools_language", default=None)  # this thread only


def language_for_localization(name: str | None) -> str:
    """The language for the WebUI's ``localization`` setting (a localization file's name, or "None")."""
    text = (name or "").strip()
    if not text or text == "None" or _TRADITIONAL.search(text):
        return ENGLISH
    return CHINESE if _SIMPLIFIED.search(text) else ENGLISH


LANGUAGE_SETTINGS = {"Auto": None, "English": ENGLISH, "简体中文": CHINESE}  # Settings → Train Tools → Language


def choose_language(setting: str | None, localization: str | None, bilingual_file: str | None = None) -> str:
    """The language from Train Tools' own setting, else ("Auto") the WebUI's localization. The Bilingual
    Localization extension asks for Localization "None" and names its file in its own setting, ``bilingual_file``."""
    chosen = LANGUAGE_SETTINGS.get(setting or "Auto")
    if chosen:
        return chosen
    if (localization or "None") == "None" and bilingual_file:
        return language_for_localization(bilingual_file)
    return language_for_localization(localization)


def set_language(language: str) -> None:
    global _language
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; one of {', '.join(LANGUAGES)}")
    _language = language


def current_language() -> str:
    return _scoped.get() or _language


def is_chinese() -> bool:
    return current_language() == CHINESE


@contextmanager
def language_scope(language: str) -> Iterator[None]:
    """``language`` for the strings this thread builds inside the block (e.g. English grid labels when the label
    font has no Chinese glyphs); other threads keep the set language."""
    token = _scoped.set(language)
    try:
        yield
    finally:
        _scoped.reset(token)


@lru_cache(maxsize=None)
def catalogue(language: str) -> dict[str, str]:
    """English text → its translation; {} for English."""
    path = CATALOGUE_FILES.get(language)
    return json.loads(path.read_text(encoding="utf-8")) if path else {}


def tr(text: str, /, **fields: object) -> str:
    """``text`` in the current language; with ``fields`` it is a ``str.format`` template filled with them."""
    language = current_language()
    translated = catalogue(language).get(text, text) if language != ENGLISH else text
    return translated.format(**fields) if fields else translated


def N_(text: str) -> str:
    """Marks a string of a table built at import (before the language is known) for the catalogue; where it is
    shown, ``tr(value)`` translates it."""
    return text

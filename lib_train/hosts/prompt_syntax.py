"""Captions as the WebUI's prompt parser reads them: parentheses and brackets are emphasis there, so a tag's
own parentheses (``hat (object)``) travel escaped and the text encoder sees them as literal text."""

from __future__ import annotations

import re

# A backslash escape as the WebUI's prompt parser reads it, or a character that parser would take as syntax.
_ESCAPED_OR_SPECIAL = re.compile(r"\\[\\()\[\]]|[\\()\[\]]")


def escape_caption(caption: str) -> str:
    """Parentheses and brackets in tags (``hat (object)``) are literal text, not the prompt's emphasis.
    Already escaped ones (``hat \\(object\\)``, as taggers write them) are left as they are."""
    return _ESCAPED_OR_SPECIAL.sub(lambda m: m.group(0) if len(m.group(0)) == 2 else "\\" + m.group(0), caption)


def literal_caption(caption: str) -> str:
    """The text a caption stands for: ``hat \\(object\\)`` is ``hat (object)``, as the WebUI reads it."""
    return re.sub(r"\\([\\()\[\]])", r"\1", caption)

"""Chinese glosses of common Danbooru tags, shown beside the tags on the Dataset page of a Chinese UI.

The captions stay English: the taggers write these tags and the models were trained on them. The table
(``tag_glosses_zh.json``) holds a few hundred of the most frequent general tags (people, hair, eyes, clothes,
poses, framing, backgrounds, media and quality tags); a tag it does not hold has no gloss.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from ..common.i18n import is_chinese

GLOSSES_FILE = Path(__file__).with_name("tag_glosses_zh.json")


@lru_cache(maxsize=1)
def _table() -> dict[str, str]:
    return json.loads(GLOSSES_FILE.read_text(encoding="utf-8"))


def normalise(tag: str) -> str:
    """A caption's tag as the table writes it: lower case, spaces for underscores, no prompt escapes."""
    return tag.strip().lower().replace("\\(", "(").replace("\\)", ")").replace("_", " ")


def gloss(tag: str) -> str:
    """The tag's Chinese gloss, or "" (also "" when the UI is not Chinese)."""
    return _table().get(normalise(tag), "") if is_chinese() else ""

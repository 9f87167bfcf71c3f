"""The Chinese glosses of common Danbooru tags: shown only with a Chinese UI, found however a caption writes the
tag, and covering the tags a first character or style dataset is made of."""

from __future__ import annotations

import json
import re

import pytest

from lib_train.common import i18n
from lib_train.tagging.tag_glosses import GLOSSES_FILE, gloss, normalise

# Among the most frequent general tags on Danbooru, and what WD14 writes for nearly every anime picture.
FREQUENT = ["1girl", "solo", "long hair", "breasts", "looking at viewer", "blush", "smile", "short hair",
            "open mouth", "bangs", "blue eyes", "skirt", "simple background", "brown hair", "black hair",
            "hair ornament", "red eyes", "thighhighs", "gloves", "long sleeves", "white background", "dress", "hat",
            "ribbon", "shirt", "jewelry", "animal ears", "sitting", "twintails", "upper body", "full body",
            "school uniform", "monochrome", "outdoors", "sky", "highres", "absurdres"]


@pytest.fixture
def chinese():
    i18n.set_language(i18n.CHINESE)
    yield
    i18n.set_language(i18n.ENGLISH)


def test_the_table_is_a_few_hundred_chinese_glosses_of_normalised_tags():
    table = json.loads(GLOSSES_FILE.read_text(encoding="utf-8"))
    assert 300 <= len(table) <= 1000
    for tag, meaning in table.items():
        assert tag == normalise(tag), tag
        assert re.search(r"[\u4e00-\u9fff]", meaning) or meaning == "3D", tag


def test_glosses_follow_the_language_and_the_way_a_caption_writes_the_tag(chinese):
    assert all(gloss(tag) for tag in FREQUENT)
    assert gloss("long_hair") == gloss("Long Hair") == gloss(" long hair ") == "长发"
    assert gloss(r"star \(sky\)") == "星星" and gloss("watercolor_(medium)") == "水彩（媒介）"
    assert gloss("ttconcept") == ""  # a trigger word or rare tag has none
    with i18n.language_scope(i18n.ENGLISH):
        assert gloss("long hair") == ""


def test_every_feature_tag_the_bind_proposal_finds_in_a_typical_set_has_a_gloss(chinese):
    from lib_train.tagging.feature_tags import propose_feature_tags

    frequency = [("1girl", 10), ("blue eyes", 10), ("long hair", 9), ("twintails", 9), ("animal ears", 8),
                 ("hair ornament", 8), ("smile", 6), ("ttconcept", 10)]
    proposals = propose_feature_tags(frequency, 10, "ttconcept")
    assert {p.tag for p in proposals} >= {"blue eyes", "long hair", "twintails", "animal ears"}
    assert all(gloss(p.tag) for p in proposals)
    assert all(re.search(r"[\u4e00-\u9fff]", p.reason) for p in proposals)  # 瞳色，出现在 10 张图片中的 10 张

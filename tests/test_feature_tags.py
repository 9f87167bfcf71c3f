import pytest
from PIL import Image

from lib_train.common.errors import ConfigError
from lib_train.tagging.caption_editing import CaptionSet
from lib_train.tagging.feature_tags import Proposal, feature_kind, propose_feature_tags

# A made-up dataset of 10 images: (tag, images having it).
FREQUENCY = [
    ("1girl", 10), ("solo", 10), ("ttchar", 10), ("red_eyes", 10), ("blue eyes", 10),
    ("long_hair", 9), ("school uniform", 9), ("smile", 9), ("standing", 9),
    ("twintails", 8), ("hair ribbon", 8), ("blush", 8), ("white background", 8),
    ("freckles", 7), ("fake animal ears", 7), ("open mouth", 7),
    ("cat ears", 6), ("glasses", 6), ("sitting", 6), ("simple background", 6),
    ("fang", 5), ("outdoors", 5), ("holding tail", 5),
    ("mole under eye", 2), ("horns", 1),
]


def test_frequent_intrinsic_features_are_proposed_and_everything_else_kept():
    proposals = propose_feature_tags(FREQUENCY, 10, "ttchar, red eyes")
    assert [p.tag for p in proposals] == ["blue eyes", "long_hair", "twintails", "freckles", "cat ears", "fang"]
    assert proposals[0] == Proposal("blue eyes", 10, "eye colour, in 10 of 10 images (100%)")
    assert proposals[1].reason == "hair length, in 9 of 10 images (90%)"


def test_trigger_words_are_never_proposed_in_any_spelling():
    proposed = {p.tag for p in propose_feature_tags(FREQUENCY, 10, ["Red Eyes", "long hair"])}
    assert "red_eyes" not in proposed and "long_hair" not in proposed
    assert "blue eyes" in proposed


def test_min_fraction_is_inclusive_and_rare_features_stay():
    at_half = {p.tag for p in propose_feature_tags(FREQUENCY, 10, "ttchar", min_fraction=0.5)}
    assert "fang" in at_half and "mole under eye" not in at_half and "horns" not in at_half
    at_tenth = {p.tag for p in propose_feature_tags(FREQUENCY, 10, "ttchar", min_fraction=0.1)}
    assert {"mole under eye", "horns"} <= at_tenth
    assert not {"smile", "school uniform", "1girl", "holding tail"} & at_tenth


@pytest.mark.parametrize("bad", [0, -0.5, 1.5])
def test_min_fraction_out_of_range_is_a_config_error(bad):
    with pytest.raises(ConfigError, match=str(bad)):
        propose_feature_tags(FREQUENCY, 10, "", min_fraction=bad)


def test_no_images_no_proposals():
    assert propose_feature_tags(FREQUENCY, 0, "") == []


@pytest.mark.parametrize("tag, kind", [
    ("aqua_eyes", "eye colour"), ("light blue eyes", "eye colour"), ("heterochromia", "eye colour"),
    ("slit pupils", "eye shape"), ("tsurime", "eye shape"),
    ("blonde_hair", "hair colour"), ("Dark Brown Hair", "hair colour"), ("streaked hair", "hair colour"),
    ("very_long_hair", "hair length"), ("short hair", "hair length"),
    ("side ponytail", "hair style"), ("ahoge", "hair style"), ("hair between eyes", "hair style"),
    ("blunt bangs", "hair style"), ("twin braids", "hair style"), ("double bun", "hair style"),
    ("whisker markings", "face"), ("thick lips", "face"), ("pointy nose", "face"),
    ("fangs", "teeth"), ("sharp_teeth", "teeth"),
    ("dark skin", "skin"), ("dark-skinned female", "skin"), ("colored skin", "skin"),
    ("mole under eye", "skin mark"), ("scar across eye", "skin mark"), ("arm tattoo", "skin mark"),
    ("fox_ears", "ears"), ("pointy ears", "ears"), ("animal ear fluff", "ears"),
    ("large breasts", "body"), ("flat chest", "body"), ("muscular female", "body"),
    ("fox tail", "non-human parts"), ("multiple tails", "non-human parts"), ("dragon horns", "non-human parts"),
    ("bat wings", "non-human parts"), ("halo", "non-human parts"),
])
def test_intrinsic_features(tag, kind):
    assert feature_kind(tag) == kind


@pytest.mark.parametrize("tag", [
    # clothes and accessories
    "school uniform", "hair ribbon", "hair ornament", "hairband", "glasses", "fake animal ears", "fake wings",
    "thighhighs", "wing collar", "tail ornament", "red dress", "lipstick",
    # expression
    "smile", "blush", "open mouth", "closed eyes", "glowing eyes", "nose blush", "teeth", "heart-shaped pupils",
    # pose and action
    "standing", "sitting", "looking at viewer", "holding tail", "spreading wings", "hand in own hair",
    # framing, background, lighting, objects, states
    "upper body", "white background", "outdoors", "sunlight", "sword", "wet hair", "floating hair",
    # count, gender, age: the class, kept on purpose
    "1girl", "solo", "male focus", "child", "ponytail holder",
])
def test_not_intrinsic(tag):
    assert feature_kind(tag) is None


def test_removing_confirmed_proposals_is_one_undo_step(tmp_path):
    captions_text = [
        "ttchar, blue_eyes, long hair, smile, school uniform",
        "ttchar, blue_eyes, long hair, sitting",
        "ttchar, blue_eyes, short hair, outdoors",
        "ttchar, blue_eyes, long hair, smile, mole under eye",
    ]
    for index, caption in enumerate(captions_text):
        Image.new("RGB", (16, 16), (index * 50, 0, 0)).save(tmp_path / f"{index}.png")
        (tmp_path / f"{index}.txt").write_text(caption, encoding="utf-8")
    captions = CaptionSet.load(tmp_path, tmp_path.parent / "history")

    proposals = propose_feature_tags(captions.tag_frequency(), len(captions.images), "ttchar")
    assert [p.tag for p in proposals] == ["blue_eyes", "long hair"]

    captions.remove_tags(p.tag for p in proposals)
    assert captions.tags_of("1.png") == ["ttchar", "sitting"]
    assert captions.tags_of("2.png") == ["ttchar", "short hair", "outdoors"]
    captions.undo()
    assert not captions.can_undo
    assert [", ".join(captions.tags_of(f"{i}.png")) for i in range(4)] == captions_text

"""Tagging a project's pictures end to end with the tiny WD14 model: merging, prefix, blacklist, failures, stop."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lib_train.common.errors import ConfigError
from lib_train.dataset.captions import read_caption
from lib_train.dataset.project_folders import ProjectFolders
from lib_train.tagging.auto_tag import TagOptions, merge_tags, tag_pictures
from lib_train.tagging.wd14 import WD14Tagger
from tests.tiny_wd14 import write_tiny_wd14

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
RED_TAGS = "red background, hat \\(object\\)"


@pytest.fixture(scope="module")
def tagger(tmp_path_factory) -> WD14Tagger:
    return WD14Tagger(write_tiny_wd14(tmp_path_factory.mktemp("model") / "tiny"))


@pytest.fixture
def pictures(tmp_path) -> Path:
    folder = ProjectFolders.for_name(tmp_path / "projects", "mylora").pictures
    folder.mkdir(parents=True)
    return folder


def picture(folder: Path, name: str, colour, caption: str | None = None) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 48), colour).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def caption_of(image: Path) -> str:
    return read_caption(image.with_suffix(".txt"))


def run(folder: Path, tagger: WD14Tagger, **options):
    general = options.pop("general_threshold", 0.35)
    character = options.pop("character_threshold", 0.85)
    with tagger.session(general, character) as tag:
        return tag_pictures(folder, tag, TagOptions(general_threshold=general, character_threshold=character, **options))


def test_uncaptioned_pictures_get_the_taggers_tags(pictures, tagger):
    red = picture(pictures, "a.png", RED)
    blue = picture(pictures, "b.jpg", BLUE)
    green = picture(pictures, "10_sub/c.webp", GREEN)  # kohya subfolders are part of the training folder
    report = run(pictures, tagger)
    assert report.tagged == [red, blue, green] and report.failed == [] and not report.stopped
    assert caption_of(red) == RED_TAGS
    assert caption_of(blue) == "^_^, long hair"
    assert caption_of(green) == "o_o, hatsune miku"
    assert green.with_suffix(".txt").read_bytes() == b"o_o, hatsune miku\n"  # UTF-8, one line
    assert not [p for p in pictures.rglob("*.tmp")]


def test_thresholds_from_the_options(pictures, tagger):
    blue = picture(pictures, "b.png", BLUE)
    green = picture(pictures, "g.png", GREEN)
    run(pictures, tagger, general_threshold=0.4, character_threshold=0.8)
    assert caption_of(blue) == "^_^"
    assert caption_of(green) == "o_o, hatsune miku, kagamine rin"


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("append", "ttlora, 1girl, hat (object), solo, red background"),  # the user's own spelling stays
        ("prepend", "ttlora, red background, hat \\(object\\), 1girl, solo"),
        ("overwrite", "ttlora, red background, hat \\(object\\)"),
    ],
)
def test_modes_prefix_first_and_no_duplicates(pictures, tagger, mode, expected):
    # The old caption already has the trigger word (not first) and one of the new tags, spelled differently.
    red = picture(pictures, "a.png", RED, "1girl, hat (object), ttlora, solo")
    run(pictures, tagger, mode=mode, prefix="ttlora")
    assert caption_of(red) == expected


def test_blacklisted_tags_are_never_written(pictures, tagger):
    red = picture(pictures, "a.png", RED)
    blue = picture(pictures, "b.png", BLUE)
    run(pictures, tagger, prefix="ttlora, my style", blacklist="hat (object), long_hair")
    assert caption_of(red) == "ttlora, my style, red background"
    assert caption_of(blue) == "ttlora, my style, ^_^"


def test_bad_files_are_reported_and_skipped(pictures, tagger):
    good = picture(pictures, "a.png", RED)
    truncated = picture(pictures, "b.png", BLUE)
    truncated.write_bytes(truncated.read_bytes()[:60])
    gbk = picture(pictures, "c.png", GREEN)
    gbk_bytes = "初音未来, 长发".encode("gbk")
    gbk.with_suffix(".txt").write_bytes(gbk_bytes)
    report = run(pictures, tagger, prefix="ttlora")
    assert report.tagged == [good]
    assert [path for path, _ in report.failed] == [truncated, gbk]
    reasons = dict(report.failed)
    assert "b.png" in reasons[truncated] and "truncated" in reasons[truncated]
    assert "c.txt" in reasons[gbk] and "GBK" in reasons[gbk]
    assert not truncated.with_suffix(".txt").exists()
    assert gbk.with_suffix(".txt").read_bytes() == gbk_bytes  # left exactly as it was
    assert caption_of(good) == "ttlora, " + RED_TAGS


def test_a_tagger_exception_fails_one_image_only(pictures):
    red = picture(pictures, "a.png", RED)
    blue = picture(pictures, "b.png", BLUE, "kept")

    def fragile(image: Image.Image) -> list[str]:
        if image.getpixel((0, 0))[2] > 128:
            raise RuntimeError("out of memory")
        return ["solo"]

    report = tag_pictures(pictures, fragile, TagOptions())
    assert report.tagged == [red] and caption_of(red) == "solo"
    assert report.failed == [(blue, f"The tagger failed on {blue}: RuntimeError: out of memory")]
    assert caption_of(blue) == "kept"


def test_stop_between_images_and_progress(pictures, tagger):
    images = [picture(pictures, f"{i}.png", RED) for i in range(4)]
    progress = []

    def report(done: int, total: int, path: Path) -> None:
        progress.append((done, total, path.name))

    with tagger.session() as tag:
        result = tag_pictures(pictures, tag, TagOptions(), should_stop=lambda: len(progress) == 2, report=report)
    assert result.stopped and result.tagged == images[:2]
    assert progress == [(1, 4, "0.png"), (2, 4, "1.png")]
    assert [p.with_suffix(".txt").exists() for p in images] == [True, True, False, False]


def test_caption_files_keep_their_name_and_extra_lines(pictures, tagger):
    red = picture(pictures, "a.png", RED)
    (pictures / "a.caption").write_text("\ufeffsolo\nnotes: shot in 2019\n", encoding="utf-8")
    run(pictures, tagger)
    assert not red.with_suffix(".txt").exists()  # the existing .caption is the one training reads
    assert (pictures / "a.caption").read_text(encoding="utf-8") == f"solo, {RED_TAGS}\nnotes: shot in 2019\n"


def test_nothing_found_leaves_an_uncaptioned_picture_alone(pictures):
    black = picture(pictures, "a.png", (0, 0, 0))
    report = tag_pictures(pictures, lambda image: [], TagOptions())
    assert report.tagged == [black] and not black.with_suffix(".txt").exists()


def test_merge_tags_treats_spellings_as_one_tag():
    options = TagOptions(prefix="TTLora", blacklist="Long Hair")
    merged = merge_tags(["ttlora", "long_hair", "blue eyes"], ["Blue_Eyes", "long hair", "smile", "smile"], options)
    # The blacklist keeps the tagger from adding a tag; a tag the user wrote stays.
    assert merged == ["TTLora", "long_hair", "blue eyes", "smile"]


def test_bad_options_and_folder(tmp_path):
    with pytest.raises(ConfigError, match="mode 'replace'"):
        TagOptions(mode="replace")
    with pytest.raises(ConfigError, match="character tag threshold must be between 0 and 1, not 85"):
        TagOptions(character_threshold=85)
    with pytest.raises(ConfigError, match="missing"):
        tag_pictures(tmp_path / "missing", lambda image: [], TagOptions())

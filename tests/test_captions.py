import random
from collections import Counter
from pathlib import Path

import pytest

from lib_train.common.errors import DatasetError
from lib_train.dataset.captions import find_caption, process_caption, read_caption, split_tags


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- find_caption ------------------------------------------------------------------------------


def test_find_caption_prefers_txt_then_caption(tmp_path):
    image = tmp_path / "cat.png"
    assert find_caption(image) is None
    write(tmp_path / "cat.caption", b"from caption")
    assert find_caption(image) == tmp_path / "cat.caption"
    write(tmp_path / "cat.txt", b"from txt")
    assert find_caption(image) == tmp_path / "cat.txt"


def test_find_caption_uses_the_full_stem(tmp_path):
    write(tmp_path / "shot.v2.txt", b"x")
    write(tmp_path / "shot.txt", b"wrong one")
    assert find_caption(tmp_path / "shot.v2.png") == tmp_path / "shot.v2.txt"


# -- read_caption ------------------------------------------------------------------------------


def test_read_caption_utf8_and_bom(tmp_path):
    plain = write(tmp_path / "a.txt", "1girl, 长发, café\n".encode("utf-8"))
    bom = write(tmp_path / "b.txt", "\ufeff1girl, 长发, café".encode("utf-8"))
    assert read_caption(plain) == "1girl, 长发, café"
    assert read_caption(bom) == "1girl, 长发, café"


def test_read_caption_uses_first_non_empty_line_stripped(tmp_path):
    path = write(tmp_path / "a.txt", b"\r\n   \r\n  first, line  \r\nsecond line\r\n")
    assert read_caption(path) == "first, line"


def test_read_caption_empty_file_is_empty_caption(tmp_path):
    assert read_caption(write(tmp_path / "a.txt", b"")) == ""
    assert read_caption(write(tmp_path / "b.txt", b"\xef\xbb\xbf \n\n")) == ""


def test_read_caption_non_ascii_path(tmp_path):
    folder = tmp_path / "中文目录"
    folder.mkdir()
    assert read_caption(write(folder / "图片.txt", "标签".encode())) == "标签"


@pytest.mark.parametrize(
    ("text", "encoding", "hint"),
    [
        ("一个女孩, 长发, 微笑, 蓝色眼睛", "gbk", "GBK"),
        ("一個女孩, 長髮", "gbk", "GBK"),  # traditional characters, outside GB2312
        ("女の子, 長い髪, 笑顔", "shift_jis", "Shift-JIS"),
        ("Mädchen, schönes Lächeln, café", "cp1252", "cp1252"),
    ],
)
def test_read_caption_legacy_encoding_names_file_and_guess(tmp_path, text, encoding, hint):
    path = write(tmp_path / "标题.txt", text.encode(encoding))
    with pytest.raises(DatasetError) as caught:
        read_caption(path)
    message = str(caught.value)
    assert str(path) in message
    assert hint in message
    assert "UTF-8" in message


def test_read_caption_undecodable_bytes_without_guess(tmp_path):
    path = write(tmp_path / "bad.txt", b"tag\x8d")
    with pytest.raises(DatasetError, match=r"invalid byte 0x8d at position 3") as caught:
        read_caption(path)
    assert str(path) in str(caught.value)


# -- split_tags / process_caption --------------------------------------------------------------


def test_split_tags():
    assert split_tags(" a ,b,, c d ,") == ["a", "b", "c d"]
    assert split_tags("") == []


def test_process_caption_unchanged_without_shuffle_or_dropout():
    caption = "a ,b,,  c"
    rng = random.Random(0)
    assert process_caption(caption, rng, shuffle=False, keep_tokens=2, dropout_rate=0.0) == caption
    # Not dropped and not shuffled: still the original text, not re-joined.
    assert process_caption(caption, random.Random(1), shuffle=False, keep_tokens=0, dropout_rate=0.01) == caption


def test_process_caption_shuffle_keeps_leading_tokens():
    caption = "sks, 1girl, red hair, smile, outdoors, sky, tree"
    rng = random.Random(3)
    orders = set()
    for _ in range(50):
        result = process_caption(caption, rng, shuffle=True, keep_tokens=2, dropout_rate=0.0)
        tags = result.split(", ")
        assert tags[:2] == ["sks", "1girl"]
        assert sorted(tags) == sorted(split_tags(caption))
        orders.add(result)
    assert len(orders) > 10


def test_process_caption_shuffle_rejoins_cleanly():
    result = process_caption("b ,a,,", random.Random(0), shuffle=True, keep_tokens=0, dropout_rate=0.0)
    assert result in ("a, b", "b, a")


def test_process_caption_keep_tokens_beyond_tag_count():
    assert process_caption("a, b", random.Random(0), shuffle=True, keep_tokens=5, dropout_rate=0.0) == "a, b"


def test_process_caption_dropout_rate_and_determinism():
    def run(seed):
        rng = random.Random(seed)
        return [process_caption("a, b, c", rng, shuffle=True, keep_tokens=0, dropout_rate=0.3) for _ in range(2000)]

    first = run(7)
    assert first == run(7)
    assert first != run(8)
    dropped = Counter(result == "" for result in first)[True]
    assert 500 < dropped < 700  # about 30 %
    assert all(sorted(r.split(", ")) == ["a", "b", "c"] for r in first if r)


def test_tag_dropout_drops_single_tags_after_the_kept_ones_deterministically():
    caption = "sks, 1girl, red hair, smile, outdoors, sky, tree, grass"

    def run(seed, shuffle):
        rng = random.Random(seed)
        return [process_caption(caption, rng, shuffle=shuffle, keep_tokens=2, dropout_rate=0.0, tag_dropout_rate=0.25)
                for _ in range(1000)]

    kept = run(5, shuffle=False)
    assert kept == run(5, shuffle=False) and kept != run(6, shuffle=False)
    flexible = split_tags(caption)[2:]
    for result in kept:
        tags = result.split(", ")
        assert tags[:2] == ["sks", "1girl"]  # keep_tokens are never dropped
        assert tags[2:] == [tag for tag in flexible if tag in tags[2:]]  # not shuffled: the order stays
    dropped = sum(len(flexible) - (len(r.split(", ")) - 2) for r in kept)
    assert 0.22 < dropped / (1000 * len(flexible)) < 0.28  # about 25 % of the six droppable tags
    shuffled = run(5, shuffle=True)
    assert all(r.split(", ")[:2] == ["sks", "1girl"] and set(r.split(", ")) <= set(split_tags(caption)) for r in shuffled)
    assert len({tuple(r.split(", ")[2:]) for r in shuffled if len(r.split(", ")) == 8}) > 1  # shuffled, then dropped


def test_no_tag_dropout_draws_nothing():
    """Off, it leaves the caption and the random sequence as they were: earlier runs reproduce bit for bit."""
    for shuffle in (False, True):
        plain, off = random.Random(4), random.Random(4)
        assert (process_caption("a, b, c", plain, shuffle=shuffle, keep_tokens=1, dropout_rate=0.2)
                == process_caption("a, b, c", off, shuffle=shuffle, keep_tokens=1, dropout_rate=0.2, tag_dropout_rate=0.0))
        assert plain.random() == off.random()

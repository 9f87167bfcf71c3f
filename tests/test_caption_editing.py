from pathlib import Path

import pytest
from PIL import Image

from lib_train.common.errors import DatasetError
from lib_train.dataset.project_folders import ProjectFolders
from lib_train.tagging.caption_editing import MAX_UNDO_STEPS, CaptionSet

CAPTIONS = {
    "a": "ttchar, blue eyes, smile, school uniform",
    "b": "ttchar, blue eyes, long hair, smile, smile",
    "c": "blue eyes, long hair, outdoors",
    "d": "ttchar, sitting",
}


def make_project(tmp_path: Path, captions: dict[str, str] = CAPTIONS) -> ProjectFolders:
    folders = ProjectFolders(tmp_path / "project")
    folders.pictures.mkdir(parents=True)
    for index, (stem, caption) in enumerate(captions.items()):
        Image.new("RGB", (16, 16), (index * 40, 90, 200)).save(folders.pictures / f"{stem}.png")
        if caption is not None:
            (folders.pictures / f"{stem}.txt").write_text(caption, encoding="utf-8")
    return folders


def caption_on_disk(folders: ProjectFolders, stem: str) -> str:
    return (folders.pictures / f"{stem}.txt").read_text(encoding="utf-8")


def all_tags(captions: CaptionSet) -> dict[str, list[str]]:
    return {image: captions.tags_of(image) for image in captions.images}


def test_load_lists_every_image_with_its_tags(tmp_path):
    folders = make_project(tmp_path, {**CAPTIONS, "e": None})
    captions = CaptionSet.load(folders.pictures)
    assert captions.images == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    assert captions.tags_of("b.png") == ["ttchar", "blue eyes", "long hair", "smile", "smile"]
    assert captions.tags_of("e.png") == []
    assert captions.refused == {}
    assert not captions.can_undo and not captions.has_unsaved_changes


def test_tag_frequency_counts_images_most_frequent_first(tmp_path):
    captions = CaptionSet.load(make_project(tmp_path).pictures)
    # "smile" appears twice in b but counts once per image.
    assert captions.tag_frequency() == [
        ("blue eyes", 3), ("ttchar", 3), ("long hair", 2), ("smile", 2),
        ("outdoors", 1), ("school uniform", 1), ("sitting", 1),
    ]


def test_missing_pictures_folder_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        CaptionSet.load(tmp_path / "nope")


def test_remove_tag_everywhere_and_save_writes_only_changed_captions(tmp_path):
    folders = make_project(tmp_path)
    (folders.pictures / "d.txt").write_bytes(b"ttchar,sitting")  # odd spacing, no smile: must stay byte for byte
    captions = CaptionSet.load(folders.pictures)

    summary = captions.remove_tag("  smile ")
    assert summary.images == ("a.png", "b.png") and summary.files_changed == 2
    assert summary.tags == ("smile",)
    assert "2 caption(s) changed" in str(summary)
    assert caption_on_disk(folders, "a") == CAPTIONS["a"]  # nothing written before save()
    assert captions.has_unsaved_changes

    saved = captions.save()
    assert saved.images == ("a.png", "b.png")
    assert caption_on_disk(folders, "a") == "ttchar, blue eyes, school uniform"
    assert caption_on_disk(folders, "b") == "ttchar, blue eyes, long hair"
    assert (folders.pictures / "d.txt").read_bytes() == b"ttchar,sitting"
    assert not captions.has_unsaved_changes
    assert not [p for p in folders.pictures.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_tags_are_compared_exactly_after_trimming(tmp_path):
    folders = make_project(tmp_path, {"a": "Blue Eyes, blue_eyes, blue eyes"})
    captions = CaptionSet.load(folders.pictures)
    captions.remove_tag("blue eyes ")
    assert captions.tags_of("a.png") == ["Blue Eyes", "blue_eyes"]


def test_replace_tag_renames_and_merges_without_duplicates(tmp_path):
    folders = make_project(tmp_path, {"a": "smile, long hair", "b": "grin, smile, outdoors", "c": "grin"})
    captions = CaptionSet.load(folders.pictures)
    summary = captions.replace_tag("smile", "grin")
    assert summary.images == ("a.png", "b.png")
    assert captions.tags_of("a.png") == ["grin", "long hair"]
    assert captions.tags_of("b.png") == ["grin", "outdoors"]
    assert captions.tags_of("c.png") == ["grin"]


def test_remove_duplicate_tags_keeps_the_first(tmp_path):
    folders = make_project(tmp_path, {"a": "x, y, x, z, y", "b": "x, y"})
    captions = CaptionSet.load(folders.pictures)
    summary = captions.remove_duplicate_tags()
    assert summary.images == ("a.png",)
    assert captions.tags_of("a.png") == ["x", "y", "z"]


def test_add_tag_to_selected_images_at_start_or_end(tmp_path):
    folders = make_project(tmp_path, {**CAPTIONS, "e": None})
    captions = CaptionSet.load(folders.pictures)

    first = captions.add_tag("ttchar", ["a.png", "c.png", "e.png"], position="start")
    assert first.images == ("c.png", "e.png")  # a already has it: not duplicated
    assert captions.tags_of("c.png") == ["ttchar", "blue eyes", "long hair", "outdoors"]
    assert captions.tags_of("e.png") == ["ttchar"]

    last = captions.add_tag("day", ["d.png"])
    assert last.images == ("d.png",) and captions.tags_of("d.png") == ["ttchar", "sitting", "day"]
    assert captions.tags_of("b.png") == CAPTIONS["b"].split(", ")

    captions.save()
    assert caption_on_disk(folders, "e") == "ttchar"  # a new caption file for the image that had none


def test_set_tags_and_move_to_front(tmp_path):
    folders = make_project(tmp_path)
    captions = CaptionSet.load(folders.pictures)
    captions.set_tags("d.png", ["sitting", " chair ", "", "ttchar"])
    assert captions.tags_of("d.png") == ["sitting", "chair", "ttchar"]
    captions.set_tags("c.png", "outdoors,  blue eyes")
    assert captions.tags_of("c.png") == ["outdoors", "blue eyes"]

    moved = captions.move_to_front(["ttchar", "blue eyes"])
    assert set(moved.images) == {"c.png", "d.png"}  # a and b already start with them
    assert captions.tags_of("d.png") == ["ttchar", "sitting", "chair"]
    assert captions.tags_of("c.png") == ["blue eyes", "outdoors"]


@pytest.mark.parametrize("bad", ["", "  ", "a, b", "two\nlines"])
def test_new_tags_must_be_single_tags(tmp_path, bad):
    captions = CaptionSet.load(make_project(tmp_path).pictures)
    with pytest.raises(DatasetError, match="tag"):
        captions.add_tag(bad, ["a.png"])
    with pytest.raises(DatasetError, match="tag"):
        captions.replace_tag("smile", bad)
    assert not captions.has_unsaved_changes


def test_unknown_image_is_refused_by_name(tmp_path):
    captions = CaptionSet.load(make_project(tmp_path).pictures)
    with pytest.raises(DatasetError, match="zzz.png"):
        captions.add_tag("x", ["a.png", "zzz.png"])
    assert captions.tags_of("a.png") == CAPTIONS["a"].split(", ")  # nothing half-applied


BULK_EDITS = {
    "remove": lambda c: c.remove_tag("smile"),
    "remove_tags": lambda c: c.remove_tags(["smile", "blue eyes"]),
    "replace": lambda c: c.replace_tag("blue eyes", "long hair"),
    "dedupe": lambda c: c.remove_duplicate_tags(),
    "add": lambda c: c.add_tag("new tag", ["a.png", "c.png", "d.png"], position="start"),
    "set": lambda c: c.set_tags("a.png", ["only this"]),
    "move": lambda c: c.move_to_front(["smile", "long hair"]),
}


@pytest.mark.parametrize("edit", BULK_EDITS.values(), ids=BULK_EDITS.keys())
def test_every_edit_is_one_undo_step(tmp_path, edit):
    captions = CaptionSet.load(make_project(tmp_path).pictures)
    original = all_tags(captions)
    captions.add_tag("earlier", ["b.png"])
    after_earlier = all_tags(captions)

    summary = edit(captions)
    assert summary.files_changed > 0 and all_tags(captions) != after_earlier
    assert captions.undo_label == summary.action

    undone = captions.undo()
    assert undone.images == summary.images and undone.action == f"Undid: {summary.action}"
    assert all_tags(captions) == after_earlier
    captions.undo()
    assert all_tags(captions) == original
    assert not captions.can_undo
    assert captions.undo().files_changed == 0


@pytest.mark.parametrize("edit", BULK_EDITS.values(), ids=BULK_EDITS.keys())
def test_undo_survives_a_reload(tmp_path, edit):
    folders = make_project(tmp_path)
    captions = CaptionSet.load(folders.pictures)
    edit(captions)
    captions.save()
    edited_on_disk = {stem: caption_on_disk(folders, stem) for stem in CAPTIONS}
    assert edited_on_disk != CAPTIONS

    reloaded = CaptionSet.load(folders.pictures)
    assert reloaded.can_undo
    reloaded.undo()
    reloaded.save()
    assert {stem: caption_on_disk(folders, stem) for stem in CAPTIONS} == {
        stem: ", ".join(CAPTIONS[stem].split(", ")) for stem in CAPTIONS
    }
    assert list(folders.caption_history.iterdir()) == []  # the undone step is gone from the history
    assert not CaptionSet.load(folders.pictures).can_undo


def test_unsaved_edits_are_not_in_the_history_after_a_reload(tmp_path):
    folders = make_project(tmp_path)
    captions = CaptionSet.load(folders.pictures)
    captions.remove_tag("smile")
    captions.save()
    captions.remove_tag("sitting")  # never saved
    reloaded = CaptionSet.load(folders.pictures)
    assert reloaded.undo_label == "Removed 'smile'"
    assert "sitting" in reloaded.tags_of("d.png")


def test_undo_leaves_alone_captions_changed_since(tmp_path):
    folders = make_project(tmp_path)
    captions = CaptionSet.load(folders.pictures)
    captions.remove_tag("blue eyes")
    captions.save()
    (folders.pictures / "b.txt").write_text("rewritten by another tool", encoding="utf-8")

    reloaded = CaptionSet.load(folders.pictures)
    undone = reloaded.undo()
    assert undone.images == ("a.png", "c.png") and undone.left_alone == ("b.png",)
    assert "b.png" in str(undone)
    reloaded.save()
    assert caption_on_disk(folders, "a") == CAPTIONS["a"]
    assert caption_on_disk(folders, "b") == "rewritten by another tool"


def test_history_is_bounded(tmp_path):
    folders = make_project(tmp_path)
    captions = CaptionSet.load(folders.pictures)
    for index in range(MAX_UNDO_STEPS + 5):
        captions.set_tags("d.png", [f"tag {index}"])
    captions.save()
    assert len(list(folders.caption_history.glob("*.json"))) == MAX_UNDO_STEPS

    reloaded = CaptionSet.load(folders.pictures)
    for _ in range(MAX_UNDO_STEPS):
        reloaded.undo()
    assert not reloaded.can_undo
    assert reloaded.tags_of("d.png") == ["tag 4"]  # the oldest five steps are forgotten


def test_gbk_caption_is_listed_and_never_written(tmp_path):
    folders = make_project(tmp_path)
    gbk_bytes = "原神, smile, 长发".encode("gbk")
    (folders.pictures / "b.txt").write_bytes(gbk_bytes)
    captions = CaptionSet.load(folders.pictures)

    assert list(captions.refused) == ["b.png"]
    assert "b.txt" in captions.refused["b.png"] and "GBK" in captions.refused["b.png"]
    assert "b.png" in captions.images
    with pytest.raises(DatasetError, match="b.txt"):
        captions.set_tags("b.png", ["smile"])
    with pytest.raises(DatasetError, match="b.txt"):
        captions.add_tag("x", ["a.png", "b.png"])
    with pytest.raises(DatasetError, match="b.txt"):
        captions.tags_of("b.png")

    summary = captions.remove_tag("smile")
    assert summary.images == ("a.png",)
    captions.save()
    assert (folders.pictures / "b.txt").read_bytes() == gbk_bytes
    assert [tag for tag, _ in captions.tag_frequency()].count("smile") == 0


def test_images_sharing_a_caption_file_are_refused(tmp_path):
    folders = make_project(tmp_path)
    Image.new("RGB", (16, 16)).save(folders.pictures / "a.jpg")
    captions = CaptionSet.load(folders.pictures)
    assert set(captions.refused) == {"a.jpg", "a.png"}
    assert "a.txt" in captions.refused["a.png"]
    captions.remove_tag("ttchar")
    captions.save()
    assert caption_on_disk(folders, "a") == CAPTIONS["a"]


def test_the_shared_caption_reason_comes_out_in_chinese(tmp_path):
    from lib_train.common import i18n

    folders = make_project(tmp_path)
    Image.new("RGB", (16, 16)).save(folders.pictures / "a.jpg")
    i18n.set_language(i18n.CHINESE)
    try:
        reason = CaptionSet.load(folders.pictures).refused["a.png"]
    finally:
        i18n.set_language(i18n.ENGLISH)
    assert "a.txt" in reason and "a.jpg" in reason and any("\u4e00" <= c <= "\u9fff" for c in reason)


def test_a_caption_with_a_long_unicode_name_is_saved(tmp_path):
    stem = "长" * 82  # 246 bytes: the picture and its caption are legal names, a temporary name built on them is not
    folders = make_project(tmp_path, {stem: "ttchar, smile"})
    captions = CaptionSet.load(folders.pictures)
    captions.remove_tag("smile")
    captions.save()
    assert caption_on_disk(folders, stem) == "ttchar"
    assert sorted(p.name for p in folders.pictures.iterdir()) == [f"{stem}.png", f"{stem}.txt"]


def test_save_keeps_utf8_and_the_lines_training_ignores(tmp_path):
    folders = make_project(tmp_path, {"a": "x"})
    (folders.pictures / "a.txt").write_bytes("\ufeff长发, café, x\nsecond line\n".encode("utf-8"))
    captions = CaptionSet.load(folders.pictures)
    captions.remove_tag("x")
    captions.save()
    assert (folders.pictures / "a.txt").read_bytes() == "长发, café\nsecond line\n".encode("utf-8")


def test_caption_extension_file_is_edited_in_place_of_txt(tmp_path):
    folders = make_project(tmp_path, {"a": None})
    (folders.pictures / "a.caption").write_text("x, y", encoding="utf-8")
    captions = CaptionSet.load(folders.pictures)
    captions.remove_tag("y")
    captions.save()
    assert (folders.pictures / "a.caption").read_text(encoding="utf-8") == "x"
    assert not (folders.pictures / "a.txt").exists()


def test_images_in_subfolders_are_keyed_by_relative_path(tmp_path):
    folders = make_project(tmp_path, {})
    sub = folders.pictures / "3_char"
    sub.mkdir()
    Image.new("RGB", (16, 16)).save(sub / "x.png")
    (sub / "x.txt").write_text("a, b", encoding="utf-8")
    captions = CaptionSet.load(folders.pictures)
    assert captions.images == ["3_char/x.png"]
    captions.set_tags("3_char/x.png", ["b"])
    captions.save()
    assert (sub / "x.txt").read_text(encoding="utf-8") == "b"


def test_save_refuses_when_a_caption_changed_on_disk(tmp_path):
    folders = make_project(tmp_path)
    captions = CaptionSet.load(folders.pictures)
    captions.remove_tag("smile")
    (folders.pictures / "b.txt").write_text("changed elsewhere, smile", encoding="utf-8")
    with pytest.raises(DatasetError, match="b.txt"):
        captions.save()
    assert caption_on_disk(folders, "a") == CAPTIONS["a"]  # nothing written at all
    assert caption_on_disk(folders, "b") == "changed elsewhere, smile"
    assert not folders.caption_history.exists()

"""Importing pictures, captions, folders and zips into a project, and re-preparing them from originals/."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib_train.common.errors import ConfigError, DatasetError
from lib_train.dataset.image_import import PrepareOptions, clean_in_project, import_pictures, original_of
from lib_train.dataset.project_folders import ProjectFolders

RED, BLUE = (220, 30, 30), (30, 30, 220)
SQUARE_128 = PrepareOptions(target_size=(128, 128))


@pytest.fixture
def project(tmp_path: Path) -> ProjectFolders:
    return ProjectFolders(tmp_path / "projects" / "my_lora")


def _picture(path: Path, size: tuple[int, int] = (200, 150), colour: tuple[int, int, int] = RED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _two_halves(path: Path, size: tuple[int, int]) -> Path:
    image = Image.new("RGB", size, RED)
    image.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _files(folder: Path) -> list[str]:
    """Every file below `folder`, hidden ones included, as sorted relative paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _holds_no_files(folder: Path) -> bool:
    return not folder.exists() or _files(folder) == []


def _is_uniform(path: Path, colour: tuple[int, int, int], tolerance: int = 8) -> bool:
    """All pixels within `tolerance` of `colour`, but for a 3 px border where resampling blends in neighbours."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)[3:-3, 3:-3]
    return bool(np.all(np.abs(pixels - np.array(colour)) <= tolerance))


def test_folder_import_keeps_originals_byte_identical_and_copies_captions(tmp_path: Path, project) -> None:
    shoot = tmp_path / "shoot"
    _picture(shoot / "a.png", (160, 130))
    (shoot / "day2").mkdir()
    Image.new("RGB", (200, 300), BLUE).save(shoot / "day2" / "b.jpg", quality=90)
    (shoot / "a.txt").write_text("ttconcept, red", encoding="utf-8")
    (shoot / "day2" / "b.caption").write_bytes("\ufeffttconcept, blue, café\nsecond line".encode("utf-8"))

    report = import_pictures([shoot], project, SQUARE_128)

    assert report.failed == [] and report.skipped == [] and report.warnings == []
    assert report.imported == [project.pictures / "a.png", project.pictures / "b.png"]
    for relative in ("a.png", "a.txt", "day2/b.jpg", "day2/b.caption"):
        assert (project.originals / "shoot" / relative).read_bytes() == (shoot / relative).read_bytes()
    assert _files(project.pictures) == ["a.png", "a.txt", "b.png", "b.txt"]
    for picture in report.imported:
        with Image.open(picture) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (128, 128)
    assert (project.pictures / "a.txt").read_text(encoding="utf-8") == "ttconcept, red"
    # The caption the dataset would read: BOM gone, first line, saved as UTF-8.
    assert (project.pictures / "b.txt").read_bytes() == "ttconcept, blue, café".encode("utf-8")


@pytest.mark.skipif(not hasattr(__import__("os"), "umask") or __import__("os").name == "nt",
                    reason="POSIX permissions")
def test_imported_files_get_the_permissions_of_any_new_file(tmp_path: Path, project) -> None:
    # A private temporary file (mode 600) that is then given its name would hide the project from the other
    # accounts that read it (a Docker volume, a shared server, kohya run as another user).
    shoot = tmp_path / "shoot"
    _picture(shoot / "a.png")
    (shoot / "a.txt").write_text("red", encoding="utf-8")
    with open(tmp_path / "plain", "wb"):
        pass
    expected = (tmp_path / "plain").stat().st_mode & 0o777
    import_pictures([shoot], project, PrepareOptions())
    clean_in_project(project, SQUARE_128)
    written = [p for p in project.root.rglob("*") if p.is_file()]
    assert len(written) == 5  # original, its caption, picture, caption, picture_sources.json
    assert {p.relative_to(project.root).as_posix(): p.stat().st_mode & 0o777 for p in written} == {
        p.relative_to(project.root).as_posix(): expected for p in written}


def test_damaged_files_are_reported_and_the_others_imported(tmp_path: Path, project) -> None:
    good = _picture(tmp_path / "in" / "good.png")
    empty = tmp_path / "in" / "empty.png"
    empty.write_bytes(b"")
    full = _picture(tmp_path / "full.jpg", (256, 256))
    Image.effect_noise((256, 256), 60).convert("RGB").save(full, quality=90)
    truncated = tmp_path / "in" / "truncated.jpg"
    truncated.write_bytes(full.read_bytes()[:2000])
    fake = tmp_path / "in" / "fake.webp"
    fake.write_text("<html>not a picture</html>", encoding="utf-8")

    report = import_pictures([empty, truncated, fake, good], project, SQUARE_128)

    assert report.imported == [project.pictures / "good.png"]
    failed = {note.path: note.reason for note in report.failed}
    assert set(failed) == {empty, truncated, fake}
    assert "empty.png is empty (0 bytes)" in failed[empty]
    assert "truncated.jpg is damaged or truncated" in failed[truncated]
    assert "fake.webp is not a readable picture" in failed[fake]
    # Refused files leave nothing behind, not even temporary copies.
    assert _files(project.originals) == ["good.png"]
    assert _files(project.pictures) == ["good.png"]


def test_zip_import_refuses_unsafe_members_and_skips_macos_litter(tmp_path: Path, project) -> None:
    archive = tmp_path / "upload.zip"
    red = _picture(tmp_path / "src" / "red.png")
    blue = _picture(tmp_path / "src" / "blue.webp", colour=BLUE)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        zipped.write(red, "set/red.png")
        zipped.writestr("set/red.txt", "ttconcept, red")
        zipped.write(blue, "blue.webp")
        for unsafe in ("../escaped.png", "/etc/absolute.png", "..\\windows_escape.png", "C:/drive.png"):
            zipped.writestr(zipfile.ZipInfo(unsafe), red.read_bytes())  # ZipInfo keeps the name as given
        zipped.writestr("__MACOSX/set/._red.png", b"\x00\x05\x16\x07 resource fork")
        zipped.writestr("set/.DS_Store", b"\x00\x00\x00\x01Bud1")
        zipped.writestr("readme.md", "hello")

    report = import_pictures([archive], project, SQUARE_128)

    assert report.imported == [project.pictures / "blue.png", project.pictures / "red.png"]
    unsafe = [note.reason for note in report.failed if note.path == archive]
    assert len(unsafe) == 4 and all("unsafe path" in reason for reason in unsafe)
    assert any("'../escaped.png'" in reason for reason in unsafe)
    assert [note.path for note in report.skipped] == [archive / "readme.md"]
    assert _files(project.originals) == ["upload/blue.webp", "upload/set/red.png", "upload/set/red.txt"]
    assert (project.originals / "upload" / "set" / "red.png").read_bytes() == red.read_bytes()
    assert (project.pictures / "red.txt").read_text(encoding="utf-8") == "ttconcept, red"
    assert _is_uniform(project.pictures / "blue.png", BLUE)
    everything = _files(tmp_path)
    assert not any(name.endswith(("escaped.png", "absolute.png", "drive.png")) for name in everything)


def test_zip_bomb_is_refused_by_the_unpacked_size_limit(tmp_path: Path, project) -> None:
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("huge.png", b"\x00" * (3 * 1024 * 1024))  # 3 MiB of zeros, a few KiB packed
    assert archive.stat().st_size < 64 * 1024

    report = import_pictures([archive], project, PrepareOptions(archive_limit=1024 * 1024))

    assert report.imported == []
    assert len(report.failed) == 1 and report.failed[0].path == archive
    assert "possible zip bomb" in report.failed[0].reason
    assert not project.originals.exists()


def test_zip_member_holding_more_than_it_declares_is_refused_as_damaged(tmp_path: Path, project) -> None:
    archive = tmp_path / "liar.zip"
    picture = _picture(tmp_path / "a.png")
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zipped:
        zipped.write(picture, "a.png")
    # Shrink the unpacked size the central directory declares to 10 bytes.
    data = bytearray(archive.read_bytes())
    central = data.rindex(b"PK\x01\x02")
    data[central + 24 : central + 28] = (10).to_bytes(4, "little")
    archive.write_bytes(bytes(data))

    report = import_pictures([archive], project, SQUARE_128)

    assert report.imported == []
    assert len(report.failed) == 1 and report.failed[0].path == archive / "a.png"
    assert "cannot be unpacked; the archive is damaged" in report.failed[0].reason
    assert _holds_no_files(project.root)


def test_damaged_zip_is_reported_and_other_sources_still_imported(tmp_path: Path, project) -> None:
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK\x03\x04 this is not really a zip")
    good = _picture(tmp_path / "good.png")

    report = import_pictures([broken, good], project, SQUARE_128)

    assert report.imported == [project.pictures / "good.png"]
    assert report.failed[0].path == broken and "not a readable zip" in report.failed[0].reason


def test_name_clashes_get_numbered_names_and_captions_follow(tmp_path: Path, project) -> None:
    loose = _picture(tmp_path / "upload" / "photo.png", colour=RED)
    folder = tmp_path / "shoot"
    blue = _picture(folder / "photo.png", colour=BLUE)
    (folder / "photo.txt").write_text("blue one", encoding="utf-8")
    _picture(project.pictures / "photo.jpg", colour=(0, 255, 0))  # already there: `photo` is taken

    report = import_pictures([loose, loose, folder], project, SQUARE_128)

    pictures = [project.pictures / name for name in ("photo_2.png", "photo_3.png", "photo_4.png")]
    assert report.imported == pictures
    assert _files(project.originals) == ["photo.png", "photo_2.png", "shoot/photo.png", "shoot/photo.txt"]
    assert (project.originals / "photo.png").read_bytes() == loose.read_bytes()
    assert (project.originals / "photo_2.png").read_bytes() == loose.read_bytes()
    assert (project.originals / "shoot" / "photo.png").read_bytes() == blue.read_bytes()
    assert [_is_uniform(p, RED) for p in pictures] == [True, True, False] and _is_uniform(pictures[2], BLUE)
    assert (project.pictures / "photo_4.txt").read_text(encoding="utf-8") == "blue one"
    assert not (project.pictures / "photo_2.txt").exists() and not (project.pictures / "photo_3.txt").exists()
    assert _is_uniform(project.pictures / "photo.jpg", (0, 255, 0))  # untouched


def test_uploaded_captions_pair_with_pictures_by_name_across_folders(tmp_path: Path, project) -> None:
    # Gradio puts each uploaded file in its own temporary folder.
    picture = _picture(tmp_path / "tmp_a1" / "cat.png")
    caption = tmp_path / "tmp_b2" / "cat.txt"
    caption.parent.mkdir()
    caption.write_text("a cat", encoding="utf-8")
    orphan = tmp_path / "tmp_c3" / "dog.txt"
    orphan.parent.mkdir()
    orphan.write_text("a dog", encoding="utf-8")

    report = import_pictures([caption, orphan, picture], project, SQUARE_128)

    assert (project.pictures / "cat.txt").read_text(encoding="utf-8") == "a cat"
    assert [(note.path, note.reason) for note in report.skipped] == [(orphan, "no picture with the same name")]


def test_caption_in_a_legacy_encoding_is_refused_and_the_picture_still_imported(tmp_path: Path, project) -> None:
    picture = _picture(tmp_path / "in" / "girl.png")
    caption = tmp_path / "in" / "girl.txt"
    caption.write_bytes("1girl, 黑发, 微笑".encode("gbk"))

    report = import_pictures([tmp_path / "in"], project, SQUARE_128)

    assert report.imported == [project.pictures / "girl.png"]
    assert [note.path for note in report.failed] == [caption]
    assert "is not valid UTF-8 (it looks like GBK" in report.failed[0].reason
    assert "girl.png was imported without a caption" in report.failed[0].reason
    assert not (project.pictures / "girl.txt").exists()
    assert (project.originals / "in" / "girl.txt").read_bytes() == caption.read_bytes()
    assert (project.originals / "in" / "girl.png").read_bytes() == picture.read_bytes()


def test_small_pictures_go_through_the_upscaler_when_it_is_on(tmp_path: Path, project) -> None:
    small = _picture(tmp_path / "small.png", (96, 72))
    calls = []

    def upscale(image: Image.Image, width: int, height: int) -> Image.Image:
        calls.append((image.size, width, height))
        return image.resize((width, height), Image.Resampling.NEAREST).convert("RGBA")

    options = PrepareOptions(target_size=(128, 128), upscale_small=True)
    report = import_pictures([small], project, options, upscale=upscale)

    assert calls == [((96, 72), 171, 128)]
    assert report.warnings == []
    assert Image.open(report.imported[0]).size == (128, 128)


def test_small_pictures_without_an_upscaler_are_enlarged_with_a_warning(tmp_path: Path, project) -> None:
    small = _picture(tmp_path / "small.png", (96, 72))
    big = _picture(tmp_path / "big.png", (300, 200))
    calls = []

    report = import_pictures([small, big], project, SQUARE_128, upscale=lambda *args: calls.append(args))

    assert calls == []  # upscaling of small pictures is off
    assert [note.path for note in report.warnings] == [small]
    assert "96x72 is smaller than 128x128" in report.warnings[0].reason
    assert [Image.open(p).size for p in report.imported] == [(128, 128), (128, 128)]


def test_a_failing_upscaler_falls_back_to_resizing_with_a_warning(tmp_path: Path, project) -> None:
    small = _picture(tmp_path / "small.png", (64, 64))

    def upscale(image: Image.Image, width: int, height: int) -> Image.Image:
        raise RuntimeError("CUDA out of memory")

    report = import_pictures([small], project, PrepareOptions(target_size=(128, 128), upscale_small=True), upscale)

    assert "the upscaler failed (CUDA out of memory)" in report.warnings[0].reason
    assert Image.open(report.imported[0]).size == (128, 128)


def test_keeping_sizes_for_buckets(tmp_path: Path, project) -> None:
    wide = _picture(tmp_path / "wide.png", (600, 300))
    tiny_for_512 = _picture(tmp_path / "tiny.png", (200, 150))
    options = PrepareOptions(target_size=None, training_resolution=512)

    report = import_pictures([wide, tiny_for_512], project, options)

    assert [Image.open(p).size for p in report.imported] == [(600, 300), (200, 150)]
    assert [note.path for note in report.warnings] == [tiny_for_512]
    assert "200x150 is small for training at 512 px" in report.warnings[0].reason


def test_keeping_sizes_upscales_small_pictures_to_the_training_area(tmp_path: Path, project) -> None:
    tiny = _picture(tmp_path / "tiny.png", (200, 100))
    options = PrepareOptions(target_size=None, training_resolution=512, upscale_small=True)

    report = import_pictures([tiny], project, options, upscale=lambda image, w, h: image.resize((w, h)))

    width, height = Image.open(report.imported[0]).size
    assert abs(width / height - 2) < 0.01 and abs(width * height - 512 * 512) < 512


def test_max_side_shrinks_large_pictures_when_keeping_sizes(tmp_path: Path, project) -> None:
    large = _picture(tmp_path / "large.png", (1200, 800))

    report = import_pictures([large], project, PrepareOptions(max_side=600))

    assert Image.open(report.imported[0]).size == (600, 400)


def test_pictures_below_the_minimum_side_are_skipped(tmp_path: Path, project) -> None:
    icon = _picture(tmp_path / "icon.png", (32, 200))

    report = import_pictures([icon], project, SQUARE_128)

    assert report.imported == []
    assert report.skipped[0].path == icon and "only 32x200" in report.skipped[0].reason
    assert _holds_no_files(project.root)


def test_large_pictures_are_stored_as_high_quality_jpeg(tmp_path: Path, project) -> None:
    photo = tmp_path / "photo.png"
    Image.effect_noise((2100, 2000), 30).convert("RGB").save(photo)
    (tmp_path / "photo.txt").write_text("a photo", encoding="utf-8")

    report = import_pictures([photo, tmp_path / "photo.txt"], project, PrepareOptions())

    assert report.imported == [project.pictures / "photo.jpg"]
    with Image.open(report.imported[0]) as stored:
        assert stored.format == "JPEG" and stored.size == (2100, 2000)
    assert (project.pictures / "photo.txt").read_text(encoding="utf-8") == "a photo"


def test_transparent_pictures_use_the_chosen_background(tmp_path: Path, project) -> None:
    cut_out = tmp_path / "cut_out.png"
    Image.new("RGBA", (128, 128), (0, 0, 0, 0)).save(cut_out)

    report = import_pictures([cut_out], project, PrepareOptions(target_size=(128, 128), background=(0, 255, 0)))

    assert _is_uniform(report.imported[0], (0, 255, 0), tolerance=0)


def test_stop_is_honoured_between_files(tmp_path: Path, project) -> None:
    sources = [_picture(tmp_path / f"p{i}.png") for i in range(4)]
    imported_so_far: list[int] = []

    def should_stop() -> bool:
        imported_so_far.append(len(list(project.pictures.glob("*.png"))) if project.pictures.exists() else 0)
        return imported_so_far[-1] >= 2

    report = import_pictures(sources, project, SQUARE_128, should_stop=should_stop)

    assert report.stopped and len(report.imported) == 2
    assert report.summary() == "2 imported (stopped)"


def test_crop_focus_at_import_and_when_re_preparing(tmp_path: Path, project) -> None:
    source = _two_halves(tmp_path / "halves.png", (256, 128))
    (tmp_path / "halves.txt").write_text("left red, right blue", encoding="utf-8")
    left = PrepareOptions(target_size=(128, 128), crop_focus={"halves.png": (0.0, 0.5)})

    report = import_pictures([source, tmp_path / "halves.txt"], project, left)
    picture = report.imported[0]
    assert _is_uniform(picture, RED)

    right = PrepareOptions(target_size=(128, 128), crop_focus={"halves.png": (1.0, 0.5)})
    again = clean_in_project(project, right, names=["halves.png"])

    assert again.imported == [picture] and again.failed == []
    assert _is_uniform(picture, BLUE)
    # A new size without a focus reuses the remembered one.
    smaller = clean_in_project(project, PrepareOptions(target_size=(64, 64)))
    assert Image.open(smaller.imported[0]).size == (64, 64) and _is_uniform(picture, BLUE)
    assert (project.pictures / "halves.txt").read_text(encoding="utf-8") == "left red, right blue"
    assert (project.originals / "halves.png").read_bytes() == source.read_bytes()
    assert original_of(project, "halves.png") == (project.originals / "halves.png").resolve()
    with pytest.raises(DatasetError, match="other.png was not imported into this project"):
        original_of(project, "other.png")


def test_re_preparing_changes_format_with_size_and_keeps_deleted_pictures_deleted(tmp_path: Path, project) -> None:
    big = tmp_path / "big.png"
    Image.effect_noise((2100, 2000), 30).convert("RGB").save(big)
    other = _picture(tmp_path / "other.png")
    import_pictures([big, other], project, SQUARE_128)
    (project.pictures / "other.png").unlink()  # the user removed it from the training set

    report = clean_in_project(project, PrepareOptions(target_size=None))

    assert report.imported == [project.pictures / "big.jpg"]
    assert _files(project.pictures) == ["big.jpg"]
    with Image.open(project.pictures / "big.jpg") as stored:
        assert stored.size == (2100, 2000)
    back = clean_in_project(project, SQUARE_128)
    assert back.imported == [project.pictures / "big.png"] and _files(project.pictures) == ["big.png"]


def test_re_preparing_reports_a_missing_original_and_unknown_names(tmp_path: Path, project) -> None:
    import_pictures([_picture(tmp_path / "a.png"), _picture(tmp_path / "b.png")], project, SQUARE_128)
    (project.originals / "a.png").unlink()

    report = clean_in_project(project, SQUARE_128, names=["a.png", "b.png", "zzz.png"])

    assert report.imported == [project.pictures / "b.png"]
    assert [note.path for note in report.failed] == [project.pictures / "a.png"]
    assert "original of a.png" in report.failed[0].reason and "is missing" in report.failed[0].reason
    assert [note.path for note in report.skipped] == [project.pictures / "zzz.png"]


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="background colour"):
        PrepareOptions(background=(0, 0, 300))
    with pytest.raises(ConfigError, match="picture size"):
        PrepareOptions(target_size=(512, 0))
    with pytest.raises(ConfigError, match="crop focus of a.png"):
        PrepareOptions(crop_focus={"a.png": (1.5, 0.5)})
    with pytest.raises(ConfigError, match="maximum side"):
        PrepareOptions(max_side=0)


def test_re_preparing_never_reads_outside_originals(tmp_path: Path, project) -> None:
    import_pictures([_picture(tmp_path / "a.png")], project, SQUARE_128)
    secret = _picture(tmp_path / "secret.png", colour=BLUE)
    manifest = project.root / "picture_sources.json"
    manifest.write_text(json.dumps({"pictures": {"a.png": {"original": "../../../secret.png", "focus": None}}}),
                        encoding="utf-8")
    assert (project.originals / "../../../secret.png").resolve() == secret

    report = clean_in_project(project, SQUARE_128)

    assert report.imported == [] and "outside originals/" in report.failed[0].reason
    assert _is_uniform(project.pictures / "a.png", RED)


def test_a_damaged_manifest_is_reported_by_name(tmp_path: Path, project) -> None:
    project.root.mkdir(parents=True)
    (project.root / "picture_sources.json").write_text("{not json", encoding="utf-8")

    with pytest.raises(DatasetError, match=r"picture_sources\.json is damaged"):
        import_pictures([_picture(tmp_path / "a.png")], project, SQUARE_128)

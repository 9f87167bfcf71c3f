import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from lib_train.common.errors import ConfigError, DatasetError
from lib_train.dataset.health import NEAR_DUPLICATE_BITS, check_dataset, perceptual_hash
from lib_train.hosts.clip_tokenizer import clip_tokenizer


def photo(seed: int, size: tuple[int, int] = (192, 160)) -> Image.Image:
    """A picture with smooth structure and fine noise; different seeds give unrelated pictures."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    noisy = np.asarray(coarse, dtype=np.float64) + rng.normal(0, 6, (size[1], size[0], 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def add_image(folder: Path, name: str, seed: int, size=(192, 160), caption: str | None = "ttchar, outdoors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    photo(seed, size).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def near_copy(image: Image.Image) -> Image.Image:
    """The same picture resized, brightened a little and re-encoded as JPEG."""
    changed = ImageEnhance.Brightness(image.resize((150, 125), Image.Resampling.LANCZOS)).enhance(1.12)
    buffer = io.BytesIO()
    changed.save(buffer, "JPEG", quality=80)
    return Image.open(io.BytesIO(buffer.getvalue()))


def findings_for(report, path: Path, severity: str | None = None):
    return [f for f in report.findings if f.path == path and (severity is None or f.severity == severity)]


def check(folder: Path, **overrides):
    settings = dict(resolution=256, repeats=1, batch_size=1)
    settings.update(overrides)
    return check_dataset(folder, **settings)


def test_a_clean_folder_has_only_figures(tmp_path):
    for index in range(4):
        add_image(tmp_path, f"{index}.png", seed=index)
    report = check(tmp_path, repeats=5, batch_size=3)
    assert report.with_severity("error") == [] and report.with_severity("warning") == []
    assert report.image_count == 4 and report.images_per_epoch == 20 and report.steps_per_epoch == 7
    assert "about 7 step(s) per epoch at batch size 3" in report.summary
    assert findings_for(report, tmp_path, "info")[0].message.startswith("4 readable image(s) × 5 repeat(s) = 20")


def test_steps_per_epoch_for_repeat_folders(tmp_path):
    for index in range(4):
        add_image(tmp_path / "3_a", f"{index}.png", seed=index)
    for index in range(2):
        add_image(tmp_path / "5_b", f"{index}.png", seed=10 + index)
    report = check(tmp_path, repeats=99, batch_size=2)  # the flat-folder repeats do not apply
    assert report.images_per_epoch == 4 * 3 + 2 * 5 and report.steps_per_epoch == 11
    assert "12 per epoch" in findings_for(report, tmp_path / "3_a", "info")[0].message
    assert "10 per epoch" in findings_for(report, tmp_path / "5_b", "info")[0].message
    assert check(tmp_path, batch_size=4).steps_per_epoch == 6


def test_corrupt_files_are_findings_not_exceptions(tmp_path):
    add_image(tmp_path, "good.png", seed=1)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not a picture", encoding="utf-8")
    whole = io.BytesIO()
    photo(2).save(whole, "PNG")
    (tmp_path / "truncated.png").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])

    report = check(tmp_path)
    assert "0 bytes" in findings_for(report, tmp_path / "empty.png", "error")[0].message
    assert "not a readable picture" in findings_for(report, tmp_path / "text.jpg", "error")[0].message
    assert "truncated" in findings_for(report, tmp_path / "truncated.png", "error")[0].message
    assert findings_for(report, tmp_path / "good.png", "error") == []
    assert report.image_count == 1 and report.images_per_epoch == 1
    assert report.findings[0].severity == "error"  # errors come first
    assert "3 error(s)" in report.summary


def test_tiny_images_are_warned_about(tmp_path):
    tiny = add_image(tmp_path, "tiny.png", seed=1, size=(120, 200))
    fine = add_image(tmp_path, "fine.png", seed=2, size=(256, 300))
    report = check(tmp_path, resolution=256)
    [warning] = findings_for(report, tiny, "warning")
    assert "120×200" in warning.message and "half the training resolution (128 px at 256)" in warning.message
    assert findings_for(report, fine, "warning") == []


def test_extreme_aspect_ratios_are_warned_about_with_the_reason(tmp_path):
    long = add_image(tmp_path, "long.png", seed=1, size=(800, 200))
    wide_enough = add_image(tmp_path, "wide.png", seed=2, size=(500, 200))
    report = check(tmp_path, resolution=256)
    [warning] = findings_for(report, long, "warning")
    assert "1:4.0" in warning.message and "about 128 px" in warning.message and "cropped" in warning.message
    assert findings_for(report, wide_enough, "warning") == []


def test_near_duplicates_are_reported_as_pairs(tmp_path):
    original = add_image(tmp_path, "a_original.png", seed=7)
    near_copy(photo(7)).save(tmp_path / "b_copy.jpg")
    (tmp_path / "b_copy.txt").write_text("ttchar", encoding="utf-8")
    distinct = add_image(tmp_path, "c_other.png", seed=8)

    report = check(tmp_path)
    duplicates = [f for f in report.findings if "near-duplicate" in f.message]
    assert len(duplicates) == 1
    assert duplicates[0].path == tmp_path / "b_copy.jpg" and original.name in duplicates[0].message
    assert distinct.name not in duplicates[0].message


def test_perceptual_hash_separates_copies_from_other_pictures():
    def distance(a, b):
        return bin(perceptual_hash(a) ^ perceptual_hash(b)).count("1")

    assert distance(photo(3), near_copy(photo(3))) <= NEAR_DUPLICATE_BITS
    assert distance(photo(3), photo(3).convert("L")) <= NEAR_DUPLICATE_BITS
    assert min(distance(photo(3), photo(seed)) for seed in range(4, 24)) > 2 * NEAR_DUPLICATE_BITS


def test_caption_problems(tmp_path):
    missing = add_image(tmp_path / "2_my char", "missing.png", seed=1, caption=None)
    empty = add_image(tmp_path / "2_my char", "empty.png", seed=2, caption="  \n")
    gbk = add_image(tmp_path / "2_my char", "gbk.png", seed=3)
    gbk.with_suffix(".txt").write_bytes("原神, 长发, 微笑".encode("gbk"))
    long = add_image(tmp_path / "2_my char", "long.png", seed=4, caption=" ".join(["cat"] * 80))
    just_fits = add_image(tmp_path / "2_my char", "fits.png", seed=5, caption=" ".join(["cat"] * 75))

    report = check(tmp_path, tokenizer=clip_tokenizer())
    assert "class token 'my char'" in findings_for(report, missing, "warning")[0].message
    assert "empty" in findings_for(report, empty.with_suffix(".txt"), "warning")[0].message
    [refused] = findings_for(report, gbk.with_suffix(".txt"), "error")
    assert "gbk.txt" in refused.message and "GBK" in refused.message
    [too_long] = findings_for(report, long.with_suffix(".txt"), "warning")
    assert "80 CLIP tokens" in too_long.message and "chunks of 75" in too_long.message
    assert findings_for(report, just_fits.with_suffix(".txt")) == []


def test_missing_caption_in_a_flat_folder_trains_empty(tmp_path):
    image = add_image(tmp_path, "a.png", seed=1, caption=None)
    assert "an empty caption" in findings_for(check(tmp_path), image, "warning")[0].message


def test_captions_are_measured_with_the_default_tokenizer(tmp_path):
    long = add_image(tmp_path, "long.png", seed=1, caption=", ".join(f"tag{i}" for i in range(60)))
    [warning] = findings_for(check(tmp_path), long.with_suffix(".txt"), "warning")
    assert "CLIP tokens" in warning.message


def test_shared_and_orphan_captions(tmp_path):
    add_image(tmp_path, "a.png", seed=1)
    photo(2).save(tmp_path / "a.jpg")
    (tmp_path / "renamed_away.txt").write_text("ttchar", encoding="utf-8")
    report = check(tmp_path)
    [shared] = findings_for(report, tmp_path / "a.txt", "warning")
    assert "a.jpg and a.png share this caption file" in shared.message
    assert "not used" in findings_for(report, tmp_path / "renamed_away.txt", "info")[0].message


def test_layout_errors_are_findings(tmp_path):
    add_image(tmp_path / "no_prefix", "x.png", seed=1)
    add_image(tmp_path / "0_zero", "y.png", seed=2)
    add_image(tmp_path / "2_good", "z.png", seed=3)
    add_image(tmp_path, "loose.png", seed=4)
    report = check(tmp_path)
    assert "repeat count" in findings_for(report, tmp_path / "no_prefix", "error")[0].message
    assert "10_no_prefix" in findings_for(report, tmp_path / "no_prefix", "error")[0].message
    assert "at least 1" in findings_for(report, tmp_path / "0_zero", "error")[0].message
    assert "directly in the folder" in findings_for(report, tmp_path, "error")[0].message
    # Every image is still checked, but only the usable folder counts towards the epoch.
    assert report.image_count == 4 and report.images_per_epoch == 2


def test_empty_folder_and_missing_folder(tmp_path):
    report = check(tmp_path)
    assert "No images found" in findings_for(report, tmp_path, "error")[0].message
    assert report.steps_per_epoch == 0
    with pytest.raises(DatasetError, match="not found"):
        check(tmp_path / "missing")


@pytest.mark.parametrize("setting", ["resolution", "repeats", "batch_size"])
def test_settings_below_one_are_config_errors(tmp_path, setting):
    with pytest.raises(ConfigError, match="at least 1"):
        check(tmp_path, **{setting: 0})

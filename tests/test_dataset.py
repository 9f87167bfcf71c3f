import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from lib_train.common.errors import DatasetError
from lib_train.dataset.buckets import resize_to_bucket
from lib_train.dataset.training_data import (
    IMAGE_EXTENSIONS,
    ImageRecord,
    TrainingData,
    load_rgb,
    pixels_to_tensor,
    scan_training_folder,
)
from lib_train.engine.config import TrainConfig


def encode(pixels: torch.Tensor) -> torch.Tensor:
    """A small deterministic stand-in for the VAE: 4 channels at 1/8 of the size."""
    return torch.nn.functional.avg_pool2d(pixels, 8).repeat(1, 2, 1, 1)[:, :4]


def save(path: Path, size=(64, 64), color=(200, 30, 30), mode="RGB", **save_args) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save_args)
    return path


def save_gradient(path: Path, size) -> Path:
    """Left-to-right gradient, so a mirrored copy encodes differently."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 255, size[0], dtype=np.float32)
    array = np.broadcast_to(ramp[None, :, None], (size[1], size[0], 3)).astype(np.uint8)
    Image.fromarray(array).save(path)
    return path


def close(pixel, expected, tolerance=12):
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected))


# -- load_rgb ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "save_args"), [("a.png", {}), ("a.webp", {"lossless": True}), ("a.bmp", {})])
def test_load_rgb_plain_formats(tmp_path, name, save_args):
    image = load_rgb(save(tmp_path / name, (40, 30), (10, 120, 230), **save_args))
    assert image.mode == "RGB" and image.size == (40, 30)
    assert image.getpixel((20, 15)) == (10, 120, 230)


def test_load_rgb_applies_exif_orientation(tmp_path):
    stored = Image.new("RGB", (64, 32), (255, 0, 0))
    stored.paste((0, 0, 255), (32, 0, 64, 32))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "photo.jpg"
    stored.save(path, quality=95, exif=exif)
    image = load_rgb(path)
    assert image.size == (32, 64)
    assert close(image.getpixel((16, 5)), (255, 0, 0))  # the left side is now on top
    assert close(image.getpixel((16, 58)), (0, 0, 255))


def test_load_rgb_flattens_transparency_on_white(tmp_path):
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 128), (0, 0, 10, 20))
    rgba.save(tmp_path / "a.png")
    image = load_rgb(tmp_path / "a.png")
    assert image.mode == "RGB"
    assert image.getpixel((15, 10)) == (255, 255, 255)
    assert close(image.getpixel((5, 10)), (255, 127, 127), 2)

    la = Image.new("LA", (8, 8), (0, 0))
    la.save(tmp_path / "la.png")
    assert load_rgb(tmp_path / "la.png").getpixel((4, 4)) == (255, 255, 255)


def test_load_rgb_palette_with_and_without_transparency(tmp_path):
    palette = Image.new("P", (10, 10), 1)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette.paste(0, (0, 0, 5, 10))
    palette.save(tmp_path / "opaque.png")
    palette.save(tmp_path / "clear.png", transparency=0)
    opaque, clear = load_rgb(tmp_path / "opaque.png"), load_rgb(tmp_path / "clear.png")
    assert opaque.getpixel((2, 5)) == (0, 0, 0) and opaque.getpixel((7, 5)) == (0, 200, 0)
    assert clear.getpixel((2, 5)) == (255, 255, 255) and clear.getpixel((7, 5)) == (0, 200, 0)


def test_load_rgb_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    image = load_rgb(tmp_path / "anim.gif")
    assert image.mode == "RGB" and close(image.getpixel((8, 8)), (255, 0, 0), 4)


def test_load_rgb_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 128 * 257, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    image = load_rgb(tmp_path / "deep.png")
    assert [image.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_load_rgb_cmyk_jpeg(tmp_path):
    save(tmp_path / "print.jpg", (16, 16), (0, 255, 255, 0), mode="CMYK", quality=95)
    image = load_rgb(tmp_path / "print.jpg")
    assert image.mode == "RGB" and close(image.getpixel((8, 8)), (255, 0, 0))


def test_load_rgb_refuses_empty_and_truncated_files(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DatasetError, match="empty"):
        load_rgb(empty)
    noise = Image.effect_noise((64, 64), 80).convert("RGB")
    noise.save(tmp_path / "full.png")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes((tmp_path / "full.png").read_bytes()[:2000])
    with pytest.raises(DatasetError) as caught:
        load_rgb(truncated)
    assert str(truncated) in str(caught.value)


def test_load_rgb_refuses_truncated_files_even_when_pillow_is_told_to_accept_them(tmp_path):
    Image.effect_noise((64, 64), 80).convert("RGB").save(tmp_path / "full.jpg")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes((tmp_path / "full.jpg").read_bytes()[:1500])
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with pytest.raises(DatasetError):
            load_rgb(cut)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_pixels_to_tensor_range_and_layout():
    image = Image.new("RGB", (3, 2), (0, 255, 51))
    pixels = pixels_to_tensor([image, image])
    assert pixels.shape == (2, 3, 2, 3) and pixels.dtype == torch.float32
    assert pixels[0, :, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 51 / 127.5 - 1])


# -- scan_training_folder ----------------------------------------------------------------------


def test_scan_repeat_subfolders(tmp_path):
    save(tmp_path / "10_cat" / "b.jpg")
    save(tmp_path / "10_cat" / "a.png")
    save(tmp_path / "3_my_dog" / "c.PNG", (80, 40))
    (tmp_path / "3_my_dog" / "c.txt").write_text("dog, running\n", encoding="utf-8")
    (tmp_path / "3_my_dog" / "notes.md").write_text("not an image")
    records = scan_training_folder(tmp_path, default_repeats=7)
    assert [(r.path.name, r.repeats, r.folder, r.caption, r.size) for r in records] == [
        ("a.png", 10, "10_cat", "cat", (64, 64)),
        ("b.jpg", 10, "10_cat", "cat", (64, 64)),
        ("c.PNG", 3, "3_my_dog", "dog, running", (80, 40)),
    ]
    assert scan_training_folder(tmp_path, 7) == records  # deterministic


def test_scan_flat_folder(tmp_path):
    root = tmp_path / "my set"
    save(root / "x.webp", lossless=True)
    save(root / "y.bmp")
    (root / "y.caption").write_text("from caption file")
    records = scan_training_folder(str(root), default_repeats=4)
    assert [(r.path.name, r.repeats, r.folder, r.caption) for r in records] == [
        ("x.webp", 4, "my set", ""),
        ("y.bmp", 4, "my set", "from caption file"),
    ]


def test_scan_chinese_names_bom_captions_and_rotated_size(tmp_path):
    folder = tmp_path / "训练" / "5_中文角色"
    save(folder / "图片一.png")
    (folder / "图片一.txt").write_bytes("\ufeff中文, 标签".encode("utf-8"))
    exif = Image.Exif()
    exif[0x0112] = 6
    save(folder / "图片二.jpg", (64, 32), exif=exif)
    records = scan_training_folder(tmp_path / "训练", 1)
    assert [(r.path.name, r.caption, r.folder, r.size) for r in records] == [
        ("图片一.png", "中文, 标签", "5_中文角色", (64, 64)),
        ("图片二.jpg", "中文角色", "5_中文角色", (32, 64)),
    ]


def test_scan_ignores_dot_files_nested_folders_and_imageless_folders(tmp_path):
    save(tmp_path / "2_a" / "img.png")
    (tmp_path / "2_a" / "._img.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    save(tmp_path / "2_a" / "nested" / "deeper.png")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "img.npz").write_bytes(b"x")
    (tmp_path / "1_empty").mkdir()
    records = scan_training_folder(tmp_path, 1)
    assert [r.path.name for r in records] == ["img.png"]


def test_scan_missing_or_file_root(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        scan_training_folder(tmp_path / "nope", 1)
    file = tmp_path / "file.png"
    file.write_bytes(b"x")
    with pytest.raises(DatasetError, match="not a folder"):
        scan_training_folder(file, 1)


def test_scan_empty_folder_lists_accepted_extensions(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(DatasetError) as caught:
        scan_training_folder(tmp_path, 1)
    message = str(caught.value)
    assert str(tmp_path) in message
    assert all(extension in message for extension in IMAGE_EXTENSIONS)


def test_scan_mixed_root_and_subfolder_images(tmp_path):
    save(tmp_path / "loose.png")
    save(tmp_path / "5_x" / "inside.png")
    with pytest.raises(DatasetError, match="both directly") as caught:
        scan_training_folder(tmp_path, 1)
    assert "5_x" in str(caught.value)


def test_scan_unprefixed_subfolder_with_images(tmp_path):
    save(tmp_path / "5_ok" / "a.png")
    save(tmp_path / "extra" / "b.png")
    with pytest.raises(DatasetError, match="10_extra") as caught:
        scan_training_folder(tmp_path, 1)
    assert str(tmp_path / "extra") in str(caught.value)


@pytest.mark.parametrize("name", ["0_zero", "-2_neg"])
def test_scan_repeat_count_below_one(tmp_path, name):
    save(tmp_path / name / "a.png")
    with pytest.raises(DatasetError, match="at least 1") as caught:
        scan_training_folder(tmp_path, 1)
    assert name in str(caught.value)


def test_scan_reports_every_bad_file_at_once(tmp_path):
    save(tmp_path / "good.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    Image.effect_noise((64, 64), 80).convert("RGB").save(tmp_path / "full.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "full.png").read_bytes()[:1500])
    (tmp_path / "full.png").unlink()
    (tmp_path / "fake.webp").write_bytes(b"this is not a picture")
    save(tmp_path / "gbk.png")
    (tmp_path / "gbk.txt").write_bytes("一个女孩".encode("gbk"))
    with pytest.raises(DatasetError) as caught:
        scan_training_folder(tmp_path, 1)
    message = str(caught.value)
    assert message.startswith("4 file(s)")
    for name in ("empty.jpg", "truncated.png", "fake.webp", "gbk.txt"):
        assert str(tmp_path / name) in message
    assert "good.png" not in message and "GBK" in message


# -- TrainingData ------------------------------------------------------------------------------

# resolution 128, buckets 64..256 step 64: (64,192), (64,256), (128,128), (192,64), (256,64)
SMALL = dict(
    resolution=128,
    enable_buckets=True,
    min_bucket_reso=64,
    max_bucket_reso=256,
    bucket_reso_steps=64,
    bucket_no_upscale=False,
    flip_aug=False,
    batch_size=2,
    shuffle_caption=False,
    keep_tokens=0,
    caption_dropout_rate=0.0,
    seed=123,
)
EXPECTED_BUCKET = {"sq": (128, 128), "wide": (192, 64), "tall": (64, 192)}


@pytest.fixture
def dataset_dir(tmp_path) -> Path:
    """2_a: three squares (one slightly off), two wide; 3_b: one tall. Gradients so flips differ."""
    a, b = tmp_path / "2_a", tmp_path / "3_b"
    save_gradient(a / "sq1.png", (96, 96))
    save_gradient(a / "sq2.png", (96, 96))
    save_gradient(a / "sq3.png", (100, 90))
    save_gradient(a / "wide1.png", (384, 128))
    save_gradient(a / "wide2.png", (192, 64))
    save_gradient(b / "tall1.png", (64, 192))
    (a / "sq1.txt").write_text("Red Hair, smile, red hair", encoding="utf-8")
    (a / "wide1.txt").write_text("smile, outdoors", encoding="utf-8")
    return tmp_path


def kind(record: ImageRecord) -> str:
    return record.path.stem.rstrip("0123456789")


def build(dataset_dir, **options) -> TrainingData:
    data = TrainingData(scan_training_folder(dataset_dir, 1), **{**SMALL, **options})
    data.cache_latents(encode, torch.device("cpu"))
    return data


def expected_latent(record: ImageRecord, bucket, flipped=False) -> torch.Tensor:
    pixels = pixels_to_tensor([resize_to_bucket(load_rgb(record.path), bucket)])
    return encode(pixels.flip(-1) if flipped else pixels)[0]


def test_buckets_and_sizes(dataset_dir):
    data = TrainingData(scan_training_folder(dataset_dir, 1), **SMALL)
    assert [c.bucket for c in data.choices] == [EXPECTED_BUCKET[kind(r)] for r in data.records]
    assert data.num_train_images == 5 * 2 + 1 * 3
    # (128,128): 6 items -> 3 batches; (192,64): 4 -> 2; (64,192): 3 -> 2 (last one partial)
    assert data.num_batches_per_epoch == 7


def test_training_data_uses_the_config_values(dataset_dir):
    config = TrainConfig(resolution=128, min_bucket_reso=64, max_bucket_reso=256, batch_size=3)
    data = config.training_data(scan_training_folder(dataset_dir, 1))
    assert data.batch_size == 3 and data.seed == config.seed
    assert data.bucket_resolutions == [(64, 192), (64, 256), (128, 128), (192, 64), (256, 64)]


def test_cache_latents_encodes_each_image_once_and_reports_progress(dataset_dir):
    data = TrainingData(scan_training_folder(dataset_dir, 1), **SMALL)
    encoded, progress = [], []

    def counting_encode(pixels):
        encoded.append(pixels.shape)
        return encode(pixels)

    data.cache_latents(counting_encode, torch.device("cpu"), lambda done, total: progress.append((done, total)), 2)
    assert sum(shape[0] for shape in encoded) == 6  # not once per repeat
    assert all(shape[0] <= 2 for shape in encoded)
    assert progress[-1] == (6, 6) and [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert len(progress) == 4  # squares in 2 chunks, wide and tall in one each


def test_cache_latents_with_flip_encodes_the_mirror_too(dataset_dir):
    data = TrainingData(scan_training_folder(dataset_dir, 1), **{**SMALL, "flip_aug": True})
    calls = []
    data.cache_latents(lambda px: calls.append(px.shape[0]) or encode(px), torch.device("cpu"))
    assert sum(calls) == 12


def test_batches_before_caching_is_an_error(dataset_dir):
    data = TrainingData(scan_training_folder(dataset_dir, 1), **SMALL)
    with pytest.raises(RuntimeError, match="cache_latents"):
        next(data.batches(0))


def test_batches_are_single_bucket_with_correct_latents_and_repeats(dataset_dir):
    data = build(dataset_dir)
    batches = list(data.batches(0))
    assert len(batches) == data.num_batches_per_epoch
    seen = Counter()
    for batch in batches:
        assert 1 <= len(batch.records) <= 2 and len(batch.captions) == len(batch.records)
        buckets = {EXPECTED_BUCKET[kind(r)] for r in batch.records}
        assert len(buckets) == 1
        (width, height), = buckets
        assert batch.latents.shape == (len(batch.records), 4, height // 8, width // 8)
        assert batch.latents.dtype == torch.float32
        for latent, record in zip(batch.latents, batch.records):
            assert torch.allclose(latent, expected_latent(record, (width, height)), atol=1e-6)
        seen.update(r.path.name for r in batch.records)
    assert seen == {"sq1.png": 2, "sq2.png": 2, "sq3.png": 2, "wide1.png": 2, "wide2.png": 2, "tall1.png": 3}
    assert sorted(len(b.records) for b in batches) == [1, 2, 2, 2, 2, 2, 2]


def test_batches_captions_fall_back_to_class_token(dataset_dir):
    data = build(dataset_dir)
    captions = {r.path.name: c for b in data.batches(0) for r, c in zip(b.records, b.captions)}
    assert captions["sq1.png"] == "Red Hair, smile, red hair"
    assert captions["sq2.png"] == "a" and captions["tall1.png"] == "b"


def _signature(data: TrainingData, epoch: int):
    return [([r.path.name for r in b.records], b.captions, b.latents) for b in data.batches(epoch)]


def test_same_seed_same_batches_and_epochs_differ(dataset_dir):
    options = {"shuffle_caption": True, "keep_tokens": 1, "caption_dropout_rate": 0.2, "flip_aug": True}
    first, second = build(dataset_dir, **options), build(dataset_dir, **options)
    for epoch in (0, 1):
        one, two = _signature(first, epoch), _signature(second, epoch)
        assert [(n, c) for n, c, _ in one] == [(n, c) for n, c, _ in two]
        assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(one, two))
    orders = [[n for n, _, _ in _signature(first, epoch)] for epoch in range(3)]
    assert orders[0] != orders[1] and orders[1] != orders[2]
    # Batches of different buckets are interleaved, not served bucket after bucket.
    bucket_orders = {tuple(tuple(b.latents.shape) for b in first.batches(epoch)) for epoch in range(5)}
    assert len(bucket_orders) > 1
    # Items are shuffled inside a bucket too, so the same images do not always share a batch.
    pairings = {frozenset(tuple(sorted(n)) for n, _, _ in _signature(first, epoch)) for epoch in range(5)}
    assert len(pairings) > 1
    other_seed = build(dataset_dir, **{**options, "seed": 124})
    assert [n for n, _, _ in _signature(other_seed, 0)] != orders[0]


def test_shuffled_captions_keep_leading_tags(dataset_dir):
    data = build(dataset_dir, shuffle_caption=True, keep_tokens=1)
    seen = set()
    for epoch in range(10):
        for batch in data.batches(epoch):
            for record, caption in zip(batch.records, batch.captions):
                if record.path.name == "sq1.png":
                    tags = caption.split(", ")
                    assert tags[0] == "Red Hair" and sorted(tags[1:]) == ["red hair", "smile"]
                    seen.add(caption)
    assert len(seen) == 2


def test_flip_uses_both_latents(dataset_dir):
    data = build(dataset_dir, flip_aug=True)
    record = next(r for r in data.records if r.path.name == "tall1.png")
    normal, mirrored = expected_latent(record, (64, 192)), expected_latent(record, (64, 192), flipped=True)
    assert not torch.allclose(normal, mirrored)
    used = Counter()
    for epoch in range(6):
        for batch in data.batches(epoch):
            for latent, r in zip(batch.latents, batch.records):
                if r is record:
                    is_normal = torch.allclose(latent, normal, atol=1e-6)
                    assert is_normal or torch.allclose(latent, mirrored, atol=1e-6)
                    used[is_normal] += 1
    assert used[True] > 0 and used[False] > 0 and sum(used.values()) == 18


def test_buckets_disabled_puts_everything_in_one_square(dataset_dir):
    data = build(dataset_dir, enable_buckets=False)
    assert {c.bucket for c in data.choices} == {(128, 128)}
    assert all(b.latents.shape[-2:] == (16, 16) for b in data.batches(0))
    assert data.bucket_info()["buckets"] == {"0": {"resolution": [128, 128], "count": 13}}


def test_no_upscale_buckets(dataset_dir):
    data = build(dataset_dir, bucket_no_upscale=True)
    by_name = {r.path.name: c.bucket for r, c in zip(data.records, data.choices)}
    # area 128²: 96x96 and 100x90 are floored to (64,64); 384x128 is shrunk to (192,64)
    assert by_name == {
        "sq1.png": (64, 64), "sq2.png": (64, 64), "sq3.png": (64, 64),
        "wide1.png": (192, 64), "wide2.png": (192, 64), "tall1.png": (64, 192),
    }
    assert data.bucket_resolutions == [(64, 64), (64, 192), (192, 64)]
    for batch in data.batches(0):
        (width, height), = {by_name[r.path.name] for r in batch.records}
        assert batch.latents.shape[-2:] == (height // 8, width // 8)


def test_no_upscale_refuses_images_smaller_than_a_step(tmp_path):
    save(tmp_path / "1_x" / "tiny.png", (40, 200))
    save(tmp_path / "1_x" / "ok.png", (64, 64))
    with pytest.raises(DatasetError, match="at least 64 px") as caught:
        TrainingData(scan_training_folder(tmp_path, 1), **{**SMALL, "bucket_no_upscale": True})
    assert str(tmp_path / "1_x" / "tiny.png") in str(caught.value)
    assert "ok.png" not in str(caught.value)


def test_metadata_helpers(dataset_dir):
    data = TrainingData(scan_training_folder(dataset_dir, 1), **SMALL)
    assert data.dataset_dirs() == {"2_a": {"n_repeats": 2, "img_count": 5}, "3_b": {"n_repeats": 3, "img_count": 1}}
    assert data.tag_frequency() == {
        "2_a": {"red hair": 2, "smile": 2, "outdoors": 1, "a": 3},
        "3_b": {"b": 1},
    }
    info = data.bucket_info()
    assert info["buckets"] == {
        "0": {"resolution": [64, 192], "count": 3},
        "2": {"resolution": [128, 128], "count": 6},
        "3": {"resolution": [192, 64], "count": 4},
    }
    # Only sq3 (100x90 in a square bucket) is off: |1 - 100/90| over 6 images.
    assert info["mean_img_ar_error"] == pytest.approx((100 / 90 - 1) / 6)
    json.dumps([data.dataset_dirs(), data.tag_frequency(), info])  # metadata values must serialise

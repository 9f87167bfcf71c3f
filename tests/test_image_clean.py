"""Opening pictures of every accepted format and mode as clean RGB, refusing damaged or huge ones, cropping."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from lib_train.common.errors import DatasetError
from lib_train.dataset.image_clean import crop_to_size, fit_within, open_clean, readable_extensions, to_rgb

RED, BLUE, GREEN = (220, 30, 30), (30, 30, 220), (30, 200, 30)


def _near(pixel: tuple[int, ...], expected: tuple[int, int, int], tolerance: int = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected))


def _two_halves(size: tuple[int, int], left: tuple[int, int, int], right: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds only a few bytes of pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def _rgba_half_transparent(size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    image.paste((*GREEN, 255), (size[0] // 2, 0, size[0], size[1]))
    return image


def _palette_with_transparent_index(size: tuple[int, int]) -> Image.Image:
    image = Image.new("P", size, 0)
    image.putpalette([0, 0, 0, *GREEN] + [0, 0, 0] * 254)
    image.paste(1, (size[0] // 2, 0, size[0], size[1]))
    image.info["transparency"] = 0
    return image


# (file name, image, save arguments, colour expected left, colour expected right)
FORMAT_CASES = {
    "png_rgb": ("a.png", _two_halves((40, 30), RED, BLUE), {}, RED, BLUE),
    "png_rgba": ("a.png", _rgba_half_transparent((40, 30)), {}, (255, 255, 255), GREEN),
    "png_la": ("a.png", Image.new("LA", (40, 30), (90, 0)), {}, (255, 255, 255), (255, 255, 255)),
    "png_palette_transparency": ("a.png", _palette_with_transparent_index((40, 30)), {"transparency": 0},
                                 (255, 255, 255), GREEN),
    "jpeg_rgb": ("a.jpg", _two_halves((40, 30), RED, BLUE), {"quality": 95}, RED, BLUE),
    "jpeg_cmyk": ("a.jpg", Image.new("CMYK", (40, 30), (0, 255, 255, 0)), {"quality": 95}, (255, 0, 0), (255, 0, 0)),
    "webp": ("a.webp", _two_halves((40, 30), RED, BLUE), {"lossless": True}, RED, BLUE),
    "webp_alpha": ("a.webp", _rgba_half_transparent((40, 30)), {"lossless": True}, (255, 255, 255), GREEN),
    "bmp": ("a.bmp", _two_halves((40, 30), RED, BLUE), {}, RED, BLUE),
    "gif": ("a.gif", _two_halves((40, 30), RED, BLUE), {}, RED, BLUE),
}


@pytest.mark.parametrize("case", FORMAT_CASES)
def test_every_format_and_mode_opens_as_rgb_of_the_same_size(tmp_path: Path, case: str) -> None:
    name, image, save_args, left, right = FORMAT_CASES[case]
    path = tmp_path / name
    image.save(path, **save_args)

    clean = open_clean(path)

    assert clean.mode == "RGB" and clean.size == (40, 30)
    assert _near(clean.getpixel((5, 15)), left), clean.getpixel((5, 15))
    assert _near(clean.getpixel((35, 15)), right), clean.getpixel((35, 15))


def test_transparency_is_composited_on_the_chosen_background(tmp_path: Path) -> None:
    path = tmp_path / "cut_out.png"
    _rgba_half_transparent((40, 30)).save(path)

    clean = open_clean(path, background=(10, 20, 250))

    assert clean.getpixel((5, 15)) == (10, 20, 250)
    assert clean.getpixel((35, 15)) == GREEN


def test_partial_transparency_is_blended_with_the_background(tmp_path: Path) -> None:
    path = tmp_path / "half_alpha.png"
    Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(path)

    assert _near(open_clean(path, background=(0, 0, 255)).getpixel((0, 0)), (128, 0, 127), tolerance=2)


def test_animated_gif_gives_its_first_frame(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (32, 32), colour) for colour in (RED, BLUE, GREEN)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(path).n_frames == 3

    assert _near(open_clean(path).getpixel((16, 16)), RED)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "depth16.png"
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")

    values = np.asarray(open_clean(path))[0, :, 0]

    assert values[0] == 0 and values[-1] == 255
    assert abs(int(values[32]) - 132) <= 2  # 32/63 of the range, not clipped to white
    assert np.all(np.diff(values.astype(int)) >= 0)


def test_float_and_32_bit_greyscale_are_scaled_into_8_bit() -> None:
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    integers = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.int32), "I")

    assert [to_rgb(floats).getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]
    assert [to_rgb(integers).getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_palette_alpha_mode_is_composited() -> None:
    image = Image.new("PA", (4, 4), (0, 0))
    image.putpalette([200, 10, 10] * 256)

    assert to_rgb(image, background=(0, 255, 0)).getpixel((0, 0)) == (0, 255, 0)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Orientation 6: the stored pixels must be turned 90 degrees clockwise for display,
    # so the stored left half (red) ends up on top.
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    _two_halves((40, 20), RED, BLUE).save(path, exif=exif, quality=95)

    clean = open_clean(path)

    assert clean.size == (20, 40)
    assert _near(clean.getpixel((10, 5)), RED)
    assert _near(clean.getpixel((10, 35)), BLUE)


def test_avif_opens_when_this_pillow_reads_it(tmp_path: Path) -> None:
    if ".avif" not in readable_extensions():
        pytest.skip("this Pillow has no AVIF support and the pillow-avif-plugin is not installed")
    path = tmp_path / "a.avif"
    try:
        _two_halves((40, 30), RED, BLUE).save(path, quality=100)
    except (OSError, KeyError, ValueError) as error:
        pytest.skip(f"AVIF can be read but not written here ({error})")

    clean = open_clean(path)

    assert clean.mode == "RGB" and clean.size == (40, 30)
    assert _near(clean.getpixel((5, 15)), RED, tolerance=25)


def test_readable_extensions_follow_what_pillow_can_decode() -> None:
    extensions = readable_extensions()
    assert {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"} <= extensions
    assert (".avif" in extensions) == ("avif" in features.modules and features.check_module("avif"))


def test_empty_file_is_refused_with_its_name(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"empty\.png is empty \(0 bytes\)"):
        open_clean(path)


def test_truncated_file_is_refused_even_when_pillow_is_told_to_allow_it(tmp_path: Path, monkeypatch) -> None:
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # what some WebUI extensions do
    source = tmp_path / "full.jpg"
    Image.effect_noise((256, 256), 60).convert("RGB").save(source, quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])

    with pytest.raises(DatasetError, match=r"cut\.jpg is damaged or truncated"):
        open_clean(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_text_and_unsupported_formats_are_refused(tmp_path: Path) -> None:
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture", encoding="utf-8")
    postscript = tmp_path / "drawing.png"  # would otherwise be handed to Ghostscript
    postscript.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    tiff = tmp_path / "scan.png"
    Image.new("RGB", (8, 8)).save(tiff, format="TIFF")

    for path in (notes, postscript, tiff):
        with pytest.raises(DatasetError, match=rf"{path.name} is not a readable picture"):
            open_clean(path)


def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path: Path) -> None:
    # 72 MP claimed, a few bytes of data: decoding would fail as truncated; the size check comes first.
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_claiming(9000, 8000))

    with pytest.raises(DatasetError, match=r"bomb\.png is too large .*9000x8000, 72\.0 megapixels; the limit is 64\.0"):
        open_clean(path)


def test_pixel_limit_is_a_parameter(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    Image.new("RGB", (100, 50)).save(path)

    with pytest.raises(DatasetError, match=r"small\.png is too large"):
        open_clean(path, pixel_limit=4999)
    assert open_clean(path, pixel_limit=5000).size == (100, 50)


def test_pillows_own_decompression_bomb_error_gives_the_same_message(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(_png_claiming(30000, 30000))  # beyond twice Pillow's limit: Pillow raises on open

    with pytest.raises(DatasetError, match=r"huge\.png is too large to open safely \(900\.0 megapixels; the limit is"):
        open_clean(path, pixel_limit=None)


def test_shown_as_names_the_users_file_in_messages(tmp_path: Path) -> None:
    path = tmp_path / ".working-copy.tmp"
    path.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"photos\.zip/a\.png is empty"):
        open_clean(path, shown_as="photos.zip/a.png")


def _ramp(width: int, height: int) -> Image.Image:
    """Red = x * 255 / (width - 1), green = y * 255 / (height - 1): every pixel says where it came from."""
    xs = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    ys = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], -1).round().astype(np.uint8), "RGB")


def test_crop_without_scaling_takes_the_centre() -> None:
    source = _ramp(256, 64)

    crop = crop_to_size(source, 64, 64)

    assert crop.size == (64, 64)
    assert np.array_equal(np.asarray(crop), np.asarray(source.crop((96, 0, 160, 64))))


def test_crop_follows_the_focus_point() -> None:
    source = _ramp(256, 64)

    crop = crop_to_size(source, 64, 64, focus=(0.25, 0.5))  # centre x = 64: columns 32..95

    assert np.array_equal(np.asarray(crop), np.asarray(source.crop((32, 0, 96, 64))))


@pytest.mark.parametrize("focus, left", [((0.0, 0.0), 0), ((0.05, 0.9), 0), ((1.0, 0.5), 192), ((0.97, 0.1), 192)])
def test_crop_window_is_clamped_inside_the_picture(focus: tuple[float, float], left: int) -> None:
    source = _ramp(256, 64)

    crop = crop_to_size(source, 64, 64, focus=focus)

    assert np.array_equal(np.asarray(crop), np.asarray(source.crop((left, 0, left + 64, 64))))


def test_crop_scales_to_cover_then_crops_around_the_focus() -> None:
    source = _ramp(512, 256)  # halved to 256x128, then a 128x128 window

    centre = np.asarray(crop_to_size(source, 128, 128)).astype(int)
    right = np.asarray(crop_to_size(source, 128, 128, focus=(0.9, 0.5))).astype(int)

    assert centre.shape == (128, 128, 3)
    # The full height is kept (green spans 0..255); the centre window covers the middle half of the width.
    assert centre[0, 64, 1] <= 2 and centre[-1, 64, 1] >= 253
    assert abs(centre[64, 0, 0] - 64) <= 3 and abs(centre[64, -1, 0] - 191) <= 3
    # Focus at 90% of the width slides the window to the right edge.
    assert abs(right[64, 0, 0] - 128) <= 3 and right[64, -1, 0] >= 252


def test_crop_enlarges_a_small_picture_to_the_exact_size() -> None:
    crop = crop_to_size(_ramp(30, 20), 128, 96)
    assert crop.size == (128, 96)


def test_fit_within_shrinks_but_never_enlarges() -> None:
    assert fit_within(_ramp(400, 100), 200, 200).size == (200, 50)
    assert fit_within(_ramp(100, 400), 300, 200).size == (50, 200)
    small = _ramp(60, 40)
    assert fit_within(small, 200, 200) is small

"""Opening any picture a user brings as a clean, upright, 8-bit RGB image, and cropping it to a size.

Only the formats below are decoded (by content, not by extension): a file named ``.png`` that really is
an EPS or a TIFF is refused rather than handed to Ghostscript or an exotic decoder.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError, features

from ..common.errors import DatasetError
from ..common.i18n import tr

Colour = tuple[int, int, int]
WHITE: Colour = (255, 255, 255)

# Checked from the header, before any pixel is decoded. 64 MP is above any camera a user trains from and
# keeps one decoded image under about 256 MB. Pillow's own limit (Image.MAX_IMAGE_PIXELS) applies on top.
DEFAULT_PIXEL_LIMIT = 64_000_000

_BASE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "DIB", "GIF")  # JPEG also opens camera MPO files
_BASE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})
_TRANSPARENT_MODES = frozenset({"RGBA", "LA", "PA", "RGBa"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


@functools.cache
def _avif_readable() -> bool:
    """Pillow >= 11.3 may have AVIF built in; older ones read it once the pillow-avif-plugin is imported."""
    if "avif" in features.modules and features.check_module("avif"):
        return True
    if importlib.util.find_spec("pillow_avif") is None:
        return False
    importlib.import_module("pillow_avif")  # registers the AVIF plugin with Pillow
    Image.init()
    return "AVIF" in Image.OPEN


def readable_extensions() -> frozenset[str]:
    """Lower-case extensions (with the dot) of the pictures this installation can open."""
    return (_BASE_EXTENSIONS | {".avif"}) if _avif_readable() else _BASE_EXTENSIONS


def _readable_formats() -> list[str]:
    return [*_BASE_FORMATS, "AVIF"] if _avif_readable() else list(_BASE_FORMATS)


def open_clean(
    path: str | Path,
    *,
    background: Colour = WHITE,
    pixel_limit: int | None = DEFAULT_PIXEL_LIMIT,
    shown_as: str | Path | None = None,
) -> Image.Image:
    """The picture as 8-bit RGB: EXIF orientation applied, transparency composited on `background`,
    the first frame of an animation, decoded completely (a truncated file is an error, never a grey band).

    `shown_as` is the name used in error messages when `path` is a working copy (e.g. a zip member).
    Raises DatasetError naming the file when it is empty, unreadable, damaged or above `pixel_limit` pixels.
    """
    return _open_upright(path, pixel_limit, shown_as, lambda image: to_rgb(image, background))


def open_alpha(path: str | Path, *, pixel_limit: int | None = DEFAULT_PIXEL_LIMIT) -> Image.Image | None:
    """The transparency ``open_clean`` composites away, upright, as an 8-bit "L" picture (255: opaque); None when
    the picture has none. Raises DatasetError as ``open_clean`` does."""
    return _open_upright(path, pixel_limit, None, alpha_channel)


def _open_upright(path: str | Path, pixel_limit: int | None, shown_as: str | Path | None,
                  convert: Callable[[Image.Image], Any]) -> Any:
    path = Path(path)
    name = shown_as if shown_as is not None else path
    try:
        file_size = path.stat().st_size
    except OSError as error:
        raise DatasetError(tr("Cannot read image {name}: {value}", name=name, value=error.strerror or error)) from None
    if file_size == 0:
        raise DatasetError(tr("Image {name} is empty (0 bytes).", name=name))
    try:
        with _strict_decoding(), Image.open(path, formats=_readable_formats()) as image:
            _check_pixel_limit(image.size, pixel_limit, name)
            image.load()
            return convert(ImageOps.exif_transpose(image))
    except DatasetError:
        raise
    except Image.DecompressionBombError as error:
        raise _too_large_from_pillow(error, name) from None
    except UnidentifiedImageError:
        raise DatasetError(
            tr("Image {name} is not a readable picture: it is damaged, or not in one of the formats {value}.",
               name=name, value=', '.join(sorted(readable_extensions())))
        ) from None
    except Exception as error:  # Pillow signals damaged data with many exception types
        raise DatasetError(tr("Image {name} is damaged or truncated ({error}).", name=name, error=error)) from None


@contextmanager
def _strict_decoding() -> Iterator[None]:
    # Some WebUI extensions turn on LOAD_TRUNCATED_IMAGES globally; a truncated file would then
    # load with a grey band and be trained on. Refuse it instead.
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _check_pixel_limit(size: tuple[int, int], pixel_limit: int | None, name: str | Path) -> None:
    # Pillow only warns between its limit and twice it; that warning is refused here like its error.
    limits = [limit for limit in (pixel_limit, Image.MAX_IMAGE_PIXELS) if limit]
    pixels = size[0] * size[1]
    if limits and pixels > min(limits):
        raise _too_large(name, pixels, min(limits), f"{size[0]}x{size[1]}, ")


def _too_large(name: str | Path, pixels: int, limit: int, dimensions: str = "") -> DatasetError:
    return DatasetError(
        tr("Image {name} is too large to open safely ({dimensions}{value:.1f} megapixels; the limit is "
           "{value2:.1f}). Shrink it first, or raise the pixel limit if you trust the file.", name=name,
           dimensions=dimensions, value=pixels / 1e6, value2=limit / 1e6)
    )


def _too_large_from_pillow(error: Exception, name: str | Path) -> DatasetError:
    numbers = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(error))
    if numbers:
        return _too_large(name, int(numbers.group(1)), int(numbers.group(2)))
    return DatasetError(tr("Image {name} is too large to open safely ({error}).", name=name, error=error))


def to_rgb(image: Image.Image, background: Colour = WHITE) -> Image.Image:
    """8-bit RGB; 16-bit and float greyscale scaled into 0..255, transparency composited on `background`."""
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _scaled_to_l(np.asarray(image, dtype=np.float64) / 257.0)
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        # Float pictures (TIFF, PFM) hold 0..1; anything brighter was meant as 0..255.
        image = _scaled_to_l(values * 255.0 if values.max(initial=0.0) <= 1.0 else values)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def alpha_channel(image: Image.Image) -> Image.Image | None:
    """The alpha that ``to_rgb`` composites, as "L"; None when it composites none (16-bit and float pictures
    lose their transparency in the scaling)."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F" or not _has_alpha(image):
        return None
    return image.convert("RGBA").getchannel("A")


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _TRANSPARENT_MODES or "transparency" in image.info


def _scaled_to_l(values: np.ndarray) -> Image.Image:
    # Pillow's own I;16 -> L conversion clips at 255, turning most 16-bit pictures white.
    return Image.fromarray(np.clip(values + 0.5, 0, 255).astype(np.uint8), "L")


def crop_to_size(
    image: Image.Image, width: int, height: int, focus: tuple[float, float] | None = None
) -> Image.Image:
    """Exactly width x height: scaled to cover it (LANCZOS) and cropped around `focus`.

    `focus` is the point to keep in view as fractions (0..1) of the picture's width and height, the centre
    when None; the window slides to stay inside the picture, so a focus near an edge keeps that edge.
    """
    if width < 1 or height < 1:
        raise ValueError(f"crop size must be positive, got {width}x{height}")
    focus_x, focus_y = focus if focus is not None else (0.5, 0.5)
    scale = max(width / image.width, height / image.height)
    # The window in the picture's own coordinates: resampling straight from it avoids a second rounding.
    window_width, window_height = width / scale, height / scale
    left = _clamp(focus_x * image.width - window_width / 2, 0.0, image.width - window_width)
    top = _clamp(focus_y * image.height - window_height / 2, 0.0, image.height - window_height)
    box = (left, top, left + window_width, top + window_height)
    return image.resize((width, height), Image.Resampling.LANCZOS, box=box)


def fit_within(image: Image.Image, max_width: int, max_height: int) -> Image.Image:
    """The whole picture, shrunk (never enlarged) to fit max_width x max_height, aspect ratio kept."""
    scale = min(max_width / image.width, max_height / image.height)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)

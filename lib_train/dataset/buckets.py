"""Aspect-ratio buckets as kohya sd-scripts builds and assigns them (`make_bucket_resolutions`, `BucketManager`).

Sizes are (width, height) throughout, as Pillow and kohya write them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from PIL import Image

Size = tuple[int, int]


@dataclass(frozen=True)
class BucketChoice:
    """Where one image goes: the bucket, the size it is resized to before the crop, and the AR error."""

    bucket: Size
    resized_size: Size
    ar_error: float  # bucket aspect ratio minus image aspect ratio, signed as kohya records it


def make_bucket_resolutions(resolution: int, min_reso: int, max_reso: int, step: int) -> list[Size]:
    """All buckets of about resolution² pixels with sides in [min_reso, max_reso], multiples of step.

    Limits off the step are moved onto it first, the minimum down and the maximum up (kohya's
    `adjust_min_max_bucket_reso_by_steps`): else a side such as 300 or 1000 would make buckets off the step.
    """
    min_reso -= min_reso % step
    max_reso += -max_reso % step
    area = resolution * resolution
    square = math.isqrt(area) // step * step
    resolutions = {(square, square)}
    for width in range(min_reso, max_reso + 1, step):
        height = min(max_reso, area // width // step * step)
        if height >= min_reso:
            resolutions.add((width, height))
            resolutions.add((height, width))
    return sorted(resolutions)


def cover_size(size: Size, bucket: Size) -> Size:
    """The size that covers `bucket` while keeping the aspect ratio: the matching side equals the bucket's."""
    width, height = size
    bucket_width, bucket_height = bucket
    if width * bucket_height > bucket_width * height:  # wider than the bucket: match heights
        scale = bucket_height / height
    else:
        scale = bucket_width / width
    return int(width * scale + 0.5), int(height * scale + 0.5)


def choose_predefined_bucket(size: Size, resolutions: list[Size]) -> BucketChoice:
    """The bucket with the smallest aspect-ratio error; on a tie the first in `resolutions` wins."""
    aspect = size[0] / size[1]
    bucket = size if size in resolutions else min(resolutions, key=lambda r: abs(r[0] / r[1] - aspect))
    return BucketChoice(bucket, cover_size(size, bucket), bucket[0] / bucket[1] - aspect)


def choose_no_upscale_bucket(size: Size, resolution: int, step: int) -> BucketChoice:
    """kohya's `bucket_no_upscale`: shrink images above resolution² to that area, never enlarge.

    The bucket is the (resized) size floored to `step`; the remainder is cropped. A side smaller than
    `step` gives a bucket side of 0, which the caller must refuse.
    """
    width, height = size
    aspect = width / height
    area = resolution * resolution
    if width * height > area:
        exact_width = math.sqrt(area * aspect)
        exact_height = area / exact_width
        # Round one side to the step and derive the other; keep whichever keeps the aspect ratio better.
        rounded_width = _round_to_step(exact_width, step)
        height_for_width = _round_to_step(rounded_width / aspect, step)
        rounded_height = _round_to_step(exact_height, step)
        width_for_height = _round_to_step(rounded_height * aspect, step)
        error_by_width = abs(rounded_width / height_for_width - aspect) if height_for_width else math.inf
        error_by_height = abs(width_for_height / rounded_height - aspect) if rounded_height else math.inf
        if error_by_width < error_by_height:
            resized = (rounded_width, int(rounded_width / aspect + 0.5))
        else:
            resized = (int(rounded_height * aspect + 0.5), rounded_height)
    else:
        resized = size
    bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
    ar_error = bucket[0] / bucket[1] - aspect if bucket[1] else math.inf
    return BucketChoice(bucket, resized, ar_error)


def _round_to_step(value: float, step: int) -> int:
    rounded = int(value + 0.5)
    return rounded - rounded % step


def centre_crop_box(size: Size, bucket: Size) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred `bucket`-sized window in an image of `size`."""
    left = (size[0] - bucket[0]) // 2
    top = (size[1] - bucket[1]) // 2
    return left, top, left + bucket[0], top + bucket[1]


def resize_to_bucket(image: Image.Image, bucket: Size, resized_size: Size | None = None) -> Image.Image:
    """Resize to `resized_size` (default: the size that just covers the bucket), then centre-crop to `bucket`.

    Pass the BucketChoice's `resized_size` to reproduce kohya exactly; in no-upscale mode it differs
    from the covering size (the image is cropped, not shrunk further).
    """
    target = resized_size or cover_size(image.size, bucket)
    if target[0] < bucket[0] or target[1] < bucket[1]:
        raise ValueError(f"resized size {target} does not cover bucket {bucket}")
    if target != image.size:
        # LANCZOS keeps detail when shrinking; BICUBIC avoids LANCZOS' ringing when enlarging.
        shrinking = target[0] * target[1] < image.width * image.height
        image = image.resize(target, Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC)
    if image.size == bucket:
        return image
    return image.crop(centre_crop_box(image.size, bucket))


def mean_ar_error(errors: Iterable[float]) -> float:
    """Mean absolute aspect-ratio error over images (not repeats), as `ss_bucket_info` records it."""
    return statistics.fmean(abs(error) for error in errors)

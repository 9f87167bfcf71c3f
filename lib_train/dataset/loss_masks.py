"""Loss masks from a picture's alpha channel (kohya's masked loss), prepared exactly as the picture is."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .buckets import Size, resize_to_bucket


def latent_mask(alpha: Image.Image | None, resized_size: Size, bucket: Size, flipped: bool,
                latent_size: tuple[int, int]) -> torch.Tensor:
    """(1, h, w) float32 in [0, 1]: the alpha resized and centre-cropped to the bucket as the picture is, mirrored
    with it, then averaged down to the latent's size (kohya's "area" interpolation). No alpha: all ones."""
    if alpha is None:
        return torch.ones((1, *latent_size), dtype=torch.float32)
    prepared = np.asarray(resize_to_bucket(alpha, bucket, resized_size), dtype=np.float32) / 255.0
    mask = torch.from_numpy(prepared)
    if flipped:
        mask = mask.flip(-1)
    return torch.nn.functional.interpolate(mask[None, None], size=latent_size, mode="area")[0]

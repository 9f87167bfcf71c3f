"""Latents kept on disk between runs: one entry per picture × prepared size and crop × flip × VAE.

A latent depends on the picture's bytes (EXIF rotation and transparency included), the size it is resized to,
the bucket it is centre-cropped to, whether it is mirrored, and the VAE encoder. The key holds all of them, so
a changed picture, crop, bucket, flip or VAE never reuses a stale latent; it does not hold the file's name, so
a renamed or moved picture is found again. A cached latent is one draw from the VAE's distribution (as kohya
caches it), made with the run's seed, which the VAE identity holds: another seed encodes again, so a run from the
cache trains as one without it. The loss mask of masked-loss runs (the alpha channel prepared like the picture,
at latent size) is kept beside it, under the same picture, size, crop and flip but no VAE.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..common.tensor_store import CacheReport, TensorStore
from .buckets import Size

# Part of every key: change it when loading, resizing or cropping a picture changes, so old latents go unused.
PREPARATION_VERSION = 1


class LatentCache:
    """The latents of one run's pictures in ``store``, under the host's VAE identity, their loss masks in
    ``mask_store``; hits and damaged files are counted in ``report``."""

    def __init__(self, store: TensorStore, vae_identity: str, report: CacheReport, mask_store: TensorStore):
        self.store = store
        self.mask_store = mask_store
        self.vae_identity = vae_identity
        self.report = report
        self._content_hashes: dict[Path, str] = {}

    def key(self, picture: Path, resized_size: Size, bucket: Size, flipped: bool) -> str:
        return (f"latent v{PREPARATION_VERSION} | picture sha256 {self._content_hash(picture)} | "
                f"resized {resized_size[0]}x{resized_size[1]} | bucket {bucket[0]}x{bucket[1]} | "
                f"flipped {flipped} | vae {self.vae_identity}")

    def load(self, picture: Path, resized_size: Size, bucket: Size, flipped: bool) -> torch.Tensor | None:
        self.report.latents_total += 1
        tensors = self.report.read(self.store, self.key(picture, resized_size, bucket, flipped),
                                   f"latent of {picture.name}{', mirrored' if flipped else ''}")
        if tensors is None:
            return None
        self.report.latents_reused += 1
        return tensors["latent"]

    def save(self, picture: Path, resized_size: Size, bucket: Size, flipped: bool, latent: torch.Tensor) -> None:
        self.store.write(self.key(picture, resized_size, bucket, flipped), {"latent": latent})

    def mask_key(self, picture: Path, resized_size: Size, bucket: Size, flipped: bool,
                 latent_size: tuple[int, int]) -> str:
        return (f"mask v{PREPARATION_VERSION} | picture sha256 {self._content_hash(picture)} | "
                f"resized {resized_size[0]}x{resized_size[1]} | bucket {bucket[0]}x{bucket[1]} | "
                f"flipped {flipped} | latent {latent_size[0]}x{latent_size[1]}")

    def load_mask(self, picture: Path, resized_size: Size, bucket: Size, flipped: bool,
                  latent_size: tuple[int, int]) -> torch.Tensor | None:
        self.report.masks_total += 1
        tensors = self.report.read(self.mask_store, self.mask_key(picture, resized_size, bucket, flipped, latent_size),
                                   f"mask of {picture.name}{', mirrored' if flipped else ''}")
        if tensors is None:
            return None
        self.report.masks_reused += 1
        return tensors["mask"]

    def save_mask(self, picture: Path, resized_size: Size, bucket: Size, flipped: bool, latent_size: tuple[int, int],
                  mask: torch.Tensor) -> None:
        self.mask_store.write(self.mask_key(picture, resized_size, bucket, flipped, latent_size), {"mask": mask})

    def _content_hash(self, picture: Path) -> str:
        if picture not in self._content_hashes:
            self._content_hashes[picture] = hashlib.sha256(picture.read_bytes()).hexdigest()
        return self._content_hashes[picture]

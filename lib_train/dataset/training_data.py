"""The training folder: scanning it (kohya's `<N>_<name>` convention), loading images, caching latents, batching."""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..common.errors import DatasetError
from ..common.i18n import N_, tr
from ..hosts.protocol import SizeCondition
from .buckets import (
    BucketChoice,
    Size,
    choose_no_upscale_bucket,
    centre_crop_box,
    choose_predefined_bucket,
    make_bucket_resolutions,
    mean_ar_error,
    resize_to_bucket,
)
from .captions import find_caption, process_caption, read_caption, split_tags
from .image_clean import open_alpha, open_clean
from .latent_cache import LatentCache
from .loss_masks import latent_mask
from .regularization import balanced_repeats, regularization_dirs

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})

# `10_my character` -> 10 repeats, class token "my character". The sign is captured so that
# "-1_x" gets the repeat-count message rather than "not prefixed".
REPEATS_PREFIX = re.compile(r"^(-?\d+)_(.*)$", re.DOTALL)


@dataclass
class ImageRecord:
    path: Path
    caption: str
    repeats: int
    folder: str  # basename of the image's folder, the key of kohya's dataset metadata
    size: Size  # (width, height) after the EXIF orientation is applied
    is_reg: bool = False  # a regularization (class) picture: its loss counts times the prior-loss weight


# ---------------------------------------------------------------------------------------------
# Image loading


def load_rgb(path: str | Path) -> Image.Image:
    """The image as 8-bit RGB, upright, with transparency flattened onto white; the first frame of animations.

    Raises DatasetError naming the file when it cannot be decoded completely (see ``image_clean.open_clean``).
    """
    return open_clean(path)


def pixels_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """Float32 (B, 3, H, W) in [-1, 1], kohya's `Normalize(0.5, 0.5)` of the RGB values."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).div_(127.5).sub_(1.0).contiguous()


# ---------------------------------------------------------------------------------------------
# Scanning the training folder


@dataclass
class FolderScan:
    records: list[ImageRecord]
    unusable: list[str]  # one message per picture that cannot be used (damaged image, undecodable caption)

    def unusable_report(self) -> str:
        return (tr("{count_unusable} file(s) in the training folder cannot be used:\n",
                   count_unusable=len(self.unusable))
                + "\n".join(f"- {problem}" for problem in self.unusable))


def scan_training_folder(root: str | Path, default_repeats: int) -> list[ImageRecord]:
    """Every training image with its caption and repeats, in a deterministic order; unusable files are an
    error that lists them all (``survey_training_folder`` returns them instead)."""
    scan = survey_training_folder(root, default_repeats)
    if scan.unusable:
        raise DatasetError(scan.unusable_report())
    return scan.records


def survey_training_folder(root: str | Path, default_repeats: int, kind: str = N_("Training folder")) -> FolderScan:
    """The usable training images and the files that cannot be used, nothing modified.

    Either `<N>_<name>` subfolders (N repeats each, caption fallback `name`) or images directly in
    `root` (default_repeats, caption fallback ""). Every image is decoded once here, so damaged
    files are reported together before any model work starts. ``kind`` names the folder in messages.
    """
    root = Path(root).resolve()
    if not root.exists():
        raise DatasetError(tr("{kind} not found: {root}", kind=tr(kind), root=root))
    if not root.is_dir():
        raise DatasetError(tr("{kind} {root} is not a folder.", kind=tr(kind), root=root))

    root_images = images_in(root)
    groups: list[tuple[Path, int, str, list[Path]]] = []  # (folder, repeats, class token, images)
    for folder in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name):
        images = images_in(folder)
        if not images:
            continue  # kohya ignores folders without images (caches, backups, ...)
        match = REPEATS_PREFIX.match(folder.name)
        if not match:
            raise DatasetError(
                tr("Subfolder {folder} contains images but its name does not start with a repeat count. Rename it "
                   "to e.g. '10_{name}' (10 repeats per epoch), or move it out of the training folder.",
                   folder=folder, name=folder.name)
            )
        repeats = int(match.group(1))
        if repeats < 1:
            raise DatasetError(
                tr("Subfolder {folder} has a repeat count of {repeats}; the number before '_' must be at least 1.",
                   folder=folder, repeats=repeats)
            )
        groups.append((folder, repeats, match.group(2), images))

    if root_images and groups:
        raise DatasetError(
            tr("{kind} {root} has images both directly inside it and in '<N>_<name>' subfolders ({value}). "
               "Move the loose images into a subfolder, or the subfolders' images up into the folder.",
               kind=tr(kind), root=root, value=', '.join(g[0].name for g in groups))
        )
    if root_images:
        groups = [(root, default_repeats, "", root_images)]
    if not groups:
        raise DatasetError(
            tr("No images found in {root}. Accepted extensions: {value}. Put the images in the folder itself, or in "
               "subfolders named like '10_<name>'.", root=root, value=', '.join(sorted(IMAGE_EXTENSIONS)))
        )

    records: list[ImageRecord] = []
    problems: list[str] = []
    for folder, repeats, class_token, images in groups:
        for image_path in images:
            try:
                size = load_rgb(image_path).size
                caption_path = find_caption(image_path)
                caption = read_caption(caption_path) if caption_path else class_token
            except DatasetError as error:
                problems.append(str(error))
                continue
            records.append(ImageRecord(image_path, caption, repeats, folder.name, size))
    return FolderScan(records, problems)


def images_in(folder: Path) -> list[Path]:
    # Dot-files are skipped as kohya's glob does; macOS leaves `._name.png` resource forks on shared drives.
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def pictures_in(folder: Path) -> list[Path]:
    """Images directly in the folder, then in its subfolders (one level, as training reads ``<N>_<name>``)."""
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [*images_in(folder), *(image for subfolder in subfolders for image in images_in(subfolder))]


# ---------------------------------------------------------------------------------------------
# Latents and batches


@dataclass
class Batch:
    latents: torch.Tensor  # (B, C, h, w) float32, as `encode` returned them
    captions: list[str]
    records: list[ImageRecord]
    sizes: list[SizeCondition]  # what SDXL is told about each picture's size and crop
    masks: torch.Tensor | None = None  # (B, 1, h, w) in [0, 1] from the alpha channel, with masked loss
    loss_weights: torch.Tensor | None = None  # (B,): the prior-loss weight for regularization pictures, else 1


Encoder = Callable[[torch.Tensor], torch.Tensor]


class TrainingData:
    """Records grouped into buckets, their cached latents, and the seeded batches of each epoch."""

    def __init__(
        self,
        records: Sequence[ImageRecord],
        *,
        resolution: int,
        enable_buckets: bool,
        min_bucket_reso: int,
        max_bucket_reso: int,
        bucket_reso_steps: int,
        bucket_no_upscale: bool,
        flip_aug: bool,
        batch_size: int,
        shuffle_caption: bool,
        keep_tokens: int,
        caption_dropout_rate: float,
        seed: int,
        caption_tag_dropout_rate: float = 0.0,
        masked_loss: bool = False,
        prior_loss_weight: float = 1.0,
    ) -> None:
        train = [record for record in records if not record.is_reg]
        reg = [record for record in records if record.is_reg]
        self._reg_dirs = regularization_dirs(reg)
        self.num_reg_images = sum(record.repeats for record in reg)  # kohya's count, before balancing
        self.records = train + balanced_repeats(sum(record.repeats for record in train), reg)
        self.prior_loss_weight = prior_loss_weight
        self.flip_aug = flip_aug
        self.batch_size = batch_size
        self.shuffle_caption = shuffle_caption
        self.keep_tokens = keep_tokens
        self.caption_dropout_rate = caption_dropout_rate
        self.caption_tag_dropout_rate = caption_tag_dropout_rate
        self.masked_loss = masked_loss
        self.seed = seed

        # Indices into bucket_resolutions are the keys of bucket_info(), as in kohya.
        if enable_buckets and bucket_no_upscale:
            self.choices = self._choose_no_upscale_buckets(resolution, bucket_reso_steps)
            self.bucket_resolutions = sorted({choice.bucket for choice in self.choices})
        else:
            # kohya ignores no_upscale when buckets are off: every image then goes to resolution².
            self.bucket_resolutions = (
                make_bucket_resolutions(resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps)
                if enable_buckets
                else [(resolution, resolution)]
            )
            self.choices = [choose_predefined_bucket(r.size, self.bucket_resolutions) for r in self.records]
        self._members: dict[Size, list[int]] = {}
        for index, choice in enumerate(self.choices):
            self._members.setdefault(choice.bucket, []).append(index)

        self._latents: list[torch.Tensor] | None = None
        self._flipped_latents: list[torch.Tensor] | None = None
        self._masks: dict[tuple[int, bool], torch.Tensor] | None = None  # (index, mirrored), with masked loss
        self.masked_pictures = 0  # training pictures whose mask leaves something out (alpha below 255 somewhere)

    def _choose_no_upscale_buckets(self, resolution: int, step: int) -> list[BucketChoice]:
        choices = [choose_no_upscale_bucket(r.size, resolution, step) for r in self.records]
        too_small = [
            f"- {r.path} ({r.size[0]}x{r.size[1]})" for r, c in zip(self.records, choices) if min(c.bucket) == 0
        ]
        if too_small:
            raise DatasetError(
                tr("With 'no upscale' buckets every image side must be at least {step} px; these are smaller:\n",
                   step=step)
                + "\n".join(too_small)
            )
        return choices

    # -- sizes --------------------------------------------------------------------------------

    @property
    def num_train_images(self) -> int:
        """Training images per epoch, repeats included, regularization pictures not (kohya's `ss_num_train_images`)."""
        return sum(record.repeats for record in self.records if not record.is_reg)

    @property
    def num_batches_per_epoch(self) -> int:
        return sum(math.ceil(self._items_in(members) / self.batch_size) for members in self._members.values())

    def _items_in(self, members: list[int]) -> int:
        return sum(self.records[i].repeats for i in members)

    # -- latents ------------------------------------------------------------------------------

    def cache_latents(
        self,
        encode: Encoder,
        device: torch.device,
        on_progress: Callable[[int, int], None] | None = None,
        batch_size: int = 4,
        cache: LatentCache | None = None,
    ) -> None:
        """Encode every image once (and its mirror image with flip_aug), or take its latent from ``cache`` and
        put the ones encoded there; keep the latents on `device`. Without a cache hit the pictures are encoded in
        the same chunks and order as without a cache, so the host's VAE sampling draws the same noise. With masked
        loss each latent gets its mask, from ``cache`` too."""
        variants = (False, True) if self.flip_aug else (False,)
        found: dict[tuple[int, bool], torch.Tensor] = {}
        if cache is not None:
            for index in range(len(self.records)):
                for flipped in variants:
                    latent = cache.load(self.records[index].path, *self._prepared(index), flipped)
                    if latent is not None:
                        found[index, flipped] = latent.to(device=device, dtype=torch.float32)
        done, total = 0, len(self.records)
        for bucket, members in sorted(self._members.items()):
            missing = [i for i in members if any((i, flipped) not in found for flipped in variants)]
            done += len(members) - len(missing)
            for start in range(0, len(missing), batch_size):
                chunk = missing[start : start + batch_size]
                images = [
                    resize_to_bucket(load_rgb(self.records[i].path), bucket, self.choices[i].resized_size)
                    for i in chunk
                ]
                pixels = pixels_to_tensor(images).to(device)
                for flipped in variants:
                    todo = [position for position, i in enumerate(chunk) if (i, flipped) not in found]
                    if not todo:
                        continue
                    batch = pixels[todo]
                    for position, latent in zip(todo, self._encode(encode, batch.flip(-1) if flipped else batch, device)):
                        index = chunk[position]
                        found[index, flipped] = latent
                        if cache is not None:
                            cache.save(self.records[index].path, *self._prepared(index), flipped, latent)
                done += len(chunk)
                if on_progress:
                    on_progress(done, total)
        order = range(len(self.records))
        self._latents = [found[i, False] for i in order]
        self._flipped_latents = [found[i, True] for i in order] if self.flip_aug else None
        if self.masked_loss:
            self._masks = self._prepare_masks(found, variants, device, cache)

    def _prepare_masks(self, latents: dict[tuple[int, bool], torch.Tensor], variants: tuple[bool, ...],
                       device: torch.device, cache: LatentCache | None) -> dict[tuple[int, bool], torch.Tensor]:
        masks = {}
        for index, record in enumerate(self.records):
            alpha, alpha_read = None, False
            for flipped in variants:
                latent_size = tuple(latents[index, flipped].shape[-2:])
                mask = cache.load_mask(record.path, *self._prepared(index), flipped, latent_size) if cache else None
                if mask is None:
                    if not alpha_read:  # one decode for both mirror images
                        alpha, alpha_read = open_alpha(record.path), True
                    mask = latent_mask(alpha, *self._prepared(index), flipped, latent_size)
                    if cache is not None:
                        cache.save_mask(record.path, *self._prepared(index), flipped, latent_size, mask)
                masks[index, flipped] = mask.to(device=device, dtype=torch.float32)
        self.masked_pictures = sum(1 for index, record in enumerate(self.records)
                                   if not record.is_reg and bool((masks[index, False] < 1).any()))
        return masks

    def _prepared(self, index: int) -> tuple[Size, Size]:
        """How a picture is prepared for its bucket: the size it is resized to, then the bucket it is cropped to."""
        return self.choices[index].resized_size, self.choices[index].bucket

    @staticmethod
    def _encode(encode: Encoder, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
        with torch.no_grad():
            result = encode(pixels)
        if result.dim() != 4 or result.shape[0] != pixels.shape[0]:
            raise ValueError(f"encode returned shape {tuple(result.shape)} for pixels {tuple(pixels.shape)}")
        return result.to(device=device, dtype=torch.float32)

    # -- batches ------------------------------------------------------------------------------

    def batches(self, epoch: int) -> Iterator[Batch]:
        """One epoch of batches; the same (seed, epoch) always gives the same batches and captions."""
        if self._latents is None:
            raise RuntimeError("TrainingData.cache_latents() must run before batches().")
        rng = random.Random(f"{self.seed}/{epoch}")
        plan: list[list[int]] = []
        for _, members in sorted(self._members.items()):
            items = [i for i in members for _ in range(self.records[i].repeats)]
            rng.shuffle(items)
            plan.extend(items[start : start + self.batch_size] for start in range(0, len(items), self.batch_size))
        rng.shuffle(plan)
        for indices in plan:
            yield self._make_batch(indices, rng, self._latents, self._flipped_latents)

    def fixed_batches(self) -> Iterator[Batch]:
        """Every training picture once, as it is (not mirrored, its caption unchanged), bucket by bucket in a fixed
        order: what the validation loss is measured on, drawing no random number. Class (regularization) pictures
        are left out: the loss measures how the LoRA fits the training pictures."""
        if self._latents is None:
            raise RuntimeError("TrainingData.cache_latents() must run before fixed_batches().")
        for _, bucket_members in sorted(self._members.items()):
            members = [index for index in bucket_members if not self.records[index].is_reg]
            for start in range(0, len(members), self.batch_size):
                indices = members[start : start + self.batch_size]
                masks = [self._masks[i, False] for i in indices] if self._masks is not None else []
                yield Batch(torch.stack([self._latents[i] for i in indices]),
                            [self.records[i].caption for i in indices], [self.records[i] for i in indices],
                            [self.size_condition(i) for i in indices], torch.stack(masks) if masks else None)

    def _make_batch(
        self,
        indices: list[int],
        rng: random.Random,
        latents: list[torch.Tensor],
        flipped: list[torch.Tensor] | None,
    ) -> Batch:
        chosen, captions, sizes, masks = [], [], [], []
        for i in indices:
            mirrored = flipped is not None and rng.random() < 0.5
            chosen.append(flipped[i] if mirrored else latents[i])
            if self._masks is not None:
                masks.append(self._masks[i, mirrored])
            sizes.append(self.size_condition(i, mirrored))
            captions.append(
                process_caption(
                    self.records[i].caption,
                    rng,
                    shuffle=self.shuffle_caption,
                    keep_tokens=self.keep_tokens,
                    dropout_rate=self.caption_dropout_rate,
                    tag_dropout_rate=self.caption_tag_dropout_rate,
                )
            )
        records = [self.records[i] for i in indices]
        return Batch(torch.stack(chosen), captions, records, sizes, torch.stack(masks) if masks else None,
                     self._loss_weights(records))

    def _loss_weights(self, records: list[ImageRecord]) -> torch.Tensor | None:
        """None without regularization pictures, so a run without them computes exactly as before."""
        if not self._reg_dirs:
            return None
        return torch.tensor([self.prior_loss_weight if record.is_reg else 1.0 for record in records])

    def size_condition(self, index: int, mirrored: bool = False) -> SizeCondition:
        """As kohya conditions SDXL: the picture's size, where the centre crop starts in the resized picture
        (measured from the right edge for a mirrored picture), and the bucket."""
        record, choice = self.records[index], self.choices[index]
        left, top, right, _ = centre_crop_box(choice.resized_size, choice.bucket)
        if mirrored:
            left = choice.resized_size[0] - right
        return SizeCondition(original_hw=(record.size[1], record.size[0]), crop_top_left=(top, left),
                             target_hw=(choice.bucket[1], choice.bucket[0]))

    # -- metadata (kohya's ss_* shapes) ---------------------------------------------------------

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """`ss_dataset_dirs`: {folder: {"n_repeats", "img_count"}}, img_count without repeats."""
        dirs: dict[str, dict[str, int]] = {}
        for record in self.records:
            if record.is_reg:
                continue
            entry = dirs.setdefault(record.folder, {"n_repeats": record.repeats, "img_count": 0})
            entry["img_count"] += 1
        return dirs

    def reg_dataset_dirs(self) -> dict[str, dict[str, int]]:
        """`ss_reg_dataset_dirs`, the same shape for the regularization folders (their own repeat counts)."""
        return dict(self._reg_dirs)

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """`ss_tag_frequency`: {folder: {lower-cased tag: occurrences}}, counted once per image, not per repeat."""
        frequency: dict[str, Counter[str]] = {}
        for record in self.records:
            frequency.setdefault(record.folder, Counter()).update(tag.lower() for tag in split_tags(record.caption))
        return {folder: dict(counts) for folder, counts in frequency.items()}

    def bucket_info(self) -> dict[str, Any]:
        """`ss_bucket_info`; keys are indices into `bucket_resolutions`, counts include repeats (as kohya)."""
        buckets = {}
        for index, resolution in enumerate(self.bucket_resolutions):
            members = self._members.get(resolution)
            if members:
                buckets[str(index)] = {"resolution": list(resolution), "count": self._items_in(members)}
        return {"buckets": buckets, "mean_img_ar_error": mean_ar_error(c.ar_error for c in self.choices)}

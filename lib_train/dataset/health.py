"""The dataset health check: what in a training folder would stop training or quietly weaken it, file by file.

Severities: "error" — training refuses the folder until it is fixed; "warning" — it trains, but this likely
hurts the result; "info" — figures for orientation. A bad file is a finding, never an exception; only a missing
folder raises.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..common.errors import ConfigError, DatasetError, TrainToolsError
from ..common.i18n import tr
from ..hosts.clip_tokenizer import clip_tokenizer
from .captions import CAPTION_EXTENSIONS, find_caption, read_caption
from .training_data import REPEATS_PREFIX, images_in, load_rgb  # the training folder's own rules

MAX_ASPECT_RATIO = 3.0
CLIP_CHUNK_TOKENS = 75
# Perceptual hashes of the same picture resized, re-encoded or slightly brightened differ in a few of their
# 64 bits; unrelated pictures in about half.
NEAR_DUPLICATE_BITS = 8

_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" | "warning" | "info"
    path: Path
    message: str


@dataclass(frozen=True)
class HealthReport:
    findings: list[Finding]  # errors first, then warnings, then info
    summary: str
    image_count: int  # images that can be read
    images_per_epoch: int  # with repeats
    steps_per_epoch: int  # about: buckets are batched separately

    def with_severity(self, severity: str) -> list[Finding]:
        return [finding for finding in self.findings if finding.severity == severity]


@dataclass
class _Group:
    folder: Path
    repeats: int | None  # None: the folder's name is not usable, training refuses it
    class_token: str
    images: list[Path]
    readable: int = 0


@dataclass
class _Check:
    """Findings collected while walking the folder."""

    findings: list[Finding] = field(default_factory=list)

    def add(self, severity: str, path: Path, message: str) -> None:
        self.findings.append(Finding(severity, path, message))


def check_dataset(
    train_dir: str | Path,
    resolution: int,
    repeats: int,
    batch_size: int,
    tokenizer: Any = None,
) -> HealthReport:
    """Check every image and caption of a training folder laid out as training expects it.

    ``repeats`` applies to a flat folder; ``<N>_<name>`` subfolders have their own. ``tokenizer`` counts caption
    tokens (a transformers CLIP tokenizer); by default SD1's, built offline.
    """
    root = Path(train_dir)
    if not root.is_dir():
        raise DatasetError(tr("Training folder not found: {root}", root=root))
    for name, value in ((tr("resolution"), resolution), (tr("repeats"), repeats), (tr("batch size"), batch_size)):
        if value < 1:
            raise ConfigError(tr("The {name} must be at least 1, not {value}.", name=name, value=value))

    check = _Check()
    groups = _groups(root, repeats, check)
    count_tokens = _token_counter(tokenizer, root, check)
    hashes: list[tuple[Path, int]] = []
    for group in groups:
        for image_path in group.images:
            image_hash = _check_image(image_path, resolution, check)
            if image_hash is not None:
                hashes.append((image_path, image_hash))
                group.readable += 1
            _check_caption(image_path, group, count_tokens, check)
        _check_shared_captions(group, check)
        _check_orphan_captions(group, check)
    _check_near_duplicates(hashes, root, check)

    counted = [group for group in groups if group.repeats is not None]
    for group in counted:
        check.add("info", group.folder, tr("{readable} readable image(s) × {repeats} repeat(s) = {value} per epoch.",
                                           readable=group.readable, repeats=group.repeats,
                                           value=group.readable * group.repeats))
    images_per_epoch = sum(group.readable * group.repeats for group in counted)
    steps = math.ceil(images_per_epoch / batch_size)
    findings = sorted(check.findings, key=lambda finding: _SEVERITY_ORDER[finding.severity])
    errors = sum(finding.severity == "error" for finding in findings)
    warnings = sum(finding.severity == "warning" for finding in findings)
    summary = (tr("{count_hashes} readable image(s), {images_per_epoch} per epoch with repeats: about {steps} "
                  "step(s) per epoch at batch size {batch_size} (a few more when images fall into several "
                  "aspect-ratio buckets). {errors} error(s), {warnings} warning(s).", count_hashes=len(hashes),
                  images_per_epoch=images_per_epoch, steps=steps, batch_size=batch_size, errors=errors,
                  warnings=warnings))
    return HealthReport(findings, summary, len(hashes), images_per_epoch, steps)


def perceptual_hash(image: Image.Image) -> int:
    """A 64-bit pHash: the signs of the lowest 8×8 DCT frequencies of a 32×32 greyscale, against their median.

    Low frequencies survive resizing, compression and brightness changes; details and noise do not matter.
    """
    grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    low = (_DCT_32 @ grey @ _DCT_32.T)[:8, :8].flatten()
    bits = low > np.median(low)
    return int("".join("1" if bit else "0" for bit in bits), 2)


def _dct_matrix(size: int) -> np.ndarray:
    frequency, position = np.arange(size)[:, None], np.arange(size)[None, :]
    return np.cos(np.pi * (2 * position + 1) * frequency / (2 * size))  # DCT-II; scale is irrelevant to signs


_DCT_32 = _dct_matrix(32)


def _groups(root: Path, default_repeats: int, check: _Check) -> list[_Group]:
    """The folders training reads, with the layout errors training would raise, as findings."""
    groups = []
    for folder in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name):
        images = images_in(folder)
        if not images:
            continue
        match = REPEATS_PREFIX.match(folder.name)
        repeats = int(match.group(1)) if match else None
        if repeats is None:
            check.add("error", folder, tr("The folder name does not start with a repeat count: rename it to e.g. "
                                          "'10_{name}' (10 repeats per epoch) or move it out.", name=folder.name))
        elif repeats < 1:
            check.add("error", folder, tr("The repeat count {repeats} must be at least 1.", repeats=repeats))
            repeats = None
        groups.append(_Group(folder, repeats, match.group(2) if match else "", images))
    loose = images_in(root)
    if loose and groups:
        check.add("error", root, tr("{count_loose} image(s) lie directly in the folder beside '<N>_<name>' "
                                    "subfolders; training refuses that: move them into a subfolder.",
                                    count_loose=len(loose)))
        groups.append(_Group(root, None, "", loose))
    elif loose:
        groups.append(_Group(root, default_repeats, "", loose))
    if not groups:
        check.add("error", root, tr("No images found (in the folder or its '<N>_<name>' subfolders)."))
    return groups


def _check_image(path: Path, resolution: int, check: _Check) -> int | None:
    """Size and shape findings; the image's perceptual hash, or None when it cannot be read."""
    try:
        image = load_rgb(path)  # decodes completely: truncated files fail here as they would in training
    except DatasetError as error:
        check.add("error", path, str(error))
        return None
    width, height = image.size
    if min(width, height) < resolution / 2:
        check.add("warning", path, tr("Is {width}×{height}: the shorter side is below half the training resolution "
                                      "({value} px at {resolution}), so it is upscaled and teaches blur.",
                                      width=width, height=height, value=resolution // 2, resolution=resolution))
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        short_side = round(resolution / math.sqrt(ratio))
        check.add("warning", path, tr("Is {width}×{height} (1:{ratio:.1f}): aspect-ratio buckets keep the pixel "
                                      "count near {resolution}×{resolution}, so its short side gets only about "
                                      "{short_side} px, and what lies beyond the most elongated bucket is cropped "
                                      "away. Crop it into parts or pad it nearer to square.", width=width,
                                      height=height, ratio=ratio, resolution=resolution, short_side=short_side))
    return perceptual_hash(image)


TokenCounter = Callable[[str], int]


def _check_caption(image_path: Path, group: _Group, count_tokens: TokenCounter | None, check: _Check) -> None:
    caption_path = find_caption(image_path)
    if caption_path is None:
        fallback = (tr("the folder's class token {class_token!r}", class_token=group.class_token) if group.class_token
                    else tr("an empty caption"))
        check.add("warning", image_path, tr("Has no caption ({stem}.txt); it trains with {fallback}.",
                                            stem=image_path.stem, fallback=fallback))
        return
    try:
        caption = read_caption(caption_path)
    except DatasetError as error:
        check.add("error", caption_path, str(error))
        return
    if not caption:
        check.add("warning", caption_path, tr("The caption is empty: the picture trains with no description."))
        return
    if count_tokens is not None:
        tokens = count_tokens(caption)
        if tokens > CLIP_CHUNK_TOKENS:
            check.add("warning", caption_path, tr("The caption is {tokens} CLIP tokens, over {CLIP_CHUNK_TOKENS}: "
                                                  "it is split into chunks of {CLIP_CHUNK_TOKENS} that the text "
                                                  "encoder reads separately. Shorten it or drop tags that repeat "
                                                  "each other.", tokens=tokens, CLIP_CHUNK_TOKENS=CLIP_CHUNK_TOKENS))


def _check_shared_captions(group: _Group, check: _Check) -> None:
    """`a.png` and `a.jpg` both read `a.txt`: one caption cannot describe two pictures."""
    images_by_caption: dict[Path, list[Path]] = {}
    for image in group.images:
        images_by_caption.setdefault(find_caption(image) or image.with_suffix(".txt"), []).append(image)
    for caption_path, images in images_by_caption.items():
        if len(images) > 1:
            names = " and ".join(image.name for image in images)
            check.add("warning", caption_path, tr("{names} share this caption file; rename one so each has its own.",
                                                  names=names))


def _check_orphan_captions(group: _Group, check: _Check) -> None:
    """Caption files no image uses, usually after an image was renamed."""
    used = {image.with_suffix(extension) for image in group.images for extension in CAPTION_EXTENSIONS}
    for path in sorted(group.folder.iterdir()):
        if path.suffix in CAPTION_EXTENSIONS and path.is_file() and path not in used and not path.name.startswith("."):
            check.add("info", path, tr("No image has this name, so this caption is not used."))


def _check_near_duplicates(hashes: list[tuple[Path, int]], root: Path, check: _Check) -> None:
    values = np.array([value for _, value in hashes], dtype=np.uint64)
    for index, (path, _) in enumerate(hashes):
        # Bits counted by unpacking bytes: np.bitwise_count needs numpy 2, the WebUI pins 1.26.
        differing = (values[index + 1 :] ^ values[index]).view(np.uint8).reshape(-1, 8)
        distances = np.unpackbits(differing, axis=1).sum(axis=1)
        for offset in np.flatnonzero(distances <= NEAR_DUPLICATE_BITS):
            other, bits = hashes[index + 1 + offset][0], int(distances[offset])
            check.add("warning", other, tr("Looks like a near-duplicate of {value} (perceptual hashes differ in "
                                           "{bits} of 64 bits): the pair trains twice as often as the rest. Keep "
                                           "the better one.", value=path.relative_to(root).as_posix(), bits=bits))


def _token_counter(tokenizer: Any, root: Path, check: _Check) -> TokenCounter | None:
    """A function counting a caption's CLIP tokens, or None (with a finding) when no tokenizer is available."""
    if tokenizer is None:
        try:
            tokenizer = clip_tokenizer()
        except (TrainToolsError, OSError) as error:
            check.add("info", root, tr("Caption lengths were not checked: {error}", error=error))
            return None
    return lambda caption: len(tokenizer.tokenize(caption))

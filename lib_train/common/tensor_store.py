"""A folder of cached tensors, one safetensors file per key: written atomically, checked when read, bounded.

An entry's file name is the sha256 of its key; the key itself and a checksum of the tensors are in the file's
metadata, so a truncated or damaged file (or one written for another key) is never returned as a hit.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .files import write_atomically
from .i18n import tr

ENTRY_SUFFIX = ".safetensors"
DEFAULT_LIMIT_BYTES = 4 * 2**30


class DamagedEntry(Exception):
    """A cache file that cannot be trusted; it has been deleted, the caller encodes the entry again."""


@dataclass
class CacheReport:
    """What a run took from the cache and what it had to encode, for the tab and the API status."""

    latents_reused: int = 0
    latents_total: int = 0
    captions_reused: int = 0
    captions_total: int = 0  # 0 when captions are not cached (text encoder trained, shuffled or dropped tags)
    masks_reused: int = 0
    masks_total: int = 0  # 0 without masked loss
    problems: list[str] = field(default_factory=list)  # damaged entries found and encoded again

    def summary(self) -> str:
        parts = [tr("{latents_reused} of {latents_total} latents from cache", latents_reused=self.latents_reused,
                    latents_total=self.latents_total)]
        if self.captions_total:
            parts.append(tr("{captions_reused} of {captions_total} captions from cache",
                            captions_reused=self.captions_reused, captions_total=self.captions_total))
        if self.masks_total:
            parts.append(tr("{masks_reused} of {masks_total} masks from cache", masks_reused=self.masks_reused,
                            masks_total=self.masks_total))
        text = ", ".join(parts) + "."
        if self.problems:
            text += (tr(" {count_problems} damaged cache file(s) encoded again:\n", count_problems=len(self.problems))
                     + "\n".join(f"- {problem}" for problem in self.problems))
        return text

    def read(self, store: TensorStore, key: str, what: str) -> dict[str, torch.Tensor] | None:
        """``store``'s entry, or None when it is missing or damaged; a damaged one is listed as ``what``."""
        try:
            return store.read(key)
        except DamagedEntry as damaged:
            self.problems.append(f"{damaged} ({what})")
            return None


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _metadata(data: bytes) -> dict[str, str]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]).get("__metadata__") or {}


class TensorStore:
    """Entries of named tensors under ``folder``, looked up by a text key."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path_for(self, key: str) -> Path:
        return self.folder / (hashlib.sha256(key.encode("utf-8")).hexdigest() + ENTRY_SUFFIX)

    def read(self, key: str) -> dict[str, torch.Tensor] | None:
        """The entry's tensors (on the CPU), None when there is none; raises DamagedEntry (and deletes the file)
        when the file is truncated, damaged or belongs to another key."""
        path = self.path_for(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            tensors = load_safetensors(data)
            metadata = _metadata(data)
            problem = (tr("it was written for another entry") if metadata.get("key") != key else
                       tr("its contents do not match their checksum") if metadata.get("sha256") != _digest(tensors) else "")
        except Exception as error:  # safetensors reports truncation as SafetensorError, a bad header as others
            problem = tr("it cannot be read ({kind}: {error})", kind=type(error).__name__, error=error)
        if problem:
            path.unlink(missing_ok=True)
            raise DamagedEntry(tr("{path} was damaged: {problem}", path=path, problem=problem))
        os.utime(path)  # its modification time is its last use: the size bound removes the least recently used
        return tensors

    def write(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
        data = save_safetensors(tensors, metadata={"key": key, "sha256": _digest(tensors)})
        write_atomically(self.path_for(key), data, overwrite=True)

    def entries(self) -> list[Path]:
        return sorted(self.folder.glob(f"*{ENTRY_SUFFIX}")) if self.folder.is_dir() else []


@dataclass(frozen=True)
class CacheSize:
    latents: int
    captions: int
    bytes: int
    masks: int = 0

    def describe(self) -> str:
        masks = tr(", {masks} masks", masks=self.masks) if self.masks else ""
        return tr("{latents} latents, {captions} captions{masks}, {size:.1f} MB", latents=self.latents,
                  captions=self.captions, masks=masks, size=self.bytes / 2**20)


class CacheFolder:
    """The cache of one training folder: ``latents/``, ``text/`` and ``masks/`` (masked loss), together at most
    ``limit_bytes``."""

    def __init__(self, folder: str | Path, limit_bytes: int = DEFAULT_LIMIT_BYTES):
        self.folder = Path(folder)
        self.limit_bytes = limit_bytes
        self.latents = TensorStore(self.folder / "latents")
        self.text = TensorStore(self.folder / "text")
        self.masks = TensorStore(self.folder / "masks")

    def size(self) -> CacheSize:
        latents, text, masks = self.latents.entries(), self.text.entries(), self.masks.entries()
        total = sum(_size_of(path) for path in (*latents, *text, *masks))
        return CacheSize(len(latents), len(text), total, len(masks))

    def keep_within_limit(self) -> int:
        """Remove the least recently used entries until the folder fits its limit; returns how many went."""
        paths = [path for store in self._stores() for path in store.entries()]
        entries = [(path.stat().st_mtime, _size_of(path), path) for path in paths]
        total, removed = sum(size for _, size, _ in entries), 0
        for _, size, path in sorted(entries, key=lambda entry: entry[0]):
            if total <= self.limit_bytes:
                break
            path.unlink(missing_ok=True)
            total, removed = total - size, removed + 1
        return removed

    def clear(self) -> int:
        """Delete every entry (and temporary files a killed process left); returns how many entries went."""
        removed = 0
        for store in self._stores():
            if not store.folder.is_dir():
                continue
            for path in store.folder.iterdir():
                if path.suffix == ENTRY_SUFFIX:
                    removed += 1
                if path.suffix in (ENTRY_SUFFIX, ".tmp"):
                    path.unlink(missing_ok=True)
        return removed

    def _stores(self) -> tuple[TensorStore, ...]:
        return self.latents, self.text, self.masks


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # removed meanwhile (another job's bound)
        return 0

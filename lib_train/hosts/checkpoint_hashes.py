"""Checkpoint hashes as the WebUI shows them."""

from __future__ import annotations

import hashlib
from pathlib import Path


def legacy_hash(path: Path) -> str:
    """A1111's old short hash: sha256 of the 64 KiB at offset 1 MiB, first 8 hex digits."""
    with open(path, "rb") as handle:
        handle.seek(0x100000)
        return hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]


def sha256_of_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()

"""What the two halves of the ComfyUI check share (plain torch, imported from both Python environments): a stream
of (LoRA module key, ΔW) records, and the deterministic stand-in base weight used where no checkpoint is loaded
(SDXL on the meta device)."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from typing import BinaryIO

import torch

_LENGTH = struct.Struct("<Q")


def write_record(stream: BinaryIO, key: str, delta: torch.Tensor) -> None:
    buffer = io.BytesIO()
    torch.save({"key": key, "delta": delta.detach().float().cpu().contiguous()}, buffer)
    stream.write(_LENGTH.pack(buffer.tell()))
    stream.write(buffer.getvalue())


def read_records(stream: BinaryIO) -> Iterator[tuple[str, torch.Tensor]]:
    while header := stream.read(_LENGTH.size):
        (length,) = _LENGTH.unpack(header)
        record = torch.load(io.BytesIO(stream.read(length)), weights_only=True)
        yield record["key"], record["delta"]


def stand_in_base_weight(lora_key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A random float32 weight seeded by the LoRA key: both sides build the same one for the same module, so
    DoRA (whose ΔW depends on the base weight) is compared on a real-looking weight without the checkpoint."""
    generator = torch.Generator().manual_seed(zlib.crc32(lora_key.encode()))
    return torch.randn(shape, generator=generator) * 0.02

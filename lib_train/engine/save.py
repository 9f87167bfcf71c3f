"""Writing LoRA files: names, atomic no-clobber writes, kohya metadata and hashes, WebUI sidecar."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as serialize

from ..common.errors import OutputError

_FORBIDDEN_NAME = re.compile(r'[\\/:*?"<>|\x00-\x1f]')
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def check_output_name(name: str) -> str:
    """A LoRA name becomes a file name and the alias in ``<lora:NAME:1>``: any script is fine (中文),
    path parts and the characters Windows or the prompt syntax reserve are not."""
    cleaned = name.strip()
    if not cleaned:
        raise OutputError("Give the LoRA a name.")
    if cleaned in (".", "..") or ".." in cleaned.split("/") or _FORBIDDEN_NAME.search(cleaned):
        raise OutputError(f"The name {name!r} cannot be used: it must not contain / \\ : * ? \" < > | or '..'.")
    if cleaned.startswith(".") or cleaned.endswith("."):
        raise OutputError(f"The name {name!r} cannot start or end with a dot.")
    if len(cleaned.encode("utf-8")) > 200:
        raise OutputError("The name is too long (at most 200 bytes).")
    return cleaned


@dataclass(frozen=True)
class OutputPlan:
    """Every file a run will write, known and checked before training starts."""

    folder: Path
    name: str
    epochs: int
    save_every_n_epochs: int
    overwrite: bool

    @classmethod
    def create(cls, folder: str | Path, name: str, epochs: int, save_every_n_epochs: int, overwrite: bool) -> "OutputPlan":
        plan = cls(Path(folder), check_output_name(name), epochs, save_every_n_epochs, overwrite)
        if plan.folder.exists() and not plan.folder.is_dir():
            raise OutputError(f"The output folder {plan.folder} is a file.")
        if not overwrite:
            existing = [p.name for p in plan.all_paths() if p.exists()]
            if existing:
                raise OutputError(f"{len(existing)} output file(s) already exist in {plan.folder}, e.g. {existing[0]}. "
                                  "Choose another name or allow overwriting.")
        return plan

    def saves_after_epoch(self, epoch: int) -> bool:
        return epoch == self.epochs or (self.save_every_n_epochs > 0 and epoch % self.save_every_n_epochs == 0)

    def stem(self, epoch: int) -> str:
        """``name-000002`` for intermediate epochs, ``name`` for the last one (each a unique alias)."""
        return self.name if epoch == self.epochs else f"{self.name}-{epoch:06d}"

    def lora_path(self, epoch: int) -> Path:
        return self.folder / f"{self.stem(epoch)}.safetensors"

    def sidecar_path(self, epoch: int) -> Path:
        return self.folder / f"{self.stem(epoch)}.json"

    def all_paths(self) -> list[Path]:
        epochs = [e for e in range(1, self.epochs + 1) if self.saves_after_epoch(e)]
        return [p for e in epochs for p in (self.lora_path(e), self.sidecar_path(e))]


def precalculated_hashes(state: dict[str, torch.Tensor], ss_metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya computes them on the ss_*-only serialisation:
    sha256 of the tensor bytes, and the A1111 legacy hash (sha256 of 64 KiB at 1 MiB, 8 hex digits)."""
    data = serialize(state, ss_metadata)
    header_length = struct.unpack("<Q", data[:8])[0]
    model_hash = hashlib.sha256(data[8 + header_length:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def write_lora(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str], overwrite: bool) -> None:
    """Serialise, hash, and write through a temporary name in the same folder, then rename."""
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    model_hash, legacy_hash = precalculated_hashes(state, ss_only)
    full = dict(metadata, sshs_model_hash=model_hash, sshs_legacy_hash=legacy_hash)
    write_atomically(path, serialize(state, full), overwrite)


def write_sidecar(path: Path, values: dict, overwrite: bool) -> None:
    text = json.dumps(values, ensure_ascii=False, indent=4) + "\n"
    write_atomically(path, text.encode("utf-8"), overwrite)


def write_atomically(path: Path, data: bytes, overwrite: bool) -> None:
    """Nobody ever sees a half-written file: the WebUI lists ``*.safetensors`` and the temporary
    name does not end so. Without ``overwrite`` an existing file is never replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(temporary, path)
            return
        try:
            os.link(temporary, path)  # atomic and fails if the name exists
        except FileExistsError:
            raise OutputError(f"{path.name} already exists in {path.parent}; it was not overwritten.") from None
        except OSError:  # file systems without hard links
            if path.exists():
                raise OutputError(f"{path.name} already exists in {path.parent}; it was not overwritten.") from None
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)

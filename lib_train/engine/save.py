"""Writing LoRA files: the run's output plan, kohya hashes, the WebUI sidecar (atomic no-clobber writes)."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as serialize

from ..common.errors import OutputError
from ..common.files import check_output_name, write_atomically
from ..common.i18n import tr

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class OutputPlan:
    """Every file a run will write, known and checked before training starts."""

    folder: Path
    name: str
    epochs: int
    save_every_n_epochs: int
    overwrite: bool

    first_epoch: int = 1  # a continued run writes the epochs after its saved state only

    @classmethod
    def create(cls, folder: str | Path, name: str, epochs: int, save_every_n_epochs: int, overwrite: bool,
               first_epoch: int = 1) -> "OutputPlan":
        plan = cls(Path(folder), check_output_name(name), epochs, save_every_n_epochs, overwrite, first_epoch)
        if plan.folder.exists() and not plan.folder.is_dir():
            raise OutputError(tr("The output folder {folder} is a file.", folder=plan.folder))
        if not overwrite:
            existing = [p.name for p in plan.all_paths() if p.exists()]
            if existing:
                raise OutputError(tr("{count_existing} output file(s) already exist in {folder}, e.g. {value}. "
                                     "Choose another name or allow overwriting.", count_existing=len(existing),
                                     folder=plan.folder, value=existing[0]))
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

    def extra_path(self, step: int) -> Path:
        """Save now's file: ``name-step000123``, a stem no epoch file has (nor the WebUI alias of one)."""
        return self.folder / f"{self.name}-step{step:06d}.safetensors"

    def all_paths(self) -> list[Path]:
        epochs = [e for e in range(self.first_epoch, self.epochs + 1) if self.saves_after_epoch(e)]
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


def copy_lora_as(source: Path, target: Path, metadata: dict[str, str], overwrite: bool) -> None:
    """Copy a LoRA under another stem. The WebUI takes the alias of ``<lora:ALIAS:w>`` from ``ss_output_name``
    and forbids an alias two files share, so a plain byte copy of ``x-000003`` to ``x`` would make both
    ``x-000003`` cards fall back to file names with a "Duplicate alias" warning. The header metadata follows the
    new stem instead; the tensors are loaded and written back unchanged. ``write_lora`` recomputes the sshs
    hashes: the model hash covers the tensor bytes only (so it stays the same), while the legacy hash covers
    bytes at 1 MiB that shift with the header's length. Writing a new file (not copying with its old mtime)
    also makes the WebUI re-read the metadata it caches by modification time."""
    renamed = dict(metadata, ss_output_name=target.stem)
    if "modelspec.title" in renamed:
        renamed["modelspec.title"] = target.stem
    write_lora(target, load_file(str(source)), renamed, overwrite)


def keep_final_as_epoch(folder: Path, name: str, epoch: int, session_id: int) -> Path | None:
    """A finished run trained longer: its final ``name.safetensors`` (epoch ``epoch``, this run's session) becomes
    the epoch file ``name-00000N`` with its card, so the new final does not replace it. Nothing to do (None) when
    the final is not that file."""
    final = folder / f"{name}.safetensors"
    if not final.is_file():
        return None
    with safe_open(str(final), "pt") as handle:
        metadata = dict(handle.metadata() or {})
    if metadata.get("ss_session_id") != str(session_id) or metadata.get("ss_epoch") != str(epoch):
        return None
    target = folder / f"{name}-{epoch:06d}.safetensors"
    card, target_card = final.with_suffix(".json"), target.with_suffix(".json")
    # Checked before anything is written: a name taken half-way would leave the final copied and not moved.
    for taken in (target, target_card):
        if taken.exists():
            raise OutputError(tr("{name} already exists in {parent}: the finished run's final file {final} becomes "
                                 "that epoch's file when training longer. Nothing was changed; move it away (or "
                                 "delete it) and continue again.", name=taken.name, parent=folder, final=final.name))
    copy_lora_as(final, target, metadata, overwrite=False)
    if card.exists():
        try:
            write_atomically(target_card, card.read_bytes(), overwrite=False)
        except BaseException:
            target.unlink(missing_ok=True)  # the final stays as it was, with its card
            raise
        card.unlink()
    final.unlink()
    return target

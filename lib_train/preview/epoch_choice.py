"""Choosing the best cell of the preview grid: its epoch becomes ``<name>.safetensors``, its picture the
Extra Networks preview, its weight the card's preferred weight."""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..common.errors import OutputError
from ..common.files import check_output_name, write_atomically
from ..common.i18n import tr
from ..engine.save import copy_lora_as, write_sidecar
from .grid_spec import WEIGHT_RANGE, EpochFile, epoch_files, epoch_suffix_pattern, read_lora_metadata


@dataclass
class ChoiceResult:
    final_path: Path
    chosen: EpochFile
    weight: float
    copied: bool  # False when the final file already held the chosen weights
    kept_final_as: Path | None  # the replaced final's own epoch, kept as an epoch file so nothing is lost
    deleted: list[Path]
    preview_path: Path
    sidecar_path: Path


def choose_epoch(lora_folder: str | Path, name: str, epoch_file: EpochFile, weight: float,
                 cell_image: Image.Image, delete_others: bool = False) -> ChoiceResult:
    """Make ``epoch_file`` the LoRA's ``<name>.safetensors``, with ``cell_image`` as its preview and ``weight``
    as its preferred weight. Everything is checked before the first write; only files of the same training run
    are replaced or deleted (same ``ss_session_id``, under a name Train Tools gives)."""
    folder = Path(lora_folder)
    name = check_output_name(name)
    low, high = WEIGHT_RANGE
    if not (math.isfinite(weight) and low <= weight <= high):
        raise OutputError(tr("The preferred weight {weight} is outside {low:g} to {high:g}.", weight=weight, low=low,
                             high=high))
    chosen_meta = _own_metadata(epoch_file.path, folder, name)
    final_path = folder / f"{name}.safetensors"
    is_final = final_path.exists() and os.path.samefile(final_path, epoch_file.path)
    final_meta = None
    if final_path.exists() and not is_final:
        final_meta = read_lora_metadata(final_path)
        if not _same_run(final_meta, chosen_meta, final_path.stem, name):
            raise OutputError(tr("{final_path} was not written by the training run of {name} (its metadata names "
                                 "another run or none), so it is not replaced. Move it away or rename it, then "
                                 "choose again.", final_path=final_path, name=epoch_file.path.name))
    sidecar_path = folder / f"{name}.json"
    final_card = _read_card(sidecar_path)
    # The card keeps what the user wrote on it; a missing one starts from the chosen epoch's card.
    card = dict(final_card if final_card is not None else _read_card(epoch_file.path.with_suffix(".json")) or {})
    keep_final = None
    if final_meta is not None and not delete_others:
        keep_final = _final_epoch_target(folder, name, final_path, final_meta)
    doomed = _other_run_files(folder, name, epoch_file, chosen_meta) if delete_others else []

    if keep_final is not None:
        copy_lora_as(final_path, keep_final, final_meta, overwrite=False)
        if final_card is not None:
            write_sidecar(keep_final.with_suffix(".json"), final_card, overwrite=False)
    if not is_final:
        copy_lora_as(epoch_file.path, final_path, chosen_meta, overwrite=True)
    card["preferred weight"] = weight
    write_sidecar(sidecar_path, card, overwrite=True)
    preview_path = folder / f"{name}.preview.png"
    write_atomically(preview_path, _png_bytes(cell_image), overwrite=True)
    deleted = []
    for path in doomed:
        for owned in (path, path.with_suffix(".json")):
            if owned.exists():
                owned.unlink()
                deleted.append(owned)
    return ChoiceResult(final_path, epoch_file, weight, not is_final, keep_final, deleted, preview_path,
                        sidecar_path)


def _own_metadata(path: Path, folder: Path, name: str) -> dict[str, str]:
    """The chosen file's metadata, once it is known to be one of this LoRA's files in this folder."""
    if not path.is_file():
        raise OutputError(tr("The chosen file {path} does not exist any more; refresh the grid.", path=path))
    if path.parent.resolve() != folder.resolve() or not _is_our_stem(path.stem, name):
        raise OutputError(tr("{path} is not one of the files of the LoRA '{name}' in {folder}.", path=path, name=name,
                             folder=folder))
    metadata = read_lora_metadata(path)
    if not metadata or "ss_session_id" not in metadata:
        raise OutputError(tr("{path} is not a LoRA file written by Train Tools (no training metadata).", path=path))
    return metadata


def _is_our_stem(stem: str, name: str) -> bool:
    return stem == name or epoch_suffix_pattern(name).fullmatch(stem) is not None


def _same_run(metadata: dict[str, str] | None, chosen_meta: dict[str, str], stem: str, name: str) -> bool:
    """A file is ours to replace or delete when it carries a name Train Tools gives and the chosen file's
    session id: kohya metadata alone would also match a LoRA trained elsewhere under the same name."""
    return (bool(metadata) and _is_our_stem(metadata.get("ss_output_name", ""), name) and _is_our_stem(stem, name)
            and metadata.get("ss_session_id") == chosen_meta["ss_session_id"])


def _final_epoch_target(folder: Path, name: str, final_path: Path, final_meta: dict[str, str]) -> Path | None:
    """Where the current final's weights must be kept before it is replaced: the last epoch only exists as
    ``<name>.safetensors``. None when an epoch file already holds the same tensors."""
    epoch = final_meta.get("ss_epoch", "")
    if not epoch.isdigit():
        raise OutputError(tr("{final_path} has no epoch in its metadata, so its weights cannot be kept as an epoch "
                             "file; choose with 'delete the other epochs' or move it away.", final_path=final_path))
    target = folder / f"{name}-{int(epoch):06d}.safetensors"
    if not target.exists():
        if target.with_suffix(".json").exists():
            raise OutputError(tr("{value} exists without its LoRA file; move it away so the weights of {name} can "
                                 "be kept as {name2}.", value=target.with_suffix('.json'), name=final_path.name,
                                 name2=target.name))
        return target
    if (read_lora_metadata(target) or {}).get("sshs_model_hash") == final_meta.get("sshs_model_hash"):
        return None
    raise OutputError(tr("{target} already exists with other weights than {name}; replacing the final file would "
                         "lose epoch {value}. Move one of them away first.", target=target, name=final_path.name,
                         value=int(epoch)))


def _other_run_files(folder: Path, name: str, chosen: EpochFile, chosen_meta: dict[str, str]) -> list[Path]:
    """The run's epoch files other than the chosen one; anything of another run or not ours is left alone."""
    return [f.path for f in epoch_files(folder, name)
            if not f.is_final and f.path.resolve() != chosen.path.resolve()
            and _same_run(read_lora_metadata(f.path), chosen_meta, f.path.stem, name)]


def _read_card(path: Path) -> dict | None:
    """A card file's values (the WebUI's ``<stem>.json``), None when there is none."""
    if not path.exists():
        return None
    try:
        values = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise OutputError(tr("{path} is not valid JSON ({error}); fix or delete it, then choose again.", path=path,
                             error=error)) from None
    if not isinstance(values, dict):
        raise OutputError(tr("{path} does not hold card data (a JSON object); fix or delete it.", path=path))
    return values


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()

"""The training state written beside the project after each saved epoch, and Continue from it.

A state holds everything the next optimizer step depends on: the network's tensors (float32, exact), each
optimizer's and schedule's state, the GradScaler, the random states (the noise generator, torch's own), the step
and epoch, the settings and a digest of every picture and caption. The data order needs no state of its own:
each epoch's order, flips and caption shuffles come from (seed, epoch) alone (``TrainingData.batches``). So a run
continued from epoch k steps exactly as the uninterrupted run did, and ends with the same tensors.

The file is read with torch's loader at ``weights_only=True``: tensors and plain values only, no code can run from
it. ``torch.serialization.load`` rather than ``torch.load``: the WebUI replaces ``torch.load`` with its own pickle
check, which refuses the archives torch 2 writes (their ``.format_version`` entry) and returns None.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..common.errors import ConfigError, OutputError
from ..common.i18n import N_, tr
from ..dataset.training_data import ImageRecord
from ..hosts.protocol import ModelFamily
from .config import TrainConfig

STATE_FORMAT = "train-tools-state/1"
# The network's and optimizer's layout: a state cannot be loaded into another one.
SHAPE_SETTINGS = ("network_type", "rank", "alpha", "conv_rank", "conv_alpha", "dora", "lokr_factor", "decompose_both",
                  "optimizer")
# Settings that change nothing the run computes (where files go, what the cards say).
NEUTRAL_SETTINGS = ("name", "train_dir", "output_dir", "state_dir", "initial_lora", "overwrite", "trigger_words",
                    "comment", "lr_finder_steps", "skip_unusable_files")


class ResumeChanged(ConfigError):
    """Continuing is possible, but not as the same run: the settings or the pictures changed. ``changes`` names them."""

    def __init__(self, message: str, changes: list[str]):
        super().__init__(message)
        self.changes = changes


@dataclass
class SavedRun:
    """A training state as read back."""

    path: Path
    epoch: int
    step: int
    family: str
    settings: dict[str, Any]
    dataset: dict[str, str]
    session_id: int
    started_at: float
    loss_history: list[tuple[int, float]]
    validation_history: list[tuple[int, int, float]]
    payload: dict[str, Any]  # network, optimizers, schedules, scaler, random states
    changes: list[str] = field(default_factory=list)  # what the continuation accepted to change


def state_path(state_dir: str | Path, name: str) -> Path:
    """The one state file of a project's run (the newest saved epoch replaces it)."""
    return Path(state_dir) / f"{name}.training-state.pt"


def dataset_digest(records: list[ImageRecord], root: str | Path, reg_root: str | Path = "") -> dict[str, str]:
    """Each picture (by its path in the training folder, a class picture by ``regularization/`` and its path in
    the regularization folder) with a digest of its bytes, its caption and repeats: enough to name what was
    added, removed or changed."""
    roots = {False: Path(root).resolve(), True: Path(reg_root).resolve() if str(reg_root).strip() else None}
    digest = {}
    for record in records:
        picture = hashlib.sha256(record.path.read_bytes()).hexdigest()[:16]
        caption = hashlib.sha256(record.caption.encode("utf-8")).hexdigest()[:16]
        name = record.path.resolve().relative_to(roots[record.is_reg]).as_posix()
        digest[f"regularization/{name}" if record.is_reg else name] = f"{picture} {caption} x{record.repeats}"
    return digest


def save_state(path: Path, run, *, family: ModelFamily, config: TrainConfig, dataset: dict[str, str], epoch: int,
               step: int, session_id: int, started_at: float, loss_history: list, validation_history: list) -> None:
    """Write the state through a temporary name, then rename: the previous state stays whole until the new one is
    complete, and a failed write (disk full) leaves it as it was."""
    payload = {
        "format": STATE_FORMAT, "family": family.value, "epoch": epoch, "step": step, "settings": config.to_dict(),
        "dataset": dataset, "session_id": session_id, "started_at": started_at,
        "loss_history": [list(entry) for entry in loss_history],
        "validation_history": [list(entry) for entry in validation_history],
        "network": run.network.kohya_state_dict(torch.float32),
        "optimizers": [optimizer.state_dict() for optimizer in run.optimizers],
        "schedules": [schedule.state_dict() for schedule in run.schedules],
        "scaler": run.scaler.state_dict() if run.scaler else None,
        "random": _random_states(run.generator),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(buffer.getbuffer())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        kept = tr(" The previous state (an earlier epoch) is kept unchanged.") if path.exists() else ""
        raise OutputError(tr("Could not write the training state of epoch {epoch} to {folder}: {error}. Free some "
                             "space there and Continue.{kept} The LoRA files saved so far are kept.", epoch=epoch,
                             folder=path.parent, error=error.strerror or error, kept=kept)) from None
    finally:
        temporary.unlink(missing_ok=True)


def load_state(path: Path) -> SavedRun:
    """The state at ``path``; a missing, damaged or foreign file is a message saying so."""
    if not path.is_file():
        raise ConfigError(tr("There is no training state to continue from ({path} does not exist): a run writes "
                             "one with each saved epoch. Train from the start, or start from one of its LoRA files.",
                             path=path))
    try:
        payload = torch.serialization.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated zip, a pickle error, bytes that are no torch file at all
        raise ConfigError(tr("The training state {path} is damaged and cannot be continued ({kind}). Train from "
                             "the start, or start from one of its LoRA files.", path=path,
                             kind=type(error).__name__)) from None
    needed = {"format", "family", "epoch", "step", "settings", "dataset", "network", "optimizers", "schedules",
              "random"}
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT or not needed <= set(payload):
        raise ConfigError(tr("{path} is not a training state of this version of Train Tools; it cannot be "
                             "continued.", path=path))
    return SavedRun(
        path=path, epoch=int(payload["epoch"]), step=int(payload["step"]), family=str(payload["family"]),
        settings=dict(payload["settings"]), dataset=dict(payload["dataset"]),
        session_id=int(payload.get("session_id", 0)), started_at=float(payload.get("started_at", 0.0)),
        loss_history=[(int(s), float(v)) for s, v in payload.get("loss_history", [])],
        validation_history=[(int(e), int(s), float(v)) for e, s, v in payload.get("validation_history", [])],
        payload=payload,
    )


def check_continuation(saved: SavedRun, config: TrainConfig, family: ModelFamily, dataset: dict[str, str],
                       accept_changes: bool) -> list[str]:
    """What differs from the saved run, named. A state of another model family or network layout, or one whose
    run has ended, is refused; other settings and the pictures may change only with ``accept_changes``."""
    if saved.family != family.value:
        raise ConfigError(tr("The training state {name} was made on a {family} model and the loaded model is "
                             "{loaded}: load the checkpoint it was trained on.", name=saved.path.name,
                             family=saved.family.upper(), loaded=family.value.upper()))
    current = config.to_dict()
    shape = [f"{key} {saved.settings.get(key)!r} → {current[key]!r}" for key in SHAPE_SETTINGS
             if saved.settings.get(key) != current[key]]
    if (saved.settings.get("text_encoder_lr", 0) > 0) != config.train_text_encoder:
        shape.append(tr("the text encoder trained → not trained") if not config.train_text_encoder
                     else tr("the text encoder not trained → trained"))
    if shape:
        raise ConfigError(tr("The training state holds a network of another shape than these settings ask for "
                             "({differences}): put them back to continue, or start a new run.",
                             differences="; ".join(shape)))
    if saved.epoch >= config.epochs:
        raise ConfigError(tr("The saved run has reached epoch {epoch} and Epochs is {epochs}: nothing is left to "
                             "train. To train longer, raise Epochs above {epoch} and Continue (the schedule then "
                             "spans the new length).", epoch=saved.epoch, epochs=config.epochs))
    changes = [f"{key}: {saved.settings.get(key)!r} → {value!r}" for key, value in current.items()
               if key not in NEUTRAL_SETTINGS and saved.settings.get(key) != value]
    changes += _data_changes(saved.dataset, dataset)
    if changes and not accept_changes:
        raise ResumeChanged(tr("The run saved at epoch {epoch} differs from what would continue it:\n{changes}\nPut "
                               "them back to continue the same run (bit-identical to an uninterrupted one), or "
                               "continue with these changes (accept_changes).", epoch=saved.epoch,
                               changes="\n".join(f"- {change}" for change in changes)), changes)
    return changes


def restore(run, saved: SavedRun, optimizer_arguments: dict[str, Any]) -> None:
    """Put the saved network, optimizers, schedules, scaler and random states into a freshly set-up run. What the
    settings give the optimizer (its learning rates, weight decay and ``optimizer_arguments``) stays the fresh
    run's: torch's ``load_state_dict`` would bring back the saved run's, so a learning rate changed on Continue
    would be named and accepted but not trained with. What the optimizer learned (moments, an adaptive step size)
    comes from the state."""
    payload = saved.payload
    configured = {"lr", "initial_lr", "weight_decay", *optimizer_arguments}
    settings = [[{key: group[key] for key in configured if key in group} for group in optimizer.param_groups]
                for optimizer in run.optimizers]
    try:
        run.network.load_kohya_state_dict(payload["network"])
    except ValueError as error:
        raise ConfigError(tr("The training state's network does not fit the loaded model: {error}.",
                             error=error)) from None
    if len(payload["optimizers"]) != len(run.optimizers):
        raise ConfigError(tr("The training state's optimizers do not fit these settings; start a new run."))
    try:
        for optimizer, state in zip(run.optimizers, payload["optimizers"]):
            optimizer.load_state_dict(state)
    except (ValueError, KeyError) as error:
        raise ConfigError(tr("The training state's optimizer does not fit these settings ({error}); put the LoRA+ "
                             "ratios and text-encoder setting back, or start a new run.", error=error)) from None
    for optimizer, groups in zip(run.optimizers, settings):
        for group, values in zip(optimizer.param_groups, groups):
            group.update(values)
    for schedule, state in zip(run.schedules, payload["schedules"]):
        # The schedule's shape (warmup, length) and base rates come from the current settings; only its position
        # is restored, and the rate of the next step is the one the schedule gives at that position.
        schedule.load_state_dict(state)
        schedule.base_lrs = [group["initial_lr"] for group in schedule.optimizer.param_groups]
        rates = [base * factor(schedule.last_epoch) for base, factor in zip(schedule.base_lrs, schedule.lr_lambdas)]
        for group, rate in zip(schedule.optimizer.param_groups, rates):
            group["lr"] = rate
        schedule._last_lr = rates
    if run.scaler is not None and payload.get("scaler"):
        run.scaler.load_state_dict(payload["scaler"])
    _set_random_states(run.generator, payload["random"])


def _random_states(generator: torch.Generator) -> dict[str, Any]:
    states = {"noise": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_random_states(generator: torch.Generator, states: dict[str, Any]) -> None:
    generator.set_state(states["noise"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def _data_changes(saved: dict[str, str], current: dict[str, str]) -> list[str]:
    added = sorted(set(current) - set(saved))
    removed = sorted(set(saved) - set(current))
    changed = sorted(path for path in set(saved) & set(current) if saved[path] != current[path])
    lines = []
    for line, paths in ((N_("pictures added: {paths}"), added), (N_("pictures removed: {paths}"), removed),
                        (N_("pictures changed (picture, caption or repeats): {paths}"), changed)):
        if paths:
            shown = ", ".join(paths[:5]) + (tr(" and {count} more", count=len(paths) - 5) if len(paths) > 5 else "")
            lines.append(tr(line, paths=shown))
    return lines

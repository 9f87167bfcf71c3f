"""Presets: named sets of Train page settings — four built in for a first LoRA, and the user's own, saved as JSON
in the extension's data folder.

A preset holds only what it changes: applying it sets every training setting to TrainConfig's default, then the
defaults of the preset's model family (SDXL: 1024², UNet only, …, as ``family_overrides``), then the preset's
own values. The numbers of the built-in ones, and where each comes from, are in README.md (*Presets*).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from ..common.errors import ConfigError
from ..common.files import check_output_name, write_atomically
from ..common.i18n import tr
from ..hosts.protocol import ModelFamily
from .config import TrainConfig
from .family_defaults import family_overrides

# What a preset may set: the training settings, not the project (name, folders, files, trigger words) nor file
# handling.
NOT_IN_PRESETS = frozenset({"name", "train_dir", "output_dir", "state_dir", "reg_dir", "initial_lora", "trigger_words",
                            "overwrite", "comment", "extra"})
PRESET_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in NOT_IN_PRESETS)
FAMILIES = {family.value: family for family in ModelFamily}


@dataclass(frozen=True)
class Preset:
    name: str
    family: ModelFamily
    settings: dict[str, Any]  # only the values it changes
    builtin: bool = False

    def values(self, on_cuda: bool, has_bitsandbytes: bool) -> dict[str, Any]:
        """Every preset setting: TrainConfig's default < the family's defaults < the preset's values."""
        return self.values_over(family_overrides(self.family, on_cuda, has_bitsandbytes))

    def values_over(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """Every preset setting: TrainConfig's default < ``defaults`` (the family's, and the WebUI's device's) < the
        preset's values."""
        merged = {**dataclasses.asdict(TrainConfig()), **defaults, **self.settings}
        return {key: merged[key] for key in PRESET_KEYS}

    def changed_outside(self, keys) -> list[str]:
        """The settings this preset changes from TrainConfig's defaults that are not among ``keys`` (the fields of
        a form that cannot show them), by name."""
        base = dataclasses.asdict(TrainConfig())
        return sorted(key for key, value in self.settings.items() if key not in keys and value != base[key])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family.value, "builtin": self.builtin,
                "settings": dict(self.settings)}


_CHARACTER = {"repeats": 10, "epochs": 10, "save_every_n_epochs": 1, "shuffle_caption": True, "keep_tokens": 1,
              "min_snr_gamma": 5.0, "lr_warmup_ratio": 0.05}
_STYLE = {"repeats": 5, "epochs": 10, "save_every_n_epochs": 1, "shuffle_caption": True, "keep_tokens": 0,
          "caption_tag_dropout_rate": 0.1, "flip_aug": True, "min_snr_gamma": 5.0, "lr_warmup_ratio": 0.05}

BUILTIN: tuple[Preset, ...] = (
    Preset("SD1.5 character", ModelFamily.SD1, {
        **_CHARACTER, "resolution": 512, "rank": 32, "alpha": 16.0, "unet_lr": 1e-4, "text_encoder_lr": 5e-5,
        "optimizer": "AdamW", "lr_scheduler": "cosine", "batch_size": 1}, builtin=True),
    Preset("SD1.5 style", ModelFamily.SD1, {
        **_STYLE, "resolution": 512, "network_type": "locon", "rank": 16, "alpha": 8.0, "conv_rank": 8,
        "conv_alpha": 4.0, "unet_lr": 1e-4, "text_encoder_lr": 0.0, "optimizer": "AdamW",
        "lr_scheduler": "cosine", "batch_size": 1}, builtin=True),
    # SDXL: the family's defaults (1024², buckets 512–2048, UNet only, checkpointing, AdamW8bit on CUDA) stay;
    # captions are not shuffled there, so each is encoded once and the text encoders leave the GPU.
    Preset("SDXL character", ModelFamily.SDXL, {
        **_CHARACTER, "repeats": 2, "shuffle_caption": False, "keep_tokens": 0, "rank": 16, "alpha": 8.0,
        "unet_lr": 1e-4, "lr_scheduler": "constant_with_warmup", "lr_warmup_ratio": 0.0, "lr_warmup_steps": 100},
        builtin=True),
    Preset("SDXL style", ModelFamily.SDXL, {
        **_STYLE, "repeats": 2, "shuffle_caption": False, "caption_tag_dropout_rate": 0.0, "network_type": "locon",
        "rank": 8, "alpha": 4.0, "conv_rank": 16, "conv_alpha": 8.0, "unet_lr": 3e-4,
        "lr_scheduler": "cosine_with_restarts", "lr_scheduler_num_cycles": 3, "min_snr_gamma": 8.0},
        builtin=True),
)


def check_settings(settings: dict[str, Any], family: ModelFamily) -> dict[str, Any]:
    """The preset settings as TrainConfig reads them (numbers converted), refused like a training would be: on the
    defaults of the preset's family, which applying it gives the settings it leaves out (SDXL: buckets 512-2048)."""
    if not isinstance(settings, Mapping):  # an API body's "settings" may be a list or a string
        raise ConfigError(tr("A preset's settings must be a mapping of setting names to values, not {kind}.",
                             kind=type(settings).__name__))
    outside = sorted(set(settings) & NOT_IN_PRESETS)
    if outside:
        raise ConfigError(tr("A preset holds training settings only, not {keys}.", keys=", ".join(outside)))
    given = {**family_overrides(family, on_cuda=False, has_bitsandbytes=False), **settings}
    config = TrainConfig.from_dict({**given, "name": "preset", "train_dir": ".", "output_dir": "."}).validate()
    values = dataclasses.asdict(config)
    return {key: values[key] for key in settings}


class PresetStore:
    """The built-in presets and the user's, one ``<name>.json`` each in ``folder``."""

    def __init__(self, folder: Path):
        self.folder = folder

    def all(self) -> list[Preset]:
        return [*BUILTIN, *self._saved()]

    def get(self, name: str) -> Preset:
        for preset in self.all():
            if preset.name == name:
                return preset
        raise ConfigError(tr("There is no preset named {name!r}; presets: {names}.", name=name,
                             names=", ".join(p.name for p in self.all())))

    def save(self, name: str, family: str, settings: dict[str, Any]) -> Preset:
        """Write (or replace) the user's preset ``name``; a built-in name is refused."""
        if not name.strip():
            raise ConfigError(tr("Give the preset a name."))
        name = check_output_name(name)  # it becomes a file name
        if any(preset.name == name for preset in BUILTIN):
            raise ConfigError(tr("{name} is a built-in preset: save yours under another name.", name=name))
        if family not in FAMILIES:
            raise ConfigError(tr("The preset's model family must be one of {families}, not {family!r}.",
                                 families=", ".join(FAMILIES), family=family))
        preset = Preset(name, FAMILIES[family], check_settings(settings, FAMILIES[family]))
        data = json.dumps(preset.to_dict(), indent=1, ensure_ascii=False).encode("utf-8")
        write_atomically(self.folder / f"{name}.json", data, overwrite=True)
        return preset

    def delete(self, name: str) -> None:
        preset = self.get(name)
        if preset.builtin:
            raise ConfigError(tr("{name} is a built-in preset and cannot be deleted.", name=name))
        (self.folder / f"{preset.name}.json").unlink(missing_ok=True)

    def _saved(self) -> list[Preset]:
        """The user's presets, by name; a damaged file is skipped rather than hiding the others."""
        found = []
        for path in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                family = FAMILIES[data["family"]]
                found.append(Preset(str(data["name"]), family, check_settings(data["settings"], family)))
            except (OSError, ValueError, KeyError, TypeError, ConfigError):
                continue
        return found

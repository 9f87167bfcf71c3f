"""The epoch × weight preview grid: what to render (prompt, axes, cells) and which epoch files a LoRA has."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from ..common.errors import ConfigError
from ..common.i18n import tr
from ..hosts.prompt_syntax import escape_caption

MAX_CELLS = 100  # about 3-5 minutes of SD1.5 at 512 px on a mid-range GPU; more is rarely looked at
WEIGHT_RANGE = (-2.0, 3.0)  # beyond this a LoRA only produces noise; negative weights are used on purpose
SEED_RANGE = (0, 2**32 - 1)
THIRD_AXES = ("seed", "cfg")
DEFAULT_TAG_COUNT = 8


def parse_number_list(text: str, label: str = "values", integers: bool = False) -> list:
    """``"0.4, 0.6, 0.8,1"`` -> ``[0.4, 0.6, 0.8, 1.0]``; commas and/or spaces separate the numbers.

    ``label`` names the field in messages ("weights", "seeds"). Duplicates are refused: they would
    only render the same row twice.
    """
    parts = [part for part in re.split(r"[,\s;]+", text.strip()) if part]
    if not parts:
        raise ConfigError(tr("Give at least one number for the {label}.", label=label))
    numbers: list = []
    for part in parts:
        try:
            number = int(part) if integers else float(part)
        except ValueError:
            kind = tr("a whole number") if integers else tr("a number")
            raise ConfigError(tr("'{part}' in the {label} is not {kind}.", part=part, label=label, kind=kind)) from None
        if not math.isfinite(number):
            raise ConfigError(tr("'{part}' in the {label} is not a finite number.", part=part, label=label))
        if number in numbers:
            raise ConfigError(tr("{part} appears twice in the {label}.", part=part, label=label))
        numbers.append(number)
    return numbers


def read_lora_metadata(path: Path) -> dict[str, str] | None:
    """The safetensors header metadata, ``{}`` when there is none, None when the file is not readable safetensors."""
    try:
        with safe_open(str(path), "pt") as handle:
            return dict(handle.metadata() or {})
    except Exception:  # safetensors reports bad headers with its own error type; OSError for unreadable files
        return None


@dataclass(frozen=True)
class EpochFile:
    """One saved LoRA of a run; the final ``<name>.safetensors`` has ``is_final``."""

    epoch: int
    path: Path
    is_final: bool

    @property
    def label(self) -> str:
        return tr("final") if self.is_final else tr("epoch {epoch}", epoch=self.epoch)

    @property
    def alias(self) -> str:
        """The name in ``<lora:ALIAS:w>``: the file stem, which the WebUI registers for every file."""
        return self.path.stem


def epoch_suffix_pattern(name: str) -> re.Pattern:
    """``<name>-000003``: the stem Train Tools (and kohya) gives an intermediate epoch's file."""
    return re.compile(re.escape(name) + r"-(\d{6})")


def epoch_files(lora_folder: str | Path, name: str) -> list[EpochFile]:
    """The LoRA's files in ``lora_folder`` ordered by epoch, the final one after an epoch file of the same epoch.

    The epoch comes from ``ss_epoch``, else from the ``-NNNNNN`` suffix. A final file without ``ss_epoch``
    counts as the epoch after the last one found. Both are kept when the final holds the same weights as an
    epoch file (after a choice), so the grid can show that they match.
    """
    folder = Path(lora_folder)
    pattern = epoch_suffix_pattern(name)
    found: list[EpochFile] = []
    final_path = None
    for path in sorted(folder.glob("*.safetensors")):
        if path.stem == name:
            final_path = path
            continue
        match = pattern.fullmatch(path.stem)
        if match:
            found.append(EpochFile(_metadata_epoch(path) or int(match.group(1)), path, is_final=False))
    if final_path is not None:
        fallback = max((f.epoch for f in found), default=0) + 1
        found.append(EpochFile(_metadata_epoch(final_path) or fallback, final_path, is_final=True))
    return sorted(found, key=lambda f: (f.epoch, f.is_final))


def _metadata_epoch(path: Path) -> int | None:
    value = (read_lora_metadata(path) or {}).get("ss_epoch", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def default_prompt(trigger_words: str, tag_frequency: Mapping[str, Mapping[str, int]],
                   count: int = DEFAULT_TAG_COUNT) -> str:
    """The trigger words, then the ``count`` tags most frequent in the captions (``ss_tag_frequency``:
    {folder: {tag: images}}) among those shared by several pictures, so the preview shows the subject as trained. Tags already in the
    trigger words are skipped; parentheses in tags are escaped so the prompt does not read them as emphasis."""
    totals: Counter[str] = Counter()
    for tags in tag_frequency.values():
        totals.update(tags)
    triggers = [word.strip() for word in trigger_words.split(",") if word.strip()]
    taken = {word.lower() for word in triggers}
    # Typical means shared: a tag on a single picture ("picture 3") says nothing about the subject. most_common
    # keeps first-seen order among equal counts, i.e. the captions' own order.
    top = max(totals.values(), default=0)
    shared = min(top, max(2, math.ceil(top / 4)))
    typical = [tag for tag, n in totals.most_common() if n >= shared and tag.lower() not in taken][:count]
    return ", ".join(triggers + [escape_caption(tag) for tag in typical])


@dataclass(frozen=True)
class GridCell:
    """One picture of the grid: its position (x = weight, y = epoch, z = third axis) and how to render it."""

    ix: int
    iy: int
    iz: int
    epoch: EpochFile
    weight: float
    seed: int
    cfg_scale: float


@dataclass
class GridSpec:
    """What the grid renders. ``seeds`` holds one seed, or the third axis' values when ``third_axis`` is
    "seed"; ``cfg_values`` are the third axis' values when it is "cfg" (``cfg_scale`` is used otherwise)."""

    prompt: str
    negative_prompt: str = ""
    sampler: str = "Euler a"
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    seeds: list[int] = field(default_factory=lambda: [1234])
    weights: list[float] = field(default_factory=lambda: [0.4, 0.6, 0.8, 1.0])
    epochs: list[int] | None = None  # None: every epoch file
    third_axis: str | None = None
    cfg_values: list[float] = field(default_factory=list)

    def validate(self) -> "GridSpec":
        """Raise ConfigError naming the first bad setting; return self for chaining."""

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(bool(self.prompt.strip()), tr("Give the preview prompt."))
        need(bool(self.sampler.strip()), tr("Choose a sampler."))
        need(1 <= self.steps <= 150, tr("Steps must be between 1 and 150 (got {steps}).", steps=self.steps))
        need(math.isfinite(self.cfg_scale) and 1 <= self.cfg_scale <= 30,
             tr("CFG scale must be between 1 and 30 (got {cfg_scale}).", cfg_scale=self.cfg_scale))
        for label, size in ((tr("Width"), self.width), (tr("Height"), self.height)):
            need(64 <= size <= 2048 and size % 8 == 0,
                 tr("{label} must be a multiple of 8 between 64 and 2048 (got {size}).", label=label, size=size))
        need(bool(self.weights), tr("Give at least one Lora weight."))
        low, high = WEIGHT_RANGE
        for weight in self.weights:
            need(math.isfinite(weight) and low <= weight <= high,
                 tr("Lora weight {weight:g} is outside {low:g} to {high:g}.", weight=weight, low=low, high=high))
        need(self.epochs is None or len(self.epochs) > 0, tr("Choose at least one epoch (or all of them)."))
        need(self.third_axis in (None, *THIRD_AXES),
             tr("The third axis must be none, seed or cfg (got {third_axis!r}).", third_axis=self.third_axis))
        need(bool(self.seeds), tr("Give a seed."))
        for seed in self.seeds:
            need(SEED_RANGE[0] <= seed <= SEED_RANGE[1],
                 tr("Seed {seed} must be between 0 and {value}: a random seed (-1) would give every cell different "
                    "noise, and the cells would no longer compare the LoRA alone.", seed=seed, value=SEED_RANGE[1]))
        need(self.third_axis == "seed" or len(self.seeds) == 1,
             tr("{count_seeds} seeds need the third axis set to seed.", count_seeds=len(self.seeds)))
        if self.third_axis == "cfg":
            need(bool(self.cfg_values), tr("Give the CFG scales of the third axis."))
            for value in self.cfg_values:
                need(math.isfinite(value) and 1 <= value <= 30, tr("CFG scale {value:g} is outside 1 to 30.",
                                                                   value=value))
        else:
            need(not self.cfg_values, tr("CFG scales were given but the third axis is not cfg."))
        if self.epochs is not None:
            self._check_cell_count(len(self.epochs))
        return self

    def z_values(self) -> list:
        if self.third_axis == "seed":
            return list(self.seeds)
        if self.third_axis == "cfg":
            return list(self.cfg_values)
        return [None]

    def select_epochs(self, available: list[EpochFile]) -> list[EpochFile]:
        """The rows of the grid: the requested epochs (a final file with the same epoch included), or all."""
        if not available:
            raise ConfigError(tr("This LoRA has no saved files to compare."))
        if self.epochs is None:
            chosen = list(available)
        else:
            known = {f.epoch for f in available}
            missing = [e for e in self.epochs if e not in known]
            if missing:
                raise ConfigError(tr("No file for epoch {value}; saved epochs: {value2}.",
                                     value=', '.join(map(str, missing)),
                                     value2=', '.join(str(e) for e in sorted(known))))
            chosen = [f for f in available if f.epoch in self.epochs]
        self._check_cell_count(len(chosen))
        return chosen

    def cells(self, available: list[EpochFile]) -> Iterator[GridCell]:
        """Every cell in X/Y/Z order (weights vary fastest, then epochs, then the third axis)."""
        rows = self.select_epochs(available)
        for iz, z in enumerate(self.z_values()):
            seed = z if self.third_axis == "seed" else self.seeds[0]
            cfg_scale = z if self.third_axis == "cfg" else self.cfg_scale
            for iy, epoch in enumerate(rows):
                for ix, weight in enumerate(self.weights):
                    yield GridCell(ix, iy, iz, epoch, weight, seed, cfg_scale)

    def axis_labels(self, rows: list[EpochFile]) -> tuple[list[str], list[str], list[str] | None]:
        """Labels for X (weights), Y (the given epoch rows) and Z (None without a third axis)."""
        x_labels = [tr("weight: {weight:g}", weight=w) for w in self.weights]
        y_labels = [row.label for row in rows]
        if self.third_axis is None:
            return x_labels, y_labels, None
        if self.third_axis == "seed":
            return x_labels, y_labels, [tr("seed: {seed}", seed=seed) for seed in self.seeds]
        return x_labels, y_labels, [f"CFG: {value:g}" for value in self.cfg_values]

    def prompt_for(self, cell: GridCell) -> str:
        return f"{self.prompt} <lora:{cell.epoch.alias}:{cell.weight:g}>"

    def _check_cell_count(self, rows: int) -> None:
        depth = len(self.z_values())
        total = len(self.weights) * rows * depth
        if total > MAX_CELLS:
            shape = tr("{weights} weights × {rows} epochs", weights=len(self.weights), rows=rows)
            if self.third_axis:
                axis = tr("seeds") if self.third_axis == "seed" else tr("CFG scales")
                shape += tr(" × {depth} {axis}", depth=depth, axis=axis)
            raise ConfigError(tr("The grid would have {total} cells ({shape}); at most {MAX_CELLS}. Remove some "
                                 "weights, epochs or third-axis values.", total=total, shape=shape,
                                 MAX_CELLS=MAX_CELLS))

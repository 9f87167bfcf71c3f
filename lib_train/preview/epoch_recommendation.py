"""★ The recommended epoch: the saved file with the lowest validation loss (``ss_validation_loss``), and whether the
loss was still falling at the last epoch (then training longer would likely help). Epochs whose loss is NaN or
infinite are left out of the comparison and named, never dropped silently."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..common.i18n import N_, tr
from .grid_spec import EpochFile, read_lora_metadata

MARK = "★"  # in the page's text; the grid's labels are drawn in the WebUI's Roboto, which has no ★
GRID_MARK = N_("(lowest validation loss)")  # shown through tr(), in the language the grid's labels use


@dataclass(frozen=True)
class Recommendation:
    file: EpochFile | None  # None: no epoch to recommend, as losses that are not numbers left fewer than two
    loss: float | None
    losses: dict[int, float]  # epoch → validation loss, for every file that has a finite one
    still_falling: bool  # the lowest loss is the last epoch's: the curve had not turned yet
    not_finite: tuple[int, ...] = ()  # epochs whose validation loss is NaN or infinite (left out of the comparison)

    def explain(self) -> str:
        epochs = ", ".join(str(epoch) for epoch in self.not_finite)
        if self.file is None:
            return tr("No {mark} epoch: the validation loss of epoch(s) {epochs} is not a number (NaN or infinite), "
                      "which leaves fewer than two epochs to compare. The network probably diverged (a learning rate "
                      "too high, or an fp16 overflow): check those files' pictures before using them.", mark=MARK,
                      epochs=epochs)
        text = tr("{mark} {label}: the lowest validation loss ({loss:.5f}) of the {count} saved epochs.", mark=MARK,
                  label=self.file.label, loss=self.loss, count=len(self.losses))
        if self.not_finite:
            text += tr(" The validation loss of epoch(s) {epochs} is not a number (NaN or infinite), so they are "
                       "left out: the network probably diverged there (a learning rate too high, or an fp16 "
                       "overflow).", epochs=epochs)
        if self.still_falling:
            text += tr(" The loss was still falling at the last epoch: training longer may help (raise Epochs and "
                       "Continue).")
        return text

    def to_dict(self) -> dict:
        return {"epoch": self.file.epoch if self.file else None, "file": str(self.file.path) if self.file else None,
                "validation_loss": self.loss, "still_falling": self.still_falling, "message": self.explain(),
                "not_finite_epochs": list(self.not_finite),
                # JSON keys are text: the WebUI's API encoder (orjson) refuses others.
                "losses": {str(epoch): loss for epoch, loss in self.losses.items()}}


def recommend_epoch(files: list[EpochFile]) -> Recommendation | None:
    """The file of lowest validation loss (the earlier epoch on a tie, an epoch file before the final of the same
    epoch); None when fewer than two epochs carry one (nothing to compare: a run without validation, or of
    another trainer). Losses that are NaN or infinite are left out and named in ``not_finite``; when they leave
    fewer than two, the answer has no file and says so."""
    scored: list[tuple[float, EpochFile]] = []
    not_finite: set[int] = set()
    for file in files:
        value = (read_lora_metadata(file.path) or {}).get("ss_validation_loss", "")
        try:
            loss = float(value)
        except ValueError:
            continue
        if math.isfinite(loss):
            scored.append((loss, file))
        else:
            not_finite.add(file.epoch)
    losses = {file.epoch: loss for loss, file in scored}
    broken = tuple(sorted(not_finite - set(losses)))
    if len(losses) < 2:
        return Recommendation(None, None, losses, False, broken) if broken else None
    loss, best = min(scored, key=lambda item: (item[0], item[1].epoch, item[1].is_final))
    # Still falling only when the best is the last epoch of all: a last epoch that broke is no reason to train on.
    return Recommendation(best, loss, losses, still_falling=best.epoch == max([*losses, *broken]), not_finite=broken)


def marked_labels(rows: list[EpochFile], labels: list[str], recommendation: Recommendation | None) -> list[str]:
    """The grid's epoch labels with the recommended row marked."""
    if recommendation is None or recommendation.file is None:
        return labels
    return [f"{label} {tr(GRID_MARK)}" if row.path == recommendation.file.path else label
            for row, label in zip(rows, labels)]

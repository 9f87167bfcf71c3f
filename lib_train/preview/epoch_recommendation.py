"""★ The recommended epoch: the saved file with the lowest validation loss (``ss_validation_loss``), and whether the
loss was still falling at the last epoch (then training longer would likely help)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..common.i18n import N_, tr
from .grid_spec import EpochFile, read_lora_metadata

MARK = "★"  # in the page's text; the grid's labels are drawn in the WebUI's Roboto, which has no ★
GRID_MARK = N_("(lowest validation loss)")  # shown through tr(), in the language the grid's labels use


@dataclass(frozen=True)
class Recommendation:
    file: EpochFile
    loss: float
    losses: dict[int, float]  # epoch → validation loss, for every file that has one
    still_falling: bool  # the lowest loss is the last epoch's: the curve had not turned yet

    def explain(self) -> str:
        text = tr("{mark} {label}: the lowest validation loss ({loss:.5f}) of the {count} saved epochs.", mark=MARK,
                  label=self.file.label, loss=self.loss, count=len(self.losses))
        if self.still_falling:
            text += tr(" The loss was still falling at the last epoch: training longer may help (raise Epochs and "
                       "Continue).")
        return text

    def to_dict(self) -> dict:
        return {"epoch": self.file.epoch, "file": str(self.file.path), "validation_loss": self.loss,
                "still_falling": self.still_falling, "message": self.explain(),
                # JSON keys are text: the WebUI's API encoder (orjson) refuses others.
                "losses": {str(epoch): loss for epoch, loss in self.losses.items()}}


def recommend_epoch(files: list[EpochFile]) -> Recommendation | None:
    """The file of lowest validation loss (the earlier epoch on a tie, an epoch file before the final of the same
    epoch); None when fewer than two epochs carry one (nothing to compare: a run without validation, or of
    another trainer)."""
    scored: list[tuple[float, EpochFile]] = []
    for file in files:
        value = (read_lora_metadata(file.path) or {}).get("ss_validation_loss", "")
        try:
            loss = float(value)
        except ValueError:
            continue
        if math.isfinite(loss):
            scored.append((loss, file))
    losses = {file.epoch: loss for loss, file in scored}
    if len(losses) < 2:
        return None
    loss, best = min(scored, key=lambda item: (item[0], item[1].epoch, item[1].is_final))
    return Recommendation(best, loss, losses, still_falling=best.epoch == max(losses))


def marked_labels(rows: list[EpochFile], labels: list[str], recommendation: Recommendation | None) -> list[str]:
    """The grid's epoch labels with the recommended row marked."""
    if recommendation is None:
        return labels
    return [f"{label} {tr(GRID_MARK)}" if row.path == recommendation.file.path else label
            for row, label in zip(rows, labels)]

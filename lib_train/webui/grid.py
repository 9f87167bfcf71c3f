"""A preview grid of a trained LoRA inside the WebUI: render every cell, save the cells with their infotext,
the labelled grid and an index that maps a click on the grid back to its epoch file, weight and picture."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..common.files import png_bytes, write_atomically
from ..common.i18n import ENGLISH, current_language, language_scope, tr
from ..engine.network import LoRANetwork
from ..preview.epoch_recommendation import Recommendation, marked_labels
from ..preview.grid_image import GridLayout, compose_grid, default_label_font, font_draws, label_font_size
from ..preview.grid_spec import EpochFile, GridSpec
from .grid_render import RenderSettings, WebUIGridRenderer, ZValue
from .host import WebUI, WebUIHost

INDEX_NAME = "grid.json"


@dataclass
class GridRequest:
    name: str  # the LoRA (and project) name
    spec: GridSpec
    rows: list[EpochFile]  # the grid's epochs, top to bottom
    out_dir: Path  # a new folder under the project's grids/
    recommended: Recommendation | None = None  # its row is marked ★


@dataclass
class GridResult:
    grid_path: Path | None  # None when stopped before any cell
    cell_paths: list[Path]
    complete: bool


def new_grid_folder(grids_dir: Path) -> Path:
    """A fresh folder per grid, named by time so the list sorts by age."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, n = grids_dir / stamp, 1
    while folder.exists():
        n += 1
        folder = grids_dir / f"{stamp}-{n}"
    return folder


def render_grid(webui: WebUI, host: WebUIHost, request: GridRequest,
                on_batch: Callable[[int, int, str], None], stop_requested: Callable[[], bool]) -> GridResult:
    spec = request.spec
    settings = RenderSettings(spec.prompt, spec.negative_prompt, spec.sampler, spec.steps, spec.width, spec.height)
    z_values = [ZValue(seed=z if spec.third_axis == "seed" else spec.seeds[0],
                       cfg_scale=z if spec.third_axis == "cfg" else spec.cfg_scale) for z in spec.z_values()]
    renderer = WebUIGridRenderer(webui, host, on_batch=on_batch, stop_requested=stop_requested)
    cells = renderer.render(settings, [row.path for row in request.rows], spec.weights, z_values,
                            network_for=lambda state: LoRANetwork.for_kohya_state_dict(host, state))
    if not cells:
        return GridResult(None, [], False)

    out = request.out_dir
    (out / "cells").mkdir(parents=True, exist_ok=True)
    entries, cell_paths = [], []
    for (ix, iy, iz), cell in sorted(cells.items(), key=lambda item: (item[0][2], item[0][1], item[0][0])):
        row, z = request.rows[iy], z_values[iz]
        path = out / "cells" / f"{row.path.stem}_w{spec.weights[ix]:g}_seed{z.seed}_cfg{z.cfg_scale:g}.png"
        write_atomically(path, png_bytes(cell.image, cell.infotext), overwrite=False)
        cell_paths.append(path)
        entries.append({"ix": ix, "iy": iy, "iz": iz, "file": str(row.path), "epoch": row.epoch,
                        "is_final": row.is_final, "weight": spec.weights[ix], "seed": z.seed,
                        "cfg_scale": z.cfg_scale, "picture": path.name, "infotext": cell.infotext})

    images = getattr(webui, "images", None)  # the WebUI's label font, as its X/Y/Z plot uses
    font = images.get_font(label_font_size(spec.width, spec.height)) if images is not None else None
    # Translated label words only where the font draws them (the WebUI's default font has no Chinese glyphs).
    words = tr("final") + tr("epoch {epoch}", epoch=1) + tr("weight: {weight:g}", weight=1) + tr("seed: {seed}", seed=1)
    drawable = font_draws(font or default_label_font(label_font_size(spec.width, spec.height)), words)
    with language_scope(current_language() if drawable else ENGLISH):
        x_labels, y_labels, z_labels = spec.axis_labels(request.rows)
        y_labels = marked_labels(request.rows, y_labels, request.recommended)
    composed = compose_grid({key: cell.image for key, cell in cells.items()}, x_labels, y_labels, z_labels, font)
    grid_path = out / "grid.png"
    write_atomically(grid_path, png_bytes(composed.image, f"Train Tools preview grid of {request.name}"), overwrite=False)
    index = {"name": request.name, "layout": composed.layout.to_dict(), "cells": entries,
             "complete": len(cells) == len(spec.weights) * len(request.rows) * len(z_values)}
    write_atomically(out / INDEX_NAME, json.dumps(index, indent=1, ensure_ascii=False).encode("utf-8"), overwrite=False)
    return GridResult(grid_path, cell_paths, index["complete"])


@dataclass(frozen=True)
class PickedCell:
    file: Path
    epoch: int
    is_final: bool
    weight: float
    picture: Path


def cell_at(grid_folder: Path, x: float, y: float) -> PickedCell | None:
    """The cell under a click at (x, y) in grid.png's pixels, from the grid's index."""
    index = json.loads((grid_folder / INDEX_NAME).read_text("utf-8"))
    position = GridLayout.from_dict(index["layout"]).cell_at(x, y)
    if position is None:
        return None
    for entry in index["cells"]:
        if (entry["ix"], entry["iy"], entry["iz"]) == tuple(position):
            return PickedCell(Path(entry["file"]), entry["epoch"], entry["is_final"], entry["weight"],
                              grid_folder / "cells" / entry["picture"])
    return None  # a cell the grid never rendered (stopped early)


def cell_of(grid_folder: Path, file: Path, weight: float) -> PickedCell | None:
    """The rendered cell of ``file`` at the grid's weight nearest to ``weight`` (first seed or CFG value): what the
    page pre-selects for the recommended epoch."""
    index = json.loads((grid_folder / INDEX_NAME).read_text("utf-8"))
    entries = [e for e in index["cells"] if Path(e["file"]) == Path(file) and e["iz"] == 0]
    if not entries:
        return None
    entry = min(entries, key=lambda e: (abs(e["weight"] - weight), -e["weight"]))
    return PickedCell(Path(entry["file"]), entry["epoch"], entry["is_final"], entry["weight"],
                      grid_folder / "cells" / entry["picture"])


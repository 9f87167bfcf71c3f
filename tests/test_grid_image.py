"""The labelled grid picture: its size, where each cell lands, labels drawn and wrapped, clicks mapped back."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFont

from lib_train.preview.grid_image import BACKGROUND, MISSING_CELL, GridLayout, compose_grid

CELL_W, CELL_H = 96, 64


def colour(ix: int, iy: int, iz: int) -> tuple[int, int, int]:
    """A colour per cell that is never the background, so every cell is recognisable in the grid."""
    return 30 + 60 * ix, 30 + 60 * iy, 30 + 100 * iz


def make_cells(columns: int, rows: int, slices: int = 1) -> dict:
    return {(x, y, z): Image.new("RGB", (CELL_W, CELL_H), colour(x, y, z))
            for x in range(columns) for y in range(rows) for z in range(slices)}


def has_text(image: Image.Image, box: tuple[int, int, int, int]) -> bool:
    band = np.asarray(image.crop(box))
    return bool((band != np.array(BACKGROUND, dtype=band.dtype)).any())


def assert_cells_in_place(grid, columns: int, rows: int, slices: int) -> None:
    layout = grid.layout
    for z in range(slices):
        for y in range(rows):
            for x in range(columns):
                left, top, right, bottom = layout.cell_box(x, y, z)
                assert (right - left, bottom - top) == (CELL_W, CELL_H)
                centre = ((left + right) // 2, (top + bottom) // 2)
                assert layout.cell_at(*centre) == (x, y, z)
                assert layout.cell_at(left, top) == (x, y, z)  # edges belong to the cell
                assert layout.cell_at(right - 1, bottom - 1) == (x, y, z)
                assert grid.image.getpixel(centre) == colour(x, y, z)


def test_two_axes_size_labels_and_clicks():
    grid = compose_grid(make_cells(3, 2), ["weight: 0.4", "weight: 0.7", "weight: 1"], ["epoch 1", "final"])
    layout = grid.layout

    assert layout.label_left > 0 and layout.label_top > 0 and layout.title_height == 0
    assert grid.image.size == (layout.label_left + 3 * CELL_W, layout.label_top + 2 * CELL_H)
    assert_cells_in_place(grid, 3, 2, 1)
    for x in range(3):
        assert has_text(grid.image, layout.column_label_box(x))
    for y in range(2):
        assert has_text(grid.image, layout.row_label_box(y))
    # A click on a label or the corner is no cell.
    assert layout.cell_at(layout.label_left // 2, layout.label_top + 5) is None
    assert layout.cell_at(layout.label_left + 5, layout.label_top // 2) is None
    assert layout.cell_at(grid.image.width, layout.label_top + 5) is None
    assert layout.cell_at(5, grid.image.height) is None
    # Nothing drawn in the top-left corner where the bands meet.
    assert not has_text(grid.image, (0, 0, layout.label_left, layout.label_top))


def test_only_weights_has_no_row_band():
    grid = compose_grid(make_cells(4, 1), ["weight: 0.25", "weight: 0.5", "weight: 0.75", "weight: 1"], None)

    assert grid.layout.label_left == 0 and grid.layout.rows == 1
    assert grid.image.size == (4 * CELL_W, grid.layout.label_top + CELL_H)
    assert_cells_in_place(grid, 4, 1, 1)
    assert all(has_text(grid.image, grid.layout.column_label_box(x)) for x in range(4))


def test_only_epochs_has_no_column_band():
    grid = compose_grid(make_cells(1, 3), [], ["epoch 1", "epoch 2", "final"])

    assert grid.layout.label_top == 0 and grid.layout.columns == 1
    assert grid.image.size == (grid.layout.label_left + CELL_W, 3 * CELL_H)
    assert_cells_in_place(grid, 1, 3, 1)
    assert all(has_text(grid.image, grid.layout.row_label_box(y)) for y in range(3))


def test_three_axes_give_titled_sub_grids_side_by_side():
    grid = compose_grid(make_cells(2, 2, 3), ["weight: 0.5", "weight: 1"], ["epoch 1", "final"],
                        ["seed: 1", "seed: 2", "seed: 3"])
    layout = grid.layout

    slice_width = layout.label_left + 2 * CELL_W
    assert layout.slice_gap > 0 and layout.title_height > 0
    assert grid.image.size == (3 * slice_width + 2 * layout.slice_gap,
                               layout.title_height + layout.label_top + 2 * CELL_H)
    assert_cells_in_place(grid, 2, 2, 3)
    for z in range(3):
        assert has_text(grid.image, layout.title_box(z))
        assert has_text(grid.image, layout.column_label_box(1, z))
        assert has_text(grid.image, layout.row_label_box(1, z))
    gap_x = slice_width + layout.slice_gap // 2
    assert layout.cell_at(gap_x, layout.height - 1) is None
    assert not has_text(grid.image, (slice_width, 0, slice_width + layout.slice_gap, layout.height))


def test_long_labels_wrap_inside_their_column():
    long_label = "weight: 0.6 with a rather long explanation that cannot fit"
    no_spaces = "abcdefghijklmnopqrstuvwxyz0123456789abcdefghij"
    short = compose_grid(make_cells(3, 1), ["w", "", ""], None)
    grid = compose_grid(make_cells(3, 1), [long_label, "", no_spaces], None)
    layout = grid.layout

    assert layout.label_top > 2 * short.layout.label_top  # several lines
    # The wrapped text stays in its own column: the empty middle column's band is untouched.
    assert has_text(grid.image, layout.column_label_box(0))
    assert not has_text(grid.image, layout.column_label_box(1))
    assert has_text(grid.image, layout.column_label_box(2))


def test_missing_cells_stay_grey_and_smaller_cells_are_centred():
    cells = {(0, 0, 0): Image.new("RGB", (CELL_W, CELL_H), (200, 0, 0)),
             (1, 1, 0): Image.new("RGB", (CELL_W // 2, CELL_H // 2), (0, 0, 200))}
    grid = compose_grid(cells, ["a", "b"], ["c", "d"])
    layout = grid.layout

    left, top, right, bottom = layout.cell_box(0, 1)
    assert grid.image.getpixel(((left + right) // 2, (top + bottom) // 2)) == MISSING_CELL
    left, top, right, bottom = layout.cell_box(1, 1)
    assert grid.image.getpixel(((left + right) // 2, (top + bottom) // 2)) == (0, 0, 200)
    assert grid.image.getpixel((left + 2, top + 2)) == BACKGROUND


def test_a_given_font_sets_the_label_size():
    small = compose_grid(make_cells(2, 2), ["weight: 0.5", "weight: 1"], ["epoch 1", "final"],
                         font=ImageFont.load_default(12))
    large = compose_grid(make_cells(2, 2), ["weight: 0.5", "weight: 1"], ["epoch 1", "final"],
                         font=ImageFont.load_default(40))

    assert large.layout.label_top > small.layout.label_top
    assert large.layout.label_left > small.layout.label_left


def test_layout_survives_a_round_trip_for_later_clicks():
    grid = compose_grid(make_cells(2, 2, 2), ["a", "b"], ["c", "d"], ["e", "f"])
    restored = GridLayout.from_dict(grid.layout.to_dict())

    assert restored == grid.layout
    left, top, _, _ = grid.layout.cell_box(1, 0, 1)
    assert restored.cell_at(left + 3, top + 3) == (1, 0, 1)


def test_cells_outside_the_labelled_axes_are_a_programming_error():
    with pytest.raises(ValueError, match="outside the 2×1×1 grid"):
        compose_grid(make_cells(3, 1), ["a", "b"], None)
    with pytest.raises(ValueError, match="at least one cell"):
        compose_grid({}, ["a"], None)
    with pytest.raises(IndexError):
        compose_grid(make_cells(1, 1), ["a"], None).layout.cell_box(1, 0, 0)


def test_labels_draw_with_an_old_pillow_that_cannot_size_its_font(monkeypatch):
    """The WebUI pins Pillow 9.5, whose ImageFont.load_default() takes no size."""
    bitmap_font = ImageFont.load_default()
    monkeypatch.setattr(ImageFont, "load_default", lambda: bitmap_font)
    cells = {(ix, 0, 0): Image.new("RGB", (64, 64), (200, 30, 30)) for ix in range(2)}
    grid = compose_grid(cells, ["weight: 0.5", "weight: 1"], ["epoch 1"])
    assert grid.image.size == (grid.layout.width, grid.layout.height)
    band = np.asarray(grid.image.crop(grid.layout.column_label_box(0)).convert("L"))
    assert (band < 128).any(), "the label is drawn"

"""Drawing the labelled preview grid (X = Lora weight, Y = epoch, optional Z = seed or CFG) and mapping a
click on it back to its cell.

The look follows the WebUI's X/Y/Z plot: column labels above the cells, row labels on the left, and for a
third axis one sub-grid per value, side by side under its title. The layout is kept as plain numbers
(``GridLayout``) so the tab can store it beside the picture and map clicks later.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)
MISSING_CELL = (224, 224, 224)  # a cell not rendered (stopped grid) stays visibly empty
MIN_FONT_SIZE = 12

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def label_font_size(cell_width: int, cell_height: int) -> int:
    """The WebUI's grid label size for a cell size (so a font the glue passes matches the default)."""
    return max(MIN_FONT_SIZE, (cell_width + cell_height) // 25)


def default_label_font(size: int) -> Font:
    """Pillow ≥ 10.1 scales its built-in font; older ones (the WebUI pins 9.5) only have a small bitmap font,
    so the WebUI glue passes the WebUI's own font instead."""
    try:
        return ImageFont.load_default(size)
    except TypeError:
        return ImageFont.load_default()


def font_draws(font: Font, text: str) -> bool:
    """Whether ``font`` has a glyph for every character of ``text``: a missing one is drawn as the font's
    "missing" box, the same picture as a code point no font has. (The WebUI's default label font has no Chinese.)"""
    def picture(character: str) -> tuple:
        mask = font.getmask(character)
        return mask.size, bytes(mask)

    try:
        missing = picture("\U0010fffd")
        return all(picture(character) != missing for character in set(text) if not character.isspace())
    except (UnicodeEncodeError, OSError):  # a bitmap font without the characters at all
        return False


@dataclass(frozen=True)
class GridLayout:
    """Where everything lies in the grid picture, in pixels."""

    cell_width: int
    cell_height: int
    columns: int
    rows: int
    slices: int
    label_left: int  # width of the row-label band of each slice, 0 without row labels
    label_top: int  # height of the column-label band, 0 without column labels
    title_height: int  # height of the slice-title band, 0 without a third axis
    slice_gap: int

    @property
    def slice_width(self) -> int:
        return self.label_left + self.columns * self.cell_width

    @property
    def width(self) -> int:
        return self.slices * self.slice_width + (self.slices - 1) * self.slice_gap

    @property
    def height(self) -> int:
        return self.title_height + self.label_top + self.rows * self.cell_height

    def slice_left(self, iz: int) -> int:
        return iz * (self.slice_width + self.slice_gap)

    def cell_box(self, ix: int, iy: int, iz: int = 0) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a cell; right and bottom exclusive, as in PIL."""
        if not (0 <= ix < self.columns and 0 <= iy < self.rows and 0 <= iz < self.slices):
            raise IndexError(f"cell ({ix}, {iy}, {iz}) is outside a {self.columns}×{self.rows}×{self.slices} grid")
        left = self.slice_left(iz) + self.label_left + ix * self.cell_width
        top = self.title_height + self.label_top + iy * self.cell_height
        return left, top, left + self.cell_width, top + self.cell_height

    def cell_at(self, x: float, y: float) -> tuple[int, int, int] | None:
        """The (ix, iy, iz) of the cell under a point of the picture; None on labels and gaps."""
        top = self.title_height + self.label_top
        if x < 0 or not top <= y < self.height:
            return None
        iz, inside = divmod(int(x), self.slice_width + self.slice_gap)
        if iz >= self.slices or not self.label_left <= inside < self.slice_width:
            return None
        return (inside - self.label_left) // self.cell_width, (int(y) - top) // self.cell_height, iz

    def column_label_box(self, ix: int, iz: int = 0) -> tuple[int, int, int, int]:
        left, _, right, _ = self.cell_box(ix, 0, iz)
        return left, self.title_height, right, self.title_height + self.label_top

    def row_label_box(self, iy: int, iz: int = 0) -> tuple[int, int, int, int]:
        _, top, _, bottom = self.cell_box(0, iy, iz)
        left = self.slice_left(iz)
        return left, top, left + self.label_left, bottom

    def title_box(self, iz: int) -> tuple[int, int, int, int]:
        left = self.slice_left(iz)
        return left, 0, left + self.slice_width, self.title_height

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, int]) -> "GridLayout":
        return cls(**{key: int(value) for key, value in values.items()})


@dataclass
class ComposedGrid:
    image: Image.Image
    layout: GridLayout


def compose_grid(cells: dict[tuple[int, int, int], Image.Image], x_labels: list[str] | None,
                 y_labels: list[str] | None, z_labels: list[str] | None = None,
                 font: Font | None = None) -> ComposedGrid:
    """Paste ``cells[(ix, iy, iz)]`` into a labelled grid. An axis without labels (None or empty) has one
    position and no label band, so one, two or three axes work alike. Missing cells stay grey; cells smaller
    than the largest are centred, as the WebUI does."""
    if not cells:
        raise ValueError("a grid needs at least one cell picture")
    columns, rows, slices = (len(labels) if labels else 1 for labels in (x_labels, y_labels, z_labels))
    for key in cells:
        ix, iy, iz = key
        if not (0 <= ix < columns and 0 <= iy < rows and 0 <= iz < slices):
            raise ValueError(f"cell {key} is outside the {columns}×{rows}×{slices} grid the labels describe")
    cell_width = max(image.width for image in cells.values())
    cell_height = max(image.height for image in cells.values())
    font = font or default_label_font(label_font_size(cell_width, cell_height))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = _line_height(measure, font)
    pad = max(4, line_height // 3)

    x_lines = [_wrap(measure, text, font, cell_width - 2 * pad) for text in x_labels or []]
    label_top = max((len(lines) for lines in x_lines), default=0) * line_height + 2 * pad if x_lines else 0
    # Row labels are short ("epoch 3"); their band is as wide as the longest, at most 3/4 of a cell.
    row_text_width = min(max((int(measure.textlength(t, font=font)) for t in y_labels or []), default=0),
                         cell_width * 3 // 4)
    y_lines = [_wrap(measure, text, font, row_text_width) for text in y_labels or []]
    label_left = row_text_width + 2 * pad if y_lines else 0
    slice_width = label_left + columns * cell_width
    z_lines = [_wrap(measure, text, font, slice_width - 2 * pad) for text in z_labels or []]
    title_height = max((len(lines) for lines in z_lines), default=0) * line_height + 2 * pad if z_lines else 0

    layout = GridLayout(cell_width, cell_height, columns, rows, slices, label_left, label_top, title_height,
                        slice_gap=max(8, cell_width // 8) if slices > 1 else 0)
    grid = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for iz in range(slices):
        for iy in range(rows):
            for ix in range(columns):
                box = layout.cell_box(ix, iy, iz)
                picture = cells.get((ix, iy, iz))
                if picture is None:
                    draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=MISSING_CELL)
                    continue
                grid.paste(picture.convert("RGB"), (box[0] + (cell_width - picture.width) // 2,
                                                    box[1] + (cell_height - picture.height) // 2))
        for ix, lines in enumerate(x_lines):
            _draw_centred(draw, lines, layout.column_label_box(ix, iz), font, line_height)
        for iy, lines in enumerate(y_lines):
            _draw_centred(draw, lines, layout.row_label_box(iy, iz), font, line_height)
        if z_lines:
            _draw_centred(draw, z_lines[iz], layout.title_box(iz), font, line_height)
    return ComposedGrid(grid, layout)


def _line_height(draw: ImageDraw.ImageDraw, font: Font) -> int:
    # Ascender to descender of tall and deep letters, plus a little leading between wrapped lines.
    bottom = draw.textbbox((0, 0), "Ägy", font=font)[3]
    return bottom + max(2, bottom // 5)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Font, max_width: int) -> list[str]:
    """Greedy word wrap; a word wider than the space (or text without spaces, e.g. CJK) is split by characters."""
    max_width = max(max_width, 1)
    lines: list[str] = []
    for paragraph in text.split("\n"):
        current = ""
        for word in paragraph.split():
            candidate = f"{current} {word}".strip()
            if draw.textlength(candidate, font=font) <= max_width:
                current = candidate
                continue
            if current:
                lines.append(current)
            current = ""
            for character in word:
                if current and draw.textlength(current + character, font=font) > max_width:
                    lines.append(current)
                    current = ""
                current += character
        lines.append(current)
    return lines


def _draw_centred(draw: ImageDraw.ImageDraw, lines: list[str], box: tuple[int, int, int, int], font: Font,
                  line_height: int) -> None:
    left, top, right, bottom = box
    y = top + (bottom - top - len(lines) * line_height) // 2
    for line in lines:
        x = left + (right - left - draw.textlength(line, font=font)) / 2
        draw.text((x, y), line, font=font, fill=TEXT_COLOR)
        y += line_height

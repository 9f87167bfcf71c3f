"""Importing pictures into a project: untouched copies in originals/, prepared pictures and captions in pictures/.

Sources are picture files, captions, folders (recursive) and zip archives. Every file is copied byte for byte
into originals/ (never overwriting: a clash gets ``_2``, ``_3``...), then its cleaned picture is written into
pictures/ with the caption next to it as ``<stem>.txt``. pictures/ is flat, as the training folder wants.

Pictures up to 4 megapixels are PNG (lossless). Larger ones, which only happen when the original size is kept,
are JPEG at quality 95 without chroma subsampling: a 24 MP photo would be a ~50 MB PNG while training sees it
through a resize to about one megapixel, and pictures are always re-made from originals/, so the loss never
compounds. ``picture_sources.json`` in the project remembers each picture's original and crop focus, so that
``clean_in_project`` can re-prepare pictures with new options.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
import secrets
import zipfile
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from PIL import Image

from ..common.errors import ConfigError, DatasetError
from ..common.i18n import tr
from .captions import CAPTION_EXTENSIONS, read_caption
from .image_clean import (
    DEFAULT_PIXEL_LIMIT,
    WHITE,
    Colour,
    crop_to_size,
    fit_within,
    open_clean,
    readable_extensions,
    to_rgb,
)
from .project_folders import ProjectFolders

Upscaler = Callable[[Image.Image, int, int], Image.Image]
Focus = tuple[float, float]

LARGE_PICTURE_PIXELS = 4_000_000
DEFAULT_ARCHIVE_LIMIT = 4 * 1024**3  # bytes unpacked from one zip: far above a dataset, far below a full disk
MANIFEST_NAME = "picture_sources.json"
_COPY_CHUNK = 1024 * 1024
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class PrepareOptions:
    """How pictures are prepared. `crop_focus` maps a file name to the point to keep in view, as fractions of
    width and height: the source file's name when importing, the picture's name when re-preparing."""

    background: Colour = WHITE  # behind transparent parts
    target_size: tuple[int, int] | None = None  # (width, height); None keeps each size, for aspect-ratio buckets
    crop_focus: Mapping[str, Focus] = field(default_factory=dict)
    training_resolution: int = 512  # when keeping sizes, pictures below half of it count as small
    min_side: int = 64  # pictures with a shorter side are skipped: too little to learn from
    max_side: int | None = None  # when keeping sizes, larger pictures are shrunk to fit this square
    pixel_limit: int | None = DEFAULT_PIXEL_LIMIT
    upscale_small: bool = False  # enlarge small pictures with the `upscale` callable instead of plain resizing
    archive_limit: int = DEFAULT_ARCHIVE_LIMIT  # total unpacked bytes taken from one zip

    def __post_init__(self) -> None:
        if len(self.background) != 3 or not all(0 <= channel <= 255 for channel in self.background):
            raise ConfigError(tr("The background colour must be three values 0..255, got {background}.",
                                 background=self.background))
        if self.target_size is not None and (len(self.target_size) != 2 or min(self.target_size) < 1):
            raise ConfigError(tr("The picture size must be two positive numbers, got {target_size}.",
                                 target_size=self.target_size))
        for name, focus in self.crop_focus.items():
            if len(focus) != 2 or not all(0.0 <= value <= 1.0 for value in focus):
                raise ConfigError(tr("The crop focus of {name} must be two fractions between 0 and 1, got {focus}.",
                                     name=name, focus=focus))
        positive = {tr("training resolution"): self.training_resolution, tr("minimum side"): self.min_side,
                    tr("archive limit"): self.archive_limit}
        if self.max_side is not None:
            positive[tr("maximum side")] = self.max_side
        for label, value in positive.items():
            if value < 1:
                raise ConfigError(tr("The {label} must be at least 1, got {value}.", label=label, value=value))


@dataclass(frozen=True)
class FileNote:
    path: Path
    reason: str


@dataclass
class ImportReport:
    imported: list[Path] = field(default_factory=list)  # pictures written into pictures/
    skipped: list[FileNote] = field(default_factory=list)  # left out on purpose (not a picture, too small...)
    failed: list[FileNote] = field(default_factory=list)  # could not be used (damaged, unsafe, refused caption)
    warnings: list[FileNote] = field(default_factory=list)  # imported, but worth a look
    stopped: bool = False

    def summary(self) -> str:
        counts = ((tr("{count} skipped"), self.skipped), (tr("{count} failed"), self.failed),
                  (tr("{count} warnings"), self.warnings))
        parts = [tr("{count} imported", count=len(self.imported))]
        parts += [template.format(count=len(notes)) for template, notes in counts if notes]
        return ", ".join(parts) + (tr(" (stopped)") if self.stopped else "")


class _Skip(Exception):
    """A picture left out on purpose; the message says why."""


# ---------------------------------------------------------------------------------------------
# Import


def import_pictures(
    sources: Sequence[str | Path],
    project: ProjectFolders,
    options: PrepareOptions,
    upscale: Upscaler | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ImportReport:
    """Import pictures, captions, folders and zips into `project`; one bad file never stops the others.

    Server folders must already be confined by the caller (`lib_train.webui.path_policy.confine`).
    """
    report = ImportReport()
    manifest = _Manifest.load(project)
    with ExitStack() as open_archives:
        found = [item for source in sources for item in _gather(Path(source), open_archives, options, report)]
        images, captions = _sort_out(found, report)
        try:
            for image in images:
                if should_stop is not None and should_stop():
                    report.stopped = True
                    break
                caption = _preferred_caption(captions.get(image.pair_key, {}))
                try:
                    _import_one(image, caption, project, options, upscale, manifest, report)
                except _Skip as skip:
                    report.skipped.append(FileNote(image.label, str(skip)))
                except (DatasetError, OSError) as error:
                    report.failed.append(FileNote(image.label, _reason(error)))
        finally:
            manifest.save()
    image_keys = {image.pair_key for image in images}
    for key, by_suffix in captions.items():
        if key not in image_keys:
            report.skipped.extend(FileNote(c.label, tr("no picture with the same name")) for c in by_suffix.values())
    return report


@dataclass(frozen=True)
class _Source:
    """One file to import: how to read it and where its copy goes under originals/."""

    label: Path  # how the report names it
    relative: PurePosixPath  # its path under originals/
    group: str  # a caption belongs to the picture with the same group, folder and stem
    read: Callable[[], BinaryIO]
    path: Path | None = None  # the file itself, unless it is inside a zip
    declared_size: int | None = None  # a zip member's unpacked size as its archive states it

    @property
    def pair_key(self) -> tuple[str, str, str]:
        return self.group, self.relative.parent.as_posix(), self.relative.stem


def _file_source(path: Path, relative: PurePosixPath, group: str) -> _Source:
    return _Source(path, relative, group, read=functools.partial(path.open, "rb"), path=path)


def _gather(source: Path, open_archives: ExitStack, options: PrepareOptions, report: ImportReport) -> list[_Source]:
    if source.is_dir():
        found: list[_Source] = []
        for path, relative in _files_under(source):
            if relative.suffix.lower() == ".zip":
                found.extend(_zip_members(path, relative.with_suffix(""), open_archives, options, report))
            else:
                found.append(_file_source(path, relative, group=str(source)))
        return found
    if not source.is_file():
        report.failed.append(FileNote(source, tr("not found")))
        return []
    if source.suffix.lower() == ".zip":
        return _zip_members(source, PurePosixPath(source.stem), open_archives, options, report)
    # Loose files pair by name alone: uploads arrive each in its own temporary folder.
    return [_file_source(source, PurePosixPath(source.name), group="")]


def _files_under(folder: Path) -> Iterator[tuple[Path, PurePosixPath]]:
    """Every file below `folder`, sorted, with its path relative to the folder's parent; hidden ones left out."""
    base = folder.resolve().name or "folder"
    for directory, subfolders, files in os.walk(folder):
        subfolders[:] = sorted(name for name in subfolders if not _hidden(name))
        for name in sorted(files):
            if not _hidden(name):
                path = Path(directory) / name
                yield path, PurePosixPath(base, *path.relative_to(folder).parts)


def _hidden(name: str) -> bool:
    # macOS leaves `._name.png` resource forks and `__MACOSX/` folders in archives and on shared drives.
    return name.startswith(".") or name == "__MACOSX"


def _zip_members(
    archive_path: Path, prefix: PurePosixPath, open_archives: ExitStack, options: PrepareOptions, report: ImportReport
) -> list[_Source]:
    try:
        archive = open_archives.enter_context(zipfile.ZipFile(archive_path))
    except (zipfile.BadZipFile, OSError) as error:
        report.failed.append(FileNote(archive_path, tr("not a readable zip archive ({error})", error=error)))
        return []
    wanted_suffixes = readable_extensions() | set(CAPTION_EXTENSIONS)
    members: list[_Source] = []
    for info in sorted(archive.infolist(), key=lambda info: info.filename):
        if info.is_dir():
            continue
        relative = _safe_member_path(info.filename)
        if relative is None:
            report.failed.append(FileNote(archive_path, tr("member {filename!r} has an unsafe path (absolute, with "
                                                           "'..' or a drive); it was not extracted",
                                                           filename=info.filename)))
            continue
        if any(_hidden(part) for part in relative.parts):
            continue
        label = archive_path / relative
        if info.flag_bits & 0x1:
            report.failed.append(FileNote(label, tr("encrypted; unpack the archive yourself and import the folder")))
            continue
        read = functools.partial(archive.open, info)
        members.append(_Source(label, prefix / relative, str(archive_path), read, declared_size=info.file_size))
    # zipfile never unpacks more than a member's stated size (then fails its CRC), so this bound holds.
    unpacked = sum(m.declared_size or 0 for m in members if m.relative.suffix.lower() in wanted_suffixes)
    if unpacked > options.archive_limit:
        report.failed.append(FileNote(archive_path, tr("unpacks to {value:.0f} MiB, more than the {value2:.0f} MiB "
                                                       "allowed for one archive; refused as a possible zip bomb",
                                                       value=unpacked / 2**20, value2=options.archive_limit / 2**20)))
        return []
    return members


def _safe_member_path(name: str) -> PurePosixPath | None:
    """The member's path inside the archive, or None when extracting it could land outside the target folder."""
    unified = name.replace("\\", "/")
    parts = [part for part in unified.split("/") if part not in ("", ".")]
    if unified.startswith("/") or _WINDOWS_DRIVE.match(unified) or not parts:
        return None
    if any(part == ".." or ":" in part for part in parts):  # ':' also names NTFS alternate streams
        return None
    return PurePosixPath(*parts)


def _sort_out(
    found: list[_Source], report: ImportReport
) -> tuple[list[_Source], dict[tuple[str, str, str], dict[str, _Source]]]:
    """(pictures, captions by pair key and extension); anything else is reported as skipped."""
    pictures: list[_Source] = []
    captions: dict[tuple[str, str, str], dict[str, _Source]] = {}
    extensions = readable_extensions()
    for item in found:
        suffix = item.relative.suffix.lower()
        if suffix in extensions:
            pictures.append(item)
        elif suffix in CAPTION_EXTENSIONS:
            captions.setdefault(item.pair_key, {})[suffix] = item
        else:
            accepted = ", ".join(sorted(extensions | set(CAPTION_EXTENSIONS) | {".zip"}))
            report.skipped.append(FileNote(item.label, tr("not a picture, caption or zip ({accepted})",
                                                          accepted=accepted)))
    return pictures, captions


def _preferred_caption(by_suffix: Mapping[str, _Source]) -> _Source | None:
    return next((by_suffix[suffix] for suffix in CAPTION_EXTENSIONS if suffix in by_suffix), None)


def _import_one(
    source: _Source,
    caption: _Source | None,
    project: ProjectFolders,
    options: PrepareOptions,
    upscale: Upscaler | None,
    manifest: _Manifest,
    report: ImportReport,
) -> None:
    folder = project.originals / source.relative.parent
    with _temporary_file(folder, lambda out: _copy_unpacking(source, out)) as copy:
        # Checked before the copy gets its name, so a refused file leaves nothing behind in originals/.
        image = open_clean(copy, background=options.background, pixel_limit=options.pixel_limit,
                           shown_as=source.label)
        focus = options.crop_focus.get(source.relative.name)
        picture, notes = _prepare(image, options, focus, upscale)
        original = _claim(copy, _numbered(folder, source.relative.stem, source.relative.suffix))
    picture_path = _write_new_picture(picture, project.pictures, source.relative.stem)
    manifest.record(picture_path.name, original.relative_to(project.originals).as_posix(), focus)
    report.imported.append(picture_path)
    report.warnings.extend(FileNote(source.label, note) for note in notes)
    if caption is not None:
        _import_caption(caption, original, picture_path, report)


def _import_caption(caption: _Source, image_original: Path, picture: Path, report: ImportReport) -> None:
    folder = image_original.parent
    with _temporary_file(folder, lambda out: _copy_unpacking(caption, out)) as copy:
        kept = _claim(copy, _numbered(folder, image_original.stem, caption.relative.suffix))
    try:
        text = read_caption(caption.path or kept)
    except DatasetError as error:
        report.failed.append(FileNote(caption.label, tr("{error} {name} was imported without a caption.", error=error,
                                                        name=picture.name)))
        return
    with _temporary_file(picture.parent, lambda out: out.write(text.encode("utf-8"))) as written:
        _claim(written, [picture.with_suffix(".txt")])


# ---------------------------------------------------------------------------------------------
# Preparing one picture


def _prepare(
    image: Image.Image, options: PrepareOptions, focus: Focus | None, upscale: Upscaler | None
) -> tuple[Image.Image, list[str]]:
    """The picture as it goes into pictures/, and warnings about it. Raises _Skip for a picture too small."""
    width, height = image.size
    if min(width, height) < options.min_side:
        raise _Skip(tr("only {width}x{height}; pictures need at least {min_side} px on each side", width=width,
                       height=height, min_side=options.min_side))
    notes: list[str] = []
    enlarged_size = _enlarged_size(image.size, options)
    if enlarged_size is not None:
        if upscale is not None and options.upscale_small:
            image = _upscaled(image, enlarged_size, upscale, options.background, notes)
        else:
            notes.append(_small_picture_note(image.size, options))
    if options.target_size is not None:
        return crop_to_size(image, *options.target_size, focus), notes
    if options.max_side is not None:
        image = fit_within(image, options.max_side, options.max_side)
    return image, notes


def _enlarged_size(size: tuple[int, int], options: PrepareOptions) -> tuple[int, int] | None:
    """The size a small picture should be enlarged to; None when it is big enough."""
    width, height = size
    if options.target_size is not None:
        scale = max(options.target_size[0] / width, options.target_size[1] / height)
    else:
        # Buckets hold about resolution² pixels: below half the resolution, training enlarges the picture over 2x.
        if width * height * 4 >= options.training_resolution**2:
            return None
        scale = options.training_resolution / math.sqrt(width * height)
    if scale <= 1:
        return None
    if options.target_size is None:
        return round(width * scale), round(height * scale)
    # Rounding must not fall a pixel short of the side that matches the target.
    return max(options.target_size[0], round(width * scale)), max(options.target_size[1], round(height * scale))


def _small_picture_note(size: tuple[int, int], options: PrepareOptions) -> str:
    advice = tr("it may look soft; turn on upscaling of small pictures to use an upscaler")
    if options.target_size is not None:
        target_width, target_height = options.target_size
        return tr("{value}x{value2} is smaller than {target_width}x{target_height} and was enlarged by resizing: "
                  "{advice}", value=size[0], value2=size[1], target_width=target_width, target_height=target_height,
                  advice=advice)
    return tr("{value}x{value2} is small for training at {training_resolution} px: {advice}", value=size[0],
              value2=size[1], training_resolution=options.training_resolution, advice=advice)


def _upscaled(
    image: Image.Image, size: tuple[int, int], upscale: Upscaler, background: Colour, notes: list[str]
) -> Image.Image:
    try:
        result = to_rgb(upscale(image, *size), background)
    except Exception as error:  # the WebUI's upscalers fail in many ways (missing model, out of memory...)
        notes.append(tr("the upscaler failed ({error}); {width}x{height} was enlarged by resizing instead",
                        error=error, width=image.width, height=image.height))
        return image
    # Upscalers work in fixed factors; land on the size asked for.
    return result if result.size == size else result.resize(size, Image.Resampling.LANCZOS)


def _encoded(picture: Image.Image) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    if picture.width * picture.height > LARGE_PICTURE_PIXELS:
        picture.save(buffer, "JPEG", quality=95, subsampling=0)
        return buffer.getvalue(), ".jpg"
    picture.save(buffer, "PNG")
    return buffer.getvalue(), ".png"


def _write_new_picture(picture: Image.Image, folder: Path, stem: str) -> Path:
    data, suffix = _encoded(picture)
    with _temporary_file(folder, lambda out: out.write(data)) as written:
        return _claim(written, _free_picture_names(folder, stem, suffix))


def _free_picture_names(folder: Path, stem: str, suffix: str) -> Iterator[Path]:
    # A stem is free only if no picture or caption uses it: `a.png` and `a.jpg` would share `a.txt`.
    siblings = readable_extensions() | set(CAPTION_EXTENSIONS)
    for candidate in _numbered(folder, stem, suffix):
        if not any(candidate.with_suffix(extension).exists() for extension in siblings):
            yield candidate


# ---------------------------------------------------------------------------------------------
# Re-preparing pictures from their originals


def clean_in_project(
    project: ProjectFolders,
    options: PrepareOptions,
    names: Collection[str] | None = None,
    upscale: Upscaler | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ImportReport:
    """Re-make pictures from originals/ with new options (size, focus, background); captions are untouched.

    `names` limits it to those pictures (file names in pictures/). A crop focus given in `options` is
    remembered; otherwise the last one is reused. Pictures deleted from pictures/ stay deleted.
    """
    report = ImportReport()
    manifest = _Manifest.load(project)
    try:
        for name in sorted(manifest.entries if names is None else names):
            if should_stop is not None and should_stop():
                report.stopped = True
                break
            picture = project.pictures / name
            if name not in manifest.entries or not picture.is_file():
                manifest.forget(name)
                if names is not None:
                    report.skipped.append(FileNote(picture, tr("not in pictures/, or not imported into this project")))
                continue
            try:
                report.imported.append(_reprepare(picture, project, options, upscale, manifest, report))
            except _Skip as skip:
                report.skipped.append(FileNote(picture, str(skip)))
            except (DatasetError, OSError) as error:
                report.failed.append(FileNote(picture, _reason(error)))
    finally:
        manifest.save()
    return report


def original_of(project: ProjectFolders, picture_name: str) -> Path:
    """The file in originals/ that ``pictures/<picture_name>`` was made from (e.g. to show it for a crop focus).

    Raises DatasetError when the picture was not imported into the project or its original is gone.
    """
    return _original_path(project, _Manifest.load(project), picture_name)


def _original_path(project: ProjectFolders, manifest: _Manifest, picture_name: str) -> Path:
    if picture_name not in manifest.entries:
        raise DatasetError(tr("{picture_name} was not imported into this project ({path} does not list it), so it "
                              "has no original to prepare again.", picture_name=picture_name, path=manifest.path))
    relative = manifest.entries[picture_name][0]
    original = (project.originals / relative).resolve()
    if not original.is_relative_to(project.originals.resolve()):
        raise DatasetError(tr("{path} points {picture_name} outside originals/ ({relative}); not used.",
                              path=manifest.path, picture_name=picture_name, relative=relative))
    if not original.is_file():
        raise DatasetError(tr("The original of {picture_name} ({original}) is missing.", picture_name=picture_name,
                              original=original))
    return original


def _reprepare(
    picture: Path,
    project: ProjectFolders,
    options: PrepareOptions,
    upscale: Upscaler | None,
    manifest: _Manifest,
    report: ImportReport,
) -> Path:
    relative, remembered_focus = manifest.entries[picture.name]
    original = _original_path(project, manifest, picture.name)
    focus = options.crop_focus.get(picture.name, remembered_focus)
    image = open_clean(original, background=options.background, pixel_limit=options.pixel_limit)
    prepared, notes = _prepare(image, options, focus, upscale)
    data, suffix = _encoded(prepared)
    target = picture.with_suffix(suffix)
    if target != picture and target.exists():
        raise DatasetError(tr("Cannot re-make {name} as {name2}: that file already exists.", name=picture.name,
                              name2=target.name))
    with _temporary_file(picture.parent, lambda out: out.write(data)) as written:
        os.replace(written, target)  # pictures/ is derived from originals/: replacing a picture is safe
    if target != picture:
        picture.unlink()
        manifest.forget(picture.name)
    manifest.record(target.name, relative, focus)
    report.warnings.extend(FileNote(target, note) for note in notes)
    return target


# ---------------------------------------------------------------------------------------------
# Files: temporary copies, no-clobber names, the manifest


def _copy_unpacking(source: _Source, out: BinaryIO) -> None:
    try:
        with source.read() as data:
            while chunk := data.read(_COPY_CHUNK):
                out.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise DatasetError(tr("{label} cannot be unpacked; the archive is damaged ({error}).", label=source.label,
                              error=error)) from None


@contextmanager
def _temporary_file(folder: Path, write: Callable[[BinaryIO], object]) -> Iterator[Path]:
    """A hidden temporary file in `folder` (the dataset scan skips dot-files) filled by `write`, removed on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its file is private (mode 600), and the name it is linked to would keep that mode.
    temporary = folder / f".import-{secrets.token_hex(8)}.tmp"
    out = open(temporary, "xb")  # exclusive: never someone else's file, which the cleanup below would delete
    try:
        with out:
            write(out)
        yield temporary
    finally:
        temporary.unlink(missing_ok=True)


def _numbered(folder: Path, stem: str, suffix: str) -> Iterator[Path]:
    """`stem.ext`, then `stem_2.ext`, `stem_3.ext`, ..."""
    yield folder / f"{stem}{suffix}"
    number = 2
    while True:
        yield folder / f"{stem}_{number}{suffix}"
        number += 1


def _claim(temporary: Path, candidates: Iterable[Path]) -> Path:
    """Give `temporary` the first free name among `candidates`, atomically; an existing file is never replaced."""
    for candidate in candidates:
        try:
            os.link(temporary, candidate)  # fails if the name exists
            return candidate
        except FileExistsError:
            continue
        except OSError:  # file systems without hard links
            if candidate.exists():
                continue
            os.replace(temporary, candidate)
            return candidate
    raise DatasetError(tr("Cannot write {parent}: every name tried already exists.", parent=temporary.parent))


class _Manifest:
    """picture file name -> (its original relative to originals/, its crop focus), for re-preparing."""

    def __init__(self, path: Path, entries: dict[str, tuple[str, Focus | None]]) -> None:
        self.path = path
        self.entries = entries
        self._saved = dict(entries)

    @classmethod
    def load(cls, project: ProjectFolders) -> _Manifest:
        path = project.root / MANIFEST_NAME
        if not path.exists():
            return cls(path, {})
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))["pictures"]
            entries = {name: (str(e["original"]), tuple(e["focus"]) if e["focus"] else None) for name, e in raw.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise DatasetError(tr("{path} is damaged ({error!r}); delete it to import again (pictures already "
                                  "imported can then no longer be re-made from originals).", path=path, error=error)) from None
        return cls(path, entries)

    def record(self, picture_name: str, original: str, focus: Focus | None) -> None:
        self.entries[picture_name] = (original, focus)

    def forget(self, picture_name: str) -> None:
        self.entries.pop(picture_name, None)

    def save(self) -> None:
        if self.entries == self._saved:
            return
        pictures = {name: {"original": original, "focus": list(focus) if focus else None}
                    for name, (original, focus) in sorted(self.entries.items())}
        text = json.dumps({"pictures": pictures}, ensure_ascii=False, indent=1) + "\n"
        with _temporary_file(self.path.parent, lambda out: out.write(text.encode("utf-8"))) as written:
            os.replace(written, self.path)
        self._saved = dict(self.entries)


def _reason(error: Exception) -> str:
    if isinstance(error, OSError):
        return f"{error.strerror or error} ({error.filename})" if error.filename else str(error)
    return str(error)

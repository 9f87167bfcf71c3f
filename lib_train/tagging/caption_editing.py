"""Tag curation on a project's pictures: every caption loaded at once, tags edited in bulk or per image, undo.

Edits change the captions in memory; ``save()`` writes the ones that changed (UTF-8, atomically) and records
the edits under ``caption_history/``, so that undo still works after the page is reloaded. A caption that
cannot be decoded is listed in ``refused`` and never written: its bytes stay exactly as they are.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..common.errors import DatasetError
from ..common.files import write_atomically
from ..common.i18n import tr
from ..dataset.captions import find_caption, read_caption, split_tags
from ..dataset.project_folders import ProjectFolders
from ..dataset.training_data import pictures_in  # the training folder's own rule for what counts as an image

MAX_UNDO_STEPS = 50


@dataclass(frozen=True)
class EditSummary:
    """What one operation did, for the UI."""

    action: str  # e.g. "Replaced 'blonde hair' with 'yellow hair'"
    tags: tuple[str, ...]  # the tags concerned
    images: tuple[str, ...]  # images whose caption changed
    left_alone: tuple[str, ...] = ()  # images an undo did not restore: changed since, or gone

    @property
    def files_changed(self) -> int:
        return len(self.images)

    def __str__(self) -> str:
        text = tr("{action}: {count} caption(s) changed", action=self.action, count=self.files_changed)
        if self.left_alone:
            text += tr("; {count_left_alone} left alone because they changed since ({value})",
                       count_left_alone=len(self.left_alone), value=', '.join(self.left_alone))
        return text + "."


@dataclass
class _Caption:
    path: Path  # the caption file that was read, or where a new one will be written
    loaded: bytes | None  # the file as loaded (None: there was none); save() refuses if it changed on disk since
    saved_tags: list[str]
    tags: list[str]
    trailing: str  # lines after the caption line: training ignores them, but they are the user's, so kept


@dataclass
class _Step:
    action: str
    tags: tuple[str, ...]
    before: dict[str, list[str]]
    after: dict[str, list[str]]
    file: Path | None = None  # where it is recorded; None until save()


class CaptionSet:
    """The tags of every image in a pictures folder (and its direct subfolders), keyed by relative path."""

    def __init__(self, pictures_dir: Path, history_dir: Path, captions: dict[str, _Caption],
                 refused: dict[str, str], steps: list[_Step]) -> None:
        self.pictures_dir = pictures_dir
        self.history_dir = history_dir
        self._captions = captions
        self._refused = refused
        self._steps = steps[-MAX_UNDO_STEPS:]
        self._forgotten_files = [step.file for step in steps[:-MAX_UNDO_STEPS] if step.file]

    @classmethod
    def load(cls, pictures_dir: str | Path, history_dir: str | Path | None = None) -> CaptionSet:
        """Read every caption; ``history_dir`` defaults to the project's ``caption_history/`` beside pictures/."""
        pictures_dir = Path(pictures_dir)
        if not pictures_dir.is_dir():
            raise DatasetError(tr("Pictures folder not found: {pictures_dir}", pictures_dir=pictures_dir))
        history = Path(history_dir) if history_dir else ProjectFolders(pictures_dir.parent).caption_history

        images_by_caption: dict[Path, list[str]] = {}
        for image in pictures_in(pictures_dir):
            caption_path = find_caption(image) or image.with_suffix(".txt")
            images_by_caption.setdefault(caption_path, []).append(image.relative_to(pictures_dir).as_posix())
        captions: dict[str, _Caption] = {}
        refused: dict[str, str] = {}
        for caption_path, keys in images_by_caption.items():
            if len(keys) > 1:
                # Editing one would silently change the other's caption too.
                for key in keys:
                    refused[key] = tr("Images {names} share the caption file {caption_path}; rename one so that "
                                      "each has its own caption.", names=" and ".join(keys), caption_path=caption_path)
                continue
            try:
                captions[keys[0]] = _read_caption_file(caption_path)
            except DatasetError as error:
                refused[keys[0]] = str(error)
        return cls(pictures_dir, history, dict(sorted(captions.items())), dict(sorted(refused.items())),
                   _load_steps(history))

    # -- reading --------------------------------------------------------------------------------

    @property
    def images(self) -> list[str]:
        """Every image, editable or not, sorted."""
        return sorted([*self._captions, *self._refused])

    @property
    def refused(self) -> dict[str, str]:
        """Images whose caption cannot be edited, with the reason (naming the file)."""
        return dict(self._refused)

    def tags_of(self, image: str) -> list[str]:
        return list(self._editable(image).tags)

    def tag_frequency(self) -> list[tuple[str, int]]:
        """(tag, number of images having it), most frequent first, then by name."""
        counts = Counter(tag for caption in self._captions.values() for tag in set(caption.tags))
        return sorted(counts.items(), key=lambda item: (-item[1], item[0]))

    @property
    def has_unsaved_changes(self) -> bool:
        return any(caption.tags != caption.saved_tags for caption in self._captions.values())

    @property
    def can_undo(self) -> bool:
        return bool(self._steps)

    @property
    def undo_label(self) -> str | None:
        """What undo() would revert, e.g. "Removed 'smile'"."""
        return self._steps[-1].action if self._steps else None

    # -- edits (each one undo step) ---------------------------------------------------------------

    def remove_tag(self, tag: str) -> EditSummary:
        return self.remove_tags([tag])

    def remove_tags(self, tags: Iterable[str]) -> EditSummary:
        """Remove these tags from every caption, as one undo step."""
        unwanted = list(dict.fromkeys(tag.strip() for tag in tags))
        return self._edit(tr("Removed {tags}", tags=_quoted(unwanted)), unwanted, lambda current: [t for t in current if t not in unwanted])

    def replace_tag(self, old: str, new: str) -> EditSummary:
        """Rename a tag everywhere; where ``new`` is already present the two merge into one."""
        old, new = old.strip(), _checked_tag(new)

        def rename(current: list[str]) -> list[str]:
            if old not in current:
                return current
            renamed: list[str] = []
            for tag in current:
                tag = new if tag == old else tag
                if not (tag == new and new in renamed):
                    renamed.append(tag)
            return renamed

        return self._edit(tr("Replaced {old!r} with {new!r}", old=old, new=new), [old, new], rename)

    def remove_duplicate_tags(self) -> EditSummary:
        """Keep the first occurrence of each tag in every caption."""
        return self._edit(tr("Removed duplicate tags"), [], lambda current: list(dict.fromkeys(current)))

    def add_tag(self, tag: str, images: Sequence[str], position: str = "end") -> EditSummary:
        """Add a tag to the given images; an image that already has it keeps it where it is."""
        tag = _checked_tag(tag)
        if position not in ("start", "end"):
            raise ValueError(f"position must be 'start' or 'end', not {position!r}")
        for image in images:
            self._editable(image)

        def add(current: list[str]) -> list[str]:
            if tag in current:
                return current
            return [tag, *current] if position == "start" else [*current, tag]

        return self._edit(tr("Added {tag!r} at the start", tag=tag) if position == "start" else
                          tr("Added {tag!r} at the end", tag=tag), [tag], add, images)

    def set_tags(self, image: str, tags: Sequence[str] | str) -> EditSummary:
        """Replace one image's tags (the per-image view): a list, or a caption string split at commas."""
        self._editable(image)
        entries = split_tags(tags) if isinstance(tags, str) else tags
        wanted = [_checked_tag(tag) for tag in entries if tag.strip()]
        return self._edit(tr("Edited the tags of {image}", image=image), wanted, lambda current: wanted, [image])

    def move_to_front(self, tags: Sequence[str]) -> EditSummary:
        """Put these tags first, in this order, wherever they appear (the trigger words first)."""
        front = list(dict.fromkeys(_checked_tag(tag) for tag in tags))

        def reorder(current: list[str]) -> list[str]:
            present = [tag for tag in front if tag in current]
            return present + [tag for tag in current if tag not in present]

        return self._edit(tr("Moved {tags} to the front", tags=_quoted(front)), front, reorder)

    def undo(self) -> EditSummary:
        """Revert the last edit (also one saved before a reload); captions changed since are left alone."""
        if not self._steps:
            return EditSummary(tr("Nothing to undo"), (), ())
        step = self._steps.pop()
        if step.file:
            self._forgotten_files.append(step.file)
        restored, left_alone = [], []
        for image, after in step.after.items():
            caption = self._captions.get(image)
            if caption is None or caption.tags != after:
                left_alone.append(image)
                continue
            caption.tags = list(step.before[image])
            restored.append(image)
        return EditSummary(tr("Undid: {action}", action=step.action), step.tags, tuple(restored), tuple(left_alone))

    # -- saving -----------------------------------------------------------------------------------

    def save(self) -> EditSummary:
        """Write the captions that changed, then record the undo history. Nothing is written if any caption
        file changed on disk since it was loaded (another tool wrote it): reload and redo the edit instead."""
        changed = {key: c for key, c in self._captions.items() if c.tags != c.saved_tags}
        conflicts = [str(c.path) for c in changed.values() if _current_bytes(c.path) != c.loaded]
        if conflicts:
            raise DatasetError(
                tr("These caption files changed on disk since they were loaded, so nothing was saved; reload the "
                   "captions and redo the edit:\n") + "\n".join(f"- {path}" for path in conflicts)
            )
        for caption in changed.values():
            data = _caption_text(caption.tags, caption.trailing).encode("utf-8")
            write_atomically(caption.path, data, overwrite=True)
            caption.loaded, caption.saved_tags = data, list(caption.tags)
        self._record_history()
        return EditSummary(tr("Saved"), (), tuple(changed))

    # -- internals --------------------------------------------------------------------------------

    def _editable(self, image: str) -> _Caption:
        if image in self._refused:
            raise DatasetError(tr("{value} Its caption is not edited.", value=self._refused[image]))
        if image not in self._captions:
            raise DatasetError(tr("There is no image {image!r} in {pictures_dir}.", image=image,
                                  pictures_dir=self.pictures_dir))
        return self._captions[image]

    def _edit(self, action: str, tags: Sequence[str], change: Callable[[list[str]], list[str]],
              images: Iterable[str] | None = None) -> EditSummary:
        before: dict[str, list[str]] = {}
        after: dict[str, list[str]] = {}
        for image in dict.fromkeys(self._captions if images is None else images):
            caption = self._captions[image]
            changed = change(list(caption.tags))
            if changed != caption.tags:
                before[image], after[image] = caption.tags, list(changed)
                caption.tags = changed
        if after:  # an edit that changed nothing is not worth an undo step
            self._steps.append(_Step(action, tuple(tags), before, after))
            for dropped in self._steps[:-MAX_UNDO_STEPS]:
                if dropped.file:
                    self._forgotten_files.append(dropped.file)
            del self._steps[:-MAX_UNDO_STEPS]
        return EditSummary(action, tuple(tags), tuple(after))

    def _record_history(self) -> None:
        for path in self._forgotten_files:
            path.unlink(missing_ok=True)
        self._forgotten_files.clear()
        new_steps = [step for step in self._steps if step.file is None]
        if not new_steps:
            return
        self.history_dir.mkdir(parents=True, exist_ok=True)
        number = max((_step_number(path) for path in self.history_dir.glob("*.json")), default=0)
        for step in new_steps:
            number += 1
            step.file = self.history_dir / f"{number:06d}.json"
            record = {"action": step.action, "tags": list(step.tags), "before": step.before, "after": step.after}
            write_atomically(step.file, json.dumps(record, ensure_ascii=False).encode("utf-8"), overwrite=True)


def _read_caption_file(path: Path) -> _Caption:
    if not path.is_file():
        return _Caption(path, None, [], [], "")
    tags = split_tags(read_caption(path))  # refuses legacy encodings, naming the file
    data = path.read_bytes()
    lines = data.decode("utf-8-sig").splitlines(keepends=True)
    first = next((index for index, line in enumerate(lines) if line.strip()), len(lines))
    return _Caption(path, data, tags, list(tags), "".join(lines[first + 1 :]))


def _caption_text(tags: list[str], trailing: str) -> str:
    return ", ".join(tags) + ("\n" + trailing if trailing else "")


def _quoted(tags: Sequence[str]) -> str:
    return ", ".join(repr(tag) for tag in tags)


def _current_bytes(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _checked_tag(tag: str) -> str:
    tag = tag.strip()
    if not tag:
        raise DatasetError(tr("A tag cannot be empty."))
    if "," in tag or "\n" in tag:
        raise DatasetError(tr("The tag {tag!r} contains a comma or a line break; add the tags one at a time.",
                              tag=tag))
    return tag


def _step_number(path: Path) -> int:
    return int(path.stem) if path.stem.isdigit() else 0


def _load_steps(history_dir: Path) -> list[_Step]:
    steps = []
    for path in sorted(history_dir.glob("*.json"), key=_step_number) if history_dir.is_dir() else []:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            steps.append(_Step(record["action"], tuple(record["tags"]), record["before"], record["after"], path))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a damaged record is skipped: undo checks every caption against it anyway
    return steps

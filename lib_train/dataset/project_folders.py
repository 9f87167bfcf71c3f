"""Where a Train Tools project keeps its files, under the projects folder (``<data>/train_tools`` by default).

``originals/`` holds untouched copies of everything imported, ``pictures/`` the prepared images and their
``.txt`` captions (the training folder, the only place captions are edited), ``grids/`` the preview grids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..common.files import check_output_name


@dataclass(frozen=True)
class ProjectFolders:
    root: Path

    @classmethod
    def for_name(cls, projects_dir: str | Path, name: str) -> "ProjectFolders":
        """The project named like its LoRA; the name is checked like a LoRA name (no path parts)."""
        return cls(Path(projects_dir) / check_output_name(name))

    @property
    def originals(self) -> Path:
        return self.root / "originals"

    @property
    def pictures(self) -> Path:
        return self.root / "pictures"

    @property
    def grids(self) -> Path:
        return self.root / "grids"

    @property
    def caption_history(self) -> Path:
        """Undo snapshots of caption edits."""
        return self.root / "caption_history"

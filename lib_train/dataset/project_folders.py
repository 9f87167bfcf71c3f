"""Where a Train Tools project keeps its files, under the projects folder (``<data>/train_tools`` by default).

``originals/`` holds untouched copies of everything imported, ``pictures/`` the prepared images and their
``.txt`` captions (the training folder, the only place captions are edited), ``grids/`` the preview grids,
``cache/`` the latents and caption embeddings kept between trainings, ``samples/`` the pictures rendered during
trainings (a folder per run), ``regularization/`` the class pictures made for it, ``training_state/`` the state of
the last saved epoch that Continue starts from (never in the Lora folder, where the WebUI lists files).
"""

from __future__ import annotations

import hashlib
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
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def regularization(self) -> Path:
        return self.root / "regularization"

    @property
    def caption_history(self) -> Path:
        """Undo snapshots of caption edits."""
        return self.root / "caption_history"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def training_state(self) -> Path:
        return self.root / "training_state"


# Caches of training folders that are not a project's pictures; the dot keeps them out of the project list.
FOLDER_CACHES = ".folder-caches"


def cache_folder_for(projects_dir: str | Path, train_dir: str | Path) -> Path:
    """Where the training folder's cache lives: in the project for a project's ``pictures/``, else under the
    projects folder, named by the training folder's path (never inside it: a user's folder is not written to)."""
    projects, folder = Path(projects_dir).resolve(), Path(train_dir).resolve()
    if folder.name == "pictures" and folder.parent.parent == projects:
        return ProjectFolders(folder.parent).cache
    return projects / FOLDER_CACHES / hashlib.sha256(str(folder).encode("utf-8")).hexdigest()[:16]

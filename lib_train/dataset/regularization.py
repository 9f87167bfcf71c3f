"""Regularization pictures, as kohya sd-scripts reads its ``reg_data_dir``: ``<N>_<class>`` subfolders of class
pictures (captions in ``<image>.txt``, else the class name), mixed into the training pictures' buckets and
batches, each one's loss multiplied by the prior-loss weight.

An epoch holds as many regularization items as training items: kohya registers every folder's pictures with
their repeats until the training count is reached (pictures beyond it are not used), then adds one repeat at a
time, picture by picture, until the counts match. So an epoch has about twice the steps of one without them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..common.errors import DatasetError
from ..common.i18n import N_, tr

if TYPE_CHECKING:  # training_data builds its epochs with the functions below
    from .training_data import FolderScan, ImageRecord

REG_FOLDER_KIND = N_("Regularization folder")


def check_separate_folders(reg_dir: str | Path, train_dir: str | Path) -> None:
    reg, train = Path(reg_dir).resolve(), Path(train_dir).resolve()
    if reg == train or train in reg.parents or reg in train.parents:
        raise DatasetError(tr("The regularization folder {reg} and the training folder {train} overlap: keep the "
                              "class pictures in a folder of their own, beside the training folder.",
                              reg=reg, train=train))


def as_regularization(scan: "FolderScan") -> "FolderScan":
    """A survey of the regularization folder (one repeat when flat), its pictures marked as class pictures."""
    uncaptioned = [record for record in scan.records if not record.caption.strip()]
    if uncaptioned:
        raise DatasetError(tr("{count} regularization picture(s) have no caption, e.g. {path}: put them in subfolders "
                              "named like '1_person' (the class becomes the caption) or give each a .txt caption.",
                              count=len(uncaptioned), path=uncaptioned[0].path))
    return dataclasses.replace(scan, records=[dataclasses.replace(record, is_reg=True) for record in scan.records])


def balanced_repeats(train_items: int, reg_records: Sequence["ImageRecord"]) -> list["ImageRecord"]:
    """The regularization pictures of one epoch with the repeats that give ``train_items`` of them (kohya's
    rule); pictures not reached are left out."""
    if not reg_records:
        return []
    repeats: list[int] = []
    count = 0
    for record in reg_records:  # first pass: each picture with its folder's repeats, until the count is reached
        repeats.append(record.repeats)
        count += record.repeats
        if count >= train_items:
            break
    index = 0
    while count < train_items:  # then one more repeat per picture in turn
        repeats[index % len(repeats)] += 1
        count += 1
        index += 1
    return [dataclasses.replace(record, repeats=n) for record, n in zip(reg_records, repeats)]


def regularization_dirs(reg_records: Sequence["ImageRecord"]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_reg_dataset_dirs``: {folder: {"n_repeats", "img_count"}}, the folder's own repeat count."""
    dirs: dict[str, dict[str, int]] = {}
    for record in reg_records:
        entry = dirs.setdefault(record.folder, {"n_repeats": record.repeats, "img_count": 0})
        entry["img_count"] += 1
    return dirs

"""Bad input gives a clear error before any work, and nothing is written to the output folder."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from lib_train.common.errors import ConfigError, DatasetError, OutputError
from lib_train.engine.model_guard import fingerprint
from lib_train.engine.train import train_lora

from .conftest import make_concept_images, tiny_config
from .test_save import read_metadata


def run_expecting(host, tmp_path, error, match, data=None, **overrides):
    before = fingerprint(host.model)
    with pytest.raises(error, match=match):
        train_lora(host, tiny_config(data or tmp_path / "data", tmp_path / "out", **overrides))
    assert not (tmp_path / "out").exists(), "nothing may be written on failure"
    assert fingerprint(host.model) == before


def test_missing_folder(tiny_host, tmp_path):
    run_expecting(tiny_host, tmp_path, DatasetError, "does not exist|not found|No such", data=tmp_path / "nope")


def test_empty_folder(tiny_host, tmp_path):
    (tmp_path / "data").mkdir()
    run_expecting(tiny_host, tmp_path, DatasetError, "[Nn]o images")


def test_folder_without_images(tiny_host, tmp_path):
    (tmp_path / "data" / "2_x").mkdir(parents=True)
    (tmp_path / "data" / "2_x" / "notes.txt").write_text("hello")
    run_expecting(tiny_host, tmp_path, DatasetError, "[Nn]o images")


def test_corrupt_and_empty_images_are_all_named(tiny_host, tmp_path):
    folder = make_concept_images(tmp_path / "data" / "2_x", count=2)
    (folder / "zero.png").write_bytes(b"")
    good = (folder / "img_00.png").read_bytes()
    (folder / "cut.png").write_bytes(good[: len(good) // 2])
    run_expecting(tiny_host, tmp_path, DatasetError, r"(?s)cut\.png.*zero\.png|zero\.png.*cut\.png")


def test_unusable_files_can_be_skipped_and_are_left_untouched(tiny_host, tmp_path):
    folder = make_concept_images(tmp_path / "data" / "2_x", count=3)
    good = (folder / "img_00.png").read_bytes()
    (folder / "cut.png").write_bytes(good[: len(good) // 2])
    (folder / "img_01.txt").write_bytes("红色的圆, 女孩".encode("gbk"))
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    # Refused by default, with the files listed and the way out named.
    run_expecting(tiny_host, tmp_path, DatasetError, r"(?s)cut\.png.*img_01\.txt.*Skip unusable files.*other 2 picture")

    result = train_lora(tiny_host, tiny_config(tmp_path / "data", tmp_path / "out", epochs=1, skip_unusable_files=True))
    assert len(result.skipped_files) == 2
    assert any("cut.png" in s for s in result.skipped_files) and any("img_01.txt" in s for s in result.skipped_files)
    meta = read_metadata(result.saved_files[-1])
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_x": {"n_repeats": 2, "img_count": 2}}  # img_00 and img_02
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before


def test_skipping_needs_one_usable_picture(tiny_host, tmp_path):
    folder = tmp_path / "data" / "2_x"
    folder.mkdir(parents=True)
    (folder / "zero.png").write_bytes(b"")
    run_expecting(tiny_host, tmp_path, DatasetError, r"(?s)zero\.png.*No picture of the folder can be used",
                  skip_unusable_files=True)


def test_gbk_caption_is_refused_with_the_file_named(tiny_host, tmp_path):
    folder = make_concept_images(tmp_path / "data" / "2_x", count=2)
    (folder / "img_01.txt").write_bytes("红色的圆, 女孩".encode("gbk"))
    run_expecting(tiny_host, tmp_path, DatasetError, r"img_01\.txt.*GBK")


def test_subfolder_without_repeat_prefix(tiny_host, tmp_path):
    make_concept_images(tmp_path / "data" / "subject", count=2)
    run_expecting(tiny_host, tmp_path, DatasetError, "10_subject")


def test_name_with_parent_path_is_refused(tiny_host, tmp_path):
    make_concept_images(tmp_path / "data" / "2_x", count=2)
    run_expecting(tiny_host, tmp_path, OutputError, "cannot be used", name="../escape")
    assert not (tmp_path / "escape.safetensors").exists()


def test_existing_output_is_not_overwritten(tiny_host, tmp_path):
    make_concept_images(tmp_path / "data" / "2_x", count=2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tiny.safetensors").write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exist"):
        train_lora(tiny_host, tiny_config(tmp_path / "data", tmp_path / "out"))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["tiny.safetensors"]
    assert (tmp_path / "out" / "tiny.safetensors").read_bytes() == b"keep me"


def test_non_ascii_paths_and_flat_folder_train(tiny_host, tmp_path):
    folder = make_concept_images(tmp_path / "数据", count=2)
    Image.new("RGB", (80, 64), "blue").save(folder / "图片.png")
    result = train_lora(tiny_host, tiny_config(folder, tmp_path / "输出", name="角色", repeats=2, epochs=1))
    assert [p.name for p in result.saved_files] == ["角色.safetensors"]


@pytest.mark.parametrize("overrides, match", [
    (dict(rank=0), "Rank"), (dict(resolution=100), "multiple of 64"), (dict(epochs=0), "Epochs"),
    (dict(optimizer="SGD"), "Optimizer"), (dict(unet_lr=float("nan")), "learning rate"),
])
def test_bad_settings(tiny_host, tmp_path, overrides, match):
    make_concept_images(tmp_path / "data" / "2_x", count=2)
    run_expecting(tiny_host, tmp_path, ConfigError, match, **overrides)

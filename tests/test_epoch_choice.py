"""Choosing a grid cell: the final file, its metadata and aliases, the preview, the card, deleting the others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lib_train.common.errors import OutputError
from lib_train.engine.save import precalculated_hashes
from lib_train.preview.epoch_choice import choose_epoch
from lib_train.preview.grid_spec import epoch_files, read_lora_metadata

from .test_grid_spec import lora_state, write_run


def cell_picture(shade: int = 90) -> Image.Image:
    picture = Image.new("RGB", (48, 32), (shade, 20, 200))
    picture.putpixel((3, 4), (255, 255, 0))
    return picture


def the_file(folder: Path, stem: str):
    return next(f for f in epoch_files(folder, "hero") if f.path.stem == stem)


def webui_aliases(folder: Path) -> list[str]:
    """What the WebUI's Lora list calls each file: ss_output_name, else the file stem (NetworkOnDisk.alias)."""
    return [(read_lora_metadata(path) or {}).get("ss_output_name", path.stem)
            for path in sorted(folder.rglob("*.safetensors"))]


def assert_tensors_equal(path: Path, expected: dict[str, torch.Tensor]) -> None:
    loaded = load_file(str(path))
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)


def test_choosing_an_epoch_makes_it_the_final_file(tmp_path):
    write_run(tmp_path, "hero", epochs=3)
    card = json.loads((tmp_path / "hero.json").read_text("utf-8"))
    card["description"] = "edited by the user on the card"
    (tmp_path / "hero.json").write_text(json.dumps(card), encoding="utf-8")
    epoch_2_meta = read_lora_metadata(tmp_path / "hero-000002.safetensors")

    result = choose_epoch(tmp_path, "hero", the_file(tmp_path, "hero-000002"), 0.7, cell_picture())

    final = tmp_path / "hero.safetensors"
    assert result.final_path == final and result.copied and result.deleted == []
    assert_tensors_equal(final, lora_state(2))
    meta = read_lora_metadata(final)
    assert meta["ss_output_name"] == "hero" and meta["modelspec.title"] == "hero"
    assert meta["ss_epoch"] == "2" and meta["ss_session_id"] == epoch_2_meta["ss_session_id"]
    # Same tensors, same model hash; the hashes are those of the file as written now.
    assert meta["sshs_model_hash"] == epoch_2_meta["sshs_model_hash"]
    ss_only = {k: v for k, v in meta.items() if k.startswith("ss_")}
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == precalculated_hashes(load_file(str(final)), ss_only)

    # The old final (epoch 3) was the only copy of its weights: it is kept as an epoch file.
    kept = tmp_path / "hero-000003.safetensors"
    assert result.kept_final_as == kept
    assert_tensors_equal(kept, lora_state(3))
    assert read_lora_metadata(kept)["ss_output_name"] == "hero-000003"
    assert json.loads(kept.with_suffix(".json").read_text("utf-8"))["description"] == "edited by the user on the card"

    # The card: preferred weight set, what the user wrote kept.
    saved_card = json.loads((tmp_path / "hero.json").read_text("utf-8"))
    assert saved_card["preferred weight"] == 0.7
    assert saved_card["description"] == "edited by the user on the card"
    assert saved_card["activation text"] == "ttconcept"

    with Image.open(tmp_path / "hero.preview.png") as preview:
        assert preview.format == "PNG" and list(preview.convert("RGB").getdata()) == list(cell_picture().getdata())

    # Every file keeps a distinct alias, so the WebUI reports no "Duplicate alias".
    aliases = webui_aliases(tmp_path)
    assert sorted(aliases) == ["hero", "hero-000001", "hero-000002", "hero-000003"]
    assert all(read_lora_metadata(p)["ss_output_name"] == p.stem for p in tmp_path.glob("*.safetensors"))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left

    files = epoch_files(tmp_path, "hero")
    assert [(f.epoch, f.label) for f in files] == [(1, "epoch 1"), (2, "epoch 2"), (2, "final"), (3, "epoch 3")]


def test_choosing_again_needs_no_second_copy_of_the_final(tmp_path):
    write_run(tmp_path, "hero", epochs=3)
    choose_epoch(tmp_path, "hero", the_file(tmp_path, "hero-000002"), 0.7, cell_picture())

    result = choose_epoch(tmp_path, "hero", the_file(tmp_path, "hero-000001"), 1.0, cell_picture(30))

    assert result.kept_final_as is None  # hero-000002 already holds what the final held
    assert_tensors_equal(tmp_path / "hero.safetensors", lora_state(1))
    assert_tensors_equal(tmp_path / "hero-000002.safetensors", lora_state(2))
    assert json.loads((tmp_path / "hero.json").read_text("utf-8"))["preferred weight"] == 1.0
    assert len(set(webui_aliases(tmp_path))) == 4


def test_choosing_the_final_copies_nothing(tmp_path):
    write_run(tmp_path, "hero", epochs=2)
    final = tmp_path / "hero.safetensors"
    before = final.read_bytes()

    result = choose_epoch(tmp_path, "hero", the_file(tmp_path, "hero"), 0.6, cell_picture())

    assert not result.copied and result.kept_final_as is None
    assert final.read_bytes() == before
    assert json.loads((tmp_path / "hero.json").read_text("utf-8"))["preferred weight"] == 0.6
    assert (tmp_path / "hero.preview.png").is_file()


def test_delete_others_removes_only_this_runs_epoch_files(tmp_path):
    write_run(tmp_path, "hero", epochs=4)
    (tmp_path / "hero-000001.png").write_bytes(b"a preview the user set in the WebUI")
    (tmp_path / "notes.txt").write_text("mine")
    save_file(lora_state(9), str(tmp_path / "hero-000009.safetensors"), {"ss_output_name": "hero-000009",
                                                                         "ss_session_id": "12345", "ss_epoch": "9"})
    other_folder = tmp_path / "elsewhere"
    write_run(other_folder, "hero", epochs=2)

    result = choose_epoch(tmp_path, "hero", the_file(tmp_path, "hero-000002"), 0.8, cell_picture(),
                          delete_others=True)

    gone = {"hero-000001.safetensors", "hero-000001.json", "hero-000003.safetensors", "hero-000003.json"}
    assert {p.name for p in result.deleted} == gone
    assert result.kept_final_as is None  # the old final is replaced, as asked
    remaining = {p.name for p in tmp_path.iterdir() if p.is_file()}
    assert remaining == {"hero.safetensors", "hero.json", "hero.preview.png", "hero-000002.safetensors",
                         "hero-000002.json", "hero-000001.png", "notes.txt", "hero-000009.safetensors"}
    assert {p.name for p in other_folder.iterdir()} == {"hero.safetensors", "hero.json", "hero-000001.safetensors",
                                                       "hero-000001.json"}
    assert_tensors_equal(tmp_path / "hero.safetensors", lora_state(2))


def test_a_final_from_elsewhere_is_not_replaced(tmp_path):
    write_run(tmp_path, "hero", epochs=2, session_id=7)
    foreign = tmp_path / "hero.safetensors"
    save_file(lora_state(5), str(foreign), {"ss_output_name": "hero", "ss_session_id": "999", "ss_epoch": "5"})
    before = foreign.read_bytes()

    with pytest.raises(OutputError, match="hero.safetensors was not written by the training run of hero-000001"):
        choose_epoch(tmp_path, "hero", the_file(tmp_path, "hero-000001"), 1.0, cell_picture())
    assert foreign.read_bytes() == before

    save_file(lora_state(5), str(foreign))  # no metadata at all
    before = foreign.read_bytes()
    with pytest.raises(OutputError, match="not written by the training run"):
        choose_epoch(tmp_path, "hero", the_file(tmp_path, "hero-000001"), 1.0, cell_picture())
    assert foreign.read_bytes() == before
    assert not (tmp_path / "hero.preview.png").exists()


def test_a_missing_card_is_created_from_the_epochs_card(tmp_path):
    write_run(tmp_path, "hero", epochs=2)
    (tmp_path / "hero.json").unlink()

    choose_epoch(tmp_path, "hero", the_file(tmp_path, "hero-000001"), 0.9, cell_picture())

    card = json.loads((tmp_path / "hero.json").read_text("utf-8"))
    epoch_card = json.loads((tmp_path / "hero-000001.json").read_text("utf-8"))
    assert card == dict(epoch_card, **{"preferred weight": 0.9})
    assert "epoch 1/2" in card["notes"]


def test_a_broken_card_is_reported_before_anything_changes(tmp_path):
    write_run(tmp_path, "hero", epochs=2)
    (tmp_path / "hero.json").write_text("{not json", encoding="utf-8")
    before = (tmp_path / "hero.safetensors").read_bytes()

    with pytest.raises(OutputError, match="hero.json is not valid JSON"):
        choose_epoch(tmp_path, "hero", the_file(tmp_path, "hero-000001"), 0.9, cell_picture())

    assert (tmp_path / "hero.safetensors").read_bytes() == before
    assert not (tmp_path / "hero-000002.safetensors").exists()


def test_bad_choices_are_refused(tmp_path):
    write_run(tmp_path, "hero", epochs=2)
    epoch_1 = the_file(tmp_path, "hero-000001")
    with pytest.raises(OutputError, match="preferred weight 7.0 is outside -2 to 3"):
        choose_epoch(tmp_path, "hero", epoch_1, 7.0, cell_picture())
    write_run(tmp_path / "other", "villain", epochs=2)
    stranger = epoch_files(tmp_path / "other", "villain")[0]
    with pytest.raises(OutputError, match="is not one of the files of the LoRA 'hero'"):
        choose_epoch(tmp_path, "hero", stranger, 1.0, cell_picture())
    epoch_1.path.unlink()
    with pytest.raises(OutputError, match="does not exist any more"):
        choose_epoch(tmp_path, "hero", epoch_1, 1.0, cell_picture())


def test_a_stopped_run_without_final_gets_one(tmp_path):
    write_run(tmp_path, "hero", epochs=3)
    (tmp_path / "hero.safetensors").unlink()  # Stop before the last epoch keeps only the finished epochs
    (tmp_path / "hero.json").unlink()

    result = choose_epoch(tmp_path, "hero", the_file(tmp_path, "hero-000002"), 0.5, cell_picture())

    assert result.copied and result.kept_final_as is None
    assert_tensors_equal(tmp_path / "hero.safetensors", lora_state(2))
    assert json.loads((tmp_path / "hero.json").read_text("utf-8"))["preferred weight"] == 0.5
    assert sorted(webui_aliases(tmp_path)) == ["hero", "hero-000001", "hero-000002"]

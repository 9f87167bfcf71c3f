"""The preview grid's settings: number lists, validation, the prefilled prompt, the epoch files, the cells."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_train.common.errors import ConfigError
from lib_train.common.i18n import CHINESE, language_scope
from lib_train.dataset.training_data import scan_training_folder
from lib_train.engine.metadata import RunFacts, lora_metadata, sidecar
from lib_train.engine.save import OutputPlan, write_lora, write_sidecar
from lib_train.hosts.protocol import BaseModelInfo, ModelFamily, PredictionType
from lib_train.preview.grid_spec import (
    MAX_CELLS,
    GridSpec,
    default_prompt,
    epoch_files,
    parse_number_list,
    read_lora_metadata,
)

from .conftest import make_concept_images, tiny_config


def lora_state(epoch: int) -> dict[str, torch.Tensor]:
    """Small but real kohya LoRA tensors whose values tell the epoch apart."""
    generator = torch.Generator().manual_seed(epoch)
    return {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 32, generator=generator),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, 4, generator=generator),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
    }


def write_run(folder: Path, name: str, epochs: int, session_id: int = 7, save_every: int = 1,
              tag_frequency: dict | None = None) -> list[Path]:
    """The files one training run leaves, written as ``train.py`` writes them (same plan, metadata, sidecar)."""
    config = tiny_config(folder, folder, name=name, epochs=epochs, save_every_n_epochs=save_every,
                         trigger_words="ttconcept", comment="my character")
    facts = RunFacts(ModelFamily.SD1, PredictionType.EPSILON, BaseModelInfo(name="base.safetensors"),
                     session_id=session_id, started_at=time.time(), num_train_images=6, num_batches_per_epoch=3,
                     max_train_steps=3 * epochs, dataset_dirs={}, tag_frequency=tag_frequency or {}, bucket_info={})
    plan = OutputPlan.create(folder, name, epochs, save_every, overwrite=False)
    written = []
    for epoch in range(1, epochs + 1):
        if plan.saves_after_epoch(epoch):
            metadata = lora_metadata(config, facts, output_name=plan.stem(epoch), epoch=epoch, steps=3 * epoch)
            write_lora(plan.lora_path(epoch), lora_state(epoch), metadata, overwrite=False)
            write_sidecar(plan.sidecar_path(epoch), sidecar(config, ModelFamily.SD1, epoch), overwrite=False)
            written.append(plan.lora_path(epoch))
    return written


# -- number lists -------------------------------------------------------------------------------


def test_number_list_accepts_commas_and_spaces():
    assert parse_number_list("0.4, 0.6, 0.8,1") == [0.4, 0.6, 0.8, 1.0]
    assert parse_number_list(" -0.5 0.5\n1 ") == [-0.5, 0.5, 1.0]
    assert parse_number_list("1234, 99", integers=True) == [1234, 99]


@pytest.mark.parametrize("text, integers, message", [
    ("", False, "at least one number for the weights"),
    (" , ,", False, "at least one number for the weights"),
    ("0.4, abc, 1", False, "'abc' in the weights is not a number"),
    ("0.5, nan", False, "'nan' in the weights is not a finite"),
    ("1, 1.0", False, "1.0 appears twice"),
    ("12, 3.5", True, "'3.5' in the weights is not a whole number"),
])
def test_number_list_errors_name_the_bad_part(text, integers, message):
    with pytest.raises(ConfigError, match=message):
        parse_number_list(text, "weights", integers=integers)


# -- validation ---------------------------------------------------------------------------------


def test_a_sensible_spec_validates():
    spec = GridSpec(prompt="ttconcept, red circle", seeds=[1, 2], third_axis="seed", epochs=[1, 2])
    assert spec.validate() is spec


@pytest.mark.parametrize("changes, message", [
    (dict(prompt="  "), "preview prompt"),
    (dict(weights=[0.5, 3.5]), "3.5 is outside -2 to 3"),
    (dict(weights=[]), "at least one Lora weight"),
    (dict(steps=0), "Steps must be between 1 and 150"),
    (dict(width=500), "Width must be a multiple of 8"),
    (dict(seeds=[-1]), "Seed -1 must be between 0"),
    (dict(seeds=[1, 2]), "2 seeds need the third axis set to seed"),
    (dict(cfg_values=[5.0]), "third axis is not cfg"),
    (dict(third_axis="cfg"), "CFG scales of the third axis"),
    (dict(third_axis="sampler"), "must be none, seed or cfg"),
    (dict(epochs=[]), "at least one epoch"),
    (dict(weights=[i / 10 for i in range(11)], epochs=list(range(1, 11))),
     "110 cells \\(11 weights × 10 epochs\\); at most 100"),
])
def test_bad_specs_are_refused_with_the_reason(changes, message):
    values = dict(prompt="ttconcept")
    values.update(changes)
    with pytest.raises(ConfigError, match=message):
        GridSpec(**values).validate()


# -- prefilled prompt ---------------------------------------------------------------------------


def test_default_prompt_is_trigger_then_most_frequent_caption_tags(tmp_path):
    folder = tmp_path / "pictures" / "3_concept"
    make_concept_images(folder, count=4, caption="ttconcept, red circle")
    (folder / "img_00.txt").write_text("ttconcept, red circle, hat (object), smile", encoding="utf-8")
    (folder / "img_01.txt").write_text("ttconcept, red circle, hat (object)", encoding="utf-8")
    config = tiny_config(tmp_path / "pictures", tmp_path / "out")
    frequency = config.training_data(scan_training_folder(tmp_path / "pictures", 1)).tag_frequency()

    # Through a saved file, as the tab will read it back from the LoRA.
    write_run(tmp_path / "lora", "hero", epochs=1, tag_frequency=frequency)
    stored = json.loads(read_lora_metadata(tmp_path / "lora" / "hero.safetensors")["ss_tag_frequency"])
    prompt = default_prompt("TTconcept", stored, count=3)

    # red circle is in every caption, the hat in two; tags of a single picture (smile, grey N) are not typical;
    # the trigger word is not repeated; ( ) are escaped.
    assert prompt == "TTconcept, red circle, hat \\(object\\)"


def test_default_prompt_without_tags_is_the_trigger_words():
    assert default_prompt("abc, def", {}) == "abc, def"


# -- epoch files --------------------------------------------------------------------------------


def test_epoch_files_are_ordered_with_the_final_last(tmp_path):
    write_run(tmp_path, "hero", epochs=4, save_every=2)
    (tmp_path / "other-000001.safetensors").write_bytes((tmp_path / "hero-000002.safetensors").read_bytes())
    (tmp_path / "hero-step00000050.safetensors").write_bytes(b"not ours")
    (tmp_path / "hero_v2.safetensors").write_bytes(b"not ours either")

    files = epoch_files(tmp_path, "hero")

    assert [(f.epoch, f.path.name, f.is_final, f.label) for f in files] == [
        (2, "hero-000002.safetensors", False, "epoch 2"),
        (4, "hero.safetensors", True, "final"),
    ]
    assert files[0].alias == "hero-000002"


def test_epoch_comes_from_the_suffix_without_metadata(tmp_path):
    save_file(lora_state(1), str(tmp_path / "hero-000003.safetensors"))
    save_file(lora_state(2), str(tmp_path / "hero.safetensors"))

    files = epoch_files(tmp_path, "hero")

    assert [(f.epoch, f.is_final) for f in files] == [(3, False), (4, True)]


def test_a_final_equal_to_an_epoch_is_listed_after_it(tmp_path):
    write_run(tmp_path, "hero", epochs=3)
    final_copy_of_epoch_2 = read_lora_metadata(tmp_path / "hero-000002.safetensors")
    final_copy_of_epoch_2["ss_output_name"] = "hero"
    write_lora(tmp_path / "hero.safetensors", lora_state(2), final_copy_of_epoch_2, overwrite=True)

    files = epoch_files(tmp_path, "hero")

    assert [(f.epoch, f.label) for f in files] == [(1, "epoch 1"), (2, "epoch 2"), (2, "final")]


# -- cells and labels ---------------------------------------------------------------------------


def test_cells_run_x_then_y_then_z(tmp_path):
    write_run(tmp_path, "hero", epochs=3)
    spec = GridSpec(prompt="ttconcept", weights=[0.5, 1.0], epochs=[1, 3], seeds=[11, 22], third_axis="seed")

    cells = list(spec.validate().cells(epoch_files(tmp_path, "hero")))

    assert [(c.ix, c.iy, c.iz) for c in cells] == [(x, y, z) for z in range(2) for y in range(2) for x in range(2)]
    assert [(c.epoch.label, c.weight, c.seed) for c in cells[:4]] == [
        ("epoch 1", 0.5, 11), ("epoch 1", 1.0, 11), ("final", 0.5, 11), ("final", 1.0, 11)]
    assert {c.seed for c in cells[4:]} == {22}
    assert all(c.cfg_scale == spec.cfg_scale for c in cells)
    assert spec.prompt_for(cells[1]) == "ttconcept <lora:hero-000001:1>"
    assert spec.axis_labels(spec.select_epochs(epoch_files(tmp_path, "hero"))) == (
        ["weight: 0.5", "weight: 1"], ["epoch 1", "final"], ["seed: 11", "seed: 22"])


def test_cfg_as_third_axis(tmp_path):
    write_run(tmp_path, "hero", epochs=1)
    spec = GridSpec(prompt="p", weights=[1.0], third_axis="cfg", cfg_values=[4.0, 7.5], seeds=[5]).validate()

    cells = list(spec.cells(epoch_files(tmp_path, "hero")))

    assert [(c.cfg_scale, c.seed) for c in cells] == [(4.0, 5), (7.5, 5)]
    assert spec.axis_labels([cells[0].epoch])[2] == ["CFG: 4", "CFG: 7.5"]


def test_missing_epochs_and_too_many_rows_are_refused(tmp_path):
    write_run(tmp_path, "hero", epochs=3)
    available = epoch_files(tmp_path, "hero")
    with pytest.raises(ConfigError, match="No file for epoch 5; saved epochs: 1, 2, 3"):
        GridSpec(prompt="p", epochs=[2, 5]).select_epochs(available)
    # All epochs (None) is only known once the files are listed: the count is checked there.
    many = GridSpec(prompt="p", weights=[i / 10 for i in range(1, 21)], seeds=[1, 2], third_axis="seed")
    expected = f"120 cells \\(20 weights × 3 epochs × 2 seeds\\); at most {MAX_CELLS}"
    with pytest.raises(ConfigError, match=expected):
        many.validate().select_epochs(available)
    with language_scope(CHINESE), pytest.raises(ConfigError, match="20 个权重 × 3 轮 × 2 个种子"):
        many.validate().select_epochs(available)
    with pytest.raises(ConfigError, match="no saved files"):
        GridSpec(prompt="p").select_epochs([])

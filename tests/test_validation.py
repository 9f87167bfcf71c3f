"""The validation loss after each epoch (real steps on the tiny SD1): deterministic, written to each epoch's file,
falling while the LoRA learns, and without any effect on the training; Save now's extra file."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lib_train.engine.save_now import SaveNow
from lib_train.engine.train import train_lora
from lib_train.engine.validation import loss_plot_title, smoothed
from lib_train.hosts.sd1 import build_tiny_sd1
from lib_train.hosts.standalone import StandaloneHost
from lib_train.preview.grid_spec import epoch_files

from .conftest import make_concept_images, tiny_config


def metadata(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def same_tensors(a, b) -> bool:
    first, second = load_file(str(a)), load_file(str(b))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.fixture
def data(tmp_path):
    return make_concept_images(tmp_path / "data" / "3_concept", count=4)


def test_validation_loss_is_deterministic_and_in_every_epoch_file(tmp_path, data):
    runs = []
    for index in range(2):
        config = tiny_config(tmp_path / "data", tmp_path / f"out{index}", epochs=3, shuffle_caption=True, flip_aug=True)
        runs.append(train_lora(StandaloneHost(build_tiny_sd1(seed=0)), config))
    assert [epoch for epoch, _, _ in runs[0].validation_history] == [1, 2, 3]
    assert runs[0].validation_history == runs[1].validation_history  # the same numbers, to the last bit
    for (epoch, step, loss), path in zip(runs[0].validation_history, runs[0].saved_files):
        values = metadata(path)
        assert float(values["ss_validation_loss"]) == loss and int(values["ss_epoch"]) == epoch
        assert int(values["ss_steps"]) == step
        assert values["ss_num_validation_images"] == "4" and values["ss_validation_split"] == "0.0"


def test_validation_does_not_change_the_training(tmp_path, data):
    """Its own generator, no gradient, eval mode: with or without it the LoRA is bit-identical, and the host's
    modules are back in their own modes."""
    files = []
    for index, validation in enumerate((True, False)):
        host = StandaloneHost(build_tiny_sd1(seed=0))
        modes = [m.training for m in host.model.modules()]
        config = tiny_config(tmp_path / "data", tmp_path / f"out{index}", epochs=2, validation_loss=validation)
        result = train_lora(host, config)
        assert bool(result.validation_history) is validation
        assert [m.training for m in host.model.modules()] == modes
        files.append(result.saved_files[-1])
    assert same_tensors(*files)
    assert "ss_validation_loss" not in metadata(files[1]) and metadata(files[1])["ss_num_validation_images"] == "0"


def test_validation_loss_falls_while_the_lora_learns(tmp_path, data):
    config = tiny_config(tmp_path / "data", tmp_path / "out", epochs=5, save_every_n_epochs=0, batch_size=4,
                         unet_lr=1e-2, text_encoder_lr=5e-3)
    result = train_lora(StandaloneHost(build_tiny_sd1(seed=0)), config)
    losses = [loss for _, _, loss in result.validation_history]
    assert len(losses) == 5 and losses[-1] < losses[0] * 0.95, losses


def test_smoothed_loss_has_no_start_up_bias():
    assert smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    values = smoothed([1.0, 0.0] * 20)
    assert 0.4 < values[-1] < 0.6 and values[0] == 1.0


@pytest.mark.parametrize("history, title", [
    ([], "Loss"),
    ([(1, 3, 0.3), (2, 6, 0.2)], "Loss (validation lowest at epoch 2: 0.2000)"),
    # A NaN first is no lowest (min() would keep it: nothing compares below NaN), and it is named.
    ([(1, 3, float("nan")), (2, 6, 0.3), (3, 9, 0.2)],
     "Loss (validation lowest at epoch 3: 0.2000; not a number at epoch(s) 1)"),
    ([(1, 3, float("nan")), (2, 6, float("inf"))], "Loss (the validation loss is not a number at epoch(s) 1, 2)"),
])
def test_the_loss_plot_title_names_validation_losses_that_are_not_numbers(history, title):
    assert loss_plot_title(history) == title


def test_save_now_writes_an_extra_file_and_the_run_goes_on_unchanged(tmp_path, data):
    plain = train_lora(StandaloneHost(build_tiny_sd1(seed=0)), tiny_config(tmp_path / "data", tmp_path / "plain"))
    host = StandaloneHost(build_tiny_sd1(seed=0))
    save_now = SaveNow()
    host._on_progress = lambda p: save_now.request() if p.phase == "training" and p.step in (3, 4) else None
    result = train_lora(host, tiny_config(tmp_path / "data", tmp_path / "out"), save_now=save_now)
    names = sorted(p.name for p in result.saved_files)
    assert names == ["tiny-000001.safetensors", "tiny-step000003.safetensors", "tiny-step000004.safetensors",
                     "tiny.safetensors"]
    extra = tmp_path / "out" / "tiny-step000003.safetensors"
    assert metadata(extra)["ss_steps"] == "3" and metadata(extra)["ss_output_name"] == "tiny-step000003"
    assert (tmp_path / "out" / "tiny-step000003.json").is_file()
    assert same_tensors(result.saved_files[-1], plain.saved_files[-1])  # saving changed nothing of the training
    assert [f.path.name for f in epoch_files(tmp_path / "out", "tiny")] == ["tiny-000001.safetensors",
                                                                           "tiny.safetensors"]


def test_save_now_onto_an_existing_file_is_reported_and_training_goes_on(tmp_path, data):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tiny-step000002.safetensors").write_bytes(b"someone's file")
    host = StandaloneHost(build_tiny_sd1(seed=0))
    save_now = SaveNow()
    host._on_progress = lambda p: save_now.request() if p.phase == "training" and p.step == 2 else None
    result = train_lora(host, tiny_config(tmp_path / "data", tmp_path / "out"), save_now=save_now)
    assert not result.stopped and result.steps == result.total_steps
    assert (tmp_path / "out" / "tiny-step000002.safetensors").read_bytes() == b"someone's file"
    assert any("Save now failed" in p.message and "already exists" in p.message for p in host.progress_log)

"""Continue a run from its training state (real steps on the tiny SD1, real files): a run stopped at epoch k and
continued ends with the very tensors of an uninterrupted run; changed settings, pictures, broken states and a
full disk are named, and nothing saved before is damaged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lib_train.common.errors import ConfigError, OutputError
from lib_train.engine.model_guard import fingerprint, hook_count
from lib_train.engine.train import train_lora
from lib_train.engine.training_state import ResumeChanged, load_state, state_path
from lib_train.hosts.sd1 import build_tiny_sd1
from lib_train.hosts.standalone import StandaloneHost

from .conftest import make_concept_images, tiny_config


def fresh_host() -> StandaloneHost:
    """A new process's model, as after a WebUI restart."""
    return StandaloneHost(build_tiny_sd1(seed=0))


def stop_after_epoch(host: StandaloneHost, epoch: int) -> None:
    """The host's Stop, asked as the first step of the next epoch begins (the epoch's state is written by then)."""
    def on_progress(progress):
        if progress.phase == "training" and progress.epoch == epoch + 1:
            host.request_stop()
    host._on_progress = on_progress


def tensor_bytes(path: Path) -> dict[str, bytes]:
    return {key: tensor.numpy().tobytes() for key, tensor in load_file(str(path)).items()}


def settings(tmp_path: Path, out: str, **overrides):
    values = dict(epochs=4, shuffle_caption=True, flip_aug=True, caption_dropout_rate=0.2, lr_scheduler="cosine",
                  lr_warmup_steps=2, state_dir=str(tmp_path / f"{out}-state"))
    values.update(overrides)
    return tiny_config(tmp_path / "data", tmp_path / out, **values)


@pytest.fixture
def data(tmp_path):
    return make_concept_images(tmp_path / "data" / "2_concept", count=4)


def test_stopped_and_continued_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, data):
    whole = train_lora(fresh_host(), settings(tmp_path, "whole"))

    host = fresh_host()
    stop_after_epoch(host, 2)
    first = train_lora(host, settings(tmp_path, "parts"))
    assert first.stopped and [p.name for p in first.saved_files] == ["tiny-000001.safetensors", "tiny-000002.safetensors"]
    state = state_path(tmp_path / "parts-state", "tiny")
    assert state.is_file() and not list((tmp_path / "parts").glob("*.pt"))  # beside the project, not with the LoRA
    assert load_state(state).epoch == 2

    second_host = fresh_host()
    before = fingerprint(second_host.model)
    second = train_lora(second_host, settings(tmp_path, "parts"), resume=True)
    assert second.continued_from_epoch == 2 and not second.stopped and second.changes == []
    assert [p.name for p in second.saved_files] == ["tiny-000003.safetensors", "tiny.safetensors"]
    assert second.steps == whole.steps == whole.total_steps
    assert second.loss_history == whole.loss_history  # every step's loss, the first part's included
    assert second.validation_history == whole.validation_history
    for name in ("tiny-000003.safetensors", "tiny.safetensors"):
        assert tensor_bytes(tmp_path / "parts" / name) == tensor_bytes(tmp_path / "whole" / name)
    # One run: the continued files carry the session id of the first part's.
    with safe_open(str(tmp_path / "parts" / "tiny.safetensors"), "pt") as final, \
            safe_open(str(tmp_path / "parts" / "tiny-000001.safetensors"), "pt") as first_file:
        assert final.metadata()["ss_session_id"] == first_file.metadata()["ss_session_id"]
    assert fingerprint(second_host.model) == before and hook_count(second_host.model) == 0


def test_continue_with_adamw_fp32_and_text_encoder_state_restores_the_optimizer(tmp_path, data):
    """Without the optimizer's moments the continued steps would differ: the test above would catch it, this one
    says what is in the state."""
    host = fresh_host()
    stop_after_epoch(host, 1)
    train_lora(host, settings(tmp_path, "run"))
    saved = load_state(state_path(tmp_path / "run-state", "tiny"))
    optimizer = saved.payload["optimizers"][0]
    assert optimizer["state"] and all("exp_avg" in entry for entry in optimizer["state"].values())
    assert saved.payload["schedules"][0]["last_epoch"] == saved.step
    assert any(key.startswith("lora_te_") for key in saved.payload["network"])
    assert saved.dataset and all(path.startswith("2_concept/") for path in saved.dataset)


def test_changed_settings_and_pictures_are_named_before_continuing(tmp_path, data):
    host = fresh_host()
    stop_after_epoch(host, 1)
    train_lora(host, settings(tmp_path, "run"))
    (data / "img_00.png").unlink()
    (data / "img_00.txt").unlink()
    make_concept_images(tmp_path / "extra", count=1)
    os.replace(tmp_path / "extra" / "img_00.png", data / "img_new.png")
    with pytest.raises(ResumeChanged) as refused:
        train_lora(fresh_host(), settings(tmp_path, "run", unet_lr=2e-3), resume=True)
    message = str(refused.value)
    assert "unet_lr: 0.001 → 0.002" in message
    assert "pictures added: 2_concept/img_new.png" in message and "pictures removed: 2_concept/img_00.png" in message
    # Accepted, the run goes on from epoch 2 with the new rate and pictures, and says what changed.
    result = train_lora(fresh_host(), settings(tmp_path, "run", unet_lr=2e-3), resume=True, accept_changes=True)
    assert result.continued_from_epoch == 1 and len(result.changes) == 3
    assert (tmp_path / "run" / "tiny.safetensors").is_file()


def test_an_accepted_learning_rate_change_is_the_rate_the_continued_run_trains_at(tmp_path, data):
    """The optimizer's saved state holds the old rates (its param groups) and the schedule its old base rates:
    restoring them as they are would train on at the old rate while the status and the file say the new one."""
    host = fresh_host()
    stop_after_epoch(host, 1)
    train_lora(host, settings(tmp_path, "run", lr_scheduler="constant", lr_warmup_steps=0))
    host = fresh_host()
    rates = []
    host._on_progress = lambda progress: rates.append(progress.learning_rate) if progress.phase == "training" else None
    result = train_lora(host, settings(tmp_path, "run", lr_scheduler="constant", lr_warmup_steps=0, unet_lr=2e-3),
                        resume=True, accept_changes=True)
    assert result.changes == ["unet_lr: 0.001 → 0.002"]
    assert rates and all(rate == pytest.approx(2e-3) for rate in rates)


@pytest.mark.parametrize("change, expected", [
    (dict(rank=8), "another shape than these settings ask for (rank 4 → 8)"),
    (dict(network_type="loha"), "network_type 'lora' → 'loha'"),
    (dict(text_encoder_lr=0.0), "the text encoder trained → not trained"),
    (dict(epochs=1), "nothing is left to train"),
])
def test_a_state_of_another_network_shape_or_a_finished_run_is_refused(tmp_path, data, change, expected):
    host = fresh_host()
    stop_after_epoch(host, 1)
    train_lora(host, settings(tmp_path, "run"))
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        train_lora(fresh_host(), settings(tmp_path, "run", **change), resume=True)


def test_a_state_of_another_model_family_is_refused(tmp_path, data):
    host = fresh_host()
    stop_after_epoch(host, 1)
    train_lora(host, settings(tmp_path, "run"))
    other = fresh_host()
    other.family = type(other.family)("sdxl")
    with pytest.raises(ConfigError, match="made on a SD1 model and the loaded model is SDXL"):
        train_lora(other, settings(tmp_path, "run"), resume=True)


def test_missing_and_damaged_states_are_named(tmp_path, data):
    with pytest.raises(ConfigError, match="There is no training state to continue from"):
        train_lora(fresh_host(), settings(tmp_path, "run"), resume=True)
    host = fresh_host()
    stop_after_epoch(host, 1)
    train_lora(host, settings(tmp_path, "run"))
    state = state_path(tmp_path / "run-state", "tiny")
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a crash while copying it, say
    host = fresh_host()
    before = fingerprint(host.model)
    with pytest.raises(ConfigError, match="is damaged and cannot be continued"):
        train_lora(host, settings(tmp_path, "run"), resume=True)
    assert fingerprint(host.model) == before and hook_count(host.model) == 0
    torch.save({"format": "something else"}, state)
    with pytest.raises(ConfigError, match="not a training state of this version"):
        train_lora(fresh_host(), settings(tmp_path, "run"), resume=True)


def test_a_full_disk_while_writing_the_state_keeps_the_previous_state(tmp_path, data):
    """The kernel's own ENOSPC: the temporary name of the state points at /dev/full when epoch 2 writes it."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full (Linux)")
    state = state_path(tmp_path / "run-state", "tiny")
    host = fresh_host()
    before = fingerprint(host.model)
    saved_epoch_one = []

    def fill_the_disk_before_the_second_state(progress):
        if progress.phase == "training" and progress.epoch == 2 and not saved_epoch_one:
            saved_epoch_one.append(state.read_bytes())
        if progress.phase == "saved" and progress.epoch == 2:
            state.with_name(f".{state.name}.{os.getpid()}.tmp").symlink_to("/dev/full")
    host._on_progress = fill_the_disk_before_the_second_state
    with pytest.raises(OutputError, match="Could not write the training state of epoch 2 .*The previous state"):
        train_lora(host, settings(tmp_path, "run"))
    assert state.read_bytes() == saved_epoch_one[0] and load_state(state).epoch == 1
    assert not [p for p in state.parent.iterdir() if p.name.endswith(".tmp")]
    assert fingerprint(host.model) == before and hook_count(host.model) == 0


def test_start_from_an_existing_lora_file(tmp_path, data):
    first = train_lora(fresh_host(), settings(tmp_path, "first", epochs=1, state_dir=""))
    start = first.saved_files[-1]
    host = fresh_host()
    seen = []
    host._on_progress = lambda p: seen.append(p.loss) if p.phase == "training" else None
    train_lora(host, settings(tmp_path, "second", epochs=1, state_dir="", initial_lora=str(start), lr_warmup_steps=0,
                              unet_lr=1e-9, text_encoder_lr=1e-9))
    # At a negligible rate the second run's file is the starting file (up to the rate's few last bits).
    started, ended = load_file(str(start)), load_file(str(tmp_path / "second" / "tiny.safetensors"))
    assert started.keys() == ended.keys()
    assert all(torch.allclose(started[k], ended[k], atol=1e-6) for k in started)
    assert any(started[k].abs().sum() > 0 for k in started if "lora_up" in k)  # not the zero initialisation


def test_a_lora_file_of_another_shape_or_alpha_is_refused(tmp_path, data):
    first = train_lora(fresh_host(), settings(tmp_path, "first", epochs=1, state_dir=""))
    start = first.saved_files[-1]
    host = fresh_host()
    before = fingerprint(host.model)
    with pytest.raises(ConfigError, match=r"lora_down.weight is \(4, .*this run's is \(8, .*another rank"):
        train_lora(host, settings(tmp_path, "second", state_dir="", initial_lora=str(start), rank=8))
    with pytest.raises(ConfigError, match="has alpha 4 .* the settings 2: set Alpha"):
        train_lora(host, settings(tmp_path, "second", state_dir="", initial_lora=str(start), alpha=2.0))
    with pytest.raises(ConfigError, match="1 tensor|tensor\\(s\\) missing"):
        unet_only = {k: v for k, v in load_file(str(start)).items() if k.startswith("lora_unet_")}
        save_file(unet_only, str(tmp_path / "unet_only.safetensors"))
        train_lora(host, settings(tmp_path, "second", state_dir="", initial_lora=str(tmp_path / "unet_only.safetensors")))
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="cannot be read"):
        train_lora(host, settings(tmp_path, "second", state_dir="", initial_lora=str(tmp_path / "broken.safetensors")))
    assert fingerprint(host.model) == before and hook_count(host.model) == 0
    assert not (tmp_path / "second").exists()


@pytest.mark.parametrize("optimizer", [
    dict(optimizer="AdamWScheduleFree", lr_scheduler="constant", lr_warmup_steps=2),  # averaged iterates, own warmup
    dict(optimizer="Prodigy", unet_lr=1.0, text_encoder_lr=1.0),  # its estimate d lives in the groups
    dict(optimizer="Lion", unet_lr=1e-4, text_encoder_lr=5e-5, loraplus_lr_ratio=4.0),  # LoRA+'s second group
], ids=["schedule_free", "prodigy", "lion_loraplus"])
def test_continue_is_bit_identical_with_other_optimizers(tmp_path, data, optimizer):
    whole = train_lora(fresh_host(), settings(tmp_path, "whole", epochs=3, **optimizer))
    host = fresh_host()
    stop_after_epoch(host, 1)
    train_lora(host, settings(tmp_path, "parts", epochs=3, **optimizer))
    continued = train_lora(fresh_host(), settings(tmp_path, "parts", epochs=3, **optimizer), resume=True)
    assert continued.continued_from_epoch == 1
    assert tensor_bytes(continued.saved_files[-1]) == tensor_bytes(whole.saved_files[-1])


def test_train_longer_keeps_the_old_final_as_its_epoch_file(tmp_path, data):
    finished = train_lora(fresh_host(), settings(tmp_path, "run", epochs=2))
    old_final = tensor_bytes(finished.saved_files[-1])
    with pytest.raises(ResumeChanged, match="epochs: 2 → 3"):
        train_lora(fresh_host(), settings(tmp_path, "run", epochs=3), resume=True)
    longer = train_lora(fresh_host(), settings(tmp_path, "run", epochs=3), resume=True, accept_changes=True)
    assert longer.continued_from_epoch == 2 and [p.name for p in longer.saved_files] == ["tiny.safetensors"]
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == ["tiny-000001.json", "tiny-000001.safetensors", "tiny-000002.json",
                                                     "tiny-000002.safetensors", "tiny.json", "tiny.safetensors"]
    assert tensor_bytes(out / "tiny-000002.safetensors") == old_final
    with safe_open(str(out / "tiny-000002.safetensors"), "pt") as moved:
        assert moved.metadata()["ss_output_name"] == "tiny-000002" and moved.metadata()["ss_epoch"] == "2"


@pytest.mark.parametrize("in_the_way", ["tiny-000002.json", "tiny-000002.safetensors"])
def test_train_longer_with_the_epoch_name_taken_refuses_before_touching_anything(tmp_path, data, in_the_way):
    """The old final becomes tiny-000002 (file and card): a file of that name left in the folder stops the run before
    any file is written or removed, named, and the run goes on once it is moved away."""
    train_lora(fresh_host(), settings(tmp_path, "run", epochs=2))
    out = tmp_path / "run"
    (out / in_the_way).write_bytes(b"the user's file")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputError, match=f"{in_the_way} already exists in {out}.*move it away"):
        train_lora(fresh_host(), settings(tmp_path, "run", epochs=3), resume=True, accept_changes=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written, nothing removed
    (out / in_the_way).unlink()
    longer = train_lora(fresh_host(), settings(tmp_path, "run", epochs=3), resume=True, accept_changes=True)
    assert [p.name for p in longer.saved_files] == ["tiny.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["tiny-000001.json", "tiny-000001.safetensors", "tiny-000002.json",
                                                     "tiny-000002.safetensors", "tiny.json", "tiny.safetensors"]


def test_a_state_reads_back_under_the_webuis_torch_load(tmp_path, data, monkeypatch):
    """The WebUI replaces torch.load with a pickle check that refuses torch 2's archives (their .format_version
    entry) and returns None; the state is read with torch's own weights-only loader, which needs no such check."""
    host = fresh_host()
    stop_after_epoch(host, 1)
    train_lora(host, settings(tmp_path, "parts", epochs=2))

    def webui_safe_load(*args, **kwargs):
        return None  # what modules/safe.py gives after "Error verifying pickled file"

    monkeypatch.setattr(torch, "load", webui_safe_load)
    assert load_state(state_path(tmp_path / "parts-state", "tiny")).epoch == 1
    continued = train_lora(fresh_host(), settings(tmp_path, "parts", epochs=2), resume=True)
    assert continued.continued_from_epoch == 1 and not continued.stopped

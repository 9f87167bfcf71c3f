"""Continue, Save now, the validation loss and the ★ epoch through the WebUI's job runner (stand-in WebUI around the
tiny real model, real steps and files), as the tab and the HTTP API use them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib_train.common.errors import ConfigError
from lib_train.engine.model_guard import fingerprint
from lib_train.preview.epoch_recommendation import GRID_MARK, marked_labels, recommend_epoch
from lib_train.preview.grid_spec import epoch_files
from lib_train.webui.grid import cell_of
from lib_train.webui.jobs import Folders, TrainingJobs, read_flag

from .conftest import make_concept_images
from .webui_standin import make_webui
from .webui_standin_txt2img import install_txt2img


def settings(data: Path, **overrides) -> dict:
    values = dict(name="live", train_dir=str(data), resolution=64, enable_buckets=False, rank=4, alpha=4.0,
                  epochs=3, batch_size=2, unet_lr=1e-3, text_encoder_lr=5e-4, lr_scheduler="cosine", seed=3,
                  trigger_words="ttconcept", save_precision="fp32", shuffle_caption=True)
    values.update(overrides)
    return values


def runner(root: Path, exposed: bool = False) -> TrainingJobs:
    """A WebUI process: each call is a fresh one (a restart), sharing the folders under ``root``."""
    torch.set_num_threads(1)
    webui = make_webui(root / "models" / "Lora")
    install_txt2img(webui)
    return TrainingJobs(webui, Folders(lora_dir=root / "models" / "Lora", projects_dir=root / "projects",
                                       data_dir=root, exposed=exposed))


def interrupt_in_epoch(jobs: TrainingJobs, epoch: int) -> None:
    track = jobs._track

    def interrupting(job, progress):
        track(job, progress)
        if progress.phase == "training" and progress.epoch == epoch:
            jobs.webui.shared.state.interrupt()  # the WebUI's Interrupt, as Stop sends it
    jobs._track = interrupting


def tensors(path: Path) -> dict[str, bytes]:
    return {key: value.numpy().tobytes() for key, value in load_file(str(path)).items()}


@pytest.fixture
def root(tmp_path):
    make_concept_images(tmp_path / "pictures" / "2_concept", count=4)
    return tmp_path


def test_stop_restart_continue_ends_with_the_uninterrupted_runs_file(root, tmp_path_factory):
    other = tmp_path_factory.mktemp("uninterrupted")
    make_concept_images(other / "pictures" / "2_concept", count=4)
    whole_jobs = runner(other)
    whole = whole_jobs.run(whole_jobs.begin(), whole_jobs.prepare(settings(other / "pictures")))
    assert whole.state == "done", whole.error

    jobs = runner(root)
    interrupt_in_epoch(jobs, 3)
    stopped = jobs.run(jobs.begin(), jobs.prepare(settings(root / "pictures")))
    assert stopped.state == "stopped"
    state = root / "projects" / "live" / "training_state" / "live.training-state.pt"
    assert state.is_file()
    lora = root / "models" / "Lora" / "live"
    assert sorted(p.name for p in lora.iterdir()) == ["live-000001.json", "live-000001.safetensors",
                                                      "live-000002.json", "live-000002.safetensors"]

    restarted = runner(root)  # the page after a restart shows defaults: Continue takes the saved run's settings
    before = fingerprint(restarted.webui.shared.sd_model)
    job = restarted.run(restarted.begin(), restarted.prepare_continue({"name": "live"}), resume=True)
    assert job.state == "done", job.error
    assert job.kind == "continue" and job.continued_from_epoch == 2 and job.model_restored is True
    assert job.message.startswith("Continued after epoch 2.")
    assert tensors(lora / "live.safetensors") == tensors(other / "models" / "Lora" / "live" / "live.safetensors")
    assert job.loss_history == whole.loss_history
    assert [entry[0] for entry in job.validation_history] == [1, 2, 3]
    assert job.validation_history == whole.validation_history
    assert fingerprint(restarted.webui.shared.sd_model) == before


def test_changed_settings_are_named_then_accepted(root):
    jobs = runner(root)
    interrupt_in_epoch(jobs, 2)
    jobs.run(jobs.begin(), jobs.prepare(settings(root / "pictures")))
    jobs = runner(root)
    refused = jobs.run(jobs.begin(), jobs.prepare_continue({"name": "live", "epochs": 4, "unet_lr": 2e-3}),
                       resume=True)
    assert refused.state == "failed" and refused.model_restored is True
    assert refused.changes == ["epochs: 3 → 4", "unet_lr: 0.001 → 0.002"]
    assert "- epochs: 3 → 4" in refused.error and "accept_changes" in refused.error
    accepted = jobs.run(jobs.begin(), jobs.prepare_continue({"name": "live", "epochs": 4, "unet_lr": 2e-3}),
                        resume=True, accept_changes=True)
    assert accepted.state == "done", accepted.error
    assert accepted.changes == refused.changes and accepted.step == accepted.total_steps
    assert [f.epoch for f in epoch_files(root / "models" / "Lora" / "live", "live")] == [1, 2, 3, 4]


@pytest.mark.parametrize("accept_changes", ["false", "0", 1, [], "maybe"])
def test_accept_changes_is_read_strictly(root, accept_changes):
    """An API body's accept_changes: true or false (or that as text); "false" is false, "0" or 1 are refused before
    any job starts."""
    jobs = runner(root)
    config = jobs.prepare(settings(root / "pictures"))
    if accept_changes == "false":
        assert read_flag("false", "accept_changes") is False and read_flag(" TRUE ", "x") is True
        assert read_flag(None, "accept_changes") is False
        return
    with pytest.raises(ConfigError, match="accept_changes must be true or false"):
        jobs.run_in_background(config, resume=True, accept_changes=accept_changes)
    assert jobs.current is None


def test_continue_without_a_saved_run_and_foreign_folders_are_refused(root):
    jobs = runner(root)
    with pytest.raises(ConfigError, match="There is no training state to continue from"):
        jobs.prepare_continue({"name": "nothing-yet"})
    with pytest.raises(ConfigError, match="state folder is not a setting"):
        jobs.prepare(settings(root / "pictures", state_dir=str(root / "elsewhere")))
    with pytest.raises(ConfigError, match="LoRA file to start from was not found"):
        jobs.prepare(settings(root / "pictures", initial_lora="live/missing.safetensors"))
    outside = root / "outside.safetensors"
    save_file({"x": torch.zeros(1)}, str(outside))
    exposed = runner(root, exposed=True)
    make_concept_images(root / "projects" / "live" / "pictures", count=2)
    with pytest.raises(ConfigError, match="outside the folders this WebUI allows"):
        exposed.prepare(settings(root / "projects" / "live" / "pictures", initial_lora=str(outside)))


def test_start_from_a_lora_file_named_in_the_lora_folder(root):
    jobs = runner(root)
    jobs.run(jobs.begin(), jobs.prepare(settings(root / "pictures", epochs=1)))
    config = jobs.prepare(settings(root / "pictures", name="second", epochs=1, initial_lora="live/live.safetensors"))
    assert config.initial_lora == str(root / "models" / "Lora" / "live" / "live.safetensors")
    job = jobs.run(jobs.begin(), config)
    assert job.state == "done", job.error


def test_save_now_while_the_training_runs_in_the_background(root):
    jobs = runner(root)
    with pytest.raises(ConfigError, match="No training is running"):
        jobs.save_now()
    track = jobs._track

    def ask_at_step_two(job, progress):
        track(job, progress)
        if progress.phase == "training" and progress.step == 2:
            jobs.save_now()  # what the tab's button and POST /save-now call, from another thread
    jobs._track = ask_at_step_two
    job = jobs.run_in_background(jobs.prepare(settings(root / "pictures")))
    deadline = time.time() + 300
    while job.state in ("queued", "running") and time.time() < deadline:
        time.sleep(0.05)
    assert job.state == "done", job.error
    extra = root / "models" / "Lora" / "live" / "live-step000002.safetensors"
    assert str(extra) in job.saved_files and extra.is_file()
    assert len(job.saved_files) == 4  # 3 epochs + the extra file


def test_save_now_after_the_last_step_is_written_and_after_the_run_is_refused_clearly(root):
    """A click during the last epoch's saving (after its last step) still writes name-stepNNNNNN; one after the
    run finished its steps, while the job is still winding up, says so instead of being silently dropped."""
    jobs = runner(root)
    track, refused = jobs._track, []

    def ask_late(job, progress):
        track(job, progress)
        if progress.phase == "saving" and progress.epoch == 3:
            jobs.save_now()
        if progress.phase == "done":
            with pytest.raises(ConfigError) as error:
                jobs.save_now()
            refused.append(str(error.value))
    jobs._track = ask_late
    job = jobs.run(jobs.begin(), jobs.prepare(settings(root / "pictures")))
    assert job.state == "done", job.error
    folder = root / "models" / "Lora" / "live"
    extra = folder / f"live-step{job.total_steps:06d}.safetensors"
    assert str(extra) in job.saved_files and len(job.saved_files) == 4  # 3 epochs + the extra file
    assert tensors(extra) == tensors(folder / "live.safetensors")  # the network after the last step
    assert refused and "already finished its steps" in refused[0] and "epoch files" in refused[0]


def write_epoch(folder: Path, stem: str, epoch: int, loss: float | None) -> None:
    metadata = {"ss_epoch": str(epoch), "ss_session_id": "1", "ss_output_name": stem}
    if loss is not None:
        metadata["ss_validation_loss"] = str(loss)
    save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, str(folder / f"{stem}.safetensors"), metadata)


@pytest.mark.parametrize("losses, best, falling", [
    ([0.30, 0.20, 0.25, 0.26], 2, False),
    ([0.30, 0.20, 0.15, 0.10], 4, True),
    ([0.30, 0.20, 0.20, 0.21], 2, False),  # a tie: the earlier epoch
])
def test_recommended_epoch_is_the_lowest_validation_loss(tmp_path, losses, best, falling):
    for epoch, loss in enumerate(losses, start=1):
        write_epoch(tmp_path, "x" if epoch == len(losses) else f"x-{epoch:06d}", epoch, loss)
    files = epoch_files(tmp_path, "x")
    found = recommend_epoch(files)
    assert found.file.epoch == best and found.still_falling is falling
    assert found.loss == min(losses) and ("still falling" in found.explain()) is falling
    # The API's answer: text keys only, as the WebUI's JSON encoder (orjson) demands.
    assert found.to_dict()["losses"] == {str(epoch): loss for epoch, loss in enumerate(losses, start=1)}
    labels = marked_labels(files, [f.label for f in files], found)
    assert [label.endswith(GRID_MARK) for label in labels] == [f.epoch == best for f in files]


def test_no_recommendation_without_two_validation_losses(tmp_path):
    write_epoch(tmp_path, "x-000001", 1, None)
    write_epoch(tmp_path, "x", 2, 0.2)
    assert recommend_epoch(epoch_files(tmp_path, "x")) is None


def test_preview_grid_marks_and_preselects_the_recommended_epoch(root):
    jobs = runner(root)
    jobs.run(jobs.begin(), jobs.prepare(settings(root / "pictures", unet_lr=5e-3, text_encoder_lr=5e-3)))
    expected = jobs.recommend("live")
    assert expected is not None and set(expected.losses) == {1, 2, 3}
    request = jobs.prepare_grid(dict(name="live", prompt="ttconcept", sampler="Euler", steps=2, width=64, height=64,
                                     seeds="7", weights="0.5, 1"))
    assert request.recommended == expected
    job = jobs.run_grid(jobs.begin(), request)
    assert job.state == "done", job.error
    assert job.recommended["epoch"] == expected.file.epoch and job.recommended["file"] == str(expected.file.path)
    cell = cell_of(Path(job.grid_folder), expected.file.path, 1.0)
    assert cell.weight == 1.0 and cell.file == expected.file.path and cell.picture.is_file()
    # Use on the pre-selected cell makes that epoch the LoRA's file.
    result = jobs.choose("live", cell.file, cell.weight, cell.picture)
    assert result.chosen.epoch == expected.file.epoch


@pytest.mark.parametrize("losses, best, falling, not_finite", [
    ([0.30, 0.20, float("nan"), 0.25], 2, False, (3,)),
    ([0.30, 0.20, float("inf")], 2, False, (3,)),  # the last epoch broke: training longer would not help
    ([0.30, 0.20, 0.10, float("nan")], 3, False, (4,)),
])
def test_a_validation_loss_that_is_not_a_number_is_named(tmp_path, losses, best, falling, not_finite):
    for epoch, loss in enumerate(losses, start=1):
        write_epoch(tmp_path, "x" if epoch == len(losses) else f"x-{epoch:06d}", epoch, loss)
    found = recommend_epoch(epoch_files(tmp_path, "x"))
    assert found.file.epoch == best and found.still_falling is falling
    assert found.not_finite == not_finite
    epochs = ", ".join(str(epoch) for epoch in not_finite)
    assert f"validation loss of epoch(s) {epochs} is not a number" in found.explain()
    assert "still falling" not in found.explain()
    assert found.to_dict()["not_finite_epochs"] == list(not_finite)


def test_every_validation_loss_not_a_number_recommends_nothing_and_says_why(root):
    jobs = runner(root)
    folder = root / "models" / "Lora" / "live"
    folder.mkdir(parents=True)
    for epoch, loss in enumerate([float("nan"), float("nan"), float("nan")], start=1):
        write_epoch(folder, "live" if epoch == 3 else f"live-{epoch:06d}", epoch, loss)
    found = jobs.recommend("live")
    assert found is not None and found.file is None and found.not_finite == (1, 2, 3)
    assert "No ★ epoch" in found.explain() and "epoch(s) 1, 2, 3 is not a number" in found.explain()
    answer = found.to_dict()  # the API's answer and the grid status's "recommended"
    assert answer["epoch"] is None and answer["file"] is None and answer["not_finite_epochs"] == [1, 2, 3]
    files = epoch_files(folder, "live")
    assert marked_labels(files, [f.label for f in files], found) == [f.label for f in files]
    request = jobs.prepare_grid(dict(name="live", prompt="ttconcept", sampler="Euler", steps=2, width=64, height=64,
                                     seeds="7", weights="1"))
    assert request.recommended == found  # the grid page shows its message instead of a ★ row


def test_a_grid_without_the_recommended_epochs_row_still_names_it(root):
    """Rendering other epochs than the ★ one is no reason to say the files carry no validation loss."""
    jobs = runner(root)
    folder = root / "models" / "Lora" / "live"
    folder.mkdir(parents=True)
    for epoch, loss in enumerate([0.3, 0.1, 0.2], start=1):
        write_epoch(folder, "live" if epoch == 3 else f"live-{epoch:06d}", epoch, loss)
    request = jobs.prepare_grid(dict(name="live", prompt="ttconcept", sampler="Euler", steps=2, width=64, height=64,
                                     seeds="7", weights="1", epochs="1, 3"))
    assert [row.epoch for row in request.rows] == [1, 3]
    assert request.recommended is not None and request.recommended.file.epoch == 2
    assert "epoch 2" in request.recommended.explain()
    assert not any(label.endswith(GRID_MARK) for label in marked_labels(request.rows, ["a", "b"], request.recommended))

"""The learning-rate finder as a WebUI job, against the stand-in WebUI around the tiny real model: under the queue
lock, the status the tab and the API read, the restore proof, Stop, nothing in the Lora folder."""

from __future__ import annotations

import math

import pytest

from lib_train.common.errors import ConfigError

from .test_host_webui import live, settings, wait  # noqa: F401  (live is a fixture)


def test_find_lr_job_runs_under_the_queue_lock_and_reports_the_rates(live):
    webui, jobs, tmp_path = live
    lock_held = []
    track = jobs._track
    jobs._track = lambda job, progress: lock_held.append(webui.call_queue.queue_lock.locked()) or track(job, progress)
    job = jobs.find_lr_in_background(jobs.prepare(settings(tmp_path / "pictures", batch_size=4, lr_finder_steps=60)))
    assert job.kind == "find-lr"
    wait(job)
    assert job.state == "done", job.error
    assert lock_held and all(lock_held) and job.model_restored is True
    assert "unet" in job.learning_rates and all(math.isfinite(r) and r > 0 for r in job.learning_rates.values())
    assert [step for step, _ in job.lr_history] == list(range(1, 61)) and job.step == job.total_steps == 60
    assert job.lr_history[-1][1]["unet"] == job.learning_rates["unet"]
    assert job.message.startswith("After 60 of 60 steps, Prodigy estimated: UNet")
    assert webui.shared.state.textinfo.startswith("After 60 of 60 steps")  # the progress bar's last text
    assert not (tmp_path / "models" / "Lora" / "live").exists()  # nothing saved
    assert job.cache["latents_total"] == 4  # the pictures' cache is filled for the training that follows
    assert job.to_dict()["learning_rates"] == job.learning_rates  # what GET /status returns


def test_find_lr_takes_the_form_of_an_adaptive_optimizer_at_an_adamw_rate(live):
    """The button's typical click: Prodigy chosen with the form's 1e-4 (which training would refuse); the search
    probes with its own optimizer and rates, so it runs."""
    webui, jobs, tmp_path = live
    values = settings(tmp_path / "pictures", optimizer="Prodigy", unet_lr=1e-4, text_encoder_lr=5e-5, batch_size=4,
                      lr_finder_steps=60)
    with pytest.raises(ConfigError, match="Prodigy estimates its own step size"):
        jobs.prepare(values)
    job = jobs.run_find_lr(jobs.begin(), jobs.prepare(values, for_finder=True))
    assert job.state == "done", job.error
    assert "unet" in job.learning_rates and len(job.lr_history) == 60 and job.model_restored is True


def test_stop_ends_a_find_lr_job_and_the_slot_is_taken_meanwhile(live):
    webui, jobs, tmp_path = live
    config = jobs.prepare(settings(tmp_path / "pictures", lr_finder_steps=500))
    track = jobs._track

    def stop_at_step_three(job, progress):
        track(job, progress)
        if progress.phase == "training" and progress.step == 3:
            with pytest.raises(ConfigError, match="A learning-rate search is already running"):
                jobs.begin()
            jobs.stop()

    jobs._track = stop_at_step_three
    job = jobs.run_find_lr(jobs.begin(), config)
    assert job.state == "stopped" and job.step == 3 and job.learning_rates == {}
    assert job.model_restored is True and "Stopped after 3 of 500 steps" in job.message

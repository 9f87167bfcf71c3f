"""The cache in the WebUI's job runner, against the stand-in WebUI around the tiny real model: where it lives,
the Prepare job under the queue lock, what the status says, clearing it; the live host's identities."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

import pytest

from lib_train.common.errors import ConfigError
from lib_train.dataset.project_folders import FOLDER_CACHES, ProjectFolders
from lib_train.webui.host import WebUIHost
from lib_train.webui.host_sdxl import WebUISDXLHost

from .conftest import make_concept_images
from .test_host_webui import live, settings, wait  # noqa: F401  (live is a fixture)
from .webui_standin_sdxl import make_sdxl_webui


def test_a_rerun_takes_every_latent_and_caption_from_the_projects_cache(live):
    webui, jobs, tmp_path = live
    pictures = ProjectFolders.for_name(jobs.folders.projects_dir, "live").pictures
    make_concept_images(pictures, count=4)
    values = settings(pictures, text_encoder_lr=0.0, epochs=1, overwrite=True)

    first = jobs.run(jobs.begin(), jobs.prepare(values))
    assert first.state == "done", first.error
    assert "0 of 4 latents from cache, 0 of 4 captions from cache." in first.message
    lora = load_file(first.saved_files[-1])
    cache = jobs.folders.projects_dir / "live" / "cache"
    assert len(list((cache / "latents").iterdir())) == 4 and len(list((cache / "text").iterdir())) == 4

    second = jobs.run(jobs.begin(), jobs.prepare(values))
    assert second.state == "done" and second.model_restored is True
    assert "4 of 4 latents from cache, 4 of 4 captions from cache." in second.message
    assert second.cache == {"latents_reused": 4, "latents_total": 4, "captions_reused": 4, "captions_total": 4,
                            "masks_reused": 0, "masks_total": 0, "problems": []}
    assert second.setup_seconds > 0
    rerun = load_file(second.saved_files[-1])
    assert all(torch.equal(lora[k], rerun[k]) for k in lora)
    assert jobs.cache_size(str(pictures)).describe().startswith("4 latents, 4 captions")


def test_a_server_folder_keeps_its_cache_outside_itself_and_out_of_the_project_list(live):
    webui, jobs, tmp_path = live
    before = sorted(p.relative_to(tmp_path / "pictures") for p in (tmp_path / "pictures").rglob("*"))
    job = jobs.run(jobs.begin(), jobs.prepare(settings(tmp_path / "pictures", epochs=1)))
    assert job.state == "done", job.error
    assert sorted(p.relative_to(tmp_path / "pictures") for p in (tmp_path / "pictures").rglob("*")) == before
    caches = list((jobs.folders.projects_dir / FOLDER_CACHES).iterdir())
    assert len(caches) == 1 and len(list((caches[0] / "latents").iterdir())) == 4
    assert jobs.project_names() == ["live"]  # from its Lora subfolder; the cache folder is not a project


def test_prepare_job_fills_the_cache_under_the_queue_lock_and_training_then_encodes_nothing(live):
    webui, jobs, tmp_path = live
    values = settings(tmp_path / "pictures", text_encoder_lr=0.0, epochs=1)
    lock_held = []
    track = jobs._track
    jobs._track = lambda job, progress: lock_held.append(webui.call_queue.queue_lock.locked()) or track(job, progress)
    job = jobs.prepare_in_background(jobs.prepare(values))
    assert job.kind == "prepare"
    wait(job)
    assert job.state == "done", job.error
    assert job.message == "Prepared for training: 0 of 4 latents from cache, 0 of 4 captions from cache."
    assert lock_held and all(lock_held) and job.model_restored is True
    assert not (tmp_path / "models" / "Lora" / "live").exists()  # nothing trained, nothing saved

    trained = jobs.run(jobs.begin(), jobs.prepare(values))
    assert "4 of 4 latents from cache, 4 of 4 captions from cache." in trained.message


def test_clear_cache_deletes_only_the_cache_and_waits_for_a_running_job(live):
    webui, jobs, tmp_path = live
    folder = str(tmp_path / "pictures")
    jobs.run(jobs.begin(), jobs.prepare(settings(folder, epochs=1)))
    assert jobs.cache_size(folder).latents == 4
    running = jobs.begin()
    with pytest.raises(ConfigError, match="A job is running"):
        jobs.clear_cache(folder)
    running.state = "done"
    assert jobs.clear_cache(folder) == 4
    assert jobs.cache_size(folder).latents == 0 and len(list((tmp_path / "pictures" / "2_concept").iterdir())) == 8
    assert jobs.cache_size("") is None
    with pytest.raises(ConfigError, match="Choose the training folder"):
        jobs.clear_cache(" ")


def test_the_live_hosts_identities_follow_clip_skip_and_the_vae_dtype(live, tmp_path):
    webui, jobs, _ = live
    host = WebUIHost(webui)
    text, vae = host.text_encoder_identity(), host.vae_identity()
    webui.shared.opts.CLIP_stop_at_last_layers = 2
    assert host.text_encoder_identity() != text and host.vae_identity() == vae
    webui.devices.dtype_vae = torch.float16
    assert "torch.float16" in host.vae_identity()

    sdxl_webui = make_sdxl_webui(tmp_path / "sdxl-loras")
    sdxl_webui.devices.dtype_vae = torch.float16
    assert "torch.float32" in WebUISDXLHost(sdxl_webui).vae_identity()  # SDXL's VAE always encodes in float32

"""The WebUI adapter and job runner against a stand-in WebUI around the tiny real model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lib_train.common.errors import ConfigError
from lib_train.engine.model_guard import fingerprint, hook_count
from lib_train.hosts.prompt_syntax import escape_caption, literal_caption
from lib_train.webui.host import WebUIHost
from lib_train.webui.jobs import Folders, TrainingJobs

from .conftest import make_concept_images
from .webui_standin import make_webui


def settings(data: Path, **overrides) -> dict:
    values = dict(name="live", train_dir=str(data), resolution=64, enable_buckets=False, rank=4, alpha=4.0,
                  epochs=2, batch_size=2, unet_lr=1e-3, text_encoder_lr=5e-4, lr_scheduler="constant", seed=3,
                  trigger_words="ttconcept", save_precision="fp32")
    values.update(overrides)
    return values


@pytest.fixture
def live(tmp_path):
    webui = make_webui(tmp_path / "models" / "Lora")
    folders = Folders(lora_dir=tmp_path / "models" / "Lora", projects_dir=tmp_path / "projects",
                      data_dir=tmp_path, exposed=False)
    make_concept_images(tmp_path / "pictures" / "2_concept", count=4, caption="hat (object), ttconcept")
    return webui, TrainingJobs(webui, folders), tmp_path


def wait(job, timeout=120):
    deadline = time.time() + timeout
    while job.state in ("queued", "running") and time.time() < deadline:
        time.sleep(0.05)
    assert job.state not in ("queued", "running"), "job did not finish"


def test_escape_caption_keeps_parentheses_literal():
    assert escape_caption("hat (object), [wip], a\\b") == "hat \\(object\\), \\[wip\\], a\\\\b"
    # Taggers already escape: nothing is escaped twice, and both spellings mean the same text.
    assert escape_caption("hat \\(object\\), (wip)") == "hat \\(object\\), \\(wip\\)"
    assert literal_caption("hat \\(object\\), a\\\\b") == literal_caption(escape_caption("hat (object), a\\b")) == "hat (object), a\\b"


def test_api_job_trains_on_the_live_model_and_leaves_it_as_it_was(live):
    webui, jobs, tmp_path = live
    sd_model = webui.shared.sd_model
    # A generation with <lora:...> left merged weights behind in a layer, as the built-in Lora does.
    layer = sd_model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.to_q
    layer.network_weights_backup = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(0.5)
    layer.network_current_names = (("other", 1.0, 1.0, None),)
    webui.networks.loaded_networks.append("other")
    sd_model.model.diffusion_model.requires_grad_(True)  # as the WebUI leaves it
    clean = layer.network_weights_backup.clone()

    lock_held = []
    job = jobs.run_in_background(jobs.prepare(settings(tmp_path / "pictures")))
    jobs_track = jobs._track

    def spy(job_status, progress):
        lock_held.append(webui.call_queue.queue_lock.locked())
        jobs_track(job_status, progress)

    jobs._track = spy
    wait(job)
    assert job.state == "done", job.error
    assert job.model_restored is True
    assert lock_held and all(lock_held)
    assert torch.equal(layer.weight, clean) and layer.network_current_names == ()
    assert webui.networks.loaded_networks == []
    assert all(p.requires_grad for p in sd_model.model.diffusion_model.parameters())
    assert hook_count(sd_model) == 0

    out = tmp_path / "models" / "Lora" / "live"
    assert sorted(p.name for p in out.iterdir()) == ["live-000001.json", "live-000001.safetensors", "live.json",
                                                      "live.safetensors"]
    assert job.saved_files == [str(out / "live-000001.safetensors"), str(out / "live.safetensors")]
    with safe_open(str(out / "live.safetensors"), "pt") as handle:
        meta = handle.metadata()
        assert meta["ss_sd_model_name"] == "tiny.safetensors" and meta["ss_sd_model_hash"] == "0123abcd"
        assert len([k for k in handle.keys() if k.startswith("lora_te_")]) == 3 * 12
    assert json.loads((out / "live.json").read_text())["activation text"] == "ttconcept"

    events = webui.events
    # The status says "done" before the worker thread hands the queue back (memory is returned in between).
    deadline = time.time() + 30
    while f"finish:{job.id}" not in events and time.time() < deadline:
        time.sleep(0.05)
    assert events.index("attention:sdp - scaled dot product") < events.index("attention:user")
    assert events.count("refresh-loras") == 2 and "gc" in events
    assert events[0] == f"queued:{job.id}" and f"finish:{job.id}" in events
    assert webui.processing.StableDiffusionProcessing.cached_c == [None, None]
    # Progress went through shared.state: job_no counted the steps up to job_count.
    assert (8, 8) in webui.shared.state.history
    # Captions went through the WebUI's text path, with parentheses escaped.
    assert any("hat \\(object\\)" in p for p in sd_model.cond_stage_model.seen_prompts)
    assert [step for step, _ in job.loss_history] == list(range(1, 9))


def test_interrupt_stops_between_steps_and_keeps_finished_epochs(live):
    webui, jobs, tmp_path = live
    before = fingerprint(webui.shared.sd_model)
    original_track = jobs._track

    def interrupt_in_epoch_two(job_status, progress):
        original_track(job_status, progress)
        if progress.phase == "training" and progress.epoch == 2:
            webui.shared.state.interrupt()  # the WebUI's Interrupt button

    jobs._track = interrupt_in_epoch_two
    job = jobs.run_in_background(jobs.prepare(settings(tmp_path / "pictures", epochs=3)))
    wait(job)
    assert job.state == "stopped" and job.model_restored is True
    out = tmp_path / "models" / "Lora" / "live"
    assert sorted(p.name for p in out.iterdir()) == ["live-000001.json", "live-000001.safetensors"]
    assert fingerprint(webui.shared.sd_model) == before


def test_one_job_at_a_time(live):
    webui, jobs, tmp_path = live
    jobs.begin()
    with pytest.raises(ConfigError, match="already running"):
        jobs.begin()


def test_refusals(live):
    webui, jobs, tmp_path = live
    with pytest.raises(ConfigError, match="output folder is not a setting"):
        jobs.prepare(settings(tmp_path / "pictures", output_dir="/etc"))
    with pytest.raises(ConfigError, match="training folder"):
        jobs.prepare(settings(tmp_path / "pictures", train_dir=""))

    webui.networks.available_networks["live"] = type("N", (), {"filename": "/elsewhere/live.safetensors"})()
    with pytest.raises(ConfigError, match="already exists"):
        jobs.prepare(settings(tmp_path / "pictures"))
    del webui.networks.available_networks["live"]

    # The WebUI's text path applies its own clip skip; the metadata must record that one, not a requested one.
    assert jobs.prepare(settings(tmp_path / "pictures", clip_skip=2)).clip_skip == 1

    jobs.folders.exposed = True
    with pytest.raises(ConfigError, match="outside the folders"):
        jobs.prepare(settings("/etc"))
    assert jobs.prepare(settings(tmp_path / "pictures")).train_dir == str((tmp_path / "pictures").resolve())

    webui.shared.cmd_opts.lowvram = True
    with pytest.raises(ConfigError, match="--lowvram"):
        WebUIHost(webui)
    webui.shared.cmd_opts.lowvram = False
    model = webui.shared.sd_model
    model.is_sd1, model.is_sd3 = False, True
    with pytest.raises(ConfigError, match="the loaded model is SD3"):
        WebUIHost(webui)
    model.is_sd3, model.is_sdxl = False, True  # an SDXL without CLIP-L: the refiner
    with pytest.raises(ConfigError, match="SDXL refiner"):
        WebUIHost(webui)
    model.is_sdxl_inpaint = True
    with pytest.raises(ConfigError, match="SDXL inpainting"):
        WebUIHost(webui)
    model.is_sd1, model.is_sdxl, model.is_sdxl_inpaint = True, False, False
    # SD1.5 inpainting and instruct-pix2pix (ldm's "hybrid" conditioning) need the masked picture beside the latent:
    # the WebUI marks them is_sd1 all the same, and training them would fail in the UNet's first call.
    model.model.conditioning_key = "hybrid"
    with pytest.raises(ConfigError, match="SD1.x inpainting or instruct-pix2pix checkpoint"):
        WebUIHost(webui)
    del model.model.conditioning_key


def test_medvram_trains_unet_only(live):
    webui, jobs, tmp_path = live
    webui.shared.sd_model.lowvram = True
    job = jobs.begin()
    jobs.run(job, jobs.prepare(settings(tmp_path / "pictures")))
    assert job.state == "failed" and "--medvram" in job.error and job.model_restored is None  # refused before touching it
    job = jobs.begin()
    jobs.run(job, jobs.prepare(settings(tmp_path / "pictures", name="unet_only", text_encoder_lr=0.0, epochs=1)))
    assert job.state == "done", job.error


def test_failure_inside_training_is_reported_and_restored(live, monkeypatch):
    webui, jobs, tmp_path = live
    before = fingerprint(webui.shared.sd_model)
    sd_model = webui.shared.sd_model
    real = sd_model.apply_model
    monkeypatch.setattr(sd_model, "apply_model", lambda *a: real(*a) * float("nan"))
    job = jobs.begin()
    jobs.run(job, jobs.prepare(settings(tmp_path / "pictures")))
    assert job.state == "failed" and "loss became nan" in job.error
    assert job.model_restored is True and fingerprint(sd_model) == before
    assert "attention:user" in webui.events and not (tmp_path / "models" / "Lora" / "live").exists()


def test_an_attention_switch_that_fails_half_way_still_gets_the_users_attention_back(live):
    """The switch to the training's attention replaces class forwards one by one: one failing after the first has
    been replaced must not leave the WebUI on it."""
    webui, _, _ = live
    cls = type(webui.shared.sd_model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1)
    forward = cls.__dict__["forward"]

    def failing_switch(option=None):
        webui.events.append(f"attention:{option}")
        cls.forward = lambda self, *args, **kwargs: None  # the first class switched, then it fails
        raise RuntimeError("xformers is not installed")

    webui.sd_hijack.apply_optimizations = failing_switch
    try:
        with pytest.raises(RuntimeError, match="xformers"):
            with WebUIHost(webui).training_session():
                pass
        assert cls.__dict__["forward"] is forward
        assert webui.events[-3:] == ["attention:sdp - scaled dot product", "attention:user", "gc"]
    finally:
        cls.forward = forward  # the other tests' model, whatever happened here


def test_api_can_skip_unusable_files(live):
    """The API's "skip_unusable_files" trains on the other pictures and lists what it left out."""
    webui, jobs, tmp_path = live
    (tmp_path / "pictures" / "2_concept" / "zero.png").write_bytes(b"")
    refused = jobs.run(jobs.begin(), jobs.prepare(settings(tmp_path / "pictures", epochs=1)))
    assert refused.state == "failed" and "zero.png" in refused.error and "Skip unusable files" in refused.error
    job = jobs.run_in_background(jobs.prepare(settings(tmp_path / "pictures", epochs=1, skip_unusable_files=True)))
    wait(job)
    assert job.state == "done", job.error
    assert len(job.skipped_files) == 1 and "zero.png" in job.skipped_files[0] and "zero.png" in job.message
    assert job.to_dict()["skipped_files"] == job.skipped_files and job.model_restored is True
    assert (tmp_path / "pictures" / "2_concept" / "zero.png").read_bytes() == b""


@pytest.mark.parametrize("flags, exposed", [
    ({}, False),
    ({"listen": True}, True),
    ({"share": True}, True),
    ({"server_name": "0.0.0.0"}, True),
    ({"ngrok": "token"}, True),  # an ngrok tunnel puts the WebUI on the internet like --share
    ({"ngrok": "token", "enable_insecure_extension_access": True}, False),
    ({"listen": True, "enable_insecure_extension_access": True}, False),
])
def test_server_paths_are_confined_whenever_the_webui_confines_extensions(flags, exposed):
    from types import SimpleNamespace

    from lib_train.webui.path_policy import exposed_to_network
    options = {"share": False, "listen": False, "server_name": None, "ngrok": None,
               "enable_insecure_extension_access": False, **flags}
    assert exposed_to_network(SimpleNamespace(**options)) is exposed
    # The WebUI's own verdict, where it has one, is the one that counts.
    assert exposed_to_network(SimpleNamespace(**options, disable_extension_access=True)) is True
    options.pop("ngrok")  # a WebUI without --ngrok
    assert exposed_to_network(SimpleNamespace(**options)) is (exposed and "ngrok" not in flags)

"""Samples during training, through the WebUI-shaped txt2img (tests/webui_standin_txt2img.py) on the tiny real
model: the run saves the same LoRA with and without them, the pictures are the training network at the prompt's
multiplier, they land in the project's folder with their infotext and in the status, Stop and a failing sample
behave, and the prompt lines read like kohya's."""

from __future__ import annotations

import random
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lib_train.common.errors import ConfigError
from lib_train.engine.model_guard import fingerprint, hook_count
from lib_train.engine.sample_prompts import SamplePrompt, folder_tag_counts, made_prompts, parse_sample_prompts
from lib_train.webui.jobs import Folders, TrainingJobs

from .conftest import make_concept_images
from .webui_standin import make_webui
from .webui_standin_txt2img import NansException, install_txt2img

PROMPTS = "ttconcept, red circle --d 11 --m 1\nttconcept --n blurry --w 64 --h 64 --s 3 --l 5 --d 12 --m 0"


def live_webui(root):
    torch.set_num_threads(1)
    webui = make_webui(root / "models" / "Lora")
    install_txt2img(webui)
    jobs = TrainingJobs(webui, Folders(lora_dir=root / "models" / "Lora", projects_dir=root / "projects",
                                       data_dir=root, exposed=False))
    if not (root / "pictures").exists():
        make_concept_images(root / "pictures" / "2_concept", count=4)
    return webui, jobs


def values(root, **overrides) -> dict:
    settings = dict(name="samplelora", train_dir=str(root / "pictures"), resolution=64, enable_buckets=False, rank=4,
                    alpha=4.0, epochs=2, batch_size=2, unet_lr=3e-3, text_encoder_lr=3e-3, lr_scheduler="constant",
                    seed=3, trigger_words="ttconcept", save_precision="fp32", overwrite=True,
                    sample_prompts=PROMPTS, sample_steps=3, sample_sampler="Euler a")
    settings.update(overrides)
    return settings


def draw_from_every_generator(webui) -> None:
    """txt2img that also draws from Python's and NumPy's generators, as the WebUI's scripts may."""
    render = webui.processing.process_images

    def process_images(p):
        random.random(), np.random.rand()
        return render(p)

    webui.processing.process_images = process_images


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run without samples, then with samples every epoch and every step."""
    root = tmp_path_factory.mktemp("samples")
    webui, jobs = live_webui(root)
    plain = jobs.run(jobs.begin(), jobs.prepare(values(root, name="plainlora")))
    assert plain.state == "done", plain.error
    draw_from_every_generator(webui)
    before = fingerprint(webui.shared.sd_model)
    sampled = jobs.run(jobs.begin(), jobs.prepare(values(root, sample_every_n_epochs=1, sample_every_n_steps=1)))
    assert sampled.state == "done", sampled.error
    return SimpleNamespace(root=root, webui=webui, jobs=jobs, plain=plain, sampled=sampled, before=before)


def test_samples_leave_the_training_bit_identical(runs):
    assert runs.sampled.loss_history == runs.plain.loss_history
    for plain_path, sampled_path in zip(runs.plain.saved_files, runs.sampled.saved_files):
        plain, sampled = load_file(plain_path), load_file(sampled_path)
        assert plain.keys() == sampled.keys() and all(torch.equal(plain[k], sampled[k]) for k in plain)
    assert runs.sampled.model_restored is True and fingerprint(runs.webui.shared.sd_model) == runs.before
    assert hook_count(runs.webui.shared.sd_model) == 0


def test_samples_are_in_the_project_folder_and_the_status(runs):
    job = runs.sampled
    folder = runs.root / "projects" / "samplelora" / "samples"
    assert job.samples_folder.startswith(str(folder))
    # 4 steps per epoch, a render after each (the epoch's last one serves the epoch too), 2 prompts each
    assert [(s["epoch"], s["step"], s["index"]) for s in job.samples] == [
        (1 + (step - 1) // 4, step, index) for step in range(1, 9) for index in (0, 1)]
    assert job.sample_prompts == ["ttconcept, red circle --w 64 --h 64 --d 11 --s 3 --l 7 --ss Euler a",
                                  "ttconcept --n blurry --w 64 --h 64 --d 12 --s 3 --l 5 --ss Euler a --m 0"]
    for sample in job.samples:
        with Image.open(sample["file"]) as image:
            parameters = image.info["parameters"]
            assert image.size == (64, 64)
        assert f'Train Tools sample: "samplelora epoch {sample["epoch"]} step {sample["step"]}"' in parameters
        assert f"Seed: {11 + sample['index']}" in parameters and "Sampler: Euler a" in parameters
    assert not any(path.suffix != ".png" for path in folder.rglob("*") if path.is_file())  # no temporary file left


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_a_sample_is_the_training_network_at_its_multiplier(runs):
    """At multiplier 0 a sample is the checkpoint's own txt2img; at 1 it changes as the LoRA learns."""
    webui = runs.webui
    job = runs.sampled
    at_zero = [s for s in job.samples if s["index"] == 1]
    p = webui.processing.StableDiffusionProcessingTxt2Img(
        sd_model=webui.shared.sd_model, prompt="ttconcept", negative_prompt="blurry", seed=12, sampler_name="Euler a",
        steps=3, cfg_scale=5.0, width=64, height=64)
    base = np.asarray(webui.processing.process_images(p).images[0], dtype=np.int16)
    assert all(np.array_equal(pixels(s["file"]), base) for s in at_zero)
    at_one = [pixels(s["file"]) for s in job.samples if s["index"] == 0]
    assert np.abs(at_one[0] - at_one[-1]).mean() > 0.5  # epoch 1 step 1 against the last step: the LoRA learned


def test_stop_during_a_sample_ends_the_run_without_a_half_picture(tmp_path):
    webui, jobs = live_webui(tmp_path)
    render = webui.processing.process_images

    def stopped_midway(p):
        jobs.stop()  # the user clicks Stop while the first sample renders
        return render(p)

    webui.processing.process_images = stopped_midway
    job = jobs.run(jobs.begin(), jobs.prepare(values(tmp_path, sample_every_n_epochs=1)))
    assert job.state == "stopped" and job.samples == [] and job.model_restored is True
    assert len(job.saved_files) == 1  # epoch 1 was saved before its samples
    assert not [p for p in (tmp_path / "projects" / "samplelora" / "samples").rglob("*") if p.is_file()]


def test_a_failing_sample_stops_the_samples_not_the_training(tmp_path):
    webui, jobs = live_webui(tmp_path)

    def nan(p):
        raise NansException("A tensor with NaNs was produced in Unet.")

    webui.processing.process_images = nan
    job = jobs.run(jobs.begin(), jobs.prepare(values(tmp_path, sample_every_n_epochs=1)))
    assert job.state == "done" and len(job.saved_files) == 2 and job.model_restored is True
    assert job.sample_error.startswith("Samples stopped at epoch 1: NansException") and job.samples == []


def test_samples_are_on_by_default_on_a_gpu_only(tmp_path):
    webui, jobs = live_webui(tmp_path)
    assert "sample_every_n_epochs" not in jobs.family_defaults(webui.shared.sd_model)
    webui.devices.device = SimpleNamespace(type="cuda")
    assert jobs.family_defaults(webui.shared.sd_model)["sample_every_n_epochs"] == 1


def test_prompt_lines_read_like_kohyas_prompt_file():
    lines = "# a comment\n\nmychar, smile --n lowres, bad --w 512 --h 768 --d 5 --s 28 --l 6.5 --ss DPM++ 2M --m 0.8\nplain"
    first, second = parse_sample_prompts(lines)
    assert first == SamplePrompt("mychar, smile", "lowres, bad", 512, 768, 5, 28, 6.5, "DPM++ 2M", 0.8)
    assert second == SamplePrompt("plain")
    assert second.resolved(1, resolution=512, seed=42, steps=20, cfg_scale=7.0, sampler="Euler a") == \
        SamplePrompt("plain", "", 512, 512, 43, 20, 7.0, "Euler a", 1.0)
    assert parse_sample_prompts(first.as_line()) == [first]
    for bad, message in (("x --q 3", "line 1: unknown option --q"), ("x\ny --w 500", "line 2: --w needs a multiple of 8"),
                         ("x --s 0", "--s needs from 1 to 1000"), ("x --l abc", "--l needs a number"),
                         (" --w 512", "line 1 has options but no prompt")):
        with pytest.raises(ConfigError, match=message):
            parse_sample_prompts(bad)


def test_made_prompts_are_the_trigger_with_the_most_frequent_tags(tmp_path):
    folder = make_concept_images(tmp_path / "pictures" / "3_thing", count=3)
    (folder / "img_00.txt").unlink()  # a picture without caption counts its folder's name
    counts = folder_tag_counts(tmp_path / "pictures")
    assert counts["ttconcept"] == 2 and counts["red circle"] == 2 and counts["thing"] == 1
    prompts = made_prompts("ttconcept", Counter({"red circle": 5, "hat": 3, **{f"t{i}": 1 for i in range(6)}}), 3)
    assert [p.prompt for p in prompts] == ["ttconcept, red circle, hat, t0, t1, t2", "ttconcept, t3, t4, t5",
                                           "ttconcept, red circle, hat, t0, t1, t2"]
    with pytest.raises(ConfigError, match="No sample prompt to make"):
        made_prompts("", Counter(), 2)


def test_rendering_leaves_every_generator_mode_and_multiplier_as_training_had_them(tiny_host, tmp_path):
    """What the training could draw from after a sample is what it would have drawn without one."""
    from contextlib import ExitStack

    from lib_train.common.tensor_store import CacheReport
    from lib_train.engine.samples import RenderedSample, TrainingSamples
    from lib_train.engine.steps import start_run, usable_pictures

    from .conftest import tiny_config

    config = tiny_config(make_concept_images(tmp_path / "pictures", count=2), tmp_path / "out", epochs=1,
                         sample_prompts="ttconcept --m 0.5\nttconcept --m -1", sample_every_n_epochs=1)
    data = config.training_data(usable_pictures(config).records)
    seen = []

    def greedy_renderer(prompt):
        """Draws from every generator the training uses, as the WebUI's samplers and scripts would."""
        seen.append((torch.is_grad_enabled(), tiny_host.unet.training, run.network.unet_modules[0].multiplier))
        torch.manual_seed(prompt.seed)
        torch.rand(3), torch.rand(3, generator=run.generator), random.random(), np.random.rand()
        return RenderedSample(Image.new("RGB", (8, 8)), "ttconcept\nSteps: 1, Seed: 0")

    with ExitStack() as cleanup:
        run = start_run(cleanup, tiny_host, config, data, None, CacheReport(), 2, None)
        tiny_host.unet.train()  # whatever mode training left it in comes back
        samples = TrainingSamples.for_config(config, greedy_renderer, tmp_path / "samples")
        before = (torch.get_rng_state(), run.generator.get_state(), random.getstate(), np.random.get_state()[1].copy())
        samples.after_epoch(tiny_host, run, 1, 1, 1)
        after = (torch.get_rng_state(), run.generator.get_state(), random.getstate(), np.random.get_state()[1])
        assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
        assert before[2] == after[2] and np.array_equal(before[3], after[3])
        assert seen == [(False, False, 0.5), (False, False, -1.0)]
        assert tiny_host.unet.training and torch.is_grad_enabled()
        assert all(module.multiplier == 1.0 for module in run.network.modules_in_order())
        assert [image.path.name for image in samples.images] == ["e001_s000001_00.png", "e001_s000001_01.png"]


def test_the_tab_writes_the_prompts_a_run_would_make(tmp_path):
    webui, jobs = live_webui(tmp_path)
    text = jobs.suggested_sample_prompts(str(tmp_path / "pictures"), "ttconcept", 2)
    assert text.splitlines() == ["ttconcept, red circle, grey 0, grey 1, grey 2, grey 3"] * 2
    with pytest.raises(ConfigError, match="Choose the training folder first"):
        jobs.suggested_sample_prompts("", "ttconcept", 2)
    for count in ("two", [2], None):  # an API body's sample_count may be anything
        with pytest.raises(ConfigError, match="The number of sample prompts must be a whole number"):
            jobs.suggested_sample_prompts(str(tmp_path / "pictures"), "ttconcept", count)


def test_bad_sample_and_regularization_settings_are_refused_before_the_run(tmp_path):
    webui, jobs = live_webui(tmp_path)
    with pytest.raises(ConfigError, match="Sample prompt line 2: --w needs a multiple of 8"):
        jobs.prepare(values(tmp_path, sample_every_n_epochs=1, sample_prompts="ok\nbad --w 12"))
    assert jobs.prepare(values(tmp_path, sample_prompts="kept for later --w 12")).sample_every_n_epochs == 0
    for settings, message in ((dict(prior_loss_weight=-1), "Prior-loss weight must be 0 or more"),
                              (dict(sample_every_n_steps=-2), "cannot be negative"),
                              (dict(sample_steps=0), "Sample steps must be between 1 and 1000")):
        with pytest.raises(ConfigError, match=message):
            jobs.prepare(values(tmp_path, **settings))

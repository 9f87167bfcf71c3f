"""Class pictures for a regularization folder made with the live model's txt2img (the WebUI-shaped stand-in around
the tiny real model): kohya's folder, seeds in the infotext and the seeds file, Stop, bad input; then a training
that uses them."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from lib_train.common.errors import ConfigError
from lib_train.webui.sample_render import SEEDS_FILE

from .test_samples import live_webui, values


def request_values(folder, **overrides) -> dict:
    settings = dict(class_prompt="person", folder=str(folder), count=2, seed=100, steps=3, cfg_scale=5.0,
                    sampler="Euler", negative_prompt="blurry")
    settings.update(overrides)
    return settings


def test_class_pictures_are_made_in_kohyas_folder_with_their_seeds(tmp_path):
    webui, jobs = live_webui(tmp_path)
    request = jobs.prepare_class_pictures(request_values(tmp_path / "reg"))
    assert (request.width, request.height) == (512, 512)  # the loaded family's resolution when none is given
    request = jobs.prepare_class_pictures(request_values(tmp_path / "reg", width=64, height=64))
    job = jobs.run_class_pictures(jobs.begin(), request)
    assert job.state == "done", job.error
    folder = tmp_path / "reg" / "1_person"
    assert job.reg_folder == str(tmp_path / "reg") and [p.split("/")[-1] for p in job.saved_files] == \
        ["0001_100.png", "0002_101.png"]
    records = json.loads((folder / SEEDS_FILE).read_text("utf-8"))
    assert [(r["file"], r["seed"], r["class_prompt"]) for r in records] == [("0001_100.png", 100, "person"),
                                                                             ("0002_101.png", 101, "person")]
    for record in records:
        with Image.open(folder / record["file"]) as image:
            assert f"Seed: {record['seed']}" in image.info["parameters"] and image.size == (64, 64)
            picture = np.asarray(image.convert("RGB"))
        p = webui.processing.StableDiffusionProcessingTxt2Img(
            sd_model=webui.shared.sd_model, prompt="person", negative_prompt="blurry", seed=record["seed"],
            sampler_name="Euler", steps=3, cfg_scale=5.0, width=64, height=64)
        assert np.array_equal(picture, np.asarray(webui.processing.process_images(p).images[0]))

    again = jobs.run_class_pictures(jobs.begin(), jobs.prepare_class_pictures(
        request_values(tmp_path / "reg", width=64, height=64, count=1, seed=-1)))
    assert again.state == "done" and again.saved_files[0].split("/")[-1].startswith("0003_")
    assert len(json.loads((folder / SEEDS_FILE).read_text("utf-8"))) == 3  # a drawn seed is recorded too

    trained = jobs.run(jobs.begin(), jobs.prepare(values(tmp_path, reg_dir=job.reg_folder, prior_loss_weight=0.5,
                                                         epochs=1, sample_prompts="")))
    assert trained.state == "done" and trained.model_restored is True, trained.error
    with safe_open(trained.saved_files[-1], "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_num_reg_images"] == "3" and metadata["ss_prior_loss_weight"] == "0.5"


def test_the_default_folder_is_the_projects_and_stop_keeps_the_finished_pictures(tmp_path):
    webui, jobs = live_webui(tmp_path)
    render = webui.processing.process_images
    calls = []

    def stop_at_second(p):
        calls.append(p.seed)
        if len(calls) == 2:
            jobs.stop()
        return render(p)

    webui.processing.process_images = stop_at_second
    request = jobs.prepare_class_pictures(request_values("", name="myproject", count=3, width=64, height=64))
    assert request.folder == tmp_path / "projects" / "myproject" / "regularization"
    job = jobs.run_class_pictures(jobs.begin(), request)
    assert job.state == "stopped" and len(job.saved_files) == 1
    assert sorted(p.name for p in request.subfolder.iterdir()) == ["0001_100.png", SEEDS_FILE]


@pytest.mark.parametrize("damaged", [b'[{"file": "0001_100.png", "seed"', b'{"file": "0001_100.png"}', b"\xff\xfe"])
def test_a_damaged_seeds_file_is_named_and_nothing_is_touched(tmp_path, damaged):
    webui, jobs = live_webui(tmp_path)
    request = jobs.prepare_class_pictures(request_values(tmp_path / "reg", width=64, height=64, count=1))
    folder = request.subfolder
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(folder / "0001_100.png")
    picture = (folder / "0001_100.png").read_bytes()
    (folder / SEEDS_FILE).write_bytes(damaged)
    expected = f"{folder / SEEDS_FILE} cannot be read as the list of class pictures"
    with pytest.raises(ConfigError, match=re.escape(expected)) as refused:
        jobs.prepare_class_pictures(request_values(tmp_path / "reg", width=64, height=64, count=1))
    assert "move it out of the folder" in str(refused.value)
    job = jobs.run_class_pictures(jobs.begin(), request)  # prepared before the file was damaged
    assert job.state == "failed" and expected in job.error and "JSONDecodeError" not in job.error
    assert sorted(p.name for p in folder.iterdir()) == ["0001_100.png", SEEDS_FILE]
    assert (folder / "0001_100.png").read_bytes() == picture and (folder / SEEDS_FILE).read_bytes() == damaged


@pytest.mark.parametrize("overrides, message", [
    (dict(class_prompt=""), "Give the class prompt"),
    (dict(class_prompt="a/b"), "names the pictures' folder"),
    (dict(count=0), "from 1 to 1000 class pictures"),
    (dict(width=100), "multiple of 8"),
    (dict(steps="many"), "Class pictures:"),
    (dict(folder="", name=""), "Choose the folder for the class pictures"),
])
def test_bad_class_picture_requests_are_named(tmp_path, overrides, message):
    webui, jobs = live_webui(tmp_path)
    with pytest.raises(ConfigError, match=message):
        jobs.prepare_class_pictures({**request_values(tmp_path / "reg"), **overrides})

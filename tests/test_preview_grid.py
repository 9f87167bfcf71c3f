"""The preview grid through a txt2img with the WebUI's shapes (tests/webui_standin_txt2img.py), on a LoRA
trained by the job runner: cells equal single renders with the LoRA merged like the built-in Lora merges it,
files and labels, choose from a click, stop, a changed checkpoint, and the live model left as it was."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lib_train.common.errors import ConfigError, OutputError
from lib_train.engine.model_guard import fingerprint, hook_count
from lib_train.engine.network import LoRANetwork
from lib_train.webui.grid_render import WebUIGridRenderer
from lib_train.webui.host import WebUIHost
from lib_train.webui.jobs import Folders, TrainingJobs

from .conftest import make_concept_images
from .webui_standin import make_webui, merge_lora, restore_from_backup
from .webui_standin_txt2img import install_txt2img

WEIGHTS = "0, 0.5, 1"


def train_in_webui(root, **settings):
    """The job runner's training on the stand-in WebUI (a LoCon unless ``settings`` say otherwise)."""
    torch.set_num_threads(1)
    webui = make_webui(root / "models" / "Lora")
    install_txt2img(webui)
    jobs = TrainingJobs(webui, Folders(lora_dir=root / "models" / "Lora", projects_dir=root / "projects",
                                       data_dir=root, exposed=False))
    make_concept_images(root / "pictures" / "2_concept", count=4)
    values = dict(name="gridlora", train_dir=str(root / "pictures"), resolution=64, enable_buckets=False,
                  rank=4, alpha=4.0, conv_rank=2, conv_alpha=1.0, epochs=2, batch_size=2, unet_lr=3e-3,
                  text_encoder_lr=3e-3, lr_scheduler="constant", seed=3, trigger_words="ttconcept",
                  save_precision="fp32")
    config = jobs.prepare({**values, **settings})
    job = jobs.run(jobs.begin(), config)
    assert job.state == "done", job.error
    return webui, jobs, root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_in_webui(tmp_path_factory.mktemp("grid"))


def grid_values(**overrides) -> dict:
    values = dict(name="gridlora", prompt="ttconcept, red circle", negative_prompt="blurry", sampler="Euler",
                  steps=3, cfg_scale=5.0, width=64, height=64, seeds="7", weights=WEIGHTS)
    values.update(overrides)
    return values


def render(jobs, **overrides):
    request = jobs.prepare_grid(grid_values(**overrides))
    job = jobs.run_grid(jobs.begin(), request)
    return request, job


def merged_render(webui, path, weight: float, seed: int, cfg: float, prompt: str = "ttconcept, red circle") -> Image.Image:
    """The reference: txt2img with <lora:name:w>, i.e. the built-in Lora's W' = W + w·ΔW merged into every layer
    (the stand-in's merge, in the built-in's order of operations), then a plain single-image txt2img."""
    model = webui.shared.sd_model
    merge_lora(model, load_file(str(path)), weight, weight)
    try:
        p = webui.processing.StableDiffusionProcessingTxt2Img(
            sd_model=model, prompt=prompt, negative_prompt="blurry", seed=seed, sampler_name="Euler", steps=3,
            cfg_scale=cfg, width=64, height=64)
        webui.processing.StableDiffusionProcessing.cached_c = [None, None]  # the Lora tag changes the key
        webui.processing.StableDiffusionProcessing.cached_uc = [None, None]
        return webui.processing.process_images(p).images[0]
    finally:
        with torch.no_grad():
            for module in model.network_layer_mapping.values():
                if getattr(module, "network_weights_backup", None) is not None:
                    restore_from_backup(module)
                    module.network_current_names = ()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_every_cell_equals_the_merged_lora_render(trained):
    assert_cells_equal_merged_renders(*trained)


@pytest.mark.parametrize("settings", [dict(network_type="loha"), dict(network_type="locon", dora=True)],
                         ids=["loha_conv", "locon_dora"])
def test_lycoris_types_cells_equal_the_merged_render(tmp_path, settings):
    """LoHa and DoRA epochs through the grid: UNet by our per-sample hooks, text encoder by the built-in Lora."""
    assert_cells_equal_merged_renders(*train_in_webui(tmp_path, **settings))


def assert_cells_equal_merged_renders(webui, jobs, root):
    before = fingerprint(webui.shared.sd_model)
    request, job = render(jobs)
    assert job.state == "done", job.error
    assert job.model_restored is True and fingerprint(webui.shared.sd_model) == before
    assert hook_count(webui.shared.sd_model) == 0
    index = json.loads((request.out_dir / "grid.json").read_text("utf-8"))
    assert len(index["cells"]) == 6 and index["complete"]
    differences = []
    for entry in index["cells"]:
        cell = Image.open(request.out_dir / "cells" / entry["picture"])
        reference = merged_render(webui, entry["file"], entry["weight"], entry["seed"], entry["cfg_scale"])
        differences.append(np.abs(pixels(cell) - pixels(reference)).max())
        assert f"<lora:{entry['file'].rsplit('/', 1)[1][:-12]}:{entry['weight']:g}>" in cell.info["parameters"]
        assert "Batch size" not in cell.info["parameters"]
    assert max(differences) <= 1, differences  # float tolerance: at most one level of 255
    # The weights matter: weight 0 and weight 1 of the last epoch differ.
    last = [e for e in index["cells"] if e["iy"] == 1]
    a, b = (pixels(Image.open(request.out_dir / "cells" / e["picture"])) for e in (last[0], last[2]))
    assert np.abs(a - b).mean() > 1


def test_grid_encodes_prompts_bit_for_bit_as_txt2img(trained):
    """The WebUI's emphasis step divides by the conditioning's mean. On this tiny model, as on the harness's
    random SD1.5 (a final layer norm without bias), that mean is a few ulps from 0 and for some prompts exactly
    0: their conditioning is NaN, in txt2img too. Adding the text encoder's Lora after each layer (hooks)
    instead of merging it changed the last bits and so which prompts became NaN: a cell failed where txt2img
    rendered. The grid's conditioning for <lora:epoch:w> must be txt2img's, bit for bit, NaNs included."""
    webui, jobs, root = trained
    model = webui.shared.sd_model
    path = root / "models" / "Lora" / "gridlora" / "gridlora.safetensors"
    state = load_file(str(path))
    host = WebUIHost(webui)
    network = LoRANetwork.for_kohya_state_dict(host, state)
    renderer = WebUIGridRenderer(webui, host)
    words = "red blue green circle square girl boy hat night day sky tree cat dog smile sword".split()
    prompts = [f"ttconcept, {words[i % 16]}, {words[i * 7 % 16]}, picture {i}" for i in range(60)]
    before = fingerprint(model)
    differing, nan_prompts = [], 0
    with torch.no_grad():
        for weight in (0.5, 1.0):
            for prompt in prompts:
                merge_lora(model, state, weight, weight)  # txt2img with <lora:gridlora:w>
                reference = model.get_learned_conditioning([prompt])
                host.unmerge_builtin_lora()
                with renderer.text_encoder_at(network, "gridlora", weight):
                    ours = model.get_learned_conditioning([prompt])
                nan_prompts += bool(reference.isnan().any())
                if not torch.equal(reference.nan_to_num(7.0), ours.nan_to_num(7.0)):
                    differing.append((weight, prompt))
    assert not differing, differing[:3]
    assert fingerprint(model) == before and hook_count(model) == 0
    print(f"{nan_prompts} of {2 * len(prompts)} encodings are NaN in txt2img and in the grid alike")


def test_grid_layout_labels_and_click_to_choose(trained):
    webui, jobs, root = trained
    request, job = render(jobs, third_axis="seed", seeds="7, 8")
    assert job.state == "done", job.error
    grid = Image.open(request.out_dir / "grid.png")
    index = json.loads((request.out_dir / "grid.json").read_text("utf-8"))
    assert len(index["cells"]) == 3 * 2 * 2
    from lib_train.preview.grid_image import GridLayout
    layout = GridLayout.from_dict(index["layout"])
    assert (grid.width, grid.height) == (layout.width, layout.height)
    # A click in the middle of (weight 0.5, final, seed 8) picks that cell, whose picture is pasted there.
    left, top, right, bottom = layout.cell_box(1, 1, 1)
    picked = jobs.pick("gridlora", request.out_dir, (left + right) / 2, (top + bottom) / 2)
    assert picked.weight == 0.5 and picked.is_final and picked.picture.exists()
    assert np.array_equal(pixels(grid.crop((left, top, right, bottom)).convert("RGB")), pixels(Image.open(picked.picture).convert("RGB")))
    lora_folder = root / "models" / "Lora" / "gridlora"
    # A generation with <lora:gridlora:1> left merged weights behind: choosing must un-merge them.
    layer = webui.shared.sd_model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.to_q
    layer.network_weights_backup = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(0.25)
    layer.network_current_names = (("gridlora", 1.0, 1.0, None),)
    result = jobs.choose("gridlora", picked.file, picked.weight, picked.picture)
    assert torch.equal(layer.weight, layer.network_weights_backup) and layer.network_current_names == ()
    with pytest.raises(ConfigError, match="not one of the preview grids"):
        jobs.pick("gridlora", root / "elsewhere", 10, 10)
    for x, y in (("left", 10), ([1], 10), (None, 10), (float("inf"), top + 1)):  # an API body's x, y may be anything
        with pytest.raises(ConfigError, match="The point on the grid must be two numbers"):
            jobs.pick("gridlora", request.out_dir, x, y)
    assert result.chosen.is_final and not result.copied
    assert json.loads(result.sidecar_path.read_text("utf-8"))["preferred weight"] == 0.5
    assert result.preview_path == lora_folder / "gridlora.preview.png" and result.preview_path.exists()


def test_stop_keeps_the_finished_rows_and_restores(trained):
    webui, jobs, root = trained
    before = fingerprint(webui.shared.sd_model)
    request = jobs.prepare_grid(grid_values())
    job = jobs.begin()
    original = jobs._track_grid

    def stop_after_first_row(job_, done, total, text):
        original(job_, done, total, text)
        if done == 1:
            jobs.stop()

    jobs._track_grid = stop_after_first_row
    try:
        jobs.run_grid(job, request)
    finally:
        jobs._track_grid = original
        webui.shared.state.interrupted = False
    assert job.state == "stopped"
    index = json.loads((request.out_dir / "grid.json").read_text("utf-8"))
    assert not index["complete"] and {e["iy"] for e in index["cells"]} == {0}
    assert job.model_restored is True and fingerprint(webui.shared.sd_model) == before


def test_another_checkpoint_loaded_is_refused_with_the_way_back(trained):
    webui, jobs, root = trained
    info = webui.shared.sd_model.sd_checkpoint_info
    other = type(info)(filename="/models/Stable-diffusion/other.safetensors", hash="99999999", sha256="e" * 64,
                       title="other [eeeeeeeeee]")
    webui.shared.sd_model.sd_checkpoint_info = other
    try:
        request = jobs.prepare_grid(grid_values())
        job = jobs.run_grid(jobs.begin(), request)
    finally:
        webui.shared.sd_model.sd_checkpoint_info = info
    assert job.state == "failed"
    assert "trained on tiny.safetensors, but other [eeeeeeeeee] is loaded" in job.error
    assert "Switch back to tiny [ffffffffff]" in job.error
    assert not (request.out_dir / "grid.png").exists()


def test_bad_grid_settings_are_refused_before_rendering(trained):
    webui, jobs, root = trained
    with pytest.raises(ConfigError, match="not a number"):
        jobs.prepare_grid(grid_values(weights="0.5, lots"))
    with pytest.raises(ConfigError, match="No file for epoch 9"):
        jobs.prepare_grid(grid_values(epochs="9"))
    with pytest.raises(ConfigError, match="no saved files"):
        jobs.prepare_grid(grid_values(name="nothing-here"))


@pytest.mark.parametrize("overrides, match", [
    (dict(steps="many"), "Setting 'steps' must be a whole number, got 'many'"),
    (dict(steps=20.5), "Setting 'steps' must be a whole number, got 20.5"),
    (dict(width=None), "Setting 'width' must be a whole number, got None"),
    (dict(cfg_scale=True), "Setting 'cfg_scale' must be a number, got True"),
    (dict(weights=[0.5, "lots"]), "'lots' in the weights is not a number"),
    (dict(weights=[0.5, 0.5]), "0.5 appears twice in the weights"),
    (dict(seeds=[True]), "'True' in the seeds is not a whole number"),
    (dict(weights={"x": 1}), "in the weights is not a number"),
    (dict(prompt=None), "Give the preview prompt"),
    (dict(negative_prompt=None, prompt=" "), "Give the preview prompt"),
])
def test_bad_grid_values_from_the_api_are_named(trained, overrides, match):
    """An API body may hold anything: each bad value gets a clear message (no TypeError, no silent rounding)."""
    webui, jobs, root = trained
    with pytest.raises(ConfigError, match=match):
        jobs.prepare_grid(grid_values(**overrides))


def test_api_grid_numbers_may_be_single_numbers_or_lists(trained):
    webui, jobs, root = trained
    request = jobs.prepare_grid(grid_values(weights=1, epochs=2, seeds=7, steps="4", cfg_scale=6))
    assert request.spec.weights == [1.0] and [row.epoch for row in request.rows] == [2]
    assert request.spec.seeds == [7] and request.spec.steps == 4 and request.spec.cfg_scale == 6.0
    request = jobs.prepare_grid(grid_values(weights=[0.5, 1], epochs=[1, 2], seeds=[7, 8], third_axis="seed"))
    assert request.spec.weights == [0.5, 1.0] and request.spec.seeds == [7, 8]
    assert jobs.prepare_grid(grid_values(negative_prompt=None)).spec.negative_prompt == ""


def test_grid_settings_take_the_values_the_tab_shows(trained):
    """The API accepts what the tab sends: epochs "all" (its default) or empty, third axis "none"."""
    webui, jobs, root = trained
    every = [row.epoch for row in jobs.prepare_grid(grid_values(epochs=[1, 2])).rows]
    for epochs in ("all", " All ", ""):
        request = jobs.prepare_grid(grid_values(epochs=epochs, third_axis="none"))
        assert [row.epoch for row in request.rows] == every == [1, 2]
        assert request.spec.third_axis is None and request.spec.epochs is None
    assert [row.epoch for row in jobs.prepare_grid(grid_values(epochs="2")).rows] == [2]


def test_returning_users_see_their_projects(trained):
    """The name list: Lora subfolders with their own files and project folders, newest first; choosing one
    brings back its trigger words and pictures folder."""
    webui, jobs, root = trained
    (root / "models" / "Lora" / "not-ours").mkdir(parents=True)  # a user's folder without files of its name
    (root / "models" / "Lora" / "not-ours" / "other.safetensors").write_bytes(b"")
    make_concept_images(root / "projects" / "newer" / "pictures", count=1)
    names = jobs.project_names()
    assert names[0] == "newer" and "gridlora" in names and "not-ours" not in names
    assert jobs.project_defaults("gridlora") == {"trigger_words": "ttconcept", "train_dir": ""}
    assert jobs.project_defaults("newer") == {"trigger_words": "", "train_dir": str(root / "projects" / "newer" / "pictures")}
    with pytest.raises(OutputError):
        jobs.project_defaults("../escape")


def test_background_grid_holds_the_queue_lock(trained):
    webui, jobs, root = trained
    request = jobs.prepare_grid(grid_values(weights="1"))
    held = []
    original = jobs._track_grid
    jobs._track_grid = lambda *a: (held.append(webui.call_queue.queue_lock.locked()), original(*a))
    try:
        job = jobs.render_grid_in_background(request)
        for _ in range(600):
            if job.state not in ("queued", "running"):
                break
            threading.Event().wait(0.1)
    finally:
        jobs._track_grid = original
    assert job.state == "done", job.error
    assert held and all(held)


def test_an_sd1_lora_on_a_loaded_sdxl_model_is_refused(trained):
    from .webui_standin_sdxl import SDXLModel

    webui, jobs, root = trained
    sd1_model = webui.shared.sd_model
    webui.shared.sd_model = SDXLModel()
    webui.shared.sd_model.sd_checkpoint_info = sd1_model.sd_checkpoint_info
    before = fingerprint(webui.shared.sd_model)
    try:
        request = jobs.prepare_grid(grid_values())
        job = jobs.run_grid(jobs.begin(), request)
        assert fingerprint(webui.shared.sd_model) == before
    finally:
        webui.shared.sd_model = sd1_model
    assert job.state == "failed"
    assert "gridlora is an SD1.x LoRA and the loaded model is SDXL" in job.error
    assert not (request.out_dir / "grid.png").exists()


@pytest.mark.parametrize("delete_others", ["0", "no", 1, 0, [], {}, "yes please"])
def test_delete_others_that_is_not_true_or_false_is_refused_and_deletes_nothing(trained, delete_others):
    """An API body's delete_others is read strictly: the JSON string "false" (or "0") must not delete epochs."""
    webui, jobs, root = trained
    request, job = render(jobs, weights="1")
    assert job.state == "done", job.error
    lora_folder = root / "models" / "Lora" / "gridlora"
    before = sorted(p.name for p in lora_folder.iterdir())
    picked = jobs.pick("gridlora", request.out_dir, *center_of_first_cell(request.out_dir))
    with pytest.raises(ConfigError, match="delete_others must be true or false"):
        jobs.choose("gridlora", picked.file, picked.weight, picked.picture, delete_others)
    assert sorted(p.name for p in lora_folder.iterdir()) == before


def test_delete_others_false_as_text_keeps_the_other_epochs(trained):
    webui, jobs, root = trained
    request, job = render(jobs, weights="1")
    lora_folder = root / "models" / "Lora" / "gridlora"
    picked = jobs.pick("gridlora", request.out_dir, *center_of_first_cell(request.out_dir))
    result = jobs.choose("gridlora", picked.file, picked.weight, picked.picture, " False ")
    assert result.deleted == [] and (lora_folder / "gridlora-000001.safetensors").exists()


def center_of_first_cell(grid_folder) -> tuple[float, float]:
    from lib_train.preview.grid_image import GridLayout
    layout = GridLayout.from_dict(json.loads((grid_folder / "grid.json").read_text("utf-8"))["layout"])
    left, top, right, bottom = layout.cell_box(0, 0, 0)
    return (left + right) / 2, (top + bottom) / 2


def test_choosing_while_a_job_runs_is_refused_before_any_file_changes(trained):
    """A running job holds the queue lock that choosing needs to un-merge the Lora: the choice would write the files,
    then hang until the job ends (an hour of training)."""
    webui, jobs, root = trained
    request, job = render(jobs, weights="1")
    lora_folder = root / "models" / "Lora" / "gridlora"
    picked = jobs.pick("gridlora", request.out_dir, *center_of_first_cell(request.out_dir))
    before = {p.name: p.read_bytes() for p in lora_folder.iterdir()}
    running = jobs.begin()
    running.kind = "train"
    try:
        with pytest.raises(ConfigError, match="A training is already running; stop it or wait for it to finish"):
            jobs.choose("gridlora", picked.file, picked.weight, picked.picture, True)
    finally:
        running.state = "done"
    assert {p.name: p.read_bytes() for p in lora_folder.iterdir()} == before


def test_a_grid_without_its_index_or_cell_picture_is_named(trained):
    """A grid folder left without grid.json (rendering cut short) or a deleted cell picture: a message, not a
    FileNotFoundError (a 500 from the API)."""
    webui, jobs, root = trained
    request, job = render(jobs, weights="1")
    picked = jobs.pick("gridlora", request.out_dir, *center_of_first_cell(request.out_dir))
    (request.out_dir / "grid.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="has no readable grid.json"):
        jobs.pick("gridlora", request.out_dir, 10, 10)
    (request.out_dir / "grid.json").unlink()
    with pytest.raises(ConfigError, match="has no readable grid.json"):
        jobs.pick("gridlora", request.out_dir, 10, 10)
    picked.picture.unlink()
    with pytest.raises(ConfigError, match="picture of that cell .* is missing"):
        jobs.choose("gridlora", picked.file, picked.weight, picked.picture)

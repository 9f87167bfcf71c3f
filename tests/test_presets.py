"""Presets: the four built-in ones validate and train (scaled down to the tiny models), the user's are saved in the
extension's data folder, refused like a training would be, and reach the API's train body by name."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from safetensors import safe_open

from lib_train.common.errors import ConfigError, TrainToolsError
from lib_train.engine.config import TrainConfig
from lib_train.engine.family_defaults import defaults_switch
from lib_train.engine.model_guard import fingerprint
from lib_train.engine.presets import BUILTIN, PRESET_KEYS, PresetStore
from lib_train.engine.train import train_lora
from lib_train.hosts.protocol import ModelFamily
from lib_train.hosts.sd1 import build_tiny_sd1
from lib_train.hosts.sdxl import build_tiny_sdxl
from lib_train.hosts.standalone import StandaloneHost
from lib_train.hosts.standalone_sdxl import StandaloneSDXLHost
from lib_train.webui.jobs import Folders, TrainingJobs

from .conftest import make_concept_images

# What the tiny models need instead of the preset's sizes: 64-px pictures, a rank the tiny layers take, a few steps.
SCALED_DOWN = {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128, "epochs": 2, "save_every_n_epochs": 1,
               "save_precision": "fp32", "gradient_checkpointing": False, "lr_warmup_steps": 0}


def scaled(values: dict) -> dict:
    """The preset's values at tiny-model size: ranks at most 4 with the preset's alpha/rank scale kept."""
    small = {**values, **SCALED_DOWN}
    for rank, alpha in (("rank", "alpha"), ("conv_rank", "conv_alpha")):
        if values[rank] > 4:
            small[rank], small[alpha] = 4, values[alpha] * 4 / values[rank]
    return small


def test_builtin_presets_are_the_four_and_validate():
    assert [p.name for p in BUILTIN] == ["SD1.5 character", "SD1.5 style", "SDXL character", "SDXL style"]
    for preset in BUILTIN:
        for on_cuda in (False, True):
            values = preset.values(on_cuda=on_cuda, has_bitsandbytes=True)
            assert set(values) == set(PRESET_KEYS) and "name" not in values and "train_dir" not in values
            config = TrainConfig.from_dict({**values, "name": "x", "train_dir": "d", "output_dir": "o"}).validate()
            assert config.rank == preset.settings["rank"]
    sdxl = BUILTIN[2].values(on_cuda=True, has_bitsandbytes=True)
    assert (sdxl["resolution"], sdxl["text_encoder_lr"], sdxl["optimizer"]) == (1024, 0.0, "AdamW8bit")
    assert BUILTIN[2].values(on_cuda=False, has_bitsandbytes=True)["optimizer"] == "AdamW"  # 8-bit is CUDA only


@pytest.mark.parametrize("preset", BUILTIN, ids=lambda p: p.name)
def test_each_preset_trains_on_the_tiny_model(preset, tmp_path):
    host = StandaloneSDXLHost(build_tiny_sdxl(seed=0)) if preset.family is ModelFamily.SDXL else \
        StandaloneHost(build_tiny_sd1(seed=0))
    before = fingerprint(host.model)
    make_concept_images(tmp_path / "data" / "2_concept", count=4)
    values = scaled(preset.values(on_cuda=False, has_bitsandbytes=False))
    config = TrainConfig.from_dict({**values, "name": "preset", "train_dir": str(tmp_path / "data"),
                                    "output_dir": str(tmp_path / "out"), "trigger_words": "concept"}).validate()
    result = train_lora(host, config)
    assert result.steps == result.total_steps > 0 and len(result.saved_files) == 2
    assert fingerprint(host.model) == before
    with safe_open(str(result.saved_files[-1]), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_lr_scheduler"] == preset.settings["lr_scheduler"]
    assert float(metadata["ss_unet_lr"]) == preset.settings["unet_lr"]
    assert metadata["ss_network_module"] == "networks.lora"  # LoCon included, as kohya writes it
    assert ("conv_dim" in (metadata.get("ss_network_args") or "")) == (preset.settings.get("conv_rank", 0) > 0)


def test_users_presets_are_saved_listed_and_refused_like_a_training(tmp_path):
    store = PresetStore(tmp_path / "presets")
    saved = store.save("我的角色", "sd1", {"rank": 8, "alpha": "4", "unet_lr": 2e-4, "epochs": 12.0})
    assert saved.settings == {"rank": 8, "alpha": 4.0, "unet_lr": 2e-4, "epochs": 12}
    on_disk = json.loads((tmp_path / "presets" / "我的角色.json").read_text(encoding="utf-8"))
    assert on_disk == {"name": "我的角色", "family": "sd1", "builtin": False, "settings": saved.settings}
    assert [p.name for p in store.all()][4:] == ["我的角色"]
    assert store.get("我的角色").values(False, False)["rank"] == 8
    assert store.get("我的角色").values(False, False)["resolution"] == 512  # the rest from the SD1.5 defaults

    with pytest.raises(ConfigError, match="Give the preset a name"):
        store.save("  ", "sd1", {"rank": 8})
    with pytest.raises(ConfigError, match="built-in preset"):
        store.save("SD1.5 character", "sd1", {"rank": 8})
    with pytest.raises(ConfigError, match="Rank must be at least 1"):
        store.save("bad", "sd1", {"rank": 0})
    with pytest.raises(ConfigError, match="not name, train_dir"):
        store.save("bad", "sd1", {"name": "x", "train_dir": "y"})
    with pytest.raises(ConfigError, match="family"):
        store.save("bad", "sd9", {"rank": 8})
    with pytest.raises(TrainToolsError, match="cannot be used"):
        store.save("../escape", "sd1", {"rank": 8})
    for not_a_mapping in (["rank", 8], "rank=8", 8, None):  # an API body's "settings" may be anything
        with pytest.raises(ConfigError, match=f"mapping of setting names to values, not {type(not_a_mapping).__name__}"):
            store.save("bad", "sd1", not_a_mapping)
    assert sorted(p.name for p in (tmp_path / "presets").iterdir()) == ["我的角色.json"]

    (tmp_path / "presets" / "damaged.json").write_text("{not json", encoding="utf-8")
    assert [p.name for p in store.all()][4:] == ["我的角色"]  # a damaged file hides nothing else
    store.delete("我的角色")
    assert len(store.all()) == 4
    with pytest.raises(ConfigError, match="cannot be deleted"):
        store.delete("SDXL style")


def test_a_preset_is_checked_with_the_defaults_of_its_family(tmp_path):
    """What an SDXL preset leaves out is SDXL's (buckets 512-2048, the UNet only), so it is checked with those: a
    preset valid on them is saved, one a training would refuse on them is refused before it is saved."""
    store = PresetStore(tmp_path / "presets")
    for settings in ({"resolution": 1536}, {"optimizer": "Prodigy", "unet_lr": 1.0}):
        saved = store.save("mine", "sdxl", settings)
        TrainConfig.from_dict({**saved.values(False, False), "name": "x", "train_dir": "d", "output_dir": "o"}).validate()
        assert [p.name for p in store.all()][4:] == ["mine"]  # listed again when read back
    with pytest.raises(ConfigError, match="Bucket sizes must satisfy 64 <= min \\(512\\) <= resolution \\(256\\)"):
        store.save("small", "sdxl", {"resolution": 256})
    assert not (tmp_path / "presets" / "small.json").exists()


def test_a_preset_names_what_it_changes_that_a_form_has_no_field_for(tmp_path):
    """The Train page has no field for some settings (gradient accumulation, save precision...): a preset saved
    through the API may change them, and applying it on the page says which ones it cannot set there."""
    store = PresetStore(tmp_path / "presets")
    preset = store.save("api", "sd1", {"rank": 8, "gradient_accumulation_steps": 4, "save_precision": "bf16",
                                       "max_grad_norm": 1.0})  # 1.0 is the default: nothing lost
    on_page = [key for key in PRESET_KEYS if key not in ("gradient_accumulation_steps", "save_precision",
                                                         "max_grad_norm")]
    assert preset.changed_outside(on_page) == ["gradient_accumulation_steps", "save_precision"]
    assert preset.changed_outside(PRESET_KEYS) == [] and BUILTIN[0].changed_outside(on_page) == []


def test_the_api_body_takes_a_preset_by_name_and_refuses_another_family(tmp_path):
    from .webui_standin import make_webui

    webui = make_webui(tmp_path / "Lora")
    jobs = TrainingJobs(webui, Folders(lora_dir=tmp_path / "Lora", projects_dir=tmp_path / "projects",
                                       data_dir=tmp_path, exposed=False))
    make_concept_images(tmp_path / "pictures" / "1_concept", count=1)
    body = {"name": "p", "train_dir": str(tmp_path / "pictures"), "preset": "SD1.5 style", "epochs": 3}
    config = jobs.prepare(body)
    assert (config.network_type, config.conv_rank, config.flip_aug, config.epochs) == ("locon", 8, True, 3)
    assert body["preset"] == "SD1.5 style"  # the caller's dict is left alone
    with pytest.raises(ConfigError, match="for SDXL models and the loaded model is SD1"):
        jobs.prepare({**body, "preset": "SDXL style"})
    with pytest.raises(ConfigError, match="no preset named"):
        jobs.prepare({**body, "preset": "nope"})
    jobs.presets.save("mine", "sd1", {"rank": 6})
    assert jobs.prepare({**body, "preset": "mine"}).rank == 6
    assert "mine" not in jobs.project_names() and ".presets" not in jobs.project_names()


def test_on_a_gpu_a_preset_keeps_the_samples_every_epoch_and_the_form_can_turn_them_off(tmp_path):
    """Samples every epoch is the GPU's default; no preset speaks of samples, so applying one keeps it (the API's body
    with a preset, the form's values) and the form's defaults after it say so: the Train click moves nothing back."""
    from .webui_standin import make_webui

    webui = make_webui(tmp_path / "Lora")
    webui.devices.device = SimpleNamespace(type="cuda")
    jobs = TrainingJobs(webui, Folders(lora_dir=tmp_path / "Lora", projects_dir=tmp_path / "projects",
                                       data_dir=tmp_path, exposed=False))
    make_concept_images(tmp_path / "pictures" / "1_concept", count=1)
    loaded = jobs.family_defaults(webui.shared.sd_model)
    assert loaded["sample_every_n_epochs"] == 1
    values = jobs.preset_values("SD1.5 character")
    assert values["sample_every_n_epochs"] == 1 and values["rank"] == 32
    body = {"name": "p", "train_dir": str(tmp_path / "pictures"), "preset": "SD1.5 character"}
    assert jobs.prepare(body).sample_every_n_epochs == jobs.prepare({**body, "preset": ""}).sample_every_n_epochs == 1
    # The form after Apply shows the preset's values and its family's defaults; the user then turns samples off.
    shown = jobs.preset_defaults(ModelFamily.SD1)
    assert defaults_switch(values, shown, loaded) == {}
    assert defaults_switch({**values, "sample_every_n_epochs": 0}, shown, loaded) == {}

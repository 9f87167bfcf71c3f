"""Per-family defaults: SDXL's (1024², buckets 512–2048, UNet only, checkpointing, AdamW8bit on CUDA) replace
only the values the user left at the defaults of the family the form showed, in the tab and the API."""

from __future__ import annotations

from lib_train.engine.config import TrainConfig
from lib_train.engine.family_defaults import defaults_switch, family_overrides
from lib_train.hosts.protocol import ModelFamily
from lib_train.webui.jobs import Folders, TrainingJobs

from .conftest import make_concept_images

SDXL_CPU = family_overrides(ModelFamily.SDXL, on_cuda=False, has_bitsandbytes=True)


def form(**changed) -> dict:
    """The tab's values as gradio sends them: integers of Number fields arrive as floats."""
    values = {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v
              for k, v in TrainConfig().to_dict().items()}
    values.update(changed)
    return values


def test_sdxl_defaults_fit_a_12gb_card_and_are_valid():
    assert family_overrides(ModelFamily.SD1, on_cuda=True, has_bitsandbytes=True) == {}
    assert SDXL_CPU == {"resolution": 1024, "min_bucket_reso": 512, "max_bucket_reso": 2048, "text_encoder_lr": 0.0,
                        "gradient_checkpointing": True}
    assert family_overrides(ModelFamily.SDXL, on_cuda=True, has_bitsandbytes=True)["optimizer"] == "AdamW8bit"
    assert "optimizer" not in family_overrides(ModelFamily.SDXL, on_cuda=True, has_bitsandbytes=False)
    config = TrainConfig.from_dict({**TrainConfig().to_dict(), **SDXL_CPU, "name": "x", "train_dir": "d", "output_dir": "o"})
    assert config.validate().resolution == 1024 and not config.train_text_encoder


def test_switching_family_moves_untouched_values_only_and_back():
    values = form(resolution=768, epochs=20)  # the user chose 768 and 20 epochs
    to_sdxl = defaults_switch(values, {}, SDXL_CPU)
    assert to_sdxl == {"min_bucket_reso": 512, "max_bucket_reso": 2048, "text_encoder_lr": 0.0,
                       "gradient_checkpointing": True}
    assert defaults_switch(form(), {}, SDXL_CPU)["resolution"] == 1024
    shown_sdxl = {**values, **to_sdxl}
    assert defaults_switch(shown_sdxl, SDXL_CPU, {}) == {"min_bucket_reso": 256, "max_bucket_reso": 1024,
                                                          "text_encoder_lr": 5e-5, "gradient_checkpointing": False}
    assert defaults_switch(form(), SDXL_CPU, SDXL_CPU) == {}  # the same family: nothing moves


def test_api_settings_left_out_take_the_loaded_sdxl_models_defaults(tmp_path):
    from .webui_standin_sdxl import make_sdxl_webui

    webui = make_sdxl_webui(tmp_path / "Lora")
    jobs = TrainingJobs(webui, Folders(lora_dir=tmp_path / "Lora", projects_dir=tmp_path / "projects",
                                       data_dir=tmp_path, exposed=False))
    make_concept_images(tmp_path / "pictures" / "1_concept", count=1)
    config = jobs.prepare({"name": "xl", "train_dir": str(tmp_path / "pictures")})
    assert (config.resolution, config.min_bucket_reso, config.max_bucket_reso) == (1024, 512, 2048)
    assert config.text_encoder_lr == 0 and config.gradient_checkpointing and config.optimizer == "AdamW"  # CPU
    given = jobs.prepare({"name": "xl", "train_dir": str(tmp_path / "pictures"), "resolution": 768,
                          "text_encoder_lr": 1e-5})
    assert given.resolution == 768 and given.text_encoder_lr == 1e-5
    assert jobs.family_defaults(None) == {}

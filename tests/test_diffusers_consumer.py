"""An independent consumer: a trained file loads into diffusers with every key used and the same ΔW."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from lib_train.engine.train import train_lora
from lib_train.hosts.sd1 import TINY_TEXT, TINY_UNET

from .conftest import make_concept_images, tiny_config

diffusers = pytest.importorskip("diffusers")
peft_lora = pytest.importorskip("peft.tuners.lora")


def diffusers_twins():
    """diffusers/transformers models with the tiny ldm model's exact block layout and widths."""
    from transformers import CLIPTextConfig, CLIPTextModel

    channels = [TINY_UNET["model_channels"] * m for m in TINY_UNET["channel_mult"]]
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=TINY_UNET["context_dim"], attention_head_dim=TINY_UNET["num_heads"], norm_num_groups=32,
    )
    return unet, CLIPTextModel(CLIPTextConfig(**TINY_TEXT))


def test_trained_file_loads_into_diffusers_with_matching_delta(tiny_host, tmp_path):
    data = make_concept_images(tmp_path / "data" / "2_concept")
    config = tiny_config(tmp_path / "data", tmp_path / "out", epochs=1, conv_rank=2, conv_alpha=1.0, alpha=2.0)
    result = train_lora(tiny_host, config)
    assert data.exists() and result.saved_files
    state = load_file(str(result.saved_files[-1]))

    unet, text_encoder = diffusers_twins()
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("diffusers").addHandler(handler)
    try:
        lora_state, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(dict(state))
        diffusers.StableDiffusionPipeline.load_lora_into_unet(lora_state, alphas, unet=unet, adapter_name="t")
        diffusers.StableDiffusionPipeline.load_lora_into_text_encoder(lora_state, alphas, text_encoder=text_encoder,
                                                                      adapter_name="t")
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert not [m for m in messages if "unexpected" in m.lower() or "missing" in m.lower()], messages

    file_modules = {k.rsplit(".", 2)[0] for k in state if k.endswith(".lora_down.weight")}
    loaded = {}
    for prefix, model in (("lora_unet_", unet), ("lora_te_", text_encoder)):
        for name, module in model.named_modules():
            if isinstance(module, peft_lora.LoraLayer) and "t" in module.lora_A:
                loaded[prefix + name.replace(".", "_")] = module
    assert set(loaded) == file_modules
    assert len(file_modules) == 277 + 12

    for key, module in loaded.items():
        down, up = state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"]
        scale = float(state[f"{key}.alpha"]) / down.shape[0]
        expected = (up.flatten(1) @ down.flatten(1)) * scale
        got = module.get_delta_weight("t").flatten(1)
        assert torch.allclose(got, expected, atol=1e-6), key
    assert any(float(state[f"{k}.lora_up.weight"].abs().sum()) > 0 for k in file_modules)  # it did train

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


def diffusers_sdxl_twins():
    """diffusers/transformers models with the tiny SDXL's block layout and widths (its level 0 has no attention,
    as SDXL's)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lib_train.hosts.sdxl import TINY_SDXL_SIZE_EMBEDDING, TINY_SDXL_TEXT1, TINY_SDXL_TEXT2, TINY_SDXL_UNET

    config = TINY_SDXL_UNET
    channels = [config["model_channels"] * m for m in config["channel_mult"]]
    depths = [max(1, d) for d in config["transformer_depth"]]
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=depths, cross_attention_dim=config["context_dim"],
        attention_head_dim=[c // config["num_head_channels"] for c in channels], use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=TINY_SDXL_SIZE_EMBEDDING,
        projection_class_embeddings_input_dim=config["adm_in_channels"], norm_num_groups=32,
    )
    text2 = TINY_SDXL_TEXT2
    te2_config = CLIPTextConfig(vocab_size=text2["vocab_size"], hidden_size=text2["width"],
                                intermediate_size=4 * text2["width"], num_hidden_layers=text2["layers"],
                                num_attention_heads=text2["heads"], projection_dim=text2["embed_dim"], hidden_act="gelu")
    return unet, CLIPTextModel(CLIPTextConfig(**TINY_SDXL_TEXT1)), CLIPTextModelWithProjection(te2_config)


def sgm_name(diffusers_name: str) -> str:
    """Oracle: the sgm (LDM) module a diffusers SDXL UNet module corresponds to, written from the two layouts
    (3 levels, 2 ResBlocks per level, a downsampler after levels 0 and 1, 3 output blocks per level)."""
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}
    parts = diffusers_name.split(".")
    if parts[0] == "down_blocks":
        level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "downsamplers":
            return f"input_blocks.{3 * (level + 1)}.0.op"
        block = f"input_blocks.{3 * level + index + 1}"
    elif parts[0] == "up_blocks":
        level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "upsamplers":
            # Only the two levels with attention have an upsampler: ResBlock, SpatialTransformer, Upsample.
            return f"output_blocks.{3 * level + 2}.2.conv"
        block = f"output_blocks.{3 * level + index}"
    else:  # mid_block
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        return (f"middle_block.{2 * index}." + resnet[rest[0]] if kind == "resnets"
                else "middle_block.1." + ".".join(rest))
    if kind == "resnets":
        return f"{block}.0.{resnet[rest[0]]}"
    return f"{block}.1." + ".".join(rest)


def test_trained_sdxl_file_loads_into_diffusers_sdxl_with_matching_delta(tmp_path):
    from lib_train.hosts.sdxl import build_tiny_sdxl
    from lib_train.hosts.standalone_sdxl import StandaloneSDXLHost

    host = StandaloneSDXLHost(build_tiny_sdxl(seed=0))
    make_concept_images(tmp_path / "data" / "2_concept")
    config = tiny_config(tmp_path / "data", tmp_path / "out", epochs=1, conv_rank=2, conv_alpha=1.0, alpha=2.0,
                         unet_lr=1e-2, text_encoder_lr=1e-2)
    state = load_file(str(train_lora(host, config).saved_files[-1]))

    unet, text_encoder, text_encoder_2 = diffusers_sdxl_twins()
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("diffusers").addHandler(handler)
    try:
        pipeline = diffusers.StableDiffusionXLPipeline
        lora_state, alphas = pipeline.lora_state_dict(dict(state), unet_config=unet.config)
        pipeline.load_lora_into_unet(lora_state, alphas, unet=unet, adapter_name="t")
        for encoder, prefix in ((text_encoder, "text_encoder"), (text_encoder_2, "text_encoder_2")):
            pipeline.load_lora_into_text_encoder(lora_state, alphas, text_encoder=encoder, prefix=prefix,
                                                 adapter_name="t")
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert not [m for m in messages if "unexpected" in m.lower() or "missing" in m.lower()], messages

    file_modules = {k.rsplit(".", 2)[0] for k in state if k.endswith(".lora_down.weight")}
    loaded = {}
    for name, module in unet.named_modules():
        if isinstance(module, peft_lora.LoraLayer) and "t" in module.lora_A:
            loaded["lora_unet_" + sgm_name(name).replace(".", "_")] = module
    for prefix, model in (("lora_te1_", text_encoder), ("lora_te2_", text_encoder_2)):
        for name, module in model.named_modules():
            if isinstance(module, peft_lora.LoraLayer) and "t" in module.lora_A:
                loaded[prefix + name.replace(".", "_")] = module
    assert set(loaded) == file_modules

    for key, module in loaded.items():
        down, up = state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"]
        scale = float(state[f"{key}.alpha"]) / down.shape[0]
        expected = (up.flatten(1) @ down.flatten(1)) * scale
        assert torch.allclose(module.get_delta_weight("t").flatten(1), expected, atol=1e-6), key
    assert any(float(state[f"{k}.lora_up.weight"].abs().sum()) > 0 for k in file_modules if k.startswith("lora_te2_"))

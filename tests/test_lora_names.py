"""Key names at full SD1.5 size are kohya's, and each resolves under A1111's mapping rules.

The oracle below is written from the WebUI's rules as documented (shared/docs/webui-internals.md §4,
lora-format.md §2.3), independently of the engine's own tables."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from lib_train.engine.lora_names import text_encoder_targets, unet_targets
from lib_train.hosts.sd1 import SD15_TEXT, SD15_UNET, SD15_VAE, build_sd1

RESNET_SUFFIXES = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                   "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def a1111_compvis_name(key: str) -> str | None:
    """A1111 v1.10 convert_diffusers_name_to_compvis, as documented, for SD1 keys."""
    def resnet(rest: str) -> str:
        for diffusers, ldm in RESNET_SUFFIXES.items():
            if rest == diffusers:
                return ldm
        return rest

    if key in ("lora_unet_conv_in", "lora_unet_conv_out"):
        return "diffusion_model_input_blocks_0_0" if key.endswith("in") else "diffusion_model_out_2"
    if m := re.fullmatch(r"lora_unet_time_embedding_linear_(\d+)", key):
        return f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}"
    if m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = rest if kind == "attentions" else resnet(rest)
        return f"diffusion_model_input_blocks_{1 + i * 3 + j}_{1 if kind == 'attentions' else 0}_{rest}"
    if m := re.fullmatch(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        kind, j, rest = m[1], int(m[2]), m[3]
        rest = rest if kind == "attentions" else resnet(rest)
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else j * 2}_{rest}"
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = rest if kind == "attentions" else resnet(rest)
        return f"diffusion_model_output_blocks_{i * 3 + j}_{1 if kind == 'attentions' else 0}_{rest}"
    if m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key):
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key):
        i = int(m[1])
        return f"diffusion_model_output_blocks_{2 + i * 3}_{2 if i > 0 else 1}_conv"
    if m := re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    return None


@pytest.fixture(scope="module")
def sd15_on_meta():
    with torch.device("meta"):
        return build_sd1(SD15_UNET, SD15_VAE, SD15_TEXT)


def webui_layer_mapping(model) -> dict[str, nn.Module]:
    """A1111's network_layer_mapping: named_modules of sd_model.model and cond_stage_model.wrapped."""
    mapping = {f"diffusion_model_{n}".replace(".", "_"): m for n, m in model.unet.named_modules() if n}
    mapping.update({f"transformer_{n}".replace(".", "_"): m for n, m in model.text_encoder.named_modules() if n})
    return mapping


def test_module_counts_match_kohya(sd15_on_meta):
    assert len(unet_targets(sd15_on_meta.unet, with_convs=False)) == 192
    assert len(unet_targets(sd15_on_meta.unet, with_convs=True)) == 278
    assert len(text_encoder_targets(sd15_on_meta.text_encoder, "lora_te")) == 72


def test_known_kohya_names_present(sd15_on_meta):
    keys = {t.key for t in unet_targets(sd15_on_meta.unet, with_convs=True)}
    keys |= {t.key for t in text_encoder_targets(sd15_on_meta.text_encoder, "lora_te")}
    for expected in [
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_0_attentions_0_proj_in",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0",
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
        "lora_unet_down_blocks_2_downsamplers_0_conv",
        "lora_unet_up_blocks_0_upsamplers_0_conv",
        "lora_unet_up_blocks_2_upsamplers_0_conv",
        "lora_unet_mid_block_resnets_1_time_emb_proj",
        "lora_te_text_model_encoder_layers_11_mlp_fc2",
        "lora_te_text_model_encoder_layers_0_self_attn_out_proj",
    ]:
        assert expected in keys, expected
    assert not any("conv_in" in k or "conv_out" in k or "time_embedding" in k or "norm" in k for k in keys)


def test_every_name_resolves_to_the_same_module_in_the_webui(sd15_on_meta):
    mapping = webui_layer_mapping(sd15_on_meta)
    targets = unet_targets(sd15_on_meta.unet, with_convs=True) + text_encoder_targets(sd15_on_meta.text_encoder, "lora_te")
    for target in targets:
        compvis = a1111_compvis_name(target.key)
        assert compvis is not None, f"A1111 cannot map {target.key}"
        assert mapping.get(compvis) is target.module, f"{target.key} -> {compvis} is not the trained layer"


def test_only_convs_3x3_get_conv_rank(sd15_on_meta):
    for target in unet_targets(sd15_on_meta.unet, with_convs=True):
        if target.is_conv_3x3:
            assert isinstance(target.module, nn.Conv2d) and target.module.kernel_size == (3, 3)
        else:
            assert isinstance(target.module, nn.Linear) or target.module.kernel_size == (1, 1)


def test_lycoris_layer_set_at_full_size_resolves_in_the_webui(sd15_on_meta):
    """LyCORIS's default preset (LoHa, LoKr, DoRA files): all ResBlocks' and samplers' layers, the time embedding and,
    with convs, conv_in/conv_out; each resolves to the layer trained."""
    mapping = webui_layer_mapping(sd15_on_meta)
    with_convs = unet_targets(sd15_on_meta.unet, with_convs=True, lycoris=True)
    without = unet_targets(sd15_on_meta.unet, with_convs=False, lycoris=True)
    # 278 + conv_in, conv_out, time_embedding.linear_1/2; without convs: 192 attention + 22 time_emb_proj +
    # 14 conv_shortcut (1x1) + the two time-embedding Linears.
    assert (len(with_convs), len(without)) == (282, 230)
    assert {t.key for t in without} < {t.key for t in with_convs}
    assert not any(t.is_conv_3x3 for t in without)
    for target in with_convs:
        assert mapping.get(a1111_compvis_name(target.key)) is target.module, target.key

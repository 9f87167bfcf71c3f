"""Which layers of a model get a LoRA, and the exact kohya key name of each.

The WebUI holds the UNet in the original LDM layout (``input_blocks / middle_block / output_blocks``).
kohya writes SD1/SD2 UNet keys with diffusers paths (``down_blocks / mid_block / up_blocks``) and SDXL keys
with the LDM/sgm paths themselves; A1111, ComfyUI and diffusers map both back, so we write what kohya writes.
Text-encoder keys always contain ``text_model_`` whatever the transformers version (transformers 5
dropped the ``.text_model`` submodule), so they are built from the layer index, not from module paths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..hosts.protocol import ModelFamily

# Container classes whose Linear / Conv2d descendants get a LoRA, by LDM class name.
ATTENTION_CONTAINERS = ("SpatialTransformer",)
CONV_CONTAINERS = ("ResBlock", "Downsample", "Upsample")

# Layers outside any container that LyCORIS's default preset also targets, by their diffusers names
# (``unet_target_name``). kohya's SDXL UNet has the LDM tree, where these names do not exist, so SDXL has none.
LYCORIS_TOP_LEVEL = {
    "input_blocks.0.0": "conv_in",
    "out.2": "conv_out",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
}

# LDM ResBlock children -> diffusers ResnetBlock2D children.
_RESBLOCK_CHILDREN = {
    "in_layers.2": "conv1",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
# CLIP encoder-layer children that get a LoRA (HF CLIPAttention / CLIPMLP).
TEXT_ENCODER_CHILDREN = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)


@dataclass(frozen=True)
class LoraTarget:
    """A layer of the host model and the kohya key its LoRA is saved under."""

    key: str  # e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    module: nn.Module  # the nn.Linear or nn.Conv2d in the host model; for a fused part, the nn.MultiheadAttention
    is_conv_3x3: bool  # gets conv rank/alpha instead of the linear ones
    fused_part: str | None = None  # "q", "k", "v" or "out" of an OpenCLIP attention (one fused in_proj weight)


def unet_targets(unet: nn.Module, with_convs: bool, ldm_keys: bool = False, lycoris: bool = False) -> list[LoraTarget]:
    """LoRA targets of an LDM UNet, in module order, with kohya's keys: diffusers-style for SD1/SD2, the LDM
    path itself for SDXL (``ldm_keys``). ``with_convs`` adds the 3x3 convolutions.

    kohya's networks.lora takes the attention blocks, and with convs also the ResBlocks and samplers. LyCORIS
    (``lycoris``) always takes all of them (without convs, their Linear and 1x1 layers) and, for SD1/SD2, the
    time embedding and, with convs, conv_in and conv_out."""
    containers = ATTENTION_CONTAINERS + (CONV_CONTAINERS if with_convs or lycoris else ())
    targets: list[LoraTarget] = []
    if lycoris and not ldm_keys:
        for path, name in LYCORIS_TOP_LEVEL.items():
            layer = unet.get_submodule(path)
            is_3x3 = isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)
            if with_convs or not is_3x3:
                targets.append(LoraTarget("lora_unet_" + name.replace(".", "_"), layer, is_3x3))
    seen: set[int] = set()
    for container_path, container in unet.named_modules():
        kind = type(container).__name__
        if kind not in containers:
            continue
        for child_path, child in container.named_modules():
            if id(child) in seen or not isinstance(child, (nn.Linear, nn.Conv2d)):
                continue
            is_3x3 = isinstance(child, nn.Conv2d) and child.kernel_size != (1, 1)
            if is_3x3 and not with_convs:
                continue
            seen.add(id(child))
            path = f"{container_path}.{child_path}" if ldm_keys else ldm_to_diffusers_path(container_path, kind, child_path)
            targets.append(LoraTarget("lora_unet_" + path.replace(".", "_"), child, is_3x3))
    return targets


def ldm_to_diffusers_path(container_path: str, container_kind: str, child_path: str) -> str:
    """Translate ``input_blocks.4.1`` + ``transformer_blocks.0.attn1.to_q`` to the diffusers path."""
    match = re.fullmatch(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)|middle_block\.(\d+)", container_path)
    if match is None:
        raise ValueError(f"Unexpected UNet layout at {container_path!r}")
    if container_kind == "ResBlock":
        child_path = _RESBLOCK_CHILDREN.get(child_path, child_path)
    elif container_kind in ("Downsample", "Upsample"):
        child_path = "conv"  # LDM `op` (down) and `conv` (up) are both `...samplers.0.conv`

    if match.group(4) is not None:  # middle_block.{0,1,2} = resnet, attention, resnet
        index = int(match.group(4))
        block = "mid_block.attentions.0" if container_kind == "SpatialTransformer" else f"mid_block.resnets.{index // 2}"
        return f"{block}.{child_path}"

    side, block_index = match.group(1), int(match.group(2))
    if side == "input_blocks":
        level, layer = divmod(block_index - 1, 3)  # input_blocks.0 is conv_in, never a container
        group = {"ResBlock": f"resnets.{layer}", "SpatialTransformer": f"attentions.{layer}",
                 "Downsample": "downsamplers.0"}[container_kind]
        return f"down_blocks.{level}.{group}.{child_path}"
    level, layer = divmod(block_index, 3)
    group = {"ResBlock": f"resnets.{layer}", "SpatialTransformer": f"attentions.{layer}",
             "Upsample": "upsamplers.0"}[container_kind]
    return f"up_blocks.{level}.{group}.{child_path}"


def text_encoder_layers(text_encoder: nn.Module) -> nn.ModuleList:
    """The encoder layers of a Hugging Face CLIPTextModel (transformers 4 or 5)."""
    root = getattr(text_encoder, "text_model", text_encoder)
    try:
        return root.encoder.layers
    except AttributeError:
        raise ValueError(f"{type(text_encoder).__name__} is not a CLIP text model (no encoder.layers)") from None


def text_encoder_targets(text_encoder: nn.Module, key_prefix: str) -> list[LoraTarget]:
    """LoRA targets of a CLIP text encoder: attention q/k/v/out and both MLP layers of every layer."""
    targets = []
    for index, layer in enumerate(text_encoder_layers(text_encoder)):
        for child in TEXT_ENCODER_CHILDREN:
            module = layer.get_submodule(child)
            key = f"{key_prefix}_text_model_encoder_layers_{index}_{child.replace('.', '_')}"
            targets.append(LoraTarget(key, module, False))
    return targets


# OpenCLIP residual-block children -> the HF CLIP names kohya writes (it converts the checkpoint's OpenCLIP
# to a transformers CLIPTextModelWithProjection before training).
_OPENCLIP_MLP = {"mlp.c_fc": "mlp_fc1", "mlp.c_proj": "mlp_fc2"}
FUSED_ATTENTION_PARTS = ("q", "k", "v", "out")


def openclip_text_targets(text_model: nn.Module, key_prefix: str, skip_last: bool = False) -> list[LoraTarget]:
    """LoRA targets of an OpenCLIP text tower (SDXL TE2, SD2): q/k/v/out of each fused attention and both MLP
    layers, under kohya's HF names (``lora_te2_text_model_encoder_layers_N_self_attn_q_proj``); all blocks but the
    last with ``skip_last``."""
    targets = []
    blocks = list(text_model.transformer.resblocks)
    for index, block in enumerate(blocks[:-1] if skip_last else blocks):
        stem = f"{key_prefix}_text_model_encoder_layers_{index}"
        for part in FUSED_ATTENTION_PARTS:
            targets.append(LoraTarget(f"{stem}_self_attn_{part}_proj", block.attn, False, fused_part=part))
        for child, name in _OPENCLIP_MLP.items():
            targets.append(LoraTarget(f"{stem}_{name}", block.get_submodule(child), False))
    return targets


def model_targets(family: ModelFamily, unet: nn.Module, text_encoders: list[tuple[nn.Module, str]],
                  with_convs: bool, lycoris: bool = False) -> tuple[list[LoraTarget], list[LoraTarget]]:
    """(UNet targets, text-encoder targets) of a model of ``family``, under the keys kohya writes for it
    (``lycoris``: LyCORIS's layer set; the text encoders' layers are the same for both).
    ``text_encoders`` are (module, key prefix) pairs: HF CLIPTextModels or OpenCLIP text towers."""
    unet_part = unet_targets(unet, with_convs, ldm_keys=family is ModelFamily.SDXL, lycoris=lycoris)
    # SD2 conditions on OpenCLIP's penultimate block: the last never runs, and kohya, which converts the text
    # model to a 23-layer HF CLIP, writes no keys for it. SDXL's bigG runs all blocks (its pooled output).
    skip_last = family is ModelFamily.SD2
    text_part: list[LoraTarget] = []
    for module, prefix in text_encoders:
        is_openclip = hasattr(getattr(module, "transformer", None), "resblocks")
        text_part += (openclip_text_targets(module, prefix, skip_last) if is_openclip
                      else text_encoder_targets(module, prefix))
    return unet_part, text_part

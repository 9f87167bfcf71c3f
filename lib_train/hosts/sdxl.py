"""SDXL under the module tree and names of the WebUI's sgm ``DiffusionEngine``: ``model.diffusion_model``
(the UNet), ``conditioner.embedders.0.transformer`` (CLIP-L), ``conditioner.embedders.1.model`` (OpenCLIP
bigG text) and ``first_stage_model`` (the VAE). Used by tests (tiny widths), the command line (full size,
loaded from a checkpoint in the original key layout).

sgm ships in no installable package, so the UNet is ldm's ``UNetModel`` (sgm's was copied from it: the same
block classes and names) given SDXL's layout: per-level transformer depths and the ``label_emb`` that takes
the pooled text + size vector. The checkpoint's 1,680 UNet tensors fit it name for name.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..common.errors import CheckpointError
from ..common.i18n import tr
from .checkpoint_file import adopt_weights, check_nothing_left_on_meta, checkpoint_family, checkpoint_header, read_checkpoint, rebuild_position_ids
from .openclip_text import BIGG_TEXT, OpenCLIPText, causal_mask
from .sd1 import SD15_TEXT, SD15_VAE, TINY_VAE, randomise_zero_weights

# configs/inference/sd_xl_base.yaml of generative-models: network_config params.
SDXL_UNET = dict(in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2,
                 channel_mult=[1, 2, 4], num_head_channels=64, use_linear_in_transformer=True,
                 transformer_depth=[1, 2, 10], context_dim=2048, adm_in_channels=2816, legacy=False)
SDXL_SIZE_EMBEDDING = 256  # ConcatTimestepEmbedderND outdim: each of the 6 size numbers gets 256 features
VAE_SCALE_FACTOR = 0.13025

# The same layout at tiny widths; level depths still differ, so every naming and trimming rule runs.
TINY_SDXL_TEXT1 = dict(SD15_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                       projection_dim=32)
TINY_SDXL_TEXT2 = dict(BIGG_TEXT, width=32, heads=4, layers=3, embed_dim=32)
TINY_SDXL_SIZE_EMBEDDING = 8
TINY_SDXL_UNET = dict(SDXL_UNET, model_channels=32, num_head_channels=16, transformer_depth=[0, 1, 2],
                      context_dim=32 + 32, adm_in_channels=32 + 6 * TINY_SDXL_SIZE_EMBEDDING)


class SDXLModel(nn.Module):
    """The parts of an SDXL checkpoint, under the checkpoint's own key prefixes."""

    def __init__(self, unet: nn.Module, text_encoder_1: nn.Module, text_encoder_2: nn.Module, vae: nn.Module,
                 size_embedding_dim: int):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = unet
        self.conditioner = nn.Module()
        self.conditioner.embedders = nn.ModuleList([nn.Module(), nn.Module()])
        self.conditioner.embedders[0].transformer = text_encoder_1
        self.conditioner.embedders[1].model = text_encoder_2
        self.first_stage_model = vae
        self.size_embedding_dim = size_embedding_dim

    @property
    def unet(self) -> nn.Module:
        return self.model.diffusion_model

    @property
    def text_encoder_1(self) -> nn.Module:
        return self.conditioner.embedders[0].transformer

    @property
    def text_encoder_2(self) -> nn.Module:
        return self.conditioner.embedders[1].model

    @property
    def vae(self) -> nn.Module:
        return self.first_stage_model


def build_sdxl_unet(config: dict) -> nn.Module:
    """ldm's UNetModel with SDXL's per-level transformer depths and its sequential ``label_emb``."""
    from ldm.modules.diffusionmodules.openaimodel import SpatialTransformer, UNetModel

    params = dict(config)
    depths = params.pop("transformer_depth")
    adm_in_channels = params.pop("adm_in_channels")
    deepest = max(depths)
    unet = UNetModel(image_size=32, use_spatial_transformer=True, transformer_depth=deepest,
                     context_dim=[params.pop("context_dim")] * deepest, **params)
    # Each block index belongs to a level: input_blocks 1..3L-1 upwards, output_blocks downwards.
    per_level = params["num_res_blocks"] + 1
    levels = len(params["channel_mult"])
    placed = [(f"input_blocks.{i}", (i - 1) // per_level) for i in range(1, len(unet.input_blocks))]
    placed += [(f"output_blocks.{i}", levels - 1 - i // per_level) for i in range(len(unet.output_blocks))]
    placed.append(("middle_block", levels - 1))
    for path, level in placed:
        for transformer in unet.get_submodule(path).modules():
            if isinstance(transformer, SpatialTransformer):
                transformer.transformer_blocks = nn.ModuleList(list(transformer.transformer_blocks)[:depths[level]])
    embed_dim = params["model_channels"] * 4
    unet.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, embed_dim), nn.SiLU(),
                                                 nn.Linear(embed_dim, embed_dim)))
    unet.num_classes = "sequential"  # ldm's forward then adds label_emb(y) to the time embedding
    unet.context_blocks = deepest  # the forward takes one context per transformer block: [context] * deepest
    return unet


def build_sdxl(unet_config: dict = SDXL_UNET, vae_config: dict = SD15_VAE, text1_config: dict = SD15_TEXT,
               text2_config: dict = BIGG_TEXT, size_embedding_dim: int = SDXL_SIZE_EMBEDDING) -> SDXLModel:
    from ldm.models.autoencoder import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = build_sdxl_unet(unet_config)
    vae = AutoencoderKL(ddconfig=dict(vae_config), lossconfig={"target": "torch.nn.Identity"}, embed_dim=4)
    text1 = CLIPTextModel(CLIPTextConfig(**dict(text1_config, hidden_act="quick_gelu")))
    text2 = OpenCLIPText(**text2_config)
    return SDXLModel(unet, text1, text2, vae, size_embedding_dim).eval()


def build_tiny_sdxl(seed: int = 0) -> SDXLModel:
    """A tiny SDXL with random weights (zero-initialised output layers made small and random, as for SD1)."""
    torch.manual_seed(seed)
    model = build_sdxl(TINY_SDXL_UNET, TINY_VAE, TINY_SDXL_TEXT1, TINY_SDXL_TEXT2, TINY_SDXL_SIZE_EMBEDDING)
    randomise_zero_weights(model.unet, seed)
    return model


def load_sdxl_checkpoint(path: str | Path, unet_config: dict = SDXL_UNET, vae_config: dict = SD15_VAE,
                         text1_config: dict = SD15_TEXT, text2_config: dict = BIGG_TEXT,
                         size_embedding_dim: int = SDXL_SIZE_EMBEDDING, dtype: torch.dtype = torch.float32) -> SDXLModel:
    """Load an SDXL base ``.safetensors`` checkpoint (SDXL 1.0, Pony, Illustrious, NoobAI, Animagine …), the UNet
    and text encoders in ``dtype`` (cast straight from the file: no float32 copy of 3.5 B weights on the way), the
    VAE in float32."""
    path = Path(path)
    header = checkpoint_header(path)
    family = checkpoint_family(header)
    if family != "sdxl":
        label = {"sd1": tr("an SD1.x"), "sd2": tr("an SD2.x")}.get(family, family)
        raise CheckpointError(tr("{name} is {label} checkpoint, not an SDXL base model.", name=path.name, label=label))
    state = read_checkpoint(path)
    with torch.device("meta"):
        model = build_sdxl(unet_config, vae_config, text1_config, text2_config, size_embedding_dim)
    adopt_weights(model, state, path.name, "SDXL",
                  {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids"})
    rebuild_position_ids(model.text_encoder_1)
    text2 = model.text_encoder_2
    text2._buffers["attn_mask"] = causal_mask(text2.context_length)
    check_nothing_left_on_meta(model, path.name)
    del state  # the model holds the file's tensors now: each cast below frees its original
    model.to(dtype)
    model.vae.float()
    return model.eval()


def size_embeddings(values: torch.Tensor, dim: int) -> torch.Tensor:
    """sgm's ConcatTimestepEmbedderND: each number of (B, n) gets a sinusoidal embedding of ``dim``, concatenated
    to (B, n·dim)."""
    from ldm.modules.diffusionmodules.util import timestep_embedding

    batch, count = values.shape
    return timestep_embedding(values.reshape(-1), dim).reshape(batch, count * dim)

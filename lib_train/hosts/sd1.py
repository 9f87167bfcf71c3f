"""SD1.x built from the real classes the WebUI holds: ldm's UNetModel and AutoencoderKL, transformers'
CLIPTextModel. Used by tests (tiny channel counts), the demo and the command line (full size, loaded
from a checkpoint in the original LDM key layout).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..common.errors import CheckpointError
from ..common.i18n import tr
from .checkpoint_file import adopt_weights, check_nothing_left_on_meta, checkpoint_family, checkpoint_header, read_checkpoint, rebuild_position_ids

# configs/v1-inference.yaml of the WebUI, unet_config / first_stage_config params.
SD15_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                 num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                 transformer_depth=1, context_dim=768, use_checkpoint=False, legacy=False)
SD15_VAE = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                num_res_blocks=2, attn_resolutions=[], dropout=0.0)
# openai/clip-vit-large-patch14, text part.
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)

# The same block layout at tiny widths (GroupNorm needs multiples of 32): every naming rule is exercised.
TINY_UNET = dict(SD15_UNET, model_channels=32, channel_mult=[1, 1, 2, 2], num_heads=4, context_dim=32)
TINY_VAE = dict(SD15_VAE, ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1)
TINY_TEXT = dict(SD15_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 projection_dim=32)

VAE_SCALE_FACTOR = 0.18215


def sd1_alphas_cumprod() -> torch.Tensor:
    """SD1's training schedule (ldm "linear": betas = linspace(√0.00085, √0.012, 1000)², float64 → float32)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


class SD1Model(nn.Module):
    """The three trainable-relevant parts of an SD1 checkpoint, under the checkpoint's own key prefixes:
    ``model.diffusion_model``, ``cond_stage_model.transformer``, ``first_stage_model``."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, vae: nn.Module):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = unet
        self.cond_stage_model = nn.Module()
        self.cond_stage_model.transformer = text_encoder
        self.first_stage_model = vae

    @property
    def unet(self) -> nn.Module:
        return self.model.diffusion_model

    @property
    def text_encoder(self) -> nn.Module:
        return self.cond_stage_model.transformer

    @property
    def vae(self) -> nn.Module:
        return self.first_stage_model


def build_sd1(unet_config: dict, vae_config: dict, text_config: dict) -> SD1Model:
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNetModel(**unet_config)
    vae = AutoencoderKL(ddconfig=dict(vae_config), lossconfig={"target": "torch.nn.Identity"}, embed_dim=4)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    return SD1Model(unet, text_encoder, vae).eval()


def build_tiny_sd1(seed: int = 0) -> SD1Model:
    """A tiny SD1 with random weights. ldm zero-initialises the output convs; give them small random values
    so the UNet output depends on its input and a LoRA can change it."""
    torch.manual_seed(seed)
    model = build_sd1(TINY_UNET, TINY_VAE, TINY_TEXT)
    randomise_zero_weights(model.unet, seed)
    return model


def randomise_zero_weights(module: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.dim() > 1 and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)


def load_sd1_checkpoint(path: str | Path, unet_config: dict = SD15_UNET, vae_config: dict = SD15_VAE,
                       text_config: dict = SD15_TEXT) -> SD1Model:
    """Load an SD1.x ``.safetensors`` checkpoint in the original LDM key layout.

    The configs default to SD1.5's; tests pass the tiny ones."""
    path = Path(path)
    header = checkpoint_header(path)
    family = checkpoint_family(header)
    if family != "sd1":
        label = {"sdxl": tr("an SDXL"), "sd2": tr("an SD2.x")}.get(family, family)
        raise CheckpointError(tr("{name} is {label} checkpoint, not SD1.x text-to-image.", name=path.name, label=label))
    state = read_checkpoint(path)
    with torch.device("meta"):
        model = build_sd1(unet_config, vae_config, text_config)
    adopt_weights(model, state, path.name, "SD1.x", {"cond_stage_model.transformer.text_model.embeddings.position_ids"})
    rebuild_position_ids(model.text_encoder)
    check_nothing_left_on_meta(model, path.name)
    model.float()
    return model.eval()

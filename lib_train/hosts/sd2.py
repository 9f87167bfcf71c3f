"""SD2.x (512 base, epsilon; 768-v, v-prediction) under the module tree and names of the WebUI's ldm
``LatentDiffusion``: ``model.diffusion_model`` (the UNet), ``cond_stage_model.model`` (OpenCLIP ViT-H text, what
ldm's ``FrozenOpenCLIPEmbedder`` holds) and ``first_stage_model`` (the VAE, SD1's). Used by tests (tiny widths)
and the command line (full size, loaded from a checkpoint in the original key layout).

The UNet's ``proj_in``/``proj_out`` are Linear when the config says ``use_linear_in_transformer`` (both
Stability releases) and 1×1 convolutions otherwise; a checkpoint is built as its tensors have them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..common.errors import CheckpointError
from ..common.i18n import tr
from .checkpoint_file import adopt_weights, check_nothing_left_on_meta, checkpoint_family, checkpoint_header, read_checkpoint
from .openclip_text import H14_TEXT, OPENCLIP_LAYER_SKIP, OpenCLIPText, causal_mask
from .protocol import PredictionType
from .sd1 import SD15_VAE, TINY_VAE, randomise_zero_weights

# configs/v2-inference.yaml and v2-inference-v.yaml of the WebUI (the same UNet), unet_config params.
SD2_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_head_channels=64, use_spatial_transformer=True,
                use_linear_in_transformer=True, transformer_depth=1, context_dim=1024, use_checkpoint=False,
                legacy=False)
# cond_stage_config: FrozenOpenCLIPEmbedder(arch ViT-H-14, layer "penultimate").
SD2_TEXT_LAYER = "penultimate"

# The same block layout at tiny widths; three text blocks, of which the last is skipped as at full size.
TINY_SD2_UNET = dict(SD2_UNET, model_channels=32, channel_mult=[1, 1, 2, 2], num_head_channels=16, context_dim=32)
TINY_SD2_TEXT = dict(H14_TEXT, width=32, heads=4, layers=3, embed_dim=32)

# Parts of the OpenCLIP model that SD2's text path never reads; a checkpoint pruned of them still loads.
_UNREAD_TEXT_PARTS = ("cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale")


class SD2Model(nn.Module):
    """The parts of an SD2 checkpoint, under the checkpoint's own key prefixes."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, vae: nn.Module, text_layer: str = SD2_TEXT_LAYER):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = unet
        self.cond_stage_model = nn.Module()
        self.cond_stage_model.model = text_encoder
        self.first_stage_model = vae
        self.text_layer = text_layer

    @property
    def unet(self) -> nn.Module:
        return self.model.diffusion_model

    @property
    def text_encoder(self) -> OpenCLIPText:
        return self.cond_stage_model.model

    @property
    def vae(self) -> nn.Module:
        return self.first_stage_model

    @property
    def text_blocks(self) -> int:
        """The OpenCLIP blocks the conditioning goes through (23 of 24 at full size)."""
        return len(self.text_encoder.transformer.resblocks) - OPENCLIP_LAYER_SKIP[self.text_layer]


def build_sd2(unet_config: dict = SD2_UNET, vae_config: dict = SD15_VAE, text_config: dict = H14_TEXT) -> SD2Model:
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**unet_config)
    vae = AutoencoderKL(ddconfig=dict(vae_config), lossconfig={"target": "torch.nn.Identity"}, embed_dim=4)
    return SD2Model(unet, OpenCLIPText(**text_config), vae).eval()


def build_tiny_sd2(seed: int = 0, linear_projections: bool = True) -> SD2Model:
    """A tiny SD2 with random weights (zero-initialised output layers made small and random, as for SD1);
    ``linear_projections`` False gives the 1×1-conv ``proj_in``/``proj_out`` of a config without
    ``use_linear_in_transformer``."""
    torch.manual_seed(seed)
    model = build_sd2(dict(TINY_SD2_UNET, use_linear_in_transformer=linear_projections), TINY_VAE, TINY_SD2_TEXT)
    randomise_zero_weights(model.unet, seed)
    return model


def load_sd2_checkpoint(path: str | Path, unet_config: dict = SD2_UNET, vae_config: dict = SD15_VAE,
                        text_config: dict = H14_TEXT) -> SD2Model:
    """Load an SD2.x ``.safetensors`` checkpoint (512 base, 768-v and their fine-tunes) in the original LDM layout,
    its transformer projections Linear or 1×1 convolutions as the file has them."""
    path = Path(path)
    header = checkpoint_header(path)
    family = checkpoint_family(header)
    if family != "sd2":
        label = {"sd1": tr("an SD1.x"), "sdxl": tr("an SDXL")}.get(family, family)
        raise CheckpointError(tr("{name} is {label} checkpoint, not SD2.x.", name=path.name, label=label))
    unet_input = header.get("model.diffusion_model.input_blocks.0.0.weight")
    if unet_input is not None and unet_input[1] != unet_config["in_channels"]:
        raise CheckpointError(tr("{name} is an SD2 inpainting or depth model ({channels} input channels); LoRA is "
                                 "trained on the text-to-image models.", name=path.name, channels=unet_input[1]))
    projection = header.get("model.diffusion_model.input_blocks.1.1.proj_in.weight")
    linear = projection is None or len(projection) == 2
    state = read_checkpoint(path)
    with torch.device("meta"):
        model = build_sd2(dict(unet_config, use_linear_in_transformer=linear), vae_config, text_config)
    adopt_weights(model, state, path.name, "SD2.x", set(_UNREAD_TEXT_PARTS))
    text = model.text_encoder
    text._buffers["attn_mask"] = causal_mask(text.context_length)
    for name in ("text_projection", "logit_scale"):
        if getattr(text, name).is_meta:
            setattr(text, name, nn.Parameter(torch.zeros(getattr(text, name).shape)))
    check_nothing_left_on_meta(model, path.name)
    model.float()
    return model.eval()


def checkpoint_prediction_type(path: str | Path) -> PredictionType | None:
    """The prediction type a checkpoint's own config (``<name>.yaml`` beside it, as the WebUI reads it) sets:
    ``parameterization: "v"`` for the 768-v models; None without a config."""
    config_path = Path(path).with_suffix(".yaml")
    if not config_path.is_file():
        return None
    import yaml

    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
        parameterization = config.get("model", {}).get("params", {}).get("parameterization", "eps")
    except (yaml.YAMLError, AttributeError, OSError) as error:
        raise CheckpointError(tr("{name} is not a readable model config: {error}", name=config_path.name,
                                 error=error)) from None
    return PredictionType.V if parameterization == "v" else PredictionType.EPSILON


def unet_prediction_type(unet: nn.Module) -> PredictionType:
    """The prediction type of an SD2 UNet whose checkpoint has no config beside it, decided as the WebUI decides it
    (so it loads v2-1_768-ema-pruned.safetensors alone as v): one float32 call on a constant latent of 0.5 at the
    last timestep with a constant text of 0.5; a v-prediction UNet answers far below its input there (on average
    by more than 1), an epsilon one does not."""
    context_dim = next(m.in_features for name, m in unet.named_modules() if name.endswith("attn2.to_k"))
    device = next(unet.parameters()).device
    with torch.no_grad():
        latent = torch.full((1, 4, 8, 8), 0.5, device=device)
        text = torch.full((1, 2, context_dim), 0.5, device=device)
        answer = unet(latent, torch.tensor([999], device=device), context=text)
    return PredictionType.V if (answer.float() - latent).mean().item() < -1 else PredictionType.EPSILON

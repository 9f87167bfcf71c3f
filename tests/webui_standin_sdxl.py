"""The WebUI's live SDXL model as the adapter sees it, from the tiny SDXL's real modules: sgm's module tree
(``model.diffusion_model``, ``conditioner.embedders`` with ``input_key`` and ``wrapped``, ``first_stage_model``),
text embedders that answer as the WebUI's wrappers do (CLIP-L: hidden states; bigG: hidden states and pooled),
sgm's size embedders, and the WebUI's ``images_tensor_to_samples`` with its VAE dtype switch."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lib_train.hosts.sd1 import sd1_alphas_cumprod
from lib_train.hosts.sdxl import VAE_SCALE_FACTOR, build_tiny_sdxl, size_embeddings
from lib_train.hosts.standalone_sdxl import StandaloneSDXLHost

from .webui_standin import make_webui


class TextEmbedder(nn.Module):
    def __init__(self, wrapped: nn.Module, encode, returns_pooled: bool):
        super().__init__()
        self.wrapped, self.input_key, self.is_trainable = wrapped, "txt", False
        self._encode, self._returns_pooled = encode, returns_pooled

    def forward(self, texts):
        return self._encode(texts, self._returns_pooled)


class SizeEmbedder(nn.Module):
    def __init__(self, input_key: str, dim: int):
        super().__init__()
        self.input_key, self.dim = input_key, dim

    def forward(self, numbers):
        return size_embeddings(numbers, self.dim)


class SDXLModel(nn.Module):
    def __init__(self):
        super().__init__()
        tiny = build_tiny_sdxl(seed=0)
        reference = StandaloneSDXLHost(tiny)
        width_1 = tiny.text_encoder_1.config.hidden_size

        def encode(texts, pooled):
            embedded = reference.encode_captions([t.replace("\\", "") for t in texts])
            if pooled:
                return embedded["crossattn"][..., width_1:], embedded["pooled"]
            return embedded["crossattn"][..., :width_1]

        clip_l, bigg = nn.Module(), nn.Module()
        clip_l.transformer, bigg.model = tiny.text_encoder_1, tiny.text_encoder_2
        self.model = nn.Module()
        self.model.diffusion_model = tiny.unet
        self.conditioner = nn.Module()
        self.conditioner.embedders = nn.ModuleList(
            [TextEmbedder(clip_l, encode, False), TextEmbedder(bigg, encode, True)]
            + [SizeEmbedder(key, tiny.size_embedding_dim)
               for key in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")])
        self.cond_stage_model = self.conditioner
        self.first_stage_model = tiny.vae
        self.alphas_cumprod_original = sd1_alphas_cumprod()
        self.parameterization = "eps"
        self.is_sd1, self.is_sd2, self.is_sdxl, self.is_sdxl_inpaint, self.lowvram = False, False, True, False, False
        self.network_layer_mapping = {}
        self.reference = [reference]  # not a submodule

    def encode_first_stage(self, x):  # sgm samples and scales here
        return self.first_stage_model.encode(x).sample() * VAE_SCALE_FACTOR

    def get_first_stage_encoding(self, x):
        return x

    def apply_model(self, x, t, cond):
        unet = self.model.diffusion_model
        return unet(x, t, context=[cond["crossattn"]] * unet.context_blocks, y=cond["vector"])


def make_sdxl_webui(lora_dir: Path):
    webui = make_webui(lora_dir)
    webui.shared.sd_model = SDXLModel()
    webui.devices.dtype_vae = torch.float32

    def images_tensor_to_samples(image, approximation=None, model=None):
        model.first_stage_model.to(webui.devices.dtype_vae)  # as the WebUI does
        image = image.to(dtype=webui.devices.dtype_vae) * 2 - 1
        return model.get_first_stage_encoding(model.encode_first_stage(image))

    webui.sd_samplers_common.images_tensor_to_samples = images_tensor_to_samples
    return webui

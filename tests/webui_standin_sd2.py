"""The WebUI's live SD2 model as the adapter sees it, from the tiny SD2's real modules: ldm's tree
(``model.diffusion_model``, ``cond_stage_model.wrapped.model`` with ``layer_idx``, ``first_stage_model``), a text
path that answers as ``FrozenOpenCLIPEmbedderWithCustomWords`` does (75-token chunks padded with 0, ldm's
``encode_with_transformer`` stopping ``layer_idx`` blocks before the end, the emphasis step, no clip skip), the
built-in Lora's layer names and its key resolution for SD2 (tests/a1111_lora.py), and ``parameterization``."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from lib_train.hosts.clip_tokenizer import chunked_token_ids
from lib_train.hosts.sd1 import sd1_alphas_cumprod
from lib_train.hosts.sd2 import build_tiny_sd2

from . import a1111_lora
from .test_lora_names import a1111_compvis_name
from .webui_standin import LdmCalls, make_webui


class FrozenOpenCLIPEmbedder(nn.Module):
    """ldm's: ``model`` (open_clip without its vision tower), ``layer_idx`` 1 for "penultimate"."""

    def __init__(self, model: nn.Module, layer_idx: int = 1):
        super().__init__()
        self.model, self.layer_idx = model, layer_idx

    def encode_with_transformer(self, tokens: torch.Tensor) -> torch.Tensor:
        x = (self.model.token_embedding(tokens) + self.model.positional_embedding).permute(1, 0, 2)
        blocks = self.model.transformer.resblocks
        for index, block in enumerate(blocks):
            if index == len(blocks) - self.layer_idx:
                break
            x = block(x, attn_mask=self.model.attn_mask)
        return self.model.ln_final(x.permute(1, 0, 2))


class OpenCLIPCondStageModel(nn.Module):
    def __init__(self, wrapped: FrozenOpenCLIPEmbedder):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, prompts: list[str]) -> torch.Tensor:
        texts = [re.sub(r"\\(.)", r"\1", p) for p in prompts]
        ids = chunked_token_ids(texts, pad_id=0)  # start, tokens, end, then the OpenCLIP pad id 0
        z = torch.cat([self.wrapped.encode_with_transformer(ids[:, i:i + 77]) for i in range(0, ids.shape[1], 77)], 1)
        original_mean = z.mean()  # the "Original" emphasis step, all token weights 1
        z = z * torch.ones(z.shape[:2] + (1,))
        return z * (original_mean / z.mean())


class SD2Model(LdmCalls, nn.Module):
    def __init__(self, parameterization: str = "v", linear_projections: bool = True):
        super().__init__()
        tiny = build_tiny_sd2(seed=0, linear_projections=linear_projections)
        with torch.no_grad():  # a real checkpoint's ln_final has a bias: keep the emphasis step's mean off 0
            bias = tiny.text_encoder.ln_final.bias
            bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(7)) * 0.02)
        self.model = nn.Module()
        self.model.diffusion_model = tiny.unet
        self.model.conditioning_key = "crossattn"
        self.cond_stage_model = OpenCLIPCondStageModel(FrozenOpenCLIPEmbedder(tiny.text_encoder))
        self.first_stage_model = tiny.vae
        self.alphas_cumprod_original = sd1_alphas_cumprod()
        self.parameterization = parameterization
        self.is_sd1, self.is_sd2, self.is_sdxl, self.lowvram = False, True, False, False
        self.sd_checkpoint_info = SimpleNamespace(filename="/models/Stable-diffusion/tiny-sd2.safetensors",
                                                  hash="2345bcde", sha256="e" * 64, title="tiny-sd2 [eeeeeeeeee]")
        # The built-in Lora's names: cond_stage_model.wrapped's modules, then sd_model.model's.
        self.network_layer_mapping = {n.replace(".", "_"): m for part in (self.cond_stage_model.wrapped, self.model)
                                      for n, m in part.named_modules() if n}

    def builtin_lora_layer(self, key: str) -> tuple[nn.Module, str | None]:
        """The layer the built-in Lora gives a file's key on this model, and for a fused attention which part."""
        compvis = a1111_compvis_name(key) if key.startswith("lora_unet_") else a1111_lora.sd2_text_compvis_name(key)
        assert compvis is not None, f"A1111 cannot convert {key}"
        module = a1111_lora.find_layer(self.network_layer_mapping, compvis)
        assert module is not None, f"A1111 finds no layer for {key} ({compvis})"
        if isinstance(module, nn.MultiheadAttention):
            return module, compvis[-6]  # ..._attn_q_proj: "q"
        if compvis.endswith("_attn_out_proj"):  # merged through its attention, with q, k and v
            return self.network_layer_mapping[compvis[:-len("_out_proj")]], "out"
        return module, None

    def merge_builtin_lora(self, state: dict, te_weight: float, unet_weight: float, name: str) -> None:
        """<lora:name:w> as the built-in Lora merges it on SD2: each Linear/Conv2d as on SD1, each OpenCLIP attention
        with all of its q, k, v and out parts at once."""
        attentions: dict[int, tuple[nn.MultiheadAttention, dict]] = {}
        with torch.no_grad():
            for key, tensors in a1111_lora.split_by_layer(state).items():
                module, part = self.builtin_lora_layer(key)
                if part is not None:
                    attentions.setdefault(id(module), (module, {}))[1][part] = tensors
                    continue
                weight = te_weight if key.startswith("lora_te_") else unet_weight
                if weight == 0:
                    continue
                if getattr(module, "network_weights_backup", None) is None:
                    module.network_weights_backup = module.weight.detach().clone()
                module.weight.copy_(module.network_weights_backup)
                a1111_lora.merge_layer(module, tensors, weight)
                module.network_current_names = ((name, te_weight, unet_weight, None),)
            for attention, parts in attentions.values():
                if te_weight == 0:
                    continue
                if getattr(attention, "network_weights_backup", None) is None:
                    attention.network_weights_backup = (attention.in_proj_weight.detach().clone(),
                                                        attention.out_proj.weight.detach().clone())
                attention.in_proj_weight.copy_(attention.network_weights_backup[0])
                attention.out_proj.weight.copy_(attention.network_weights_backup[1])
                a1111_lora.merge_attention(attention, parts, te_weight)
                attention.network_current_names = ((name, te_weight, unet_weight, None),)


def make_sd2_webui(lora_dir: Path, parameterization: str = "v", linear_projections: bool = True):
    webui = make_webui(lora_dir)
    webui.shared.sd_model = SD2Model(parameterization, linear_projections)
    return webui

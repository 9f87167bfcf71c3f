"""A stand-in for the WebUI modules the adapter uses, built around the tiny SD1 from real classes.

Only the WebUI's plumbing is imitated (state, queue lock, attention switch, the built-in Lora's merge and its
bookkeeping, the emphasis step of the text path, the VAE helper); the model, the text encoder and every
training step are real."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from safetensors.torch import load_file

from lib_train.engine.lora_names import text_encoder_targets, unet_targets
from lib_train.hosts.clip_tokenizer import clip_tokenizer
from lib_train.hosts.sd1 import VAE_SCALE_FACTOR, build_tiny_sd1, sd1_alphas_cumprod
from lib_train.webui.host import WebUI

from . import a1111_lora


class State:
    """The fields of modules.shared_state.State that the adapter and the progress API use."""

    def __init__(self):
        self.interrupted = self.stopping_generation = False
        self.job, self.job_count, self.job_no, self.textinfo = "", 0, 0, None
        self.history: list[tuple[int, int]] = []

    def begin(self, job="(unknown)"):
        self.job, self.job_count, self.job_no, self.interrupted = job, -1, 0, False

    def end(self):
        self.job, self.job_count = "", 0

    def interrupt(self):
        self.interrupted = True

    def __setattr__(self, key, value):
        super().__setattr__(key, value)
        if key == "job_no" and hasattr(self, "history"):
            self.history.append((value, self.job_count))


class CondStageModel(nn.Module):
    """Like the WebUI's FrozenCLIPEmbedderWithCustomWords: a list of prompts in, (B, 77, C) out,
    backslash escapes read as literal characters, clip skip from the options."""

    def __init__(self, transformer: nn.Module, opts):
        super().__init__()
        self.wrapped = nn.Module()
        self.wrapped.transformer = transformer
        self.opts = opts
        self.seen_prompts: list[str] = []

    def forward(self, prompts: list[str]) -> torch.Tensor:
        self.seen_prompts.extend(prompts)
        texts = [re.sub(r"\\(.)", r"\1", p) for p in prompts]
        ids = clip_tokenizer()(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        skip = self.opts.CLIP_stop_at_last_layers
        out = self.wrapped.transformer(input_ids=ids, output_hidden_states=skip > 1)
        z = out.last_hidden_state if skip == 1 else self.wrapped.transformer.text_model.final_layer_norm(out.hidden_states[-skip])
        # The WebUI's default "Original" emphasis: scale by the (here all 1) token weights, then restore the mean.
        # A conditioning whose mean rounds to exactly 0 becomes NaN here (0/0), as in the WebUI.
        original_mean = z.mean()
        z = z * torch.ones(z.shape[:2] + (1,))
        return z * (original_mean / z.mean())


class LdmCalls:
    """The calls the WebUI makes on an ldm ``LatentDiffusion`` (SD1 and SD2 stand-ins alike)."""

    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, distribution):
        return distribution.sample() * VAE_SCALE_FACTOR

    def get_learned_conditioning(self, texts):
        return self.cond_stage_model(texts)

    def apply_model(self, x, t, cond):
        return self.model.diffusion_model(x, t, context=cond)


class SDModel(LdmCalls, nn.Module):
    def __init__(self, opts):
        super().__init__()
        tiny = build_tiny_sd1(seed=0)
        # A real checkpoint's final layer norm has a bias; with ldm's zero bias the conditioning's mean is ~0 and
        # the emphasis step's 0/0 turns some prompts to NaN, which depends on rounding (and so on package versions).
        with torch.no_grad():
            bias = getattr(tiny.text_encoder, "text_model", tiny.text_encoder).final_layer_norm.bias
            bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(7)) * 0.02)
        self.model = nn.Module()
        self.model.diffusion_model = tiny.unet
        self.cond_stage_model = CondStageModel(tiny.text_encoder, opts)
        self.first_stage_model = tiny.vae
        self.alphas_cumprod_original = sd1_alphas_cumprod()
        self.parameterization = "eps"
        self.is_sd1, self.is_sd2, self.is_sdxl, self.lowvram = True, False, False, False
        self.sd_checkpoint_info = SimpleNamespace(filename="/models/Stable-diffusion/tiny.safetensors",
                                                  hash="0123abcd", sha256="f" * 64, title="tiny [ffffffffff]")
        # The built-in Lora names every layer on model load, the text encoder's too.
        self.network_layer_mapping = {n.replace(".", "_"): m for part in (self.model, self.cond_stage_model)
                                      for n, m in part.named_modules() if n}



def restore_from_backup(module):
    """As the built-in Lora does it: a plain in-place copy (it runs under no_grad in the WebUI's own calls); a
    fused attention's backup is its in_proj and out_proj weights."""
    if isinstance(module, nn.MultiheadAttention):
        module.in_proj_weight.copy_(module.network_weights_backup[0])
        module.out_proj.weight.copy_(module.network_weights_backup[1])
    else:
        module.weight.copy_(module.network_weights_backup)


def merge_lora(sd_model, state: dict, te_weight: float, unet_weight: float, name: str = "lora") -> None:
    """What the built-in Lora does for <lora:name:w>: back each layer up, then W' = W + ΔW·w with ΔW of the layer's
    module type (LoRA, LoHa, LoKr, DoRA: tests/a1111_lora.py), in its order of operations."""
    if hasattr(sd_model, "merge_builtin_lora"):  # another family's stand-in resolves its own keys
        sd_model.merge_builtin_lora(state, te_weight, unet_weight, name)
        return
    targets = [(t, unet_weight) for t in unet_targets(sd_model.model.diffusion_model, with_convs=True, lycoris=True)] + \
        [(t, te_weight) for t in text_encoder_targets(sd_model.cond_stage_model.wrapped.transformer, "lora_te")]
    layers = a1111_lora.split_by_layer(state)
    with torch.no_grad():
        for target, weight in targets:
            if target.key not in layers or weight == 0:
                continue
            module = target.module
            if getattr(module, "network_weights_backup", None) is None:
                module.network_weights_backup = module.weight.detach().clone()
            module.weight.copy_(module.network_weights_backup)
            a1111_lora.merge_layer(module, layers[target.key], weight)
            module.network_current_names = ((name, te_weight, unet_weight, None),)


def make_webui(lora_dir: Path) -> WebUI:
    opts = SimpleNamespace(CLIP_stop_at_last_layers=1)
    sd_model = SDModel(opts)
    events: list[str] = []
    hijack = SimpleNamespace(
        apply_optimizations=lambda option=None: events.append(f"attention:{option}"),
        model_hijack=SimpleNamespace(apply_optimizations=lambda: events.append("attention:user")),
    )
    networks = SimpleNamespace(
        loaded_networks=[],
        available_networks={},
        network_restore_weights_from_backup=restore_from_backup,
        list_available_networks=lambda: events.append("refresh-loras"),
    )

    def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
        """The built-in Lora's loader by alias (a file stem under the Lora folder); it merges into the loaded model
        at once."""
        networks.loaded_networks.clear()
        for index, name in enumerate(names):
            found = sorted(Path(lora_dir).rglob(f"{name}.safetensors"))
            if not found:
                continue
            merge_lora(webui.shared.sd_model, load_file(str(found[0])), te_multipliers[index] if te_multipliers else 1.0,
                       unet_multipliers[index] if unet_multipliers else 1.0, name)
            networks.loaded_networks.append(SimpleNamespace(name=name))
        events.append(f"load-networks:{','.join(names)}")

    networks.load_networks = load_networks
    processing = SimpleNamespace(StableDiffusionProcessing=SimpleNamespace(cached_c=["c", "old"], cached_uc=["u", "old"]))
    progress = SimpleNamespace(
        add_task_to_queue=lambda i: events.append(f"queued:{i}"),
        start_task=lambda i: events.append(f"start:{i}"),
        finish_task=lambda i: events.append(f"finish:{i}"),
    )

    def images_tensor_to_samples(image, approximation=None, model=None):
        return model.get_first_stage_encoding(model.encode_first_stage(image * 2 - 1))

    webui = WebUI(
        shared=SimpleNamespace(sd_model=sd_model, state=State(), opts=opts,
                               cmd_opts=SimpleNamespace(lowvram=False, lora_dir=str(lora_dir))),
        devices=SimpleNamespace(device=torch.device("cpu"), torch_gc=lambda: events.append("gc")),
        sd_hijack=hijack,
        processing=processing,
        sd_samplers_common=SimpleNamespace(images_tensor_to_samples=images_tensor_to_samples),
        call_queue=SimpleNamespace(queue_lock=threading.Lock()),
        progress=progress,
        sd_vae=SimpleNamespace(loaded_vae_file=None),
        networks=networks,
    )
    webui.events = events
    return webui

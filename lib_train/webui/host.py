"""The host protocol over the WebUI's live model (``shared.sd_model``): SD1.x here, SDXL and SD2.x in their files.

The WebUI's modules are handed in as a namespace (see ``scripts/train_tools.py``), so this package
imports none of them and the tests can drive this adapter with a stand-in built from real classes.
Captions go through the WebUI's own ``cond_stage_model`` (clip skip, long prompts, emphasis and
embeddings behave as in generation) and images through its VAE path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace
from typing import Any, Callable

import torch

from ..common.errors import ConfigError
from ..common.i18n import tr
from ..common.memory import parked_on_cpu
from ..hosts.model_identity import sampled_weights_digest, vae_encoder_side
from ..hosts.prompt_syntax import escape_caption
from ..hosts.protocol import BaseModelInfo, Conditioning, ModelFamily, PredictionType, Progress, SizeCondition, TextEmbedding, TextEncoder

TRAINING_ATTENTION = "sdp - scaled dot product"
# The WebUI options its text path reads (clip skip, emphasis, chunking, SDXL's CLIP-L layer).
_TEXT_PATH_OPTIONS = ("CLIP_stop_at_last_layers", "emphasis", "use_old_emphasis_implementation",
                      "comma_padding_backtrack", "sdxl_clip_l_skip")


@dataclass
class WebUI:
    """The WebUI modules the adapter uses; ``networks`` is the built-in Lora extension's module, if loaded."""

    shared: Any
    devices: Any
    sd_hijack: Any
    processing: Any
    sd_samplers_common: Any
    call_queue: Any = None
    progress: Any = None
    sd_vae: Any = None
    sd_models: Any = None
    images: Any = None
    networks: ModuleType | SimpleNamespace | None = None


def model_family(sd_model) -> ModelFamily:
    """The loaded model's family, or a message naming what Train Tools cannot train."""
    if getattr(sd_model, "is_sdxl", False):
        if getattr(sd_model, "is_sdxl_inpaint", False):
            raise ConfigError(tr("The loaded model is an SDXL inpainting checkpoint; Train Tools trains on SDXL "
                                 "base models (SDXL, Pony, Illustrious, NoobAI, Animagine …). Load one of those "
                                 "first."))
        embedders = getattr(getattr(sd_model, "conditioner", None), "embedders", [])
        if not any(getattr(e, "input_key", None) == "txt" and hasattr(getattr(e, "wrapped", None), "transformer")
                   for e in embedders):
            raise ConfigError(tr("The loaded model is an SDXL refiner (it has only the OpenCLIP text encoder); LoRA "
                                 "is trained on an SDXL base model. Load one first."))
        return ModelFamily.SDXL
    if getattr(sd_model, "is_sd2", False):
        # ldm's DiffusionWrapper: "hybrid" for inpainting and depth models, "crossattn-adm" for unCLIP.
        conditioning = getattr(getattr(sd_model, "model", None), "conditioning_key", "crossattn")
        if conditioning != "crossattn":
            raise ConfigError(tr("The loaded model is an SD2.x inpainting, depth or unCLIP checkpoint ({conditioning} "
                                 "conditioning); Train Tools trains on the SD2.x text-to-image models (512 base, 768-v "
                                 "and their fine-tunes). Load one of those first.", conditioning=conditioning))
        return ModelFamily.SD2
    if getattr(sd_model, "is_sd1", False):
        # SD1.5 inpainting and instruct-pix2pix take the (masked) picture beside the latent ("hybrid").
        conditioning = getattr(getattr(sd_model, "model", None), "conditioning_key", "crossattn")
        if conditioning != "crossattn":
            raise ConfigError(tr("The loaded model is an SD1.x inpainting or instruct-pix2pix checkpoint ({conditioning} "
                                 "conditioning); Train Tools trains on the SD1.x text-to-image models. Load one of "
                                 "those first.", conditioning=conditioning))
        return ModelFamily.SD1
    kind = "SD3" if getattr(sd_model, "is_sd3", False) else type(sd_model).__name__
    raise ConfigError(tr("Train Tools trains on SD1.x, SD2.x and SDXL checkpoints; the loaded model is {kind}. "
                         "Load an SD1.x, SD2.x or SDXL checkpoint in the WebUI first.", kind=kind))


def webui_host(webui: WebUI, **kwargs) -> "WebUIHost":
    """The host for the WebUI's loaded model, of its family."""
    family = model_family(webui.shared.sd_model)
    if family is ModelFamily.SDXL:
        from .host_sdxl import WebUISDXLHost
        return WebUISDXLHost(webui, **kwargs)
    if family is ModelFamily.SD2:
        from .host_sd2 import WebUISD2Host
        return WebUISD2Host(webui, **kwargs)
    return WebUIHost(webui, **kwargs)


def text_path_clip_skip(webui: WebUI) -> int:
    """The clip skip the WebUI's text path applies to the loaded model: its option, except on SD2, whose OpenCLIP
    layer is the model config's choice (the WebUI reads no option there), and on SDXL, whose CLIP-L reads it only
    with the "Clip skip SDXL" option (``sdxl_clip_l_skip``; bigG never)."""
    sd_model, opts = webui.shared.sd_model, webui.shared.opts
    if getattr(sd_model, "is_sd2", False):
        return 1
    if getattr(sd_model, "is_sdxl", False) and getattr(opts, "sdxl_clip_l_skip", False) is not True:
        return 1
    return int(getattr(opts, "CLIP_stop_at_last_layers", 1))


class WebUIHost:
    """Implements ``TrainingHost`` over ``shared.sd_model`` (SD1; ``WebUISDXLHost``, ``WebUISD2Host``); progress goes
    to ``shared.state``."""

    def __init__(self, webui: WebUI, *, seed: int = 0, on_progress: Callable[[Progress], None] | None = None,
                 stop_requested: Callable[[], bool] = lambda: False):
        self.webui = webui
        self.sd_model = webui.shared.sd_model
        self.seed = seed
        self._on_progress = on_progress
        self._stop_requested = stop_requested
        model = self.sd_model
        if getattr(webui.shared.cmd_opts, "lowvram", False):
            raise ConfigError(tr("Training is not possible with --lowvram: restart the WebUI without it (--medvram "
                                 "works)."))
        self.family = model_family(model)
        self.prediction_type = PredictionType.V if getattr(model, "parameterization", "eps") == "v" else PredictionType.EPSILON
        self.unet = model.model.diffusion_model
        self.device = torch.device(webui.devices.device)
        self.medvram = bool(getattr(model, "lowvram", False))

    @property
    def text_encoders(self) -> list[TextEncoder]:
        return [TextEncoder(self.sd_model.cond_stage_model.wrapped.transformer, "lora_te")]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def base_model(self) -> BaseModelInfo:
        info = getattr(self.sd_model, "sd_checkpoint_info", None)
        vae_file = getattr(self.webui.sd_vae, "loaded_vae_file", None) if self.webui.sd_vae else None
        return BaseModelInfo(
            name=os.path.basename(getattr(info, "filename", "") or ""),
            legacy_hash=getattr(info, "hash", "") or "",
            sha256=getattr(info, "sha256", "") or "",
            vae_name=os.path.basename(vae_file) if vae_file else "",
        )

    def text_encoders_parked(self):
        if self.medvram:  # the WebUI's own hooks already keep them off the GPU between uses
            return nullcontext()
        return parked_on_cpu([encoder.module for encoder in self.text_encoders], self.device)

    @contextmanager
    def training_session(self) -> Iterator[None]:
        """Leave the live model as the WebUI had it: built-in Lora weights un-merged, SDP attention for the run,
        the user's attention optimisation and cleared conditioning caches afterwards, memory given back."""
        self.unmerge_builtin_lora()
        self.clear_conditioning_caches()
        # The WebUI's undo of an attention optimisation puts ldm's AttnBlock forward on sgm's AttnBlock too (the
        # SDXL VAE then decodes slightly differently): every class-level forward of the model is put back as it was.
        classes = {type(module) for module in self.sd_model.modules()}
        forwards = {cls: cls.__dict__.get("forward") for cls in classes}
        try:
            # Inside: a switch that fails half-way (some forwards replaced) is undone like a finished one.
            self.webui.sd_hijack.apply_optimizations(TRAINING_ATTENTION)
            yield
        finally:
            self.webui.sd_hijack.model_hijack.apply_optimizations()
            for cls, forward in forwards.items():
                if cls.__dict__.get("forward") is not forward:
                    if forward is None:
                        delattr(cls, "forward")
                    else:
                        setattr(cls, "forward", forward)
            self.clear_conditioning_caches()
            self.webui.devices.torch_gc()

    def unmerge_builtin_lora(self) -> None:
        """The built-in Lora merges weights into the model and keeps them after a generation; training
        must start from the checkpoint's own weights, and the next generation re-merges what it needs."""
        networks = self.webui.networks
        if networks is None:
            return
        with torch.no_grad():  # the WebUI's UNet weights require grad; an in-place copy on them needs no_grad
            self._restore_backups(networks)
        networks.loaded_networks.clear()

    def _restore_backups(self, networks) -> None:
        for module in getattr(self.sd_model, "network_layer_mapping", {}).values():
            if getattr(module, "network_weights_backup", None) is not None or getattr(module, "network_bias_backup", None) is not None:
                networks.network_restore_weights_from_backup(module)
            if hasattr(module, "network_current_names"):
                module.network_current_names = ()

    def clear_conditioning_caches(self) -> None:
        processing = self.webui.processing.StableDiffusionProcessing
        processing.cached_c = [None, None]
        processing.cached_uc = [None, None]

    def alphas_cumprod(self) -> torch.Tensor:
        schedule = getattr(self.sd_model, "alphas_cumprod_original", None)
        if schedule is None:
            schedule = self.sd_model.alphas_cumprod
        return schedule.detach().to(self.device, torch.float32)

    def encode_captions(self, captions: list[str]) -> TextEmbedding:
        return self.sd_model.cond_stage_model([escape_caption(c) for c in captions])

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        # The VAE samples from the global RNG: seed it for repeatable latents, then give the WebUI its state back.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            images01 = (pixels.float() + 1.0) / 2.0
            latents = self.webui.sd_samplers_common.images_tensor_to_samples(images01, 0, self.sd_model)
        return latents.float()

    # The checkpoint's and VAE file's hashes would name what was loaded, not what is in memory (the WebUI computes
    # a full sha256 lazily, and a VAE chosen in the settings replaces the checkpoint's): the weights themselves,
    # sampled (see sampled_weights_digest), identify the VAE and text encoders at no cost.
    def vae_identity(self) -> str:
        vae = self.sd_model.first_stage_model
        return (f"{self.family.value} webui | {self._vae_encoding_dtype()} | "
                f"scale {getattr(self.sd_model, 'scale_factor', '')} | sampled with seed {self.seed} | "
                f"{sampled_weights_digest(vae_encoder_side(vae))}")

    def _vae_encoding_dtype(self) -> torch.dtype:
        return getattr(self.webui.devices, "dtype_vae", None) or next(self.sd_model.first_stage_model.parameters()).dtype

    def text_encoder_identity(self) -> str:
        opts = self.webui.shared.opts
        options = {name: getattr(opts, name, None) for name in _TEXT_PATH_OPTIONS}
        modules = [encoder.module for encoder in self.text_encoders]
        return (f"{self.family.value} webui | {options} | embeddings {self._embedding_versions()} | "
                f"{next(modules[0].parameters()).dtype} | {sampled_weights_digest(modules)}")

    def _embedding_versions(self) -> list[tuple[str, str]]:
        """Loaded textual-inversion embeddings by name and checksum: a caption naming one is encoded with it."""
        database = getattr(getattr(self.webui.sd_hijack, "model_hijack", None), "embedding_db", None)
        embeddings = getattr(database, "word_embeddings", {}) or {}
        return sorted((name, str(getattr(embedding, "checksum", lambda: "")())) for name, embedding in embeddings.items())

    def unet_conditioning(self, text: TextEmbedding, sizes: list[SizeCondition]) -> Conditioning:
        return text  # SD1 is not conditioned on sizes

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.sd_model.apply_model(noisy_latents, timesteps, cond)

    def report(self, progress: Progress) -> None:
        state = self.webui.shared.state
        if progress.phase == "caching":
            state.job_count, state.job_no = progress.total_steps, progress.step
            state.textinfo = progress.message
        elif progress.phase == "training":
            state.job_count, state.job_no = progress.total_steps, progress.step
            rates = ", ".join(f"{part} {rate:.2e}" for part, rate in progress.learning_rates.items())
            where = (tr("Finding the learning rate: {rates}, ", rates=rates) if rates else
                     tr("Epoch {epoch}/{total_epochs}, ", epoch=progress.epoch, total_epochs=progress.total_epochs))
            state.textinfo = where + tr("step {step}/{total_steps}, loss {loss:.4f}", step=progress.step,
                                        total_steps=progress.total_steps, loss=progress.loss)
        elif progress.message:
            state.textinfo = progress.message
        if progress.phase == "saved" and self.webui.networks is not None:
            self.webui.networks.list_available_networks()  # new files usable in prompts and listed at once
        if self._on_progress is not None:
            self._on_progress(progress)

    def should_stop(self) -> bool:
        state = self.webui.shared.state
        return bool(state.interrupted or getattr(state, "stopping_generation", False) or self._stop_requested())

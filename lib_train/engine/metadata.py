"""The metadata a LoRA file carries: kohya's ``ss_*`` keys, ``modelspec.*``, and the WebUI sidecar."""

from __future__ import annotations

import datetime
import functools
import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..hosts.protocol import BaseModelInfo, ModelFamily, PredictionType
from .config import TrainConfig
from .network_spec import NetworkSpec
from .optim import describe_optimizer, optimizer_kind
from .validation import SEED_OFFSET as VALIDATION_SEED_OFFSET

_BASE_MODEL_VERSION = {ModelFamily.SD1: "sd_v1", ModelFamily.SD2: "sd_v2", ModelFamily.SDXL: "sdxl_base_v1-0"}
_ARCHITECTURE = {ModelFamily.SD1: "stable-diffusion-v1/lora", ModelFamily.SD2: "stable-diffusion-v2-512/lora",
                 ModelFamily.SDXL: "stable-diffusion-xl-v1-base/lora"}
_SD2_V_ARCHITECTURE = "stable-diffusion-v2-768-v/lora"  # kohya's modelspec for v2 with v-parameterization
_SIDECAR_VERSION = {ModelFamily.SD1: "SD1", ModelFamily.SD2: "SD2", ModelFamily.SDXL: "SDXL"}


@dataclass
class RunFacts:
    """What the run knows beyond the config, fixed when training starts."""

    family: ModelFamily
    prediction_type: PredictionType
    base_model: BaseModelInfo
    session_id: int
    started_at: float
    num_train_images: int
    num_batches_per_epoch: int
    max_train_steps: int
    dataset_dirs: dict
    tag_frequency: dict
    bucket_info: dict
    num_reg_images: int = 0  # regularization pictures with their folders' repeats (kohya's count)
    reg_dataset_dirs: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def lora_metadata(config: TrainConfig, facts: RunFacts, *, output_name: str, epoch: int, steps: int,
                  validation_loss: float | None = None) -> dict[str, str]:
    """Every value a string, as safetensors requires; dicts as JSON (A1111 parses values starting with '{').
    ``validation_loss``: this epoch's (``ss_validation_loss``; sd-scripts only logs its own, it writes no key)."""
    network = NetworkSpec.of(config)
    ss = {
        "ss_session_id": facts.session_id,
        "ss_training_started_at": facts.started_at,
        "ss_training_finished_at": time.time(),
        "ss_output_name": output_name,
        "ss_sd_model_name": facts.base_model.name,
        "ss_sd_model_hash": facts.base_model.legacy_hash,
        "ss_new_sd_model_hash": facts.base_model.sha256,
        "ss_training_comment": config.comment or None,
        "ss_sd_scripts_commit_hash": "(unknown)",  # what sd-scripts writes when it cannot tell; this is not sd-scripts
        "ss_network_module": network.ss_network_module(),
        "ss_network_dim": config.rank,
        "ss_network_alpha": float(config.alpha),
        "ss_network_dropout": None,
        "ss_v2": facts.family is ModelFamily.SD2,
        "ss_base_model_version": _BASE_MODEL_VERSION[facts.family] + ("_v" if facts.family is not ModelFamily.SDXL
                                                                        and facts.prediction_type is PredictionType.V else ""),
        "ss_clip_skip": config.clip_skip if config.clip_skip > 1 else None,
        "ss_max_token_length": None,
        "ss_learning_rate": config.unet_lr,
        "ss_unet_lr": config.unet_lr,
        "ss_text_encoder_lr": config.text_encoder_lr,
        "ss_optimizer": describe_optimizer(optimizer_kind(config.optimizer),
                                           config.optimizer_arguments(facts.max_train_steps)),
        "ss_lr_scheduler": config.lr_scheduler,
        # kohya writes its --lr_warmup_steps as given: a ratio of the steps when it was one
        "ss_lr_warmup_steps": config.lr_warmup_ratio or config.lr_warmup_steps,
        "ss_max_grad_norm": config.max_grad_norm,
        "ss_gradient_accumulation_steps": config.gradient_accumulation_steps,
        "ss_gradient_checkpointing": config.gradient_checkpointing,
        "ss_mixed_precision": config.mixed_precision,
        "ss_full_fp16": False,
        "ss_seed": config.seed,
        "ss_max_train_steps": facts.max_train_steps,
        "ss_num_epochs": config.epochs,
        "ss_num_batches_per_epoch": facts.num_batches_per_epoch,
        "ss_steps": steps,
        "ss_epoch": epoch,
        "ss_cache_latents": True,
        "ss_lowram": False,
        "ss_noise_offset": config.noise_offset or None,
        "ss_multires_noise_iterations": config.multires_noise_iterations or None,
        "ss_multires_noise_discount": config.multires_noise_discount,
        "ss_adaptive_noise_scale": None,
        "ss_zero_terminal_snr": config.zero_terminal_snr,
        "ss_caption_dropout_rate": config.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": 0,
        "ss_caption_tag_dropout_rate": config.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": None,
        "ss_prior_loss_weight": config.prior_loss_weight,
        "ss_min_snr_gamma": config.min_snr_gamma or None,
        "ss_scale_weight_norms": None,
        "ss_ip_noise_gamma": config.ip_noise_gamma or None,
        "ss_debiased_estimation": config.debiased_estimation_loss,
        "ss_noise_offset_random_strength": False,
        "ss_ip_noise_gamma_random_strength": False,
        "ss_loss_type": config.loss_type,
        "ss_huber_schedule": config.huber_schedule,
        "ss_huber_scale": config.huber_scale,
        "ss_huber_c": config.huber_c,
        "ss_fp8_base": False,
        "ss_fp8_base_unet": False,
        # Validation uses every training picture (no split) at fixed noise from its own seed (validation.py).
        "ss_num_validation_images": (sum(d["img_count"] for d in facts.dataset_dirs.values())
                                     if config.validation_loss else 0),
        "ss_validation_seed": config.seed + VALIDATION_SEED_OFFSET if config.validation_loss else None,
        "ss_validation_split": 0.0,
        "ss_max_validation_steps": None,
        "ss_validate_every_n_epochs": 1 if config.validation_loss else None,
        "ss_validate_every_n_steps": None,
        "ss_resize_interpolation": None,
        "ss_resolution": (config.resolution, config.resolution),
        "ss_batch_size_per_device": config.batch_size,
        "ss_total_batch_size": config.batch_size * config.gradient_accumulation_steps,
        "ss_enable_bucket": config.enable_buckets,
        "ss_bucket_no_upscale": config.bucket_no_upscale,
        "ss_min_bucket_reso": config.min_bucket_reso if config.enable_buckets else None,
        "ss_max_bucket_reso": config.max_bucket_reso if config.enable_buckets else None,
        "ss_color_aug": False,
        "ss_flip_aug": config.flip_aug,
        "ss_random_crop": False,
        "ss_shuffle_caption": config.shuffle_caption,
        "ss_keep_tokens": config.keep_tokens,
        "ss_num_train_images": facts.num_train_images,
        "ss_num_reg_images": facts.num_reg_images,
        "ss_dataset_dirs": facts.dataset_dirs,
        "ss_reg_dataset_dirs": facts.reg_dataset_dirs,
        "ss_tag_frequency": facts.tag_frequency,
        "ss_bucket_info": json.dumps(facts.bucket_info) if config.enable_buckets else "null",  # as sd-scripts
    }
    network_args = network.ss_network_args()
    loraplus = _loraplus_args(config)
    if loraplus:  # sd-scripts records the network's dropout after the arguments it was given
        network_args = {**{k: v for k, v in (network_args or {}).items() if k != "dropout"}, **loraplus, "dropout": None}
    if network_args is not None:
        ss["ss_network_args"] = network_args
    if validation_loss is not None:
        ss["ss_validation_loss"] = validation_loss
    if config.masked_loss:  # sd-scripts records no masked loss; metadata viewers (lora-inspector) read this key
        ss["ss_masked_loss"] = True
    if facts.base_model.vae_name:
        ss["ss_vae_name"] = facts.base_model.vae_name

    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": _SD2_V_ARCHITECTURE if facts.family is ModelFamily.SD2
        and facts.prediction_type is PredictionType.V else _ARCHITECTURE[facts.family],
        "modelspec.implementation": "diffusers" if facts.family is not ModelFamily.SDXL
        else "https://github.com/Stability-AI/generative-models",
        "modelspec.title": output_name,
        "modelspec.resolution": f"{config.resolution}x{config.resolution}",
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "v" if facts.prediction_type is PredictionType.V else "epsilon",
    }
    if config.clip_skip > 1:
        spec["modelspec.encoder_layer"] = str(config.clip_skip)
    if config.trigger_words.strip():
        spec["modelspec.trigger_phrase"] = config.trigger_words.strip()
    spec["modelspec.implementation_version"] = f"train-tools/{_train_tools_revision()}"
    return {key: _as_text(value) for key, value in {**ss, **spec}.items()}


def _loraplus_args(config: TrainConfig) -> dict[str, str]:
    """The LoRA+ ratios as a kohya user passes them in --network_args, as the strings sd-scripts records."""
    keys = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
    return {key: str(getattr(config, key)) for key in keys if getattr(config, key)}


@functools.lru_cache(maxsize=1)
def _train_tools_revision() -> str:
    """The extension's git commit (``modelspec.implementation_version``), "unknown" outside its own checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = top.stdout.split()
    if top.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != root:
        return "unknown"  # not a git checkout, or one of an enclosing folder (the WebUI's own)
    return lines[1]


def _as_text(value) -> str:
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def sidecar(config: TrainConfig, family: ModelFamily, epoch: int) -> dict:
    """The WebUI's user metadata (``<name>.json`` beside the file), shown on the Extra Networks card."""
    settings = (f"Trained with Train Tools: epoch {epoch}/{config.epochs}, {NetworkSpec.of(config).label}, "
                f"rank {config.rank}, alpha {config.alpha}"
                + (f", conv rank {config.conv_rank}/{config.conv_alpha}" if config.conv_rank else "")
                + (f", factor {config.lokr_factor}" + (", both sides decomposed" if config.decompose_both else "")
                   if config.network_type == "lokr" else "")
                + f", {config.resolution}px, batch {config.batch_size}, UNet lr {config.unet_lr}, "
                f"text encoder lr {config.text_encoder_lr}, {config.optimizer}"
                + "".join(f" {key}={value}" for key, value in config.optimizer_args.items())
                + f", {config.lr_scheduler}, seed {config.seed}.")
    return {
        "description": config.comment,
        "sd version": _SIDECAR_VERSION[family],
        "activation text": config.trigger_words.strip(),
        "preferred weight": 1.0,
        "negative text": "",
        "notes": settings,
    }

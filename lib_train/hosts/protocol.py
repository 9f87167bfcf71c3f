"""The host boundary: everything the engine needs from whoever loaded the Stable Diffusion model.

The engine trains through this protocol only. It is implemented once for the live WebUI (in
``scripts/``) and once for tests and the command line (``lib_train.hosts.standalone``). Both hold the
same real model classes (ldm's ``UNetModel``, transformers' ``CLIPTextModel``), so the code that names
and hooks modules runs on identical module trees.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from contextlib import AbstractContextManager
from typing import Protocol, Union

import torch
from torch import nn

# SD1/SD2 condition the UNet on a tensor (B, 77*k, C). SDXL uses a dict with "crossattn" and
# "vector" (pooled text + size/crop embeddings); the engine passes it through untouched.
Conditioning = Union[torch.Tensor, dict[str, torch.Tensor]]
# What the text encoders give for a batch of captions, batch first: a tensor (SD1/SD2), or a dict of tensors
# (SDXL: "crossattn" and "pooled"). It depends on the captions only, so it can be cached per caption.
TextEmbedding = Union[torch.Tensor, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class SizeCondition:
    """The sizes SDXL is conditioned on for one training picture, (height, width) as sgm orders them:
    the picture's own size, the top-left corner of the crop in the resized picture, the bucket's size."""

    original_hw: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_hw: tuple[int, int]


class ModelFamily(str, Enum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"


class PredictionType(str, Enum):
    EPSILON = "eps"
    V = "v"


@dataclass
class TextEncoder:
    """One text encoder the LoRA can train.

    ``module`` is the Hugging Face ``CLIPTextModel`` (SD1, SDXL TE1) or the OpenCLIP transformer
    (SD2, SDXL TE2). ``key_prefix`` is the kohya prefix of its keys: ``lora_te`` for SD1/SD2,
    ``lora_te1`` / ``lora_te2`` for SDXL.
    """

    module: nn.Module
    key_prefix: str


@dataclass
class BaseModelInfo:
    """Identity of the checkpoint, written into the LoRA metadata."""

    name: str = ""  # file name without folder
    legacy_hash: str = ""  # A1111 short hash: sha256 of 64 KiB at 1 MiB, 8 hex digits
    sha256: str = ""
    vae_name: str = ""


@dataclass
class Progress:
    """What the engine reports after every optimizer step and at each phase change."""

    phase: str  # "caching", "training", "validated", "saving", "saved", "done"
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    total_epochs: int = 0
    loss: float | None = None
    learning_rate: float | None = None
    learning_rates: dict[str, float] = field(default_factory=dict)  # the learning-rate finder's estimate per part
    validation_loss: float | None = None  # after an epoch ("validated"), see engine/validation.py
    message: str = ""
    saved_files: list[str] = field(default_factory=list)


class TrainingHost(Protocol):
    """A loaded Stable Diffusion model the engine may train LoRA modules on.

    Contract: the engine never replaces or mutates the host's modules' weights; it adds forward
    hooks and may toggle ``requires_grad``/training flags, and undoes both before returning.
    """

    family: ModelFamily
    prediction_type: PredictionType
    unet: nn.Module  # ldm/sgm UNetModel (input_blocks / middle_block / output_blocks)
    text_encoders: list[TextEncoder]
    device: torch.device
    dtype: torch.dtype  # dtype of the UNet weights
    base_model: BaseModelInfo

    def training_session(self) -> AbstractContextManager[None]:
        """Entered around the whole run: the host switches to what training needs (attention
        implementation, caches, offloading) and switches back on exit, whatever happened."""

    def text_encoders_parked(self) -> AbstractContextManager[None]:
        """Entered once every caption is encoded and cached: the text encoders may leave the GPU until the block
        ends (the main VRAM saving of SDXL's cached text), coming back unchanged."""

    def alphas_cumprod(self) -> torch.Tensor:
        """The model's original training noise schedule, float32, shape (1000,)."""

    def encode_captions(self, captions: list[str]) -> TextEmbedding:
        """The text encoders' output for the captions. Runs with grad enabled when the engine trains the TE."""

    def unet_conditioning(self, text: TextEmbedding, sizes: list[SizeCondition]) -> Conditioning:
        """What ``predict`` takes for a batch: the text embedding, plus (SDXL) the size embeddings of each picture."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents the UNet expects (already multiplied by the VAE scale factor).

        ``pixels`` is (B, 3, H, W) in [-1, 1] on the host device, float32.
        """

    def vae_identity(self) -> str:
        """What ``encode_images`` gives besides the pixels depends on: the VAE encoder's weights, the dtype it
        encodes in, the latent scale. Equal identities give equal latents (cached latents are keyed by it)."""

    def text_encoder_identity(self) -> str:
        """What ``encode_captions`` gives besides the captions depends on: the text encoders' weights, the layer
        read (clip skip), the text path's options. Cached caption embeddings are keyed by it."""

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's raw prediction (noise or velocity, see ``prediction_type``)."""

    def report(self, progress: Progress) -> None:
        """Show progress to the user (WebUI progress bar, console)."""

    def should_stop(self) -> bool:
        """True once the user asked to stop; polled between steps."""

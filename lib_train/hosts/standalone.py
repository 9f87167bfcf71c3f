"""The host used by tests and the command line: an SD1 model this process loaded itself."""

from __future__ import annotations

import torch

from ..common.memory import parked_on_cpu
from .attention import sdpa_attention
from .clip_tokenizer import clip_tokenizer
from .model_identity import sampled_weights_digest, vae_encoder_side
from .prompt_syntax import literal_caption
from .protocol import BaseModelInfo, Conditioning, ModelFamily, PredictionType, Progress, SizeCondition, TextEmbedding, TextEncoder
from .sd1 import VAE_SCALE_FACTOR, SD1Model, sd1_alphas_cumprod


class StandaloneHost:
    """Implements ``TrainingHost`` over an ``SD1Model``; progress goes to a callback (console, test)."""

    family = ModelFamily.SD1
    vae_scale_factor = VAE_SCALE_FACTOR

    def __init__(
        self,
        model: SD1Model,
        *,
        device: torch.device | str = "cpu",
        clip_skip: int = 1,
        base_model: BaseModelInfo | None = None,
        on_progress=None,
        seed: int = 0,
        prediction_type: PredictionType = PredictionType.EPSILON,
    ):
        self.model = model.to(device)
        self.prediction_type = prediction_type
        self.device = torch.device(device)
        self.clip_skip = clip_skip
        self.base_model = base_model or BaseModelInfo()
        self.tokenizer = clip_tokenizer()
        self.progress_log: list[Progress] = []
        self._on_progress = on_progress
        self._stop_requested = False
        # The VAE draws its latent sample from this generator, not from the global RNG.
        self._seed = seed
        self._generator = torch.Generator(device=self.device).manual_seed(seed)

    @property
    def unet(self) -> torch.nn.Module:
        return self.model.unet

    @property
    def text_encoders(self) -> list[TextEncoder]:
        return [TextEncoder(self.model.text_encoder, "lora_te")]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.unet.parameters()).dtype

    def training_session(self):
        return sdpa_attention(self.model.unet)

    def text_encoders_parked(self):
        return parked_on_cpu([encoder.module for encoder in self.text_encoders], self.device)

    def alphas_cumprod(self) -> torch.Tensor:
        return sd1_alphas_cumprod().to(self.device)

    def encode_captions(self, captions: list[str]) -> TextEmbedding:
        # Escaped brackets (as taggers write them for the WebUI) are the brackets themselves.
        tokens = self.tokenizer([literal_caption(c) for c in captions], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        input_ids = tokens.input_ids.to(self.device)
        encoder = self.model.text_encoder
        if self.clip_skip == 1:
            return encoder(input_ids=input_ids).last_hidden_state
        hidden = encoder(input_ids=input_ids, output_hidden_states=True).hidden_states[-self.clip_skip]
        return getattr(encoder, "text_model", encoder).final_layer_norm(hidden)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.model.vae
        distribution = vae.encode(pixels.to(self.device, next(vae.parameters()).dtype))
        noise = torch.randn(distribution.mean.shape, generator=self._generator, device=self.device,
                            dtype=distribution.mean.dtype)
        return ((distribution.mean + distribution.std * noise) * self.vae_scale_factor).float()

    def vae_identity(self) -> str:
        vae = self.model.vae
        return (f"{self.family.value} standalone | {next(vae.parameters()).dtype} | scale {self.vae_scale_factor} | "
                f"sampled with seed {self._seed} | {sampled_weights_digest(vae_encoder_side(vae))}")

    def text_encoder_identity(self) -> str:
        modules = [encoder.module for encoder in self.text_encoders]
        return f"{self.family.value} standalone | clip skip {self.clip_skip} | {sampled_weights_digest(modules)}"

    def unet_conditioning(self, text: TextEmbedding, sizes: list[SizeCondition]) -> Conditioning:
        return text  # SD1 is not conditioned on sizes

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.model.unet(noisy_latents, timesteps, context=cond)

    def report(self, progress: Progress) -> None:
        self.progress_log.append(progress)
        if self._on_progress is not None:
            self._on_progress(progress)

    def request_stop(self) -> None:
        self._stop_requested = True

    def should_stop(self) -> bool:
        return self._stop_requested

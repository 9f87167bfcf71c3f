"""Noise, timesteps, targets and the loss of epsilon / v-prediction training (kohya's math)."""

from __future__ import annotations

import torch

from ..hosts.protocol import PredictionType


def add_noise(latents: torch.Tensor, alphas_cumprod: torch.Tensor, generator: torch.Generator,
              noise_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uniform timesteps in [0, 1000) and the forward process x_t = √ā x0 + √(1-ā) ε.

    Returns (noisy latents, noise, timesteps). With noise_offset the noise gets a per-channel constant,
    which lets the model learn very dark and very bright images."""
    batch = latents.shape[0]
    device = latents.device
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=torch.float32)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((batch, latents.shape[1], 1, 1), generator=generator,
                                                   device=device, dtype=torch.float32)
    timesteps = torch.randint(0, alphas_cumprod.shape[0], (batch,), generator=generator, device=device)
    alpha_bar = alphas_cumprod[timesteps].view(batch, 1, 1, 1)
    noisy = alpha_bar.sqrt() * latents + (1.0 - alpha_bar).sqrt() * noise
    return noisy, noise, timesteps


def training_target(prediction_type: PredictionType, latents: torch.Tensor, noise: torch.Tensor,
                    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    if prediction_type is PredictionType.EPSILON:
        return noise
    alpha_bar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    return alpha_bar.sqrt() * noise - (1.0 - alpha_bar).sqrt() * latents  # velocity


def zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"): shift and scale √ᾱ so the
    last timestep is pure noise (ᾱ = 0) while the first keeps its value. Trains the model to see the very noise
    sampling starts from; only meaningful with v-prediction (ε is undefined at SNR 0)."""
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return (root ** 2).to(alphas_cumprod.dtype)


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float,
                    prediction_type: PredictionType) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR+1) for v."""
    alpha_bar = alphas_cumprod[timesteps]
    snr = alpha_bar / (1.0 - alpha_bar)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1.0) if prediction_type is PredictionType.V else clipped / snr


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """MSE in float32, averaged over C,H,W per sample, weighted per sample, averaged over the batch."""
    per_sample = torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()

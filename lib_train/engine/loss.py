"""Targets, timestep weights and the loss of epsilon / v-prediction training (kohya's math)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..hosts.protocol import PredictionType

LOSS_TYPES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")


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


def debiased_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
                     prediction_type: PredictionType) -> torch.Tensor:
    """Debiased estimation (Yu et al. 2024) as kohya weighs it: 1/√SNR for ε, 1/(SNR+1) for v, with SNR clipped
    at 1000 (it is infinite at t = 0)."""
    alpha_bar = alphas_cumprod[timesteps]
    snr = torch.clamp(alpha_bar / (1.0 - alpha_bar), max=1000.0)
    return 1.0 / (snr + 1.0) if prediction_type is PredictionType.V else 1.0 / snr.sqrt()


def huber_thresholds(schedule: str, huber_c: float, huber_scale: float, alphas_cumprod: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """Kohya's per-sample Huber c. ``exponential``: scale·c^(t/T), from scale at t=0 down to scale·c at t=T;
    ``snr``: (1-c)/(1+σ_t)² + c with σ_t = √((1-ᾱ)/ᾱ), near 1 (about L2) for small t, c for noisy ones (kohya
    applies no scale to it); ``constant``: c·scale."""
    if schedule == "exponential":
        rate = -math.log(huber_c) / alphas_cumprod.shape[0]
        return torch.exp(-rate * timesteps) * huber_scale
    if schedule == "snr":
        alpha_bar = alphas_cumprod[timesteps]
        sigmas = ((1.0 - alpha_bar) / alpha_bar) ** 0.5
        return (1.0 - huber_c) / (1.0 + sigmas) ** 2 + huber_c
    if schedule == "constant":
        return torch.full(timesteps.shape, huber_c * huber_scale, device=timesteps.device)
    raise ValueError(f"Unknown Huber schedule {schedule!r}")


def elementwise_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """Kohya's ``conditional_loss`` without reduction, in float32. Huber: 2c(√(d²+c²) - c), d² for |d| ≪ c and
    2c|d| for |d| ≫ c; smooth L1: the same divided by c."""
    prediction, target = prediction.float(), target.float()
    if loss_type == "l2":
        return torch.nn.functional.mse_loss(prediction, target, reduction="none")
    c = huber_c.view(-1, *([1] * (prediction.ndim - 1)))
    root = torch.sqrt((prediction - target) ** 2 + c ** 2) - c
    if loss_type == "huber":
        return 2 * c * root
    if loss_type == "smooth_l1":
        return 2 * root
    raise ValueError(f"Unknown loss type {loss_type!r}")


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """MSE in float32, averaged over C,H,W per sample, weighted per sample, averaged over the batch."""
    per_sample = elementwise_loss(prediction, target).mean(dim=(1, 2, 3))
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


@dataclass(frozen=True)
class Objective:
    """What a step minimises, in kohya's order: the element-wise loss (L2, Huber or smooth L1 with its c per
    sample), the alpha mask, the mean per sample, the timestep weights (Min-SNR, then debiased), the batch mean."""

    prediction_type: PredictionType
    alphas_cumprod: torch.Tensor
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: float = 0.0  # 0: off
    debiased_estimation: bool = False

    def __call__(self, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                 mask: torch.Tensor | None = None, sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """``mask``: (B, 1, h, w) in [0, 1] at latent size; masked-out elements count as 0 in the mean over all
        elements, as kohya's masked loss does. ``sample_weights`` (B,): kohya's loss weights (the prior-loss weight
        of regularization pictures), applied to each sample's mean; the batch mean still counts every sample."""
        thresholds = (None if self.loss_type == "l2" else
                      huber_thresholds(self.huber_schedule, self.huber_c, self.huber_scale, self.alphas_cumprod,
                                       timesteps))
        loss = elementwise_loss(prediction, target, self.loss_type, thresholds)
        if mask is not None:
            loss = loss * mask
        per_sample = loss.mean(dim=(1, 2, 3))
        if sample_weights is not None:
            per_sample = per_sample * sample_weights.to(per_sample.device, per_sample.dtype)
        if self.min_snr_gamma > 0:
            per_sample = per_sample * min_snr_weights(self.alphas_cumprod, timesteps, self.min_snr_gamma,
                                                      self.prediction_type)
        if self.debiased_estimation:
            per_sample = per_sample * debiased_weights(self.alphas_cumprod, timesteps, self.prediction_type)
        return per_sample.mean()

"""The noise of each training step: timesteps, the forward process and kohya's noise options."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Noising:
    """Noise, uniform timesteps in [0, T) and x_t = √ā x0 + √(1-ā) ε, with kohya's options in kohya's order:
    offset noise, multi-resolution (pyramid) noise, then input perturbation. Draws nothing for an option that is
    off, so the default run draws exactly the noise it always did."""

    alphas_cumprod: torch.Tensor
    offset: float = 0.0  # a per-channel constant: lets the model learn very dark and very bright images
    multires_iterations: int = 0  # 0: off
    multires_discount: float = 0.3
    ip_noise_gamma: float = 0.0  # 0: off

    def sample(self, latents: torch.Tensor, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, noise, timesteps). The target is built from the returned noise; with input
        perturbation only the noisy latents carry the extra noise (Ning et al. 2023)."""
        batch, device = latents.shape[0], latents.device
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=torch.float32)
        if self.offset:
            noise = noise + self.offset * torch.randn((batch, latents.shape[1], 1, 1), generator=generator,
                                                      device=device, dtype=torch.float32)
        if self.multires_iterations:
            noise = pyramid_noise(noise, generator, self.multires_iterations, self.multires_discount)
        timesteps = torch.randint(0, self.alphas_cumprod.shape[0], (batch,), generator=generator, device=device)
        applied = noise
        if self.ip_noise_gamma:
            applied = noise + self.ip_noise_gamma * torch.randn(latents.shape, generator=generator, device=device,
                                                                dtype=torch.float32)
        alpha_bar = self.alphas_cumprod[timesteps].view(batch, 1, 1, 1)
        noisy = alpha_bar.sqrt() * latents + (1.0 - alpha_bar).sqrt() * applied
        return noisy, noise, timesteps


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Kohya's ``pyramid_noise_like`` (multi-resolution noise, J. Whitaker 2023): noise drawn at sizes shrinking by a
    random factor in [2, 4) per level, upsampled bilinearly and added with weight discount^level, until a side
    reaches 1; then scaled to unit standard deviation. Low frequencies get noise too, so the model learns to
    change overall brightness and composition."""
    batch, channels, height, width = noise.shape
    upsample = torch.nn.Upsample(size=(height, width), mode="bilinear")
    for level in range(iterations):
        factor = float(torch.rand((), generator=generator, device=noise.device)) * 2 + 2
        small_h, small_w = max(1, int(height / factor ** level)), max(1, int(width / factor ** level))
        coarse = torch.randn((batch, channels, small_h, small_w), generator=generator, device=noise.device,
                             dtype=noise.dtype)
        noise = noise + upsample(coarse) * discount ** level
        if small_h == 1 or small_w == 1:
            break
    return noise / noise.std()

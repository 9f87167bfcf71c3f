"""The validation loss after each epoch: every training picture at fixed noise and fixed timesteps.

Why not a held-out share of the pictures: a LoRA is trained on 10-50 pictures, and each one left out is a
look of the character the LoRA never learns; a 10 % split of 20 pictures is 2 pictures, too few for a
steady number. With the same noise and timesteps every epoch, the loss of epoch 3 and epoch 7 differ only by
what the network learned, so the curve is smooth and its lowest point means something: from there on the
network stops getting better at denoising the pictures at those noise levels (it starts to fit its
training noise instead). It measures fit, not generalisation to unseen pictures; the preview grid shows that.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..common.i18n import tr
from ..dataset.training_data import TrainingData
from ..hosts.protocol import TrainingHost
from .loss import training_target

# Four noise levels spread over the schedule (the middle of each quarter): each picture is denoised at all four.
TIMESTEP_FRACTIONS = (0.125, 0.375, 0.625, 0.875)
# The validation noise is drawn from a generator of its own, seeded from the run seed plus this: the training
# generator is never touched, and the noise is not the one of the first training steps.
SEED_OFFSET = 0x5EED


class ValidationLoss:
    """The run's fixed validation set: the same pictures, noise and timesteps at every evaluation."""

    def __init__(self, data: TrainingData, seed: int):
        self.data = data
        self.seed = seed

    def evaluate(self, host: TrainingHost, run) -> float:
        """The mean loss (the run's own objective) over every picture and timestep; no gradient, eval mode,
        and no random number of the training drawn."""
        generator = torch.Generator(device=host.device).manual_seed(self.seed + SEED_OFFSET)
        schedule = run.alphas_cumprod
        levels = [int(fraction * schedule.shape[0]) for fraction in TIMESTEP_FRACTIONS]
        total, count = 0.0, 0
        modules = [host.unet, run.network, *(encoder.module for encoder in host.text_encoders)]
        with torch.no_grad(), evaluation_mode(modules):
            for batch in self.data.fixed_batches():
                latents, size = batch.latents, batch.latents.shape[0]
                with run.autocast:
                    cond = host.unet_conditioning(run.conditioning.encode(batch.captions), batch.sizes)
                for level in levels:
                    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=torch.float32)
                    timesteps = torch.full((size,), level, device=latents.device, dtype=torch.long)
                    alpha_bar = schedule[timesteps].view(size, 1, 1, 1)
                    noisy = alpha_bar.sqrt() * latents + (1.0 - alpha_bar).sqrt() * noise
                    with run.autocast:
                        prediction = host.predict(noisy, timesteps, cond)
                    target = training_target(host.prediction_type, latents, noise, schedule, timesteps)
                    total += float(run.objective(prediction, target, timesteps, batch.masks)) * size
                    count += size
        return total / count


@contextmanager
def evaluation_mode(modules: list[nn.Module]) -> Iterator[None]:
    """Every submodule in eval mode for the block, each one's own mode given back afterwards."""
    saved = [(module, module.training) for root in modules for module in root.modules()]
    try:
        for module, _ in saved:
            module.training = False
        yield
    finally:
        for module, mode in saved:
            module.training = mode


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """An exponential moving average with its start-up bias removed (as TensorBoard's smoothing), so the first
    points are not pulled towards 0."""
    result, average = [], 0.0
    for index, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        result.append(average / (1 - weight ** index))
    return result


def loss_plot_title(validation_history: list[tuple[int, int, float]]) -> str:
    """The Train page's loss plot title: the epoch of lowest validation loss, and the epochs whose loss is NaN or
    infinite (never taken for the lowest: ``min`` keeps a NaN it meets first, as nothing compares below it)."""
    finite = [entry for entry in validation_history if math.isfinite(entry[2])]
    broken = ", ".join(str(epoch) for epoch, _, loss in validation_history if not math.isfinite(loss))
    if not finite:
        return tr("Loss (the validation loss is not a number at epoch(s) {epochs})", epochs=broken) if broken \
            else tr("Loss")
    epoch, _, lowest = min(finite, key=lambda entry: entry[2])
    if broken:
        return tr("Loss (validation lowest at epoch {epoch}: {lowest:.4f}; not a number at epoch(s) {epochs})",
                  epoch=epoch, lowest=lowest, epochs=broken)
    return tr("Loss (validation lowest at epoch {epoch}: {lowest:.4f})", epoch=epoch, lowest=lowest)

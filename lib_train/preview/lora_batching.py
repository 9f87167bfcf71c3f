"""Several Lora weights in one batch: each sample of a UNet forward gets its own multiplier.

A grid row renders the same prompt and seed at W weights. With per-sample multipliers those W images are one
batch instead of W generations. Samplers with classifier-free guidance call the UNet on the cond rows and the
uncond rows of every image together (2W rows: cond 0..W-1, then uncond 0..W-1) or separately (W rows each),
so the multiplier of a row is its image's weight either way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..engine.network import LoRANetwork


@contextmanager
def per_sample_unet_weights(network: LoRANetwork, unet: nn.Module, weights: Sequence[float]) -> Iterator[None]:
    """While active, a UNet call with k·W rows gives row r the weight ``weights[r % W]``."""
    per_image = torch.tensor([float(w) for w in weights], dtype=torch.float32)

    def choose_rows(module: nn.Module, args: tuple) -> None:
        rows = args[0].shape[0]
        if rows % len(per_image):
            raise ValueError(f"The UNet was called with {rows} samples, not a multiple of the {len(per_image)} "
                             "Lora weights of the batch (AND prompts are not supported in the grid).")
        multipliers = per_image.repeat(rows // len(per_image)).to(args[0].device)
        for module_ in network.unet_modules:
            module_.multiplier = multipliers

    handle = unet.register_forward_pre_hook(choose_rows)
    try:
        yield
    finally:
        handle.remove()
        for module in network.unet_modules:
            module.multiplier = 1.0


@contextmanager
def text_encoder_weight(network: LoRANetwork, weight: float | torch.Tensor) -> Iterator[None]:
    """The text encoder's Lora at one weight (or one per sample of its batch) for the block's encodings."""
    for module in network.text_encoder_modules:
        module.multiplier = weight
    try:
        yield
    finally:
        for module in network.text_encoder_modules:
            module.multiplier = 1.0

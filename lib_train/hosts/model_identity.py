"""A short identity of a model part's weights, for the keys of cached latents and caption embeddings."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import nn

SAMPLED_VALUES = 256


def sampled_weights_digest(modules: Sequence[nn.Module]) -> str:
    """sha256 over every parameter's name, dtype and shape and an evenly spread sample of its values.

    Not all of them: on a GPU that would copy every weight to the CPU at each Train click (SDXL's text
    encoders are 1.6 GB in fp16), which is the wait the cache removes. Fine-tunes, merges and other VAEs
    change every weight, so a spread sample of each tensor tells them apart."""
    digest = hashlib.sha256()
    for number, module in enumerate(modules):
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            flat = tensor.detach().reshape(-1)
            count = min(flat.numel(), SAMPLED_VALUES)
            # Integer steps: a float32 linspace rounds the last index of a large tensor past its end.
            picks = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
            digest.update(f"{number}.{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(flat[picks].to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def vae_encoder_side(vae: nn.Module) -> list[nn.Module]:
    """The parts of an ldm or sgm AutoencoderKL that latents come from: a VAE with another decoder (as the
    ft-MSE VAEs are) gives the same latents, so it shares them. Another VAE class counts as a whole."""
    parts = [getattr(vae, name, None) for name in ("encoder", "quant_conv")]
    return parts if all(isinstance(part, nn.Module) for part in parts) else [vae]

"""Keeping the host model exactly as it was: freezing for training, checkpointing, fingerprints."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .lora_names import text_encoder_layers


@contextmanager
def frozen(modules: list[nn.Module]) -> Iterator[None]:
    """Base weights need no gradient (the WebUI leaves its UNet with requires_grad=True, which would
    give every UNet weight a .grad). Flags and train/eval modes are restored whatever happens."""
    saved_grad = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    saved_mode = [(sub, sub.training) for m in modules for sub in m.modules()]
    try:
        for parameter, _ in saved_grad:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in saved_grad:
            parameter.requires_grad_(flag)
            parameter.grad = None
        for module, mode in saved_mode:
            module.training = mode


def checkpointed_blocks(unet: nn.Module, text_encoders: list[nn.Module]) -> list[nn.Module]:
    """The blocks whose activations are recomputed in backward: every UNet block and text-encoder layer."""
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    for encoder in text_encoders:
        openclip = getattr(getattr(encoder, "transformer", None), "resblocks", None)
        blocks += list(openclip if openclip is not None else text_encoder_layers(encoder))
    return blocks


@contextmanager
def gradient_checkpointing(blocks: list[nn.Module]) -> Iterator[None]:
    """Non-reentrant checkpointing through an instance-level forward, removed afterwards.

    ldm's own checkpoint flag computes gradients only for the block's parameters, and our LoRA
    parameters live outside the module tree, so it cannot be used."""

    def wrap(block: nn.Module):
        original = block.forward

        def forward(*args, **kwargs):
            if not torch.is_grad_enabled():
                return original(*args, **kwargs)
            return checkpoint(original, *args, use_reentrant=False, **kwargs)

        return forward

    try:
        for block in blocks:
            block.forward = wrap(block)
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


def fingerprint(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes, bytes) and requires_grad flags."""
    digest = hashlib.sha256()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|{tensor.requires_grad}|".encode())
        data = tensor.detach().to("cpu").contiguous()
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def hook_count(module: nn.Module) -> int:
    """Forward hooks and instance-level forward overrides left on any submodule."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + ("forward" in m.__dict__) for m in module.modules())

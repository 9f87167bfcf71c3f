"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..common.errors import ConfigError


def make_optimizer(name: str, groups: list[dict], weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    if name == "AdamW":
        # The fused kernel is exact and faster on CUDA; the foreach path is the fast one on CPU.
        fused = device.type == "cuda"
        return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=fused, foreach=None if fused else True)
    if name == "AdamW8bit":
        if device.type != "cuda":
            raise ConfigError("AdamW8bit runs on a CUDA GPU only and this run is on the CPU; choose AdamW.")
        try:
            import bitsandbytes
        except Exception as error:  # a broken install raises more than ImportError
            raise ConfigError(f"AdamW8bit needs the bitsandbytes package, which cannot be loaded here ({error}); "
                              "choose AdamW or install bitsandbytes.") from None
        return bitsandbytes.optim.AdamW8bit(groups, weight_decay=weight_decay)
    raise ConfigError(f"Unknown optimizer {name!r}.")


def describe_optimizer(name: str, weight_decay: float) -> str:
    """The optimizer as kohya writes it into ss_optimizer."""
    qualified = {"AdamW": "torch.optim.adamw.AdamW", "AdamW8bit": "bitsandbytes.optim.adamw.AdamW8bit"}[name]
    return f"{qualified}(weight_decay={weight_decay})"


def make_lr_schedule(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warmup (for every schedule when warmup_steps > 0), then constant or cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if name == "cosine":
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    if name not in ("constant", "cosine", "constant_with_warmup"):
        raise ConfigError(f"Unknown learning-rate scheduler {name!r}.")
    return LambdaLR(optimizer, factor)

"""Learning-rate schedules, by the names kohya's --lr_scheduler takes: a factor of each group's learning rate
per optimizer step."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial")


def warmup_steps(lr_warmup_steps: int, lr_warmup_ratio: float, total_steps: int) -> int:
    """Warmup given as steps, or as a ratio of all steps (rounded down, as kohya's float --lr_warmup_steps)."""
    return int(lr_warmup_ratio * total_steps) if lr_warmup_ratio > 0 else lr_warmup_steps


def schedule_factor(name: str, step: int, warmup: int, total_steps: int, cycles: int = 1, power: float = 1.0) -> float:
    """The factor at optimizer step ``step`` (0-based). Linear warmup for every schedule when ``warmup`` > 0 (never
    0 at the first step, which would waste it), then: constant; cosine to 0; cosine restarting ``cycles`` times
    (each from the full rate, as transformers' hard restarts); linear to 0; (1 - progress)^power."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if name in ("constant", "constant_with_warmup"):
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "cosine_with_restarts":
        return 0.0 if progress >= 1.0 else 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0)))
    if name == "linear":
        return 1.0 - progress
    if name == "polynomial":
        # transformers' polynomial decay ends at lr_end=1e-7 rather than 0; with LoRA rates the difference is nil.
        return (1.0 - progress) ** power
    raise ValueError(f"Unknown learning-rate scheduler {name!r}.")


def make_lr_schedule(optimizer: torch.optim.Optimizer, name: str, warmup: int, total_steps: int,
                     cycles: int = 1, power: float = 1.0) -> LambdaLR:
    schedule_factor(name, 0, warmup, total_steps, cycles, power)  # an unknown name fails here, not at step 1
    return LambdaLR(optimizer, lambda step: schedule_factor(name, step, warmup, total_steps, cycles, power))

"""DoRA (weight-decomposed LoRA, LyCORIS's ``dora_wd``): the merged weight ``W + ΔW`` is rescaled so that each
input column has a trained magnitude ``m`` (``dora_scale``), which starts at the base weight's own norms.

The norm runs over every axis but the input one: ``m`` has shape (1, in) or (1, in, 1, 1). That is the layout
A1111 v1.10's built-in Lora applies (its ``apply_weight_decompose``); LyCORIS writes it with
``wd_on_output=False`` (its default since 3.2 is the output axis, which A1111 would mis-apply). At multiplier
``w`` the built-in Lora merges ``W + w * (DoRA(W + ΔW) - W)``, which is what we add through the hook.
"""

from __future__ import annotations

import torch


def input_column_norms(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each input column (over the output axis and the kernel), shaped (1, in, 1, ...)."""
    per_input = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    return per_input.reshape(1, weight.shape[1], *([1] * (weight.dim() - 2)))


def decomposed_delta(base_weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA(W + ΔW) - W in float32: the change the decomposed weight makes to the base weight."""
    base = base_weight.to(delta.device, torch.float32)
    merged = base + delta
    return merged * (magnitude / input_column_norms(merged)) - base

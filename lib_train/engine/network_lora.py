"""A kohya-format LoRA (LoCon on convolutions) module for one layer, optionally with DoRA.

Term = ``up(down(x)) * (alpha / rank)``, computed on the activations. With DoRA the term is the decomposed
weight's change applied to ``x`` (network_dora), which needs the whole ΔW = up @ down.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .network_base import NetworkModule
from .network_dora import decomposed_delta, input_column_norms

FILE_KEYS = ("lora_down.weight", "lora_up.weight", "alpha")
DORA_KEY = "dora_scale"


class LoRAModule(NetworkModule):
    def __init__(self, key: str, base: nn.Module, rank: int, alpha: float, generator: torch.Generator | None = None,
                 device: torch.device | None = None, fused_part: str | None = None, dora: bool = False):
        super().__init__(key, base, device, fused_part)
        self.rank = rank
        g = self.geometry
        if g.is_conv:
            # The down conv carries the base kernel, stride and padding; the up conv is 1x1.
            self.lora_down = nn.Conv2d(g.in_features, rank, g.kernel_size, g.stride, g.padding, bias=False)
            self.lora_up = nn.Conv2d(rank, g.out_features, 1, bias=False)
        else:
            self.lora_down = nn.Linear(g.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, g.out_features, bias=False)
        # Microsoft LoRA init: kaiming-uniform down, zero up, so training starts from the base model.
        # Drawn on CPU from the caller's generator, so a seed gives the same weights on any device.
        with torch.no_grad():
            down = torch.empty(self.lora_down.weight.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
            self.lora_down.weight.copy_(down)
            nn.init.zeros_(self.lora_up.weight)
        # DoRA's magnitude starts at the base weight's column norms, so it too starts from the base model.
        self.dora_scale = nn.Parameter(input_column_norms(self.base_weight().float().cpu())) if dora else None
        self._place(alpha)

    @classmethod
    def accepts(cls, suffixes: set[str]) -> bool:
        return suffixes in (set(FILE_KEYS), set(FILE_KEYS) | {DORA_KEY})

    @classmethod
    def from_tensors(cls, key: str, base: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device,
                     fused_part: str | None) -> "LoRAModule":
        magnitude = tensors.get(DORA_KEY)
        if magnitude is not None and magnitude.shape[0] != 1:
            raise ValueError(f"{key}: a DoRA magnitude per output channel (LyCORIS's wd_on_output default); A1111's "
                             "built-in Lora applies DoRA per input channel, and so does Train Tools")
        return cls(key, base, tensors["lora_down.weight"].shape[0], float(tensors["alpha"]), device=device,
                   fused_part=fused_part, dora=DORA_KEY in tensors)

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def weight_delta(self) -> torch.Tensor:
        """ΔW at multiplier 1 (with DoRA, the decomposed weight minus the base weight)."""
        shape = self.geometry.weight_shape
        delta = (self.lora_up.weight.flatten(1) @ self.lora_down.weight.flatten(1)).reshape(shape) * self.scale
        if self.dora_scale is None:
            return delta
        return decomposed_delta(self.base_weight(), delta, self.dora_scale)

    def term(self, x: torch.Tensor) -> torch.Tensor:
        if self.dora_scale is not None:
            return self.weight_term(x, self.weight_delta)
        return self.lora_up(self.lora_down(x)) * self.scale

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"lora_down.weight": self.lora_down.weight, "lora_up.weight": self.lora_up.weight,
                   "alpha": self.alpha}
        if self.dora_scale is not None:
            tensors[DORA_KEY] = self.dora_scale
        return tensors

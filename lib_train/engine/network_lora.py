"""A kohya-format LoRA module for one Linear or Conv2d layer of the host model.

Output = ``W x + up(down(x)) * (alpha / rank) * multiplier``. The base layer is never modified: the
module adds its term through a forward hook, so detaching it leaves the layer exactly as it was.
The LoRA weights stay float32 whatever the dtype of the base layer. The multiplier is one number, or one
per sample of the batch (a 1-D tensor) so a single forward pass renders several Lora weights at once.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled(device_type) exists from torch 2.4; the WebUI ships 2.1."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


class LoRAModule(nn.Module):
    def __init__(self, key: str, base: nn.Module, rank: int, alpha: float, generator: torch.Generator | None = None,
                 device: torch.device | None = None, fused_part: str | None = None):
        super().__init__()
        self.key = key
        self.rank = rank
        # A part (q, k, v, out) of a fused attention adds its term through that attention's FusedAttentionLoRA.
        self.fused_part = fused_part
        if fused_part is not None:
            width = base.embed_dim
            self.lora_down = nn.Linear(width, rank, bias=False)
            self.lora_up = nn.Linear(rank, width, bias=False)
        elif isinstance(base, nn.Linear):
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        elif isinstance(base, nn.Conv2d):
            if base.groups != 1 or base.dilation != (1, 1):
                raise ValueError(f"{key}: grouped or dilated convolutions are not supported")
            # The down conv carries the base kernel, stride and padding; the up conv is 1x1.
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            raise TypeError(f"{key}: cannot attach LoRA to {type(base).__name__}")
        # Microsoft LoRA init: kaiming-uniform down, zero up, so training starts from the base model.
        # Drawn on CPU from the caller's generator, so a seed gives the same weights on any device.
        with torch.no_grad():
            down = torch.empty(self.lora_down.weight.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
            self.lora_down.weight.copy_(down)
            nn.init.zeros_(self.lora_up.weight)
        # On the compute device, not necessarily the base layer's: under the WebUI's --medvram the base
        # layers wait on the CPU between forwards.
        device = device or next(base.parameters()).device
        self.to(device=device, dtype=torch.float32)
        self.register_buffer("alpha", torch.tensor(float(alpha), dtype=torch.float32, device=device))
        self.multiplier: float | torch.Tensor = 1.0
        self._base = [base]  # a list so the base layer is not registered as our submodule
        self._handle: RemovableHandle | None = None

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The LoRA term for input ``x`` (already scaled by alpha/rank and the multiplier)."""
        if not autocast_enabled(x.device.type):
            x = x.to(self.lora_down.weight.dtype)
        out = self.lora_up(self.lora_down(x))
        multiplier = self.multiplier
        if isinstance(multiplier, torch.Tensor):
            if multiplier.shape[0] != out.shape[0]:
                raise ValueError(f"{self.key}: {multiplier.shape[0]} per-sample multipliers for a batch of {out.shape[0]}")
            # Batch first in every targeted layer (Linear on [B, tokens, C] or [B, C], Conv2d on [B, C, H, W]).
            multiplier = multiplier.to(out.device, out.dtype).view(-1, *([1] * (out.ndim - 1)))
        return out * (self.scale * multiplier)

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + self.delta(args[0]).to(output.dtype)

    def attach(self) -> None:
        if self._handle is None and self.fused_part is None:
            self._handle = self._base[0].register_forward_hook(self._hook)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

"""What every network module type (LoRA, LoHa, LoKr) shares: a forward hook on one layer of the host model,
the multiplier, float32 weights on the compute device, and read-only access to the base layer's weight.

Output = ``base(x) + term(x) * multiplier``. The base layer is never modified: the term is added to the layer's
output by a forward hook, so detaching leaves the layer exactly as it was. The multiplier is one number, or one
per sample of the batch (a 1-D tensor) so that a single forward pass renders several Lora weights at once; every
type's term is linear in it (the built-in Lora merges ``W + multiplier * ΔW``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle


def autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled(device_type) exists from torch 2.4; the WebUI ships 2.1."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


@dataclass(frozen=True)
class LayerGeometry:
    """The weight layout of a targeted layer: (out, in) for a Linear, (out, in, kh, kw) for a Conv2d."""

    out_features: int
    in_features: int
    kernel_size: tuple[int, ...] = ()  # () for a Linear
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()

    @property
    def is_conv(self) -> bool:
        return bool(self.kernel_size)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features, *self.kernel_size)

    @property
    def flat_in_features(self) -> int:
        """Inputs per output channel once the kernel is flattened (``in * kh * kw``)."""
        return self.in_features * math.prod(self.kernel_size)


def layer_geometry(key: str, base: nn.Module, fused_part: str | None) -> LayerGeometry:
    if fused_part is not None:  # q, k, v or out of an nn.MultiheadAttention: square projections
        return LayerGeometry(base.embed_dim, base.embed_dim)
    if isinstance(base, nn.Linear):
        return LayerGeometry(base.out_features, base.in_features)
    if isinstance(base, nn.Conv2d):
        if base.groups != 1 or base.dilation != (1, 1):
            raise ValueError(f"{key}: grouped or dilated convolutions are not supported")
        return LayerGeometry(base.out_channels, base.in_channels, tuple(base.kernel_size), tuple(base.stride),
                             tuple(base.padding))
    raise TypeError(f"{key}: cannot attach a network module to {type(base).__name__}")


class NetworkModule(nn.Module):
    """One layer's module. Subclasses create their parameters, then call ``_place(alpha)``, and define
    ``term`` (the output added at multiplier 1) and ``state_tensors`` (their tensors under the file's names)."""

    def __init__(self, key: str, base: nn.Module, device: torch.device | None, fused_part: str | None):
        super().__init__()
        self.key = key
        # A part (q, k, v, out) of a fused attention adds its term through that attention's FusedAttentionLoRA.
        self.fused_part = fused_part
        self.geometry = layer_geometry(key, base, fused_part)
        # The compute device, not necessarily the base layer's: under the WebUI's --medvram the base layers wait
        # on the CPU between forwards.
        self._device = device or next(base.parameters()).device
        self.multiplier: float | torch.Tensor = 1.0
        self._base = [base]  # a list so the base layer is not registered as our submodule
        self._handle: RemovableHandle | None = None

    def _place(self, alpha: float) -> None:
        self.to(device=self._device, dtype=torch.float32)
        self.register_buffer("alpha", torch.tensor(float(alpha), dtype=torch.float32, device=self._device))

    def term(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The module's own tensors (not copies) keyed by their suffix in the file (``lora_up.weight``, ``alpha``)."""
        raise NotImplementedError

    def base_weight(self) -> torch.Tensor:
        """The base layer's weight as it is now, for reading only (DoRA's norm): a fused part's rows of the
        attention's ``in_proj_weight``, or its ``out_proj`` weight."""
        base = self._base[0]
        if self.fused_part is None:
            return base.weight.detach()
        if self.fused_part == "out":
            return base.out_proj.weight.detach()
        return base.in_proj_weight.detach().chunk(3)["qkv".index(self.fused_part)]

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x`` through a weight of this layer's shape, without bias (the base layer adds its own)."""
        g = self.geometry
        if g.is_conv:
            return F.conv2d(x, weight, None, g.stride, g.padding)
        return F.linear(x, weight)

    def weight_term(self, x: torch.Tensor, weight_delta) -> torch.Tensor:
        """``x`` through ΔW, ΔW built in float32 even under autocast (its factors multiply; F.linear casts after)."""
        with torch.autocast(x.device.type, enabled=False):
            delta = weight_delta()
        return self.apply_weight(x, delta)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """What the module adds to the layer's output for input ``x``, at its multiplier."""
        if not autocast_enabled(x.device.type):
            x = x.to(torch.float32)
        out = self.term(x)
        multiplier = self.multiplier
        if isinstance(multiplier, torch.Tensor):
            if multiplier.shape[0] != out.shape[0]:
                raise ValueError(f"{self.key}: {multiplier.shape[0]} per-sample multipliers for a batch of {out.shape[0]}")
            # Batch first in every targeted layer (Linear on [B, tokens, C] or [B, C], Conv2d on [B, C, H, W]).
            multiplier = multiplier.to(out.device, out.dtype).view(-1, *([1] * (out.ndim - 1)))
        return out * multiplier

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + self.delta(args[0]).to(output.dtype)

    def attach(self) -> None:
        if self._handle is None and self.fused_part is None:
            self._handle = self._base[0].register_forward_hook(self._hook)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

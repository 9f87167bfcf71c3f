"""LoHa (LyCORIS ``algo=loha``): ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) * alpha / rank, the Hadamard product of two
rank-r matrices, so a rank of r reaches a ΔW of rank up to r² for the parameters of a rank-2r LoRA.

Tensors as LyCORIS writes them: ``hada_w1_a``/``hada_w2_a`` (out, r), ``hada_w1_b``/``hada_w2_b`` (r, in·kh·kw),
``alpha``; a convolution's kernel is flattened into the second factor (no Tucker core). The initialisation is
LyCORIS's: the ``b`` factors ~ N(0, 1), ``w1_a`` ~ N(0, 0.1), ``w2_a`` = 0 so training starts from the base model.
"""

from __future__ import annotations

import torch
from torch import nn

from .network_base import NetworkModule

FILE_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha")


class _HadamardOfProducts(torch.autograd.Function):
    """(w1a @ w1b) ⊙ (w2a @ w2b), saving only the factors: the two full-size products are rebuilt in the backward
    pass instead of being kept for it (two float32 copies of every targeted weight)."""

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b):
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        return (w1a @ w1b) * (w2a @ w2b)

    @staticmethod
    def backward(ctx, grad):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        grad1 = grad * (w2a @ w2b)
        grad2 = grad * (w1a @ w1b)
        return grad1 @ w1b.T, w1a.T @ grad1, grad2 @ w2b.T, w2a.T @ grad2


class LoHaModule(NetworkModule):
    def __init__(self, key: str, base: nn.Module, rank: int, alpha: float, generator: torch.Generator | None = None,
                 device: torch.device | None = None, fused_part: str | None = None):
        super().__init__(key, base, device, fused_part)
        self.rank = rank
        out, flat_in = self.geometry.out_features, self.geometry.flat_in_features

        def normal(shape: tuple[int, int], std: float) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape).normal_(0.0, std, generator=generator))

        self.hada_w1_a = normal((out, rank), 0.1)
        self.hada_w1_b = normal((rank, flat_in), 1.0)
        self.hada_w2_a = nn.Parameter(torch.zeros(out, rank))
        self.hada_w2_b = normal((rank, flat_in), 1.0)
        self._place(alpha)

    @classmethod
    def accepts(cls, suffixes: set[str]) -> bool:
        return suffixes == set(FILE_KEYS)

    @classmethod
    def from_tensors(cls, key: str, base: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device,
                     fused_part: str | None) -> "LoHaModule":
        return cls(key, base, tensors["hada_w1_b"].shape[0], float(tensors["alpha"]), device=device,
                   fused_part=fused_part)

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def weight_delta(self) -> torch.Tensor:
        product = _HadamardOfProducts.apply(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b)
        return product.reshape(self.geometry.weight_shape) * self.scale

    def term(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight_term(x, self.weight_delta)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"hada_w1_a": self.hada_w1_a, "hada_w1_b": self.hada_w1_b, "hada_w2_a": self.hada_w2_a,
                "hada_w2_b": self.hada_w2_b, "alpha": self.alpha}

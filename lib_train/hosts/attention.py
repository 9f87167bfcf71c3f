"""PyTorch's fused scaled-dot-product attention for ldm's CrossAttention, for the length of a block.

ldm's own forward materialises the full attention matrix in float32; SDPA computes the same result
with far less memory and time. Only the standalone host needs this: the WebUI selects its own
attention optimisation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn


def _sdpa_forward(self: nn.Module, x: torch.Tensor, context: torch.Tensor | None = None, mask=None) -> torch.Tensor:
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    batch, length, _ = q.shape
    q, k, v = (t.reshape(batch, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return self.to_out(out.transpose(1, 2).reshape(batch, length, -1))


@contextmanager
def sdpa_attention(model: nn.Module) -> Iterator[None]:
    """Instance-level forward overrides on every CrossAttention, removed afterwards."""
    layers = [m for m in model.modules() if type(m).__name__ in ("CrossAttention", "MemoryEfficientCrossAttention")]
    try:
        for layer in layers:
            layer.forward = MethodType(_sdpa_forward, layer)
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)

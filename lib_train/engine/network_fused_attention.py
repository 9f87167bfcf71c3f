"""Network modules (any type) on the q/k/v/out projections of a torch ``nn.MultiheadAttention`` (OpenCLIP's
text attention).

That module computes with one fused ``in_proj_weight`` and calls no ``nn.Linear`` forward, so a forward hook
cannot reach its projections. While attached, an instance-level forward runs the same attention from the
same weights, adding each part's term to its projection (in activation space, as for every other layer).
Detaching removes it and leaves the module exactly as it was.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .network_base import NetworkModule


class FusedAttentionLoRA:
    def __init__(self, attention: nn.MultiheadAttention, parts: dict[str, NetworkModule]):
        if set(parts) != {"q", "k", "v", "out"}:
            raise ValueError(f"a fused attention needs q, k, v and out parts, got {sorted(parts)}")
        if attention.in_proj_weight is None or attention.bias_k is not None or attention.add_zero_attn:
            raise ValueError("only attentions with one fused in_proj weight (as OpenCLIP builds them) are supported")
        self.attention = attention
        self.parts = parts

    def attach(self) -> None:
        self.attention.forward = self._forward

    def detach(self) -> None:
        self.attention.__dict__.pop("forward", None)

    def _project(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, part: str) -> torch.Tensor:
        output = F.linear(x, weight, bias)
        return output + self.parts[part].delta(x).to(output.dtype)

    def _forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                 average_attn_weights=True, is_causal=False):
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask is not supported while a LoRA is attached (OpenCLIP passes none)")
        attention = self.attention
        if not attention.batch_first:  # LoRA terms take the batch first
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        weights = attention.in_proj_weight.chunk(3)
        biases = attention.in_proj_bias.chunk(3) if attention.in_proj_bias is not None else (None, None, None)
        projected = [self._project(x, w, b, name) for x, w, b, name in zip((query, key, value), weights, biases, "qkv")]
        batch, length, width = projected[0].shape
        heads = attention.num_heads
        q, k, v = (t.reshape(batch, t.shape[1], heads, width // heads).transpose(1, 2) for t in projected)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask  # MultiheadAttention: True = masked out; SDPA: True = attend
        dropout = attention.dropout if attention.training else 0.0
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout,
                                               is_causal=is_causal and attn_mask is None)
        mixed = mixed.transpose(1, 2).reshape(batch, length, width)
        out_proj = attention.out_proj
        output = self._project(mixed, out_proj.weight, out_proj.bias, "out")
        if not attention.batch_first:
            output = output.transpose(0, 1)
        return output, None

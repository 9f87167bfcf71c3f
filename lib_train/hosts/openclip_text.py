"""OpenCLIP's text tower (SDXL's second text encoder, ViT-bigG-14; SD2's text encoder, ViT-H-14) under open_clip's
own module names.

open_clip cannot be imported without torchvision, which CI cannot install beside CPU torch; this tower has
the same submodules, parameter names and computation as ``open_clip.CLIP`` without its vision tower (what
sgm's ``FrozenOpenCLIPEmbedder2`` and ldm's ``FrozenOpenCLIPEmbedder`` keep), with torch's own
``nn.MultiheadAttention`` as open_clip uses it, so naming, hooking and checkpoint loading run on the tree the
WebUI holds at ``conditioner.embedders.1.model`` (SDXL) and ``cond_stage_model.wrapped.model`` (SD2).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

# open_clip's ViT-bigG-14 text config.
BIGG_TEXT = dict(context_length=77, vocab_size=49408, width=1280, heads=20, layers=32, embed_dim=1280)
# open_clip's ViT-H-14 text config (SD2).
H14_TEXT = dict(context_length=77, vocab_size=49408, width=1024, heads=16, layers=24, embed_dim=1024)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)  # sequence first, as open_clip 2.20 calls it
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(width * 4, width))]))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])


class OpenCLIPText(nn.Module):
    def __init__(self, context_length: int, vocab_size: int, width: int, heads: int, layers: int, embed_dim: int):
        super().__init__()
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * 4.6052)
        self.register_buffer("attn_mask", causal_mask(context_length), persistent=False)
        if not self.positional_embedding.is_meta:
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            nn.init.normal_(self.positional_embedding, std=0.01)
            nn.init.normal_(self.text_projection, std=width ** -0.5)


def causal_mask(length: int) -> torch.Tensor:
    """open_clip's additive mask: -inf above the diagonal."""
    return torch.full((length, length), float("-inf")).triu_(1)


def encode_penultimate_and_pooled(model: OpenCLIPText, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What sgm's FrozenOpenCLIPEmbedder2 (layer "penultimate", legacy False) returns: the hidden states before
    the last block (B, 77, width), and the projected end-of-text features after the last block and ln_final."""
    x = model.token_embedding(tokens) + model.positional_embedding
    x = x.permute(1, 0, 2)  # batch, length, width -> length, batch, width
    mask = model.attn_mask.to(x.dtype)
    blocks = model.transformer.resblocks
    for block in blocks[:-1]:
        x = block(x, attn_mask=mask)
    penultimate = x.permute(1, 0, 2)
    last = model.ln_final(blocks[-1](x, attn_mask=mask).permute(1, 0, 2))
    # The end-of-text token has the highest id in every sequence.
    pooled = last[torch.arange(last.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection
    return penultimate, pooled


# ldm's FrozenOpenCLIPEmbedder layer choice (SD2's yaml says "penultimate"): how many blocks from the end it skips.
OPENCLIP_LAYER_SKIP = {"last": 0, "penultimate": 1}


def encode_through_blocks(model: OpenCLIPText, tokens: torch.Tensor, blocks: int) -> torch.Tensor:
    """What ldm's FrozenOpenCLIPEmbedder.encode_with_transformer gives (SD2's text conditioning): the first
    ``blocks`` blocks, then ln_final, (B, 77, width)."""
    x = (model.token_embedding(tokens) + model.positional_embedding).permute(1, 0, 2)
    mask = model.attn_mask.to(x.dtype)
    for block in model.transformer.resblocks[:blocks]:
        x = block(x, attn_mask=mask)
    return model.ln_final(x.permute(1, 0, 2))

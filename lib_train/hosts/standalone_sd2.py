"""The host used by tests and the command line for SD2: an ``SD2Model`` this process loaded itself.

Text goes as the WebUI's SD2 path sends it: OpenCLIP's token ids in 75-token chunks (start, tokens, end, then
padding with 0), each chunk through the blocks the model's layer choice runs (23 of 24: "penultimate") and
ln_final, side by side (B, 77·k, 1024). A clip skip above 1 leaves out more blocks, as kohya's skips layers of
its converted 23-layer text model (the WebUI applies none on SD2).
"""

from __future__ import annotations

import torch

from .clip_tokenizer import chunked_token_ids
from .openclip_text import encode_through_blocks
from .prompt_syntax import literal_caption
from .protocol import ModelFamily, TextEmbedding
from .sd2 import SD2Model
from .standalone import StandaloneHost


class StandaloneSD2Host(StandaloneHost):
    family = ModelFamily.SD2

    model: SD2Model

    def encode_captions(self, captions: list[str]) -> TextEmbedding:
        ids = chunked_token_ids([literal_caption(c) for c in captions], pad_id=0).to(self.device)
        blocks = self.model.text_blocks - (self.clip_skip - 1)
        chunks = [encode_through_blocks(self.model.text_encoder, ids[:, start:start + 77], blocks)
                  for start in range(0, ids.shape[1], 77)]
        return torch.cat(chunks, dim=1)

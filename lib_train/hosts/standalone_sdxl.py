"""The host used by tests and the command line for SDXL: an ``SDXLModel`` this process loaded itself.

Text goes as the WebUI's SDXL path sends it: CLIP-L's penultimate hidden states and OpenCLIP bigG's
penultimate hidden states side by side (B, 77·k, 768 + 1280), long captions in 75-token chunks, the pooled
bigG features of the first chunk; each picture's sizes are embedded as sgm's conditioner does.
"""

from __future__ import annotations

import torch

from .clip_tokenizer import chunked_token_ids
from .openclip_text import encode_penultimate_and_pooled
from .prompt_syntax import literal_caption
from .protocol import Conditioning, ModelFamily, SizeCondition, TextEmbedding, TextEncoder
from .sd1 import sd1_alphas_cumprod
from .sdxl import VAE_SCALE_FACTOR, SDXLModel, size_embeddings
from .standalone import StandaloneHost


class StandaloneSDXLHost(StandaloneHost):
    family = ModelFamily.SDXL
    vae_scale_factor = VAE_SCALE_FACTOR

    model: SDXLModel

    @property
    def text_encoders(self) -> list[TextEncoder]:
        return [TextEncoder(self.model.text_encoder_1, "lora_te1"), TextEncoder(self.model.text_encoder_2, "lora_te2")]

    def alphas_cumprod(self) -> torch.Tensor:
        # sgm's LegacyDDPMDiscretization: the same linear-in-√β schedule as SD1.
        return sd1_alphas_cumprod().to(self.device)

    def encode_captions(self, captions: list[str]) -> TextEmbedding:
        literal = [literal_caption(c) for c in captions]
        clip_ids = chunked_token_ids(literal, pad_id=49407).to(self.device)  # CLIP-L pads with the end token
        bigg_ids = chunked_token_ids(literal, pad_id=0).to(self.device)  # OpenCLIP pads with 0
        hidden, pooled = [], None
        for start in range(0, clip_ids.shape[1], 77):
            clip_l = self.model.text_encoder_1(input_ids=clip_ids[:, start:start + 77], output_hidden_states=True)
            bigg, chunk_pooled = encode_penultimate_and_pooled(self.model.text_encoder_2, bigg_ids[:, start:start + 77])
            hidden.append(torch.cat([clip_l.hidden_states[-2], bigg.to(clip_l.hidden_states[-2].dtype)], dim=2))
            pooled = chunk_pooled if pooled is None else pooled
        return {"crossattn": torch.cat(hidden, dim=1), "pooled": pooled}

    def unet_conditioning(self, text: TextEmbedding, sizes: list[SizeCondition]) -> Conditioning:
        numbers = [torch.tensor([s.original_hw for s in sizes]), torch.tensor([s.crop_top_left for s in sizes]),
                   torch.tensor([s.target_hw for s in sizes])]
        dim = self.model.size_embedding_dim
        pooled = text["pooled"]
        embedded = [size_embeddings(n.to(self.device), dim).to(pooled.dtype) for n in numbers]
        return {"crossattn": text["crossattn"], "vector": torch.cat([pooled, *embedded], dim=1)}

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        unet = self.model.unet
        return unet(noisy_latents, timesteps, context=[cond["crossattn"]] * unet.context_blocks, y=cond["vector"])

"""The host protocol over the WebUI's live SDXL model (sgm ``DiffusionEngine``).

Captions go through the conditioner's own text embedders (the WebUI's wrappers: emphasis, embeddings, 75-token
chunks and the CLIP-L layer choice as in generation), called one by one rather than through sgm's
``GeneralConditioner.forward``, which runs them under ``no_grad`` and so could not train their LoRA. The size
embedders get each picture's own sizes, as kohya trains SDXL, not the one size of a generation.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..hosts.prompt_syntax import escape_caption
from ..hosts.protocol import Conditioning, SizeCondition, TextEmbedding, TextEncoder
from .host import WebUIHost

# sgm's input keys of the three size embedders, and which number of a SizeCondition each one takes.
_SIZE_INPUTS = {"original_size_as_tuple": "original_hw", "crop_coords_top_left": "crop_top_left",
                "target_size_as_tuple": "target_hw"}


class WebUISDXLHost(WebUIHost):
    @property
    def _embedders(self) -> list:
        return list(self.sd_model.conditioner.embedders)

    @property
    def text_encoders(self) -> list[TextEncoder]:
        clip_l, bigg = [e for e in self._embedders if getattr(e, "input_key", None) == "txt"]
        return [TextEncoder(clip_l.wrapped.transformer, "lora_te1"), TextEncoder(bigg.wrapped.model, "lora_te2")]

    def encode_captions(self, captions: list[str]) -> TextEmbedding:
        texts = [escape_caption(c) for c in captions]
        hidden, pooled = [], None
        for embedder in self._embedders:
            if getattr(embedder, "input_key", None) != "txt":
                continue
            output = embedder(texts)
            if isinstance(output, (tuple, list)):  # OpenCLIP bigG: (hidden states, pooled)
                output, pooled = output
            hidden.append(output)
        return {"crossattn": torch.cat(hidden, dim=2), "pooled": pooled}

    def unet_conditioning(self, text: TextEmbedding, sizes: list[SizeCondition]) -> Conditioning:
        pooled = text["pooled"]
        vector = [pooled]
        for embedder in self._embedders:
            field = _SIZE_INPUTS.get(getattr(embedder, "input_key", None))
            if field is None:
                continue
            numbers = torch.tensor([getattr(size, field) for size in sizes], device=pooled.device, dtype=torch.float32)
            vector.append(embedder(numbers).to(pooled.dtype))
        return {"crossattn": text["crossattn"], "vector": torch.cat(vector, dim=1)}

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with self._vae_in_float32():
            return super().encode_images(pixels)

    def _vae_encoding_dtype(self) -> torch.dtype:
        return torch.float32  # see _vae_in_float32

    @contextmanager
    def _vae_in_float32(self):
        """The SDXL VAE overflows to NaN in fp16: encode in float32 (fp16 -> fp32 -> fp16 is exact), then give the
        WebUI back its VAE dtype."""
        devices = self.webui.devices
        vae = self.sd_model.first_stage_model
        dtype_before, weights_before = devices.dtype_vae, next(vae.parameters()).dtype
        if dtype_before != torch.float16:
            yield
            return
        devices.dtype_vae = torch.float32
        try:
            yield
        finally:
            devices.dtype_vae = dtype_before
            vae.to(weights_before)

"""The host protocol over the WebUI's live SD2.x model (ldm ``LatentDiffusion`` with an OpenCLIP text encoder).

Captions go through the WebUI's ``FrozenOpenCLIPEmbedderWithCustomWords`` (emphasis, embeddings, 75-token chunks)
as in generation; it reads the layer the model's config chose (``wrapped.layer_idx``: "penultimate" on both
Stability releases) and no clip-skip option. The UNet, VAE and schedule go as for SD1; the prediction type is the
model's ``parameterization`` (``"v"`` from ``v2-inference-v.yaml``).
"""

from __future__ import annotations

from ..hosts.protocol import TextEncoder
from .host import WebUIHost


class WebUISD2Host(WebUIHost):
    @property
    def text_encoders(self) -> list[TextEncoder]:
        return [TextEncoder(self.sd_model.cond_stage_model.wrapped.model, "lora_te")]

    def text_encoder_identity(self) -> str:
        layer_skip = getattr(self.sd_model.cond_stage_model.wrapped, "layer_idx", None)
        return f"{super().text_encoder_identity()} | OpenCLIP layer skip {layer_skip}"

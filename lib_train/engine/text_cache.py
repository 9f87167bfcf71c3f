"""Caption embeddings encoded once: in memory for a run, and on disk between runs when a cache folder is given.

Only with frozen text encoders and fixed captions (no shuffled or dropped tags): the embedding then depends on
the caption text and the text encoders alone, which is the key on disk (with the host's text-encoder identity:
weights, clip skip, the text path's options), so a caption edit re-encodes only that caption.
"""

from __future__ import annotations

import torch

from ..common.tensor_store import CacheReport, TensorStore
from ..hosts.protocol import TextEmbedding, TrainingHost

_TENSOR = "embedding"  # an SD1 entry; SDXL's dict is stored as "part.<name>" tensors


class CaptionStore:
    """Caption embeddings in ``store`` under the host's text-encoder identity; hits and damage go to ``report``."""

    def __init__(self, store: TensorStore, text_encoder_identity: str, report: CacheReport):
        self.store = store
        self.identity = text_encoder_identity
        self.report = report

    def key(self, caption: str) -> str:
        return f"caption | text encoders {self.identity} | {caption}"

    def load(self, caption: str, device: torch.device) -> TextEmbedding | None:
        tensors = self.report.read(self.store, self.key(caption), f"embedding of the caption {caption[:60]!r}")
        if tensors is None:
            return None
        self.report.captions_reused += 1
        if _TENSOR in tensors:
            return tensors[_TENSOR].to(device)
        return {name.removeprefix("part."): tensor.to(device) for name, tensor in tensors.items()}

    def save(self, caption: str, embedding: TextEmbedding) -> None:
        tensors = ({f"part.{name}": t for name, t in embedding.items()} if isinstance(embedding, dict)
                   else {_TENSOR: embedding})
        self.store.write(self.key(caption), tensors)


class ConditioningCache:
    """With frozen text encoders and fixed captions, each caption is encoded once (a tensor, or SDXL's dict of
    tensors, per caption), or read from ``stored``."""

    def __init__(self, host: TrainingHost, cacheable: bool, stored: CaptionStore | None = None):
        self.host = host
        self.cacheable = cacheable
        self.stored = stored if cacheable else None
        self.cache: dict[str, TextEmbedding] = {}

    def prefill(self, captions: list[str], chunk: int = 16) -> None:
        unique = sorted(set(captions))
        if self.stored is not None:
            self.stored.report.captions_total += len(unique)
        for start in range(0, len(unique), chunk):
            if self.cacheable:
                self.encode(unique[start:start + chunk])

    def complete(self) -> bool:
        """Every batch can come from the cache: the text encoders are not needed again. Captions of different
        chunk counts are encoded again batch by batch (see ``encode``)."""
        return self.cacheable and len({_shape(t) for t in self.cache.values()}) <= 1

    def encode(self, captions: list[str]) -> TextEmbedding:
        if not self.cacheable:
            return self.host.encode_captions(captions)
        missing = sorted({c for c in captions if c not in self.cache})
        if missing and self.stored is not None:
            for caption in missing:
                embedding = self.stored.load(caption, self.host.device)
                if embedding is not None:
                    self.cache[caption] = embedding
            missing = [c for c in missing if c not in self.cache]
        if missing:
            with torch.no_grad():
                encoded = _per_sample(self.host.encode_captions(missing), len(missing))
            self.cache.update(zip(missing, encoded))
            if self.stored is not None:
                for caption, embedding in zip(missing, encoded):
                    self.stored.save(caption, embedding)
        cached = [self.cache[c] for c in captions]
        if len({_shape(t) for t in cached}) > 1:
            # Captions over 75 tokens take more 77-token chunks (the WebUI's text path): encoded together,
            # the batch is padded to a common length.
            with torch.no_grad():
                return self.host.encode_captions(captions)
        if isinstance(cached[0], dict):
            return {name: torch.stack([t[name] for t in cached]) for name in cached[0]}
        return torch.stack(cached)


def _per_sample(encoded: TextEmbedding, count: int) -> list[TextEmbedding]:
    if isinstance(encoded, dict):
        return [{name: tensor[i] for name, tensor in encoded.items()} for i in range(count)]
    return list(encoded)


def _shape(embedding: TextEmbedding) -> tuple:
    if isinstance(embedding, dict):
        return tuple((name, tuple(t.shape)) for name, t in sorted(embedding.items()))
    return tuple(embedding.shape)

"""LoKr (LyCORIS ``algo=lokr``): ΔW = w1 ⊗ w2 * alpha / rank, a Kronecker product of a small matrix w1 and a
larger w2, each side of the weight split in two factors by ``factorization``.

Layout exactly as LyCORIS plans it for a rank r, a factor f and ``decompose_both``:
- out = a·b and in = c·d with (a, b) = factorization(out, f), (c, d) = factorization(in, f), a <= b, c <= d;
- ``lokr_w1`` (a, c), or ``lokr_w1_a`` (a, r) @ ``lokr_w1_b`` (r, c) when decompose_both and r < max(a, c) / 2;
- ``lokr_w2_a`` (b, r) @ ``lokr_w2_b`` (r, d·kh·kw) when r < max(b, d) / 2, else a full ``lokr_w2``: (b, d), or
  (b, d, kh, kw) for a convolution;
- when neither side is decomposed the scale is 1 and the file's alpha is the rank (what LyCORIS writes).
Initialisation is LyCORIS's: w1 factors kaiming-uniform, w2_a kaiming-uniform, w2_b (or a full w2) zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .network_base import LayerGeometry, NetworkModule, layer_geometry

W1_KEYS = ({"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"})
W2_KEYS = ({"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"})


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension and m <= n, as LyCORIS splits a weight side: ``factor`` itself when it divides
    the dimension; otherwise the divisors are tried upwards, keeping the last one that is at most ``factor``
    (any, for -1) and stopping at the first divisor past the square root."""
    if factor > 0 and dimension % factor == 0:
        m, n = sorted((factor, dimension // factor))
        return m, n
    limit = dimension if factor < 0 else factor
    m = 1
    for divisor in range(2, dimension + 1):
        if dimension % divisor:
            continue
        if divisor > limit:
            break
        m = divisor
        if divisor >= dimension // divisor:
            break
    m, n = sorted((m, dimension // m))
    return m, n


@dataclass(frozen=True)
class LokrLayout:
    """The shapes of one module's tensors."""

    w1: tuple[int, int]  # (a, c)
    w2: tuple[int, int]  # (b, d)
    kernel: tuple[int, ...]  # () for a Linear
    rank: int  # of the decomposed side(s); unused when both are full
    w1_decomposed: bool
    w2_decomposed: bool

    @classmethod
    def plan(cls, geometry: LayerGeometry, rank: int, factor: int, decompose_both: bool) -> "LokrLayout":
        a, b = factorization(geometry.out_features, factor)
        c, d = factorization(geometry.in_features, factor)
        return cls((a, c), (b, d), geometry.kernel_size, rank, decompose_both and rank < max(a, c) / 2,
                   rank < max(b, d) / 2)

    @classmethod
    def from_tensors(cls, geometry: LayerGeometry, tensors: dict[str, torch.Tensor]) -> "LokrLayout":
        if "lokr_w1" in tensors:
            w1, w1_rank = tuple(tensors["lokr_w1"].shape), None
        else:
            w1, w1_rank = (tensors["lokr_w1_a"].shape[0], tensors["lokr_w1_b"].shape[1]), tensors["lokr_w1_a"].shape[1]
        if "lokr_w2" in tensors:
            w2, w2_rank = tuple(tensors["lokr_w2"].shape[:2]), None
        else:
            w2_rank = tensors["lokr_w2_a"].shape[1]
            w2 = (tensors["lokr_w2_a"].shape[0], tensors["lokr_w2_b"].shape[1] // math.prod(geometry.kernel_size))
        return cls(w1, w2, geometry.kernel_size, w2_rank or w1_rank or 1, w1_rank is not None, w2_rank is not None)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        (a, c), (b, d), r = self.w1, self.w2, self.rank
        shapes = {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)} if self.w1_decomposed else {"lokr_w1": (a, c)}
        if self.w2_decomposed:
            shapes.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d * math.prod(self.kernel)))
        else:
            shapes["lokr_w2"] = (b, d, *self.kernel)
        return shapes


class LoKrModule(NetworkModule):
    def __init__(self, key: str, base: nn.Module, layout: LokrLayout, alpha: float,
                 generator: torch.Generator | None = None, device: torch.device | None = None,
                 fused_part: str | None = None):
        super().__init__(key, base, device, fused_part)
        (a, c), (b, d) = layout.w1, layout.w2
        if a * b != self.geometry.out_features or c * d != self.geometry.in_features:
            raise ValueError(f"{key}: LoKr factors {layout.w1} x {layout.w2} do not make the layer's "
                             f"{self.geometry.weight_shape[:2]} weight")
        self.layout = layout
        for name, shape in layout.shapes().items():
            tensor = torch.empty(shape)
            if name in ("lokr_w2", "lokr_w2_b"):
                nn.init.zeros_(tensor)
            else:
                nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)
            setattr(self, name, nn.Parameter(tensor))
        if not (layout.w1_decomposed or layout.w2_decomposed):
            alpha = layout.rank  # LyCORIS: no low-rank side, scale 1
        self._place(alpha)

    @classmethod
    def accepts(cls, suffixes: set[str]) -> bool:
        return any(suffixes == w1 | w2 | {"alpha"} for w1 in W1_KEYS for w2 in W2_KEYS)

    @classmethod
    def from_tensors(cls, key: str, base: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device,
                     fused_part: str | None) -> "LoKrModule":
        layout = LokrLayout.from_tensors(layer_geometry(key, base, fused_part), tensors)
        return cls(key, base, layout, float(tensors["alpha"]), device=device, fused_part=fused_part)

    @property
    def scale(self) -> float:
        if not (self.layout.w1_decomposed or self.layout.w2_decomposed):
            return 1.0  # as the built-in Lora (no rank to divide by) and LyCORIS
        return float(self.alpha) / self.layout.rank

    def weight_delta(self) -> torch.Tensor:
        w1 = self.lokr_w1_a @ self.lokr_w1_b if self.layout.w1_decomposed else self.lokr_w1
        w2 = self.lokr_w2_a @ self.lokr_w2_b if self.layout.w2_decomposed else self.lokr_w2
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2).reshape(self.geometry.weight_shape) * self.scale

    def term(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight_term(x, self.weight_delta)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {name: getattr(self, name) for name in self.layout.shapes()}
        tensors["alpha"] = self.alpha
        return tensors

"""Test oracle: the weight math of A1111 v1.10.1's built-in Lora (extensions-builtin/Lora: network.py,
network_lora.py, network_hada.py, network_lokr.py, lyco_helpers.py, networks.py), written from its source.

Which module type takes a layer's tensors (tried in the built-in order), the ΔW it merges into the layer's
weight (``calc_updown`` then ``finalize_updown``: scale alpha/dim, DoRA's ``apply_weight_decompose``, the
multiplier), the merge of a fused attention (q/k/v rows stacked into ``in_proj_weight``), and SD2's text-encoder
key conversion with the fused-attention lookup."""

from __future__ import annotations

import re

import torch

# The built-in module types' tests for "this layer's tensors are mine", in the order networks.py tries them.
ACCEPTS = (
    ("lora", lambda w: {"lora_up.weight", "lora_down.weight"} <= w or {"lora_A.weight", "lora_B.weight"} <= w),
    ("hada", lambda w: {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= w),
    ("ia3", lambda w: "weight" in w),
    ("lokr", lambda w: ("lokr_w1" in w or {"lokr_w1_a", "lokr_w1_b"} <= w)
     and ("lokr_w2" in w or {"lokr_w2_a", "lokr_w2_b"} <= w)),
)
# What each type reads; anything else in a layer's tensors is ignored by the built-in Lora.
READS = {"lora": {"lora_up.weight", "lora_down.weight", "lora_mid.weight"},
         "hada": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
         "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}}
COMMON = {"alpha", "scale", "bias", "dora_scale"}  # NetworkModule's own


def module_type(tensors: dict[str, torch.Tensor]) -> str | None:
    names = set(tensors)
    return next((name for name, accepts in ACCEPTS if accepts(names)), None)


def _rebuild(up: torch.Tensor, down: torch.Tensor, shape) -> torch.Tensor:  # lyco_helpers.rebuild_conventional
    return (up.reshape(up.size(0), -1) @ down.reshape(down.size(0), -1)).reshape(shape)


def _raw_updown(kind: str, w: dict[str, torch.Tensor], orig_weight: torch.Tensor) -> tuple[torch.Tensor, list, int | None]:
    """calc_updown before finalize_updown: (updown, output_shape, dim)."""
    if kind == "lora":
        up, down = w["lora_up.weight"], w["lora_down.weight"]
        shape = [up.size(0), down.size(1)] + (list(down.shape[2:]) if down.dim() == 4 else [])
        return _rebuild(up, down, shape), shape, down.shape[0]
    if kind == "hada":
        w1a, w1b, w2a, w2b = (w[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        shape = [w1a.size(0), w1b.size(1)] + (list(w1b.shape[2:]) if w1b.dim() == 4 else [])
        return _rebuild(w1a, w1b, shape) * _rebuild(w2a, w2b, shape), shape, w1b.shape[0]
    w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
    w2 = w["lokr_w2"] if "lokr_w2" in w else w["lokr_w2_a"] @ w["lokr_w2_b"]
    dim = w["lokr_w2_b"].shape[0] if "lokr_w2_b" in w else (w["lokr_w1_b"].shape[0] if "lokr_w1_b" in w else None)
    shape = list(orig_weight.shape) if orig_weight.dim() == 4 else [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    return torch.kron(w1, w2.contiguous()).reshape(shape), shape, dim


def updown(tensors: dict[str, torch.Tensor], orig_weight: torch.Tensor, multiplier: float,
           layer_weight_shape: torch.Size | None = None) -> torch.Tensor:
    """What the built-in Lora adds to ``orig_weight`` for one layer. ``layer_weight_shape``: the shape of the
    matched module's weight (for a fused attention, its out_proj's), which sizes DoRA's norm."""
    kind = module_type(tensors)
    assert kind in READS, f"the built-in Lora has no (supported) module type for {sorted(tensors)}"
    w = {k: v.float() for k, v in tensors.items()}
    orig = orig_weight.float()
    delta, shape, dim = _raw_updown(kind, w, orig)
    if len(shape) == 4:
        delta = delta.reshape(shape)
    if orig.numel() == delta.numel():
        delta = delta.reshape(orig.shape)
    alpha = float(w["alpha"]) if "alpha" in w else None
    delta = delta * (alpha / dim if dim is not None and alpha is not None else 1.0)
    if "dora_scale" in w:  # apply_weight_decompose
        norm_dims = len(layer_weight_shape or orig.shape) - 1
        merged = delta + orig
        norm = (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(merged.shape[1], *[1] * norm_dims).transpose(0, 1))
        delta = merged * (w["dora_scale"] / norm) - orig
    return delta * multiplier


def merge_attention(attention: torch.nn.MultiheadAttention, parts: dict[str, dict[str, torch.Tensor]],
                    multiplier: float) -> None:
    """network_apply_weights for an nn.MultiheadAttention: only with all of q, k, v and out; each q/k/v against
    its own rows of in_proj_weight, stacked; out against out_proj.weight."""
    assert set(parts) == {"q", "k", "v", "out"}
    shape = attention.out_proj.weight.shape
    with torch.no_grad():
        rows = attention.in_proj_weight.chunk(3, 0)
        stacked = torch.vstack([updown(parts[p], rows[i], multiplier, shape) for i, p in enumerate("qkv")])
        attention.in_proj_weight += stacked.to(attention.in_proj_weight.dtype)
        out = attention.out_proj.weight
        out += updown(parts["out"], out, multiplier, shape).to(out.dtype)


def merge_layer(module: torch.nn.Module, tensors: dict[str, torch.Tensor], multiplier: float) -> None:
    """network_apply_weights for a Linear or Conv2d: W' = W + updown, in the layer's dtype."""
    with torch.no_grad():
        weight = module.weight
        weight.copy_((weight.float() + updown(tensors, weight, multiplier)).to(weight.dtype))


def split_by_layer(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """networks.load_network's split of each key at its first dot: layer key -> {network part: tensor}."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        stem, _, part = key.partition(".")
        layers.setdefault(stem, {})[part] = tensor
    return layers


def sd2_text_compvis_name(key: str) -> str | None:
    """convert_diffusers_name_to_compvis for a ``lora_te_`` key when the model is SD2 (its mapping holds
    ``model_transformer_resblocks``): the HF-CLIP names kohya writes back to OpenCLIP's."""
    match = re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key)
    if match is None:
        return None
    rest = match[2]
    if "mlp_fc1" in rest:
        rest = rest.replace("mlp_fc1", "mlp_c_fc")
    elif "mlp_fc2" in rest:
        rest = rest.replace("mlp_fc2", "mlp_c_proj")
    else:
        rest = rest.replace("self_attn", "attn")
    return f"model_transformer_resblocks_{match[1]}_{rest}"


def find_layer(mapping: dict[str, torch.nn.Module], compvis_key: str) -> torch.nn.Module | None:
    """load_network's lookup of a converted key: the name itself, else (a fused attention's q/k/v) the name
    without its ``_q_proj`` / ``_k_proj`` / ``_v_proj``."""
    module = mapping.get(compvis_key)
    if module is None and (match := re.fullmatch(r"(.*)_[qkv]_proj", compvis_key)):
        module = mapping.get(match[1])
    return module

"""Defaults that depend on the model family: ``TrainConfig``'s are a first SD1.5 LoRA; SDXL and SD2 768-v differ.

SDXL was trained at 1024² with buckets from 512 to 2048 (kohya's SDXL docs use the same range). On a GPU the
wall is VRAM: the WebUI already holds ~7 GB of fp16 SDXL, so the SDXL default is what fits a 12 GB card —
the UNet only (SDXL LoRAs of characters and styles are trained that way; the two text encoders' gradients
would add their activations), whose captions are then encoded once and the text encoders can leave the GPU;
gradient checkpointing (activations at 128×128 latents are the largest cost); AdamW8bit (optimizer state a
quarter of AdamW's) when bitsandbytes is there.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..hosts.protocol import ModelFamily, PredictionType
from .config import TrainConfig

# The SD2 768-v models were trained at 768² (the 512 base keeps TrainConfig's 512; kohya's buckets fit both).
_SD2_768_V = {"resolution": 768}
_SDXL = {"resolution": 1024, "min_bucket_reso": 512, "max_bucket_reso": 2048, "text_encoder_lr": 0.0,
         "gradient_checkpointing": True}


def family_overrides(family: ModelFamily | None, on_cuda: bool, has_bitsandbytes: bool,
                     prediction_type: PredictionType = PredictionType.EPSILON) -> dict[str, Any]:
    """The settings whose default for this family (and device, and prediction type) differs from ``TrainConfig``'s."""
    if family is ModelFamily.SD2 and prediction_type is PredictionType.V:
        return dict(_SD2_768_V)
    if family is not ModelFamily.SDXL:
        return {}
    overrides = dict(_SDXL)
    if on_cuda and has_bitsandbytes:
        overrides["optimizer"] = "AdamW8bit"
    return overrides


def defaults_switch(values: dict[str, Any], shown: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """The settings to change when the loaded model's family changes from the one whose defaults the form shows
    (``shown`` overrides) to another (``wanted``): only those still at the shown default, so a value the user
    typed is never overwritten."""
    base = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name != "extra"}
    changes = {}
    for key in set(shown) | set(wanted):
        old, new = shown.get(key, base[key]), wanted.get(key, base[key])
        if key in values and old != new and _same(values[key], old):
            changes[key] = new
    return changes


def _same(value: Any, default: Any) -> bool:
    """Form values come back as floats for integer fields (gradio Number)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return value is default or value == default
    if isinstance(default, (int, float)) and isinstance(value, (int, float)):
        return float(value) == float(default)
    return value == default

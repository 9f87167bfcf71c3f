"""LoRA+: the up weights in their own optimizer groups at lr × ratio, seen in the groups and in a real first step."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lib_train.engine.network import LoRANetwork, is_up_weight
from lib_train.engine.train import train_lora

from .conftest import make_concept_images, tiny_config


def names_of(network: LoRANetwork) -> dict[int, str]:
    return {id(p): f"{module.key}.{name}" for module in network.modules_in_order() for name, p in module.named_parameters()}


def test_groups_split_the_up_weights_by_part(tiny_host):
    network = LoRANetwork.for_host(tiny_host, rank=4, alpha=4.0, conv_rank=2, conv_alpha=1.0)
    plain = network.parameter_groups(1e-3, 5e-4)
    assert [(g["name"], g["lr"]) for g in plain] == [("unet", 1e-3), ("text_encoder", 5e-4)]

    groups = network.parameter_groups(1e-3, 5e-4, unet_up_ratio=4.0, text_encoder_up_ratio=2.0)
    assert [(g["name"], g["lr"]) for g in groups] == [
        ("unet", 1e-3), ("unet plus", pytest.approx(4e-3)), ("text_encoder", 5e-4), ("text_encoder plus", 1e-3)]
    names = names_of(network)
    named = {g["name"]: [names[id(p)] for p in g["params"]] for g in groups}
    assert all(n.endswith(".lora_up.weight") for n in named["unet plus"] + named["text_encoder plus"])
    assert not any("lora_up" in n for n in named["unet"] + named["text_encoder"])
    assert len(named["unet plus"]) == len(network.unet_modules)  # one up weight per module, convs included
    assert len(named["text_encoder plus"]) == len(network.text_encoder_modules)
    everything = [p for g in plain for p in g["params"]]
    assert sorted(map(id, everything)) == sorted(id(p) for g in groups for p in g["params"])


def test_up_weights_are_named_as_kohya_and_lycoris_choose_them():
    assert is_up_weight("lora_unet_x.lora_up.weight") and is_up_weight("3.lora_up.weight")
    # LyCORIS trains LoHa's and LoKr's factors and DoRA's magnitude at the base rate under LoRA+.
    assert not any(map(is_up_weight, ["x.lora_down.weight", "x.hada_w1_a", "x.hada_w2_b", "x.lokr_w1",
                                      "x.lokr_w2_b", "x.dora_scale", "x.alpha"]))


def test_a_first_adamw_step_moves_each_up_weight_by_its_learning_rate(tiny_host, tmp_path):
    """AdamW's first step moves a parameter by lr·g/(|g|+ε) ≈ ±lr; the up weights start at 0, so after one step
    their size is their group's learning rate."""
    make_concept_images(tmp_path / "data" / "1_concept", count=2)

    def one_step(run: str, **overrides) -> dict[str, float]:
        config = tiny_config(tmp_path / "data", tmp_path / run, epochs=1, unet_lr=1e-3, text_encoder_lr=5e-4,
                             **overrides)
        result = train_lora(tiny_host, config)
        assert result.steps == 1
        state = load_file(str(result.saved_files[-1]))
        sizes = {}
        for part in ("lora_unet_", "lora_te_"):
            ups = torch.cat([t.flatten() for k, t in state.items() if k.startswith(part) and "lora_up" in k])
            sizes[part] = float(ups[ups != 0].abs().median())
        return sizes

    assert one_step("plain") == {"lora_unet_": pytest.approx(1e-3, rel=1e-2), "lora_te_": pytest.approx(5e-4, rel=1e-2)}
    # The part's own ratio wins over the common one, as in kohya.
    assert one_step("plus", loraplus_lr_ratio=2.0, loraplus_unet_lr_ratio=4.0) == {
        "lora_unet_": pytest.approx(4e-3, rel=1e-2), "lora_te_": pytest.approx(1e-3, rel=1e-2)}
    with safe_open(str(tmp_path / "plus" / "tiny.safetensors"), "pt") as handle:
        args = json.loads(handle.metadata()["ss_network_args"])
    assert args == {"loraplus_lr_ratio": "2.0", "loraplus_unet_lr_ratio": "4.0", "dropout": None}

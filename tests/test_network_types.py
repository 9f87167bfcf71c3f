"""LoHa, LoKr and DoRA modules on single layers: shapes and forward equal LyCORIS's own modules (lycoris-lora
4.1.3), the built-in Lora's merge (tests/a1111_lora.py) equals our hooked forward at any multiplier, the
settings that do not combine are refused, and a file reloads into identical modules."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lib_train.common.errors import ConfigError
from lib_train.engine.config import TrainConfig
from lib_train.engine.lora_names import LoraTarget
from lib_train.engine.model_guard import fingerprint
from lib_train.engine.network import LoRANetwork, new_module
from lib_train.engine.network_lokr import factorization
from lib_train.engine.network_spec import NetworkSpec
from lib_train.engine.train import train_lora

from . import a1111_lora
from .conftest import make_concept_images, tiny_config

lycoris = pytest.importorskip("lycoris")
from lycoris.functional import factorization as lycoris_factorization  # noqa: E402
from lycoris.modules import LoConModule, LohaModule, LokrModule  # noqa: E402

logging.getLogger("lycoris").setLevel(logging.ERROR)

LAYERS = {
    "linear": lambda: nn.Linear(12, 20),
    "conv3x3_stride2": lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1),
    "conv1x1": lambda: nn.Conv2d(8, 16, 1),
}
# (our spec, LyCORIS's module and arguments for the same settings)
TYPES = {
    "loha": (NetworkSpec("loha", 3, 1.5), lambda layer: LohaModule("x", layer, 1.0, 3, 1.5)),
    "lokr": (NetworkSpec("lokr", 1, 2.0), lambda layer: LokrModule("x", layer, 1.0, 1, 2.0)),
    "lokr_factor_both": (NetworkSpec("lokr", 1, 2.0, lokr_factor=2, decompose_both=True),
                         lambda layer: LokrModule("x", layer, 1.0, 1, 2.0, factor=2, decompose_both=True)),
    "lokr_full": (NetworkSpec("lokr", 64, 4.0), lambda layer: LokrModule("x", layer, 1.0, 64, 4.0)),
    "dora": (NetworkSpec("lora", 3, 1.5, dora=True),
             lambda layer: LoConModule("x", layer, 1.0, 3, 1.5, weight_decompose=True, wd_on_out=False)),
}


def layer_input(layer: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    if isinstance(layer, nn.Linear):
        return torch.randn(2, 3, layer.in_features, generator=generator)
    return torch.randn(2, layer.in_channels, 6, 6, generator=generator)


def ours_for(spec: NetworkSpec, layer: nn.Module):
    return new_module(spec, LoraTarget("x", layer, False))


def randomised_like(module_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(9)
    values = {}
    for name, tensor in module_state.items():
        if name == "alpha":
            values[name] = tensor.clone()
        elif name == "dora_scale":  # a magnitude: positive, near the base norms
            values[name] = tensor * (1 + 0.3 * torch.rand(tensor.shape, generator=generator))
        else:
            values[name] = torch.randn(tensor.shape, generator=generator) * 0.3
    return values


@pytest.mark.parametrize("layer_name", LAYERS)
@pytest.mark.parametrize("type_name", TYPES)
def test_module_equals_lycoris_and_the_builtin_lora(type_name, layer_name):
    torch.manual_seed(0)
    spec, make_lycoris = TYPES[type_name]
    layer = LAYERS[layer_name]()
    theirs = make_lycoris(layer)
    ours = ours_for(spec, layer)
    their_state = {k: v.detach() for k, v in theirs.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_tensors().items()} == {k: tuple(v.shape) for k, v in their_state.items()}
    assert float(ours.alpha) == float(their_state["alpha"])
    if "dora_scale" in their_state:  # both start at the base weight's input-column norms
        torch.testing.assert_close(ours.dora_scale.detach(), their_state["dora_scale"])

    values = randomised_like(their_state)
    theirs.load_state_dict(values)
    with torch.no_grad():
        for name, tensor in ours.state_tensors().items():
            tensor.copy_(values[name])
    x = layer_input(layer)
    before = fingerprint(layer)
    with torch.no_grad():
        base = layer(x)
        theirs.apply_to()
        lycoris_out = layer(x)
        theirs.restore()
        ours.attach()
        our_out = layer(x)
        ours.multiplier = 0.4
        our_out_04 = layer(x)
        ours.detach()
    assert not torch.allclose(our_out, base, atol=1e-3), "the module must change the output"
    # At multiplier 1 (training): LyCORIS's forward. (LyCORIS scales DoRA's rescaling, not ΔW, by other
    # multipliers; the built-in Lora, which users load the file into, interpolates the merged weight.)
    torch.testing.assert_close(our_out, lycoris_out, atol=1e-5, rtol=1e-4)
    for multiplier, out in ((1.0, our_out), (0.4, our_out_04)):
        merged = LAYERS[layer_name]()
        merged.load_state_dict(layer.state_dict())
        a1111_lora.merge_layer(merged, values, multiplier)
        with torch.no_grad():
            torch.testing.assert_close(out, merged(x), atol=1e-5, rtol=1e-4)
    assert fingerprint(layer) == before


def test_factorization_equals_lycoris():
    for dimension in range(1, 400):
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 64):
            assert factorization(dimension, factor) == lycoris_factorization(dimension, factor), (dimension, factor)
    assert factorization(1280, -1) == lycoris_factorization(1280, -1) and factorization(5120, 8) == (8, 640)


def test_lokr_with_no_low_rank_side_is_written_as_lycoris_does():
    """Both Kronecker factors full: LyCORIS stores alpha = rank and applies scale 1; so does the built-in Lora."""
    module = ours_for(NetworkSpec("lokr", 64, 4.0), nn.Linear(12, 20))
    assert set(module.state_tensors()) == {"lokr_w1", "lokr_w2", "alpha"}
    assert float(module.alpha) == 64 and module.scale == 1.0


def test_dora_reads_a_half_precision_base_weight_and_never_writes_it():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8).to(torch.bfloat16).requires_grad_(False)  # frozen, as in training
    before = fingerprint(layer)
    module = ours_for(NetworkSpec("lora", 2, 2.0, dora=True), layer)
    assert module.dora_scale.dtype == torch.float32
    torch.testing.assert_close(module.dora_scale.detach(), layer.weight.float().norm(dim=0, keepdim=True))
    with torch.no_grad():
        nn.init.normal_(module.lora_up.weight)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    module.attach()
    out = layer(x)
    out.float().sum().backward()
    module.detach()
    assert out.dtype == torch.bfloat16 and module.dora_scale.grad is not None
    assert fingerprint(layer) == before


@pytest.mark.parametrize("settings, message", [
    (dict(network_type="loha", dora=True), "DoRA .* not to LoHa"),
    (dict(network_type="lokr", dora=True), "not to LoKr"),
    (dict(network_type="locon"), "LoCon also trains the 3x3 convolutions"),
    (dict(network_type="loha", lokr_factor=8), "LoKr factor and decompose-both apply to LoKr only"),
    (dict(decompose_both=True), "apply to LoKr only"),
    (dict(network_type="lokr", lokr_factor=0), "LoKr factor must be -1"),
    (dict(network_type="boft"), "Network type must be one of lora, locon, loha, lokr"),
])
def test_settings_that_do_not_combine_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(name="n", train_dir="d", output_dir="o", **settings).validate()


def test_settings_from_toml_values():
    config = TrainConfig.from_dict({"name": "n", "train_dir": "d", "output_dir": "o", "network_type": "lokr",
                                    "lokr_factor": 8, "decompose_both": "true", "conv_rank": 4}).validate()
    assert (config.network_type, config.lokr_factor, config.decompose_both) == ("lokr", 8, True)


NETWORKS = {
    "loha_conv": dict(network_type="loha", rank=2, alpha=1.0, conv_rank=2, conv_alpha=2.0),
    "lokr_conv": dict(network_type="lokr", rank=2, alpha=1.0, conv_rank=4, conv_alpha=1.0, lokr_factor=4),
    "locon_dora": dict(network_type="locon", dora=True, rank=2, alpha=1.0, conv_rank=2, conv_alpha=1.0),
}


@pytest.mark.parametrize("name", NETWORKS)
def test_a_file_reloads_into_identical_modules(tiny_host, tmp_path, name):
    network = LoRANetwork.for_host(tiny_host, seed=4, **NETWORKS[name])
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    state = network.kohya_state_dict()
    save_file(state, str(tmp_path / "x.safetensors"))
    reloaded = LoRANetwork.for_kohya_state_dict(tiny_host, load_file(str(tmp_path / "x.safetensors")))
    assert [type(m) for m in reloaded.modules_in_order()] == [type(m) for m in network.modules_in_order()]
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([300, 700])
    outputs = []
    for net in (network, reloaded):
        with net.attached(), torch.no_grad():
            outputs.append(tiny_host.predict(x, t, tiny_host.encode_captions(["a red circle", "a hat"])))
    assert torch.equal(outputs[0], outputs[1])


def test_unsupported_lycoris_tensors_are_refused_by_name(tiny_host):
    state = LoRANetwork.for_host(tiny_host, rank=2, alpha=1.0, network_type="loha").kohya_state_dict()
    key = next(k for k in state if k.endswith(".hada_w1_a")).rsplit(".", 1)[0]
    state[f"{key}.hada_t1"] = torch.zeros(2, 2, 1, 1)
    with pytest.raises(ValueError, match="Tucker"):
        LoRANetwork.for_kohya_state_dict(tiny_host, state)
    dora = LoRANetwork.for_host(tiny_host, rank=2, alpha=1.0, dora=True).kohya_state_dict()
    key = next(k for k in dora if k.endswith(".dora_scale"))
    dora[key] = torch.ones(dora[key].shape[1], 1)  # LyCORIS's default axis: one magnitude per output channel
    with pytest.raises(ValueError, match="per output channel"):
        LoRANetwork.for_kohya_state_dict(tiny_host, dora)


@pytest.mark.parametrize("name", NETWORKS)
def test_each_type_trains_under_bf16_autocast(tiny_host, tmp_path, name):
    """Mixed precision: ΔW is built in float32 and cast by autocast where it meets the activations."""
    make_concept_images(tmp_path / "data" / "2_concept", count=2)
    before = fingerprint(tiny_host.model)
    result = train_lora(tiny_host, tiny_config(tmp_path / "data", tmp_path / "out", epochs=1, mixed_precision="bf16",
                                               **NETWORKS[name]))
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.loss_history)
    state = load_file(str(result.saved_files[-1]))
    # The factors that start at zero (LoRA up, LoHa w2_a, LoKr w2_b / w2) have moved.
    assert any(state[k].abs().sum() > 0 for k in state if k.endswith(("lora_up.weight", "hada_w2_a", "lokr_w2_b")))
    assert fingerprint(tiny_host.model) == before

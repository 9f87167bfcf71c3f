"""LoRA modules: the forward formula, attach/detach hygiene, the kohya state dict."""

from __future__ import annotations

import torch
from torch import nn

from lib_train.engine.model_guard import fingerprint, hook_count
from lib_train.engine.network import LoRANetwork
from lib_train.engine.network_lora import LoRAModule


def test_linear_forward_is_base_plus_scaled_up_down():
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    lora = LoRAModule("lora_unet_x", base, rank=4, alpha=2.0)
    nn.init.normal_(lora.lora_up.weight)
    x = torch.randn(3, 5, 8)
    lora.multiplier = 0.7
    expected = base(x) + (x @ lora.lora_down.weight.T @ lora.lora_up.weight.T) * (2.0 / 4) * 0.7
    lora.attach()
    assert torch.allclose(base(x), expected, atol=1e-6)
    lora.detach()
    assert torch.equal(base(x), x @ base.weight.T + base.bias)


def test_conv_lora_keeps_kernel_stride_padding_and_merges_like_kohya():
    torch.manual_seed(0)
    base = nn.Conv2d(4, 8, 3, stride=2, padding=1)
    lora = LoRAModule("lora_unet_down_blocks_0_downsamplers_0_conv", base, rank=2, alpha=1.0)
    nn.init.normal_(lora.lora_up.weight)
    assert lora.lora_down.weight.shape == (2, 4, 3, 3) and lora.lora_up.weight.shape == (8, 2, 1, 1)
    x = torch.randn(2, 4, 8, 8)
    # kohya's merge: ΔW = (up.flatten(1) @ down.flatten(1)).reshape(W.shape) * alpha / rank
    delta_w = (lora.lora_up.weight.flatten(1) @ lora.lora_down.weight.flatten(1)).reshape(base.weight.shape) * 0.5
    expected = nn.functional.conv2d(x, base.weight + delta_w, base.bias, stride=2, padding=1)
    with torch.no_grad():
        lora.attach()
        assert torch.allclose(base(x), expected, atol=1e-5)
        lora.detach()


def test_lora_weights_are_float32_on_half_base():
    base = nn.Linear(8, 8).to(torch.bfloat16)
    lora = LoRAModule("k", base, rank=2, alpha=1.0)
    assert lora.lora_down.weight.dtype == lora.lora_up.weight.dtype == lora.alpha.dtype == torch.float32
    lora.attach()
    out = base(torch.randn(2, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    lora.detach()


def test_network_attach_detach_leaves_host_identical(tiny_host):
    model = tiny_host.model
    before = fingerprint(model)
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([500])
    cond = tiny_host.encode_captions(["a red circle"])
    reference = tiny_host.predict(x, t, cond)

    network = LoRANetwork.for_host(tiny_host, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, seed=3)
    # 278 at full size; the tiny UNet keeps 32 channels into level 1, so one ResBlock has no conv_shortcut.
    assert len(network.unet_modules) == 277 and len(network.text_encoder_modules) == 2 * 6
    with network.attached():
        assert hook_count(model) == len(network.unet_modules) + len(network.text_encoder_modules)
        # Zero-initialised up weights: attaching alone changes nothing.
        assert torch.equal(tiny_host.predict(x, t, tiny_host.encode_captions(["a red circle"])), reference)
        for module in network.modules_in_order():
            nn.init.normal_(module.lora_up.weight, std=0.05)
        changed = tiny_host.predict(x, t, tiny_host.encode_captions(["a red circle"]))
        assert not torch.allclose(changed, reference)
    assert hook_count(model) == 0
    assert fingerprint(model) == before
    assert torch.equal(tiny_host.predict(x, t, tiny_host.encode_captions(["a red circle"])), reference)


def test_kohya_state_dict_shapes_and_round_trip(tiny_host):
    network = LoRANetwork.for_host(tiny_host, rank=4, alpha=8.0, seed=1)
    state = network.kohya_state_dict()
    assert len(state) == 3 * (192 + 12)
    for key, tensor in state.items():
        if key.endswith(".alpha"):
            assert tensor.dim() == 0 and float(tensor) == 8.0
    attn = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert state[f"{attn}.lora_down.weight"].dim() == 2  # Linear targets are 2-D
    assert state["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape[2:] == (1, 1)

    other = LoRANetwork.for_host(tiny_host, rank=4, alpha=8.0, seed=2)
    assert not torch.equal(other.kohya_state_dict()[f"{attn}.lora_down.weight"], state[f"{attn}.lora_down.weight"])
    other.load_kohya_state_dict(state)
    assert all(torch.equal(other.kohya_state_dict()[k], v) for k, v in state.items())

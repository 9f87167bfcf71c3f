"""LoHa, LoKr and DoRA trained for real on the tiny SD1 and SDXL: the loss falls and the host comes back
unchanged; the file has exactly the keys and shapes LyCORIS (lycoris.kohya 4.1.3) creates from the file's own
ss_network_args; the built-in Lora (tests/a1111_lora.py) matches every key and its merge equals our hooked
forward; per-sample multipliers (the preview grid) equal separate passes."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lib_train.dataset.training_data import load_rgb, pixels_to_tensor
from lib_train.engine.model_guard import fingerprint, hook_count
from lib_train.engine.network import LoRANetwork
from lib_train.engine.train import train_lora
from lib_train.hosts.protocol import SizeCondition
from lib_train.hosts.sd1 import build_tiny_sd1
from lib_train.hosts.sdxl import build_tiny_sdxl
from lib_train.hosts.standalone import StandaloneHost
from lib_train.hosts.standalone_sdxl import StandaloneSDXLHost
from lib_train.preview.lora_batching import per_sample_unet_weights, text_encoder_weight

from . import a1111_lora
from .conftest import make_concept_images, tiny_config
from .test_lora_names import a1111_compvis_name, webui_layer_mapping
from .test_sdxl import a1111_sdxl_module, webui_sdxl_mapping
from .test_training import eval_loss

lycoris_kohya = pytest.importorskip("lycoris.kohya")
toml = pytest.importorskip("toml")
from lycoris.config import PRESET  # noqa: E402

logging.getLogger("lycoris").setLevel(logging.ERROR)

SD1_TYPES = {
    "loha_conv": dict(network_type="loha", conv_rank=2, conv_alpha=1.0),
    "lokr": dict(network_type="lokr", rank=2),
    "lokr_conv_factor_both": dict(network_type="lokr", conv_rank=2, conv_alpha=1.0, lokr_factor=4, decompose_both=True),
    "dora": dict(dora=True),
    "locon_dora": dict(network_type="locon", dora=True, conv_rank=2, conv_alpha=1.0),
}
SDXL_TYPES = {
    "loha_conv": dict(network_type="loha", conv_rank=2, conv_alpha=1.0),
    "lokr": dict(network_type="lokr", rank=2),
    "locon_dora": dict(network_type="locon", dora=True, conv_rank=2, conv_alpha=1.0),
}
WEIGHTS = [0.0, 0.5, 1.0]


def metadata_of(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def train(host, tmp_path, settings: dict, epochs: int):
    """A real run (fp32 file), with the loss on fixed noise before and after and the host's fingerprint."""
    data = make_concept_images(tmp_path / "data" / "4_concept", count=4)
    before = fingerprint(host.model)
    config = tiny_config(tmp_path / "data", tmp_path / "out", epochs=epochs, save_every_n_epochs=0, batch_size=4,
                         unet_lr=1e-2, text_encoder_lr=5e-3, **settings)
    path = train_lora(host, config).saved_files[-1]
    restored = fingerprint(host.model) == before and hook_count(host.model) == 0
    pictures = sorted(data.glob("*.png"))
    with torch.no_grad():
        latents = host.encode_images(pixels_to_tensor([load_rgb(p) for p in pictures]))
    captions = [p.with_suffix(".txt").read_text() for p in pictures]
    sizes = [SizeCondition((64, 64), (0, 0), (64, 64))] * 4 if isinstance(host, StandaloneSDXLHost) else None
    state = load_file(str(path))
    losses = (eval_loss(host, latents, captions, None, sizes), eval_loss(host, latents, captions, state, sizes))
    return path, state, restored, losses


def lycoris_shapes(path, text_encoders, unet, preset: dict, tmp_path) -> dict[str, tuple]:
    """What lycoris.kohya creates from the file's own metadata (as sd-scripts would with --network_args)."""
    metadata = metadata_of(path)
    preset_path = tmp_path / "preset.toml"
    preset_path.write_text(toml.dumps(preset))
    network = lycoris_kohya.create_network(1.0, int(metadata["ss_network_dim"]), float(metadata["ss_network_alpha"]),
                                           None, text_encoders, unet, preset=str(preset_path),
                                           **json.loads(metadata["ss_network_args"]))
    network.apply_to(text_encoders, unet, apply_text_encoder=True, apply_unet=True)
    return {key: tuple(tensor.shape) for key, tensor in network.state_dict().items()}


def builtin_lora_tensors(state) -> dict[str, dict[str, torch.Tensor]]:
    """The file split per layer as the built-in Lora reads it; every layer's tensors taken by one module type,
    none left unread."""
    layers = a1111_lora.split_by_layer(state)
    for stem, tensors in layers.items():
        kind = a1111_lora.module_type(tensors)
        assert kind in a1111_lora.READS, (stem, sorted(tensors))
        assert set(tensors) <= a1111_lora.READS[kind] | a1111_lora.COMMON, (stem, sorted(tensors))
    return layers


# --- SD1 ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=SD1_TYPES)
def sd1_run(request, tmp_path_factory):
    torch.set_num_threads(1)
    host = StandaloneHost(build_tiny_sd1(seed=0))
    path, state, restored, losses = train(host, tmp_path_factory.mktemp(request.param), SD1_TYPES[request.param], 6)
    return request.param, host, path, state, restored, losses


def test_sd1_trains_saves_and_restores_the_host(sd1_run):
    name, host, path, state, restored, (untrained, trained) = sd1_run
    assert restored
    assert trained < untrained * 0.9, (name, untrained, trained)
    metadata = metadata_of(path)
    assert metadata["ss_network_module"] == "lycoris.kohya"
    args = json.loads(metadata["ss_network_args"])
    settings = SD1_TYPES[name]
    assert args["algo"] == settings.get("network_type", "lora")
    assert args["conv_dim"] == str(settings.get("conv_rank", 0)) and args["dropout"] is None
    assert ("dora_wd" in args) == settings.get("dora", False)
    assert metadata["ss_network_dim"] == str(settings.get("rank", 4)) and metadata["ss_network_alpha"] == "4.0"


def test_sd1_keys_and_shapes_equal_lycoris(sd1_run, tmp_path):
    from .test_diffusers_consumer import diffusers_twins

    _, _, path, state, _, _ = sd1_run
    unet, text_encoder = diffusers_twins()  # the layout kohya's SD1 UNet copies, so the names LyCORIS gives it
    preset = dict(PRESET["full"])
    # LyCORIS 4.1.3 lists Anima's TimestepEmbedding class, which makes it name SD1's time_embedding.linear_1 twice
    # (a container and a target name) and stop; without it, the same layers once.
    preset["unet_target_module"] = [m for m in preset["unet_target_module"] if m != "TimestepEmbedding"]
    expected = lycoris_shapes(path, text_encoder, unet, preset, tmp_path)
    assert {key: tuple(tensor.shape) for key, tensor in state.items()} == expected


@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_sd1_builtin_lora_merge_equals_our_forward(sd1_run, multiplier):
    _, host, _, state, _, _ = sd1_run
    merged = build_tiny_sd1(seed=0)
    mapping = webui_layer_mapping(merged)
    for stem, tensors in builtin_lora_tensors(state).items():
        module = mapping.get(a1111_compvis_name(stem) or "")
        assert module is not None, f"the built-in Lora cannot map {stem}"
        a1111_lora.merge_layer(module, tensors, multiplier)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    timesteps, captions = torch.tensor([250, 750]), ["ttconcept, red circle", "a hat"]
    merged_host = StandaloneHost(merged)
    network = LoRANetwork.for_kohya_state_dict(host, state)
    network.set_multiplier(multiplier)
    with torch.no_grad():
        expected = merged_host.predict(latents, timesteps, merged_host.encode_captions(captions))
        base = host.predict(latents, timesteps, host.encode_captions(captions))
        with network.attached():
            ours = host.predict(latents, timesteps, host.encode_captions(captions))
    assert not torch.allclose(ours, base, atol=1e-3)
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_sd1_per_sample_multipliers_equal_separate_passes(sd1_run):
    """Each row of a batch at its own weight equals that row of the same batch at one weight (same batch size:
    the CPU kernels of the base model itself differ in the last bits between batch sizes)."""
    _, host, _, state, _, _ = sd1_run
    network = LoRANetwork.for_kohya_state_dict(host, state)
    generator = torch.Generator().manual_seed(3)
    rows = 2 * len(WEIGHTS)  # classifier-free guidance layout: cond rows of every image, then uncond rows
    latents = torch.randn(rows, 4, 8, 8, generator=generator)
    timesteps = torch.full((rows,), 500, dtype=torch.long)
    captions = ["ttconcept, red circle"] * len(WEIGHTS) + ["a hat"] * len(WEIGHTS)
    with network.attached():
        context = host.encode_captions(captions)
        separate = []
        for weight in WEIGHTS:
            network.set_multiplier(weight)
            separate.append(host.predict(latents, timesteps, context))
        network.set_multiplier(1.0)
        with per_sample_unet_weights(network, host.unet, WEIGHTS):
            batched = host.predict(latents, timesteps, context)
        texts = []
        for weight in WEIGHTS:
            with text_encoder_weight(network, weight):
                texts.append(host.encode_captions(captions[:len(WEIGHTS)]))
        with text_encoder_weight(network, torch.tensor(WEIGHTS)):
            text_batched = host.encode_captions(captions[:len(WEIGHTS)])
    expected = torch.stack([separate[row % len(WEIGHTS)][row] for row in range(rows)])
    assert not torch.allclose(separate[0], separate[2], atol=1e-3)
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(texts[0], texts[2], atol=1e-4)
    torch.testing.assert_close(text_batched, torch.stack([texts[i][i] for i in range(len(WEIGHTS))]),
                               atol=1e-5, rtol=1e-4)


# --- SDXL (the text encoder 2 is OpenCLIP's fused attention) --------------------------------------------------


@pytest.fixture(scope="module", params=SDXL_TYPES)
def sdxl_run(request, tmp_path_factory):
    torch.set_num_threads(1)
    host = StandaloneSDXLHost(build_tiny_sdxl(seed=0))
    path, state, restored, losses = train(host, tmp_path_factory.mktemp(request.param), SDXL_TYPES[request.param], 4)
    return request.param, host, path, state, restored, losses


def test_sdxl_trains_every_part_and_restores_the_host(sdxl_run):
    name, _, _, state, restored, (untrained, trained) = sdxl_run
    assert restored
    assert trained < untrained * 0.95, (name, untrained, trained)
    trained_parts = {key.split("_")[1] for key, tensor in state.items()
                     if not key.endswith((".alpha", ".dora_scale")) and tensor.abs().sum() > 0}
    assert trained_parts == {"unet", "te1", "te2"}


def test_sdxl_keys_and_shapes_equal_lycoris(sdxl_run, tmp_path):
    from .test_diffusers_consumer import diffusers_sdxl_twins

    _, _, path, state, _, _ = sdxl_run
    _, text_encoder_1, text_encoder_2 = diffusers_sdxl_twins()  # HF CLIP twins: LyCORIS cannot see fused attention
    preset = dict(PRESET["full"])
    # kohya's SDXL UNet is the sgm tree under diffusers class names (library/sdxl_original_unet.py): the same
    # children, and no conv_in / time_embedding names.
    preset["unet_target_module"] = ["SpatialTransformer", "ResBlock", "Downsample", "Upsample"]
    expected = lycoris_shapes(path, [text_encoder_1, text_encoder_2], build_tiny_sdxl(seed=0).unet, preset, tmp_path)
    assert {key: tuple(tensor.shape) for key, tensor in state.items()} == expected


def test_sdxl_builtin_lora_merge_equals_our_forward(sdxl_run):
    _, host, _, state, _, _ = sdxl_run
    merged = build_tiny_sdxl(seed=0)
    mapping = webui_sdxl_mapping(merged)
    attention_parts: dict[int, dict[str, dict]] = {}
    for stem, tensors in builtin_lora_tensors(state).items():
        assert a1111_sdxl_module(stem, mapping) is not None, f"the built-in Lora cannot map {stem}"
        if m := re.fullmatch(r"lora_te2_text_model_encoder_layers_(\d+)_self_attn_(q|k|v|out)_proj", stem):
            attention_parts.setdefault(int(m[1]), {})[m[2]] = tensors
        else:
            a1111_lora.merge_layer(a1111_sdxl_module(stem, mapping), tensors, 0.7)
    for index, parts in attention_parts.items():
        a1111_lora.merge_attention(merged.text_encoder_2.transformer.resblocks[index].attn, parts, 0.7)

    merged_host = StandaloneSDXLHost(merged)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    timesteps, captions = torch.tensor([250, 750]), ["ttconcept, red circle", "a hat"]
    sizes = [SizeCondition((64, 64), (0, 0), (64, 64))] * 2
    network = LoRANetwork.for_kohya_state_dict(host, state)
    network.set_multiplier(0.7)
    with torch.no_grad():
        expected_text = merged_host.encode_captions(captions)
        expected = merged_host.predict(latents, timesteps, merged_host.unet_conditioning(expected_text, sizes))
        with network.attached():
            text = host.encode_captions(captions)
            ours = host.predict(latents, timesteps, host.unet_conditioning(text, sizes))
    for part in ("crossattn", "pooled"):
        torch.testing.assert_close(text[part], expected_text[part], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)

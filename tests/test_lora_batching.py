"""Preview fast path: per-sample Lora weights in one batch, and epoch tensors swapped in place."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lib_train.engine.model_guard import fingerprint, hook_count
from lib_train.engine.network import LoRANetwork
from lib_train.engine.train import train_lora
from lib_train.preview.lora_batching import per_sample_unet_weights, text_encoder_weight
from tests.conftest import make_concept_images, tiny_config

WEIGHTS = [0.0, 0.5, 1.0]


@pytest.fixture(scope="module")
def epoch_files(tmp_path_factory):
    """Two epochs of a real training run on the tiny model (UNet with conv LoRA, and text encoder)."""
    from lib_train.hosts.standalone import StandaloneHost
    from lib_train.hosts.sd1 import build_tiny_sd1

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("epochs")
    config = tiny_config(make_concept_images(root / "data"), root / "out", conv_rank=2, conv_alpha=1.0,
                         unet_lr=5e-3, text_encoder_lr=5e-3)
    result = train_lora(StandaloneHost(build_tiny_sd1(seed=0)), config)
    files = sorted(p for p in result.saved_files if p.suffix == ".safetensors")
    assert [p.name for p in files] == ["tiny-000001.safetensors", "tiny.safetensors"]
    return files


def _unet_inputs(host, rows: int):
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(rows, 4, 8, 8, generator=generator)
    timesteps = torch.full((rows,), 500, dtype=torch.long)
    context = host.encode_captions(["ttconcept, red circle"] * rows)
    return latents, timesteps, context


@torch.no_grad()
def test_unet_per_sample_weights_equal_separate_passes(tiny_host, epoch_files):
    network = LoRANetwork.for_kohya_state_dict(tiny_host, load_file(epoch_files[1]))
    latents, timesteps, context = _unet_inputs(tiny_host, len(WEIGHTS))
    with network.attached():
        separate = []
        for index, weight in enumerate(WEIGHTS):
            network.set_multiplier(weight)
            separate.append(tiny_host.predict(latents[index:index + 1], timesteps[:1], context[index:index + 1]))
        network.set_multiplier(1.0)
        separate = torch.cat(separate)
        with per_sample_unet_weights(network, tiny_host.unet, WEIGHTS):
            batched = tiny_host.predict(latents, timesteps, context)
            # Classifier-free guidance layout: cond rows of every image, then uncond rows of every image.
            doubled = tiny_host.predict(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]),
                                        torch.cat([context, context]))
    assert not torch.allclose(separate[0], separate[2], atol=1e-4), "the weights must make a difference"
    torch.testing.assert_close(batched, separate, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(doubled, torch.cat([separate, separate]), atol=1e-5, rtol=1e-4)
    assert all(module.multiplier == 1.0 for module in network.modules_in_order())


@torch.no_grad()
def test_unet_rows_not_matching_the_weights_are_refused(tiny_host, epoch_files):
    network = LoRANetwork.for_kohya_state_dict(tiny_host, load_file(epoch_files[0]))
    latents, timesteps, context = _unet_inputs(tiny_host, 4)
    with network.attached(), per_sample_unet_weights(network, tiny_host.unet, WEIGHTS):
        with pytest.raises(ValueError, match="not a multiple of the 3 Lora weights"):
            tiny_host.predict(latents, timesteps, context)


@torch.no_grad()
def test_text_encoder_per_sample_weights_equal_separate_passes(tiny_host, epoch_files):
    network = LoRANetwork.for_kohya_state_dict(tiny_host, load_file(epoch_files[1]))
    assert len(network.text_encoder_modules) > 0
    captions = ["ttconcept, red circle"] * len(WEIGHTS)
    with network.attached():
        separate = []
        for weight in WEIGHTS:
            with text_encoder_weight(network, weight):
                separate.append(tiny_host.encode_captions(captions[:1]))
        with text_encoder_weight(network, torch.tensor(WEIGHTS)):
            batched = tiny_host.encode_captions(captions)
    assert not torch.allclose(separate[0], separate[2], atol=1e-4)
    torch.testing.assert_close(batched, torch.cat(separate), atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_swapping_epoch_tensors_equals_loading_each_file_fresh(tiny_host, epoch_files):
    latents, timesteps, context = _unet_inputs(tiny_host, 1)
    before = fingerprint(tiny_host.unet)

    def render(network: LoRANetwork) -> torch.Tensor:
        with network.attached():
            return tiny_host.predict(latents, timesteps, tiny_host.encode_captions(["ttconcept"]))

    fresh = [render(LoRANetwork.for_kohya_state_dict(tiny_host, load_file(f))) for f in epoch_files]
    swapped_network = LoRANetwork.for_kohya_state_dict(tiny_host, load_file(epoch_files[0]))
    swapped = []
    for path in [*epoch_files, epoch_files[0]]:
        swapped_network.load_kohya_state_dict(load_file(path))
        swapped.append(render(swapped_network))
    assert not torch.equal(fresh[0], fresh[1])
    assert torch.equal(swapped[0], fresh[0]) and torch.equal(swapped[1], fresh[1]) and torch.equal(swapped[2], fresh[0])
    assert fingerprint(tiny_host.unet) == before and hook_count(tiny_host.unet) == 0


def test_a_file_for_another_model_is_refused(tiny_host, epoch_files):
    state = load_file(epoch_files[0])
    state["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="match no layer"):
        LoRANetwork.for_kohya_state_dict(tiny_host, state)

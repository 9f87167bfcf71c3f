"""Real training steps on the tiny SD1: learning, determinism, restore guarantees, stop and NaN."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lib_train.common.errors import ConfigError, TrainingDiverged
from lib_train.dataset.training_data import load_rgb, pixels_to_tensor
from lib_train.engine.config import TrainConfig
from lib_train.engine.loss import diffusion_loss, training_target
from lib_train.engine.model_guard import fingerprint, hook_count
from lib_train.engine.network import LoRANetwork
from lib_train.engine.noise import Noising
from lib_train.engine.train import train_lora
from lib_train.hosts.sd1 import build_tiny_sd1
from lib_train.hosts.standalone import StandaloneHost

from .conftest import make_concept_images, tiny_config


def eval_loss(host, latents, captions, state=None, sizes=None, alphas_cumprod=None) -> float:
    """Loss on fixed noise and timesteps against the host's own target (noise or velocity), with the given LoRA
    state attached (or the bare model); ``sizes`` for SDXL, ``alphas_cumprod`` for another schedule."""
    generator = torch.Generator().manual_seed(1234)
    schedule = host.alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
    losses = []
    network = None
    if state is not None:
        network = LoRANetwork.for_kohya_state_dict(host, state)
        network.attach()
    with torch.no_grad():
        for _ in range(8):
            noisy, noise, t = Noising(schedule).sample(latents, generator)
            cond = host.unet_conditioning(host.encode_captions(captions), sizes)
            target = training_target(host.prediction_type, latents, noise, schedule, t)
            losses.append(float(diffusion_loss(host.predict(noisy, t, cond), target)))
    if network is not None:
        network.detach()
    return sum(losses) / len(losses)


def full_fingerprint(host: StandaloneHost) -> str:
    return fingerprint(host.model)


def test_training_lowers_the_loss(tiny_host, tmp_path):
    make_concept_images(tmp_path / "data" / "4_concept", count=4)
    config = tiny_config(tmp_path / "data", tmp_path / "out", epochs=6, save_every_n_epochs=0, batch_size=4,
                         unet_lr=1e-2, text_encoder_lr=5e-3)
    result = train_lora(tiny_host, config)
    assert result.steps == result.total_steps == 6 * 4  # 4 images x 4 repeats / batch 4 per epoch
    state = load_file(str(result.saved_files[-1]))

    images = [load_rgb(p) for p in sorted((tmp_path / "data" / "4_concept").glob("*.png"))]
    pixels = pixels_to_tensor(images)
    with torch.no_grad():
        latents = tiny_host.encode_images(pixels)
    captions = [(p.with_suffix(".txt")).read_text() for p in sorted((tmp_path / "data" / "4_concept").glob("*.png"))]
    before = eval_loss(tiny_host, latents, captions)
    after = eval_loss(tiny_host, latents, captions, state)
    assert after < before * 0.9, (before, after)


def test_same_seed_gives_bit_identical_lora(tmp_path):
    make_concept_images(tmp_path / "data" / "2_concept", count=4)
    states = []
    for run in range(2):
        host = StandaloneHost(build_tiny_sd1(seed=0))
        config = tiny_config(tmp_path / "data", tmp_path / f"out{run}", epochs=2, shuffle_caption=True,
                             flip_aug=True, caption_dropout_rate=0.2)
        result = train_lora(host, config)
        states.append(load_file(str(result.saved_files[-1])))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(states[0][k].abs().sum() > 0 for k in states[0] if "lora_up" in k)


def test_host_identical_after_training_and_every_epoch_saved(tiny_host, tmp_path):
    make_concept_images(tmp_path / "data" / "1_concept", count=4)
    before = full_fingerprint(tiny_host)
    flags = [p.requires_grad for p in tiny_host.model.parameters()]
    config = tiny_config(tmp_path / "data", tmp_path / "out", epochs=3, gradient_checkpointing=True,
                         min_snr_gamma=5.0, noise_offset=0.05, lr_scheduler="cosine", lr_warmup_steps=1,
                         gradient_accumulation_steps=2)
    result = train_lora(tiny_host, config)
    assert [p.name for p in result.saved_files] == ["tiny-000001.safetensors", "tiny-000002.safetensors", "tiny.safetensors"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["tiny-000001.safetensors", "tiny-000001.json", "tiny-000002.safetensors", "tiny-000002.json",
         "tiny.safetensors", "tiny.json"])
    assert full_fingerprint(tiny_host) == before
    assert [p.requires_grad for p in tiny_host.model.parameters()] == flags
    assert all(p.grad is None for p in tiny_host.model.parameters())
    assert hook_count(tiny_host.model) == 0
    assert [p.phase for p in tiny_host.progress_log][-1] == "done"


def test_host_restored_after_exception_inside_a_step(tiny_host, tmp_path, monkeypatch):
    make_concept_images(tmp_path / "data" / "1_concept", count=4)
    # The WebUI leaves its UNet with requires_grad=True; those flags must come back too.
    tiny_host.model.unet.requires_grad_(True)
    before = full_fingerprint(tiny_host)
    calls = {"n": 0}
    real_predict = tiny_host.predict

    def failing_predict(*args):
        calls["n"] += 1
        if calls["n"] == 2:  # the second step of epoch 1, before anything is saved
            raise RuntimeError("CUDA out of memory (simulated inside a step)")
        return real_predict(*args)

    monkeypatch.setattr(tiny_host, "predict", failing_predict)
    with pytest.raises(RuntimeError, match="out of memory"):
        train_lora(tiny_host, tiny_config(tmp_path / "data", tmp_path / "out", gradient_checkpointing=True))
    monkeypatch.undo()
    assert full_fingerprint(tiny_host) == before
    assert hook_count(tiny_host.model) == 0
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_stop_between_steps_keeps_saved_epochs_and_restores(tiny_host, tmp_path):
    make_concept_images(tmp_path / "data" / "2_concept", count=4)
    before = full_fingerprint(tiny_host)

    def stop_in_epoch_two(progress):
        if progress.phase == "training" and progress.epoch == 2:
            tiny_host.request_stop()

    tiny_host._on_progress = stop_in_epoch_two
    result = train_lora(tiny_host, tiny_config(tmp_path / "data", tmp_path / "out", epochs=3))
    assert result.stopped
    assert [p.name for p in result.saved_files] == ["tiny-000001.safetensors"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tiny-000001.json", "tiny-000001.safetensors"]
    assert full_fingerprint(tiny_host) == before and hook_count(tiny_host.model) == 0


def test_nan_loss_stops_with_a_clear_message(tiny_host, tmp_path, monkeypatch):
    make_concept_images(tmp_path / "data" / "1_concept", count=2)
    before = full_fingerprint(tiny_host)
    real_predict = tiny_host.predict
    monkeypatch.setattr(tiny_host, "predict", lambda *a: real_predict(*a) * float("nan"))
    with pytest.raises(TrainingDiverged, match="loss became nan at step 1") as raised:
        train_lora(tiny_host, tiny_config(tmp_path / "data", tmp_path / "out"))
    # The advice fits the run: this one was fp32, so no word of fp16.
    assert "already in full precision (fp32): lower the learning rate" in str(raised.value)
    assert "fp16" not in str(raised.value) and "bf16" not in str(raised.value)
    with pytest.raises(TrainingDiverged, match="choose no mixed precision") as raised:
        train_lora(tiny_host, tiny_config(tmp_path / "data", tmp_path / "out", mixed_precision="bf16"))
    assert "fp16" not in str(raised.value)
    monkeypatch.undo()
    assert full_fingerprint(tiny_host) == before and hook_count(tiny_host.model) == 0


@pytest.mark.parametrize("mixed_precision, expected", [
    ("fp16", "choose bf16 or no mixed precision: fp16 overflows"),  # fp16 autocast (CUDA only)
    ("no", "The loaded model runs in fp16"),  # no autocast asked, but the WebUI holds fp16 weights
])
def test_nan_advice_on_fp16_runs(tmp_path, mixed_precision, expected):
    from lib_train.engine.steps import _divergence_advice
    config = tiny_config(tmp_path, tmp_path, mixed_precision=mixed_precision)
    assert expected in _divergence_advice(config, torch.float16)


def test_unet_only_training_leaves_text_encoder_untrained(tiny_host, tmp_path):
    make_concept_images(tmp_path / "data" / "1_concept", count=2)
    result = train_lora(tiny_host, tiny_config(tmp_path / "data", tmp_path / "out", text_encoder_lr=0.0, epochs=1))
    state = load_file(str(result.saved_files[-1]))
    assert not any(k.startswith("lora_te_") for k in state)
    assert len([k for k in state if k.endswith(".alpha")]) == 192


def test_bf16_autocast_on_cpu_trains(tiny_host, tmp_path):
    make_concept_images(tmp_path / "data" / "1_concept", count=2)
    result = train_lora(tiny_host, tiny_config(tmp_path / "data", tmp_path / "out", mixed_precision="bf16", epochs=1))
    assert result.steps == 1 and all(torch.isfinite(torch.tensor(loss)) for _, loss in result.loss_history)


@pytest.mark.parametrize("overrides, message", [
    (dict(mixed_precision="fp16"), "fp16 mixed precision needs a CUDA GPU"),
    (dict(optimizer="AdamW8bit"), "AdamW8bit runs on a CUDA GPU only"),
])
def test_cpu_only_refusals_are_clear(tiny_host, tmp_path, overrides, message):
    make_concept_images(tmp_path / "data" / "1_concept", count=2)
    before = full_fingerprint(tiny_host)
    with pytest.raises(ConfigError, match=message):
        train_lora(tiny_host, tiny_config(tmp_path / "data", tmp_path / "out", **overrides))
    assert full_fingerprint(tiny_host) == before and not (tmp_path / "out").exists()


def test_config_defaults_validate():
    TrainConfig(name="x", train_dir="d", output_dir="o").validate()


def test_cached_conditioning_of_captions_with_different_chunk_counts(tiny_host):
    """The WebUI encodes a caption over 75 tokens into 154 positions; a batch mixing lengths must still stack."""
    from lib_train.engine.text_cache import ConditioningCache

    class ChunkingHost:
        def encode_captions(self, captions):
            chunks = max(1 + len(c.split()) // 75 for c in captions)
            parts = [tiny_host.encode_captions(captions) for _ in range(chunks)]
            return torch.cat(parts, dim=1)

    cache = ConditioningCache(ChunkingHost(), cacheable=True)
    short, long = "red circle", " ".join(["tag"] * 80)
    cache.prefill([short, long], chunk=1)
    assert cache.cache[short].shape[0] == 77 and cache.cache[long].shape[0] == 154
    batch = cache.encode([short, long])
    assert batch.shape == (2, 154, 32)
    assert cache.encode([short, short]).shape == (2, 77, 32)
    assert not cache.complete()  # mixed chunk counts are encoded again per batch: the encoders stay
    uniform = ConditioningCache(ChunkingHost(), cacheable=True)
    uniform.prefill([short, "blue square"])
    assert uniform.complete() and not ConditioningCache(ChunkingHost(), cacheable=False).complete()

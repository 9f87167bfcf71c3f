"""Loading SD1 checkpoints in the LDM key layout: safetensors only, clear refusals, exact weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lib_train.common.errors import CheckpointError
from lib_train.hosts.attention import sdpa_attention
from lib_train.hosts.sd1 import TINY_TEXT, TINY_UNET, TINY_VAE, build_tiny_sd1, load_sd1_checkpoint

TINY = dict(unet_config=TINY_UNET, vae_config=TINY_VAE, text_config=TINY_TEXT)


def save_as_checkpoint(model, path, extra=None):
    """What a real SD1 file holds: our three parts under their LDM prefixes, fp16, plus schedule buffers."""
    state = {k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items()
             if not k.endswith("position_ids")}
    state.update(extra or {})
    save_file(state, str(path))


def test_round_trip_keeps_every_weight(tmp_path):
    model = build_tiny_sd1(seed=5)
    path = tmp_path / "tiny.safetensors"
    save_as_checkpoint(model, path, {"alphas_cumprod": torch.ones(1000), "model_ema.decay": torch.tensor(0.999)})
    loaded = load_sd1_checkpoint(path, **TINY)
    original = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert value.dtype == torch.float32 and not value.is_meta, key
        assert torch.equal(value, original[key].to(torch.float16).float()) or key.endswith("position_ids"), key
    assert torch.equal(loaded.text_encoder.text_model.embeddings.position_ids, torch.arange(77).unsqueeze(0))


def test_pickle_formats_are_refused_without_being_read(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"not even opened")
    with pytest.raises(CheckpointError, match="only .safetensors"):
        load_sd1_checkpoint(path)


@pytest.mark.parametrize("content, match", [
    (b"garbage that is not safetensors", "not a readable safetensors"),
    (b"", "not a readable safetensors"),
])
def test_unreadable_files(tmp_path, content, match):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_sd1_checkpoint(path)


def test_other_model_families_and_lora_files_are_named(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1)}, str(lora))
    with pytest.raises(CheckpointError, match="no UNet weights"):
        load_sd1_checkpoint(lora)
    sdxl = tmp_path / "xl.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(1), "conditioner.embedders.0.x": torch.zeros(1)}, str(sdxl))
    with pytest.raises(CheckpointError, match="SDXL"):
        load_sd1_checkpoint(sdxl)


def test_other_families_are_refused_from_the_header_before_any_tensor_is_read(tmp_path, monkeypatch):
    """An SD3 or Flux file (10-23 GB) is named without loading it; so are SD1.5 inpainting and instruct-pix2pix
    models, whose UNet takes 9 or 8 input channels, rather than by a shape mismatch."""
    import safetensors.torch

    from lib_train.hosts.sd2 import load_sd2_checkpoint
    from lib_train.hosts.sdxl import load_sdxl_checkpoint

    files = {}
    for name, tensors in {
        "sd3": {"model.diffusion_model.joint_blocks.0.x": torch.zeros(1), "text_encoders.clip_l.x": torch.zeros(1)},
        "flux": {"model.diffusion_model.double_blocks.0.x": torch.zeros(1)},
        "inpainting": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3),
                       "cond_stage_model.transformer.x": torch.zeros(1)},
        "sd1": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)},
    }.items():
        files[name] = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(files[name]))

    def read_everything(*args, **kwargs):
        raise AssertionError("the whole checkpoint was read before its family was checked")

    monkeypatch.setattr(safetensors.torch, "load_file", read_everything)
    with pytest.raises(CheckpointError, match="sd3.safetensors is an SD3 checkpoint, not SD1.x text-to-image"):
        load_sd1_checkpoint(files["sd3"])
    with pytest.raises(CheckpointError, match="flux.safetensors is a Flux checkpoint, not SD1.x text-to-image"):
        load_sd1_checkpoint(files["flux"])
    with pytest.raises(CheckpointError, match="is an SD1.x inpainting or instruct-pix2pix checkpoint, not SD1.x text-to-image"):
        load_sd1_checkpoint(files["inpainting"])
    with pytest.raises(CheckpointError, match="sd1.safetensors is an SD1.x checkpoint, not SD2.x"):
        load_sd2_checkpoint(files["sd1"])
    with pytest.raises(CheckpointError, match="sd1.safetensors is an SD1.x checkpoint, not an SDXL base model"):
        load_sdxl_checkpoint(files["sd1"])


def test_truncated_architecture_is_refused(tmp_path):
    model = build_tiny_sd1()
    path = tmp_path / "partial.safetensors"
    state = {k: v for k, v in model.state_dict().items() if "first_stage_model" not in k and "position_ids" not in k}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CheckpointError, match="missing, e.g. first_stage_model"):
        load_sd1_checkpoint(path, **TINY)


def test_missing_file():
    with pytest.raises(CheckpointError, match="not found"):
        load_sd1_checkpoint("/nonexistent/model.safetensors")


def test_sdpa_attention_matches_ldm_attention_and_is_removed():
    model = build_tiny_sd1()
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 32)
    with torch.no_grad():
        reference = model.unet(x, t, context=context)
        with sdpa_attention(model.unet):
            fast = model.unet(x, t, context=context)
        after = model.unet(x, t, context=context)
    assert torch.allclose(fast, reference, atol=1e-5)
    assert torch.equal(after, reference)
    assert not any("forward" in m.__dict__ for m in model.modules())

"""SDXL: the model tree at full size, kohya's keys and A1111's mapping of them, the fused OpenCLIP attention,
size conditioning, checkpoints, and real training steps on a tiny SDXL built from the same classes."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lib_train.common.errors import CheckpointError, ConfigError
from lib_train.dataset.training_data import TrainingData, scan_training_folder
from lib_train.engine.lora_names import model_targets
from lib_train.engine.model_guard import fingerprint, hook_count
from lib_train.engine.network import LoRANetwork
from lib_train.engine.loss import zero_terminal_snr
from lib_train.engine.train import train_lora
from lib_train.hosts.protocol import ModelFamily, PredictionType, SizeCondition
from lib_train.hosts.sd1 import load_sd1_checkpoint, sd1_alphas_cumprod
from lib_train.hosts.sdxl import (TINY_SDXL_SIZE_EMBEDDING, TINY_SDXL_TEXT1, TINY_SDXL_TEXT2, TINY_SDXL_UNET,
                                  build_sdxl, build_tiny_sdxl, load_sdxl_checkpoint)
from lib_train.hosts.sd1 import TINY_VAE
from lib_train.hosts.standalone_sdxl import StandaloneSDXLHost

from .conftest import make_concept_images, tiny_config
from .test_training import eval_loss

TINY = dict(unet_config=TINY_SDXL_UNET, vae_config=TINY_VAE, text1_config=TINY_SDXL_TEXT1,
            text2_config=TINY_SDXL_TEXT2, size_embedding_dim=TINY_SDXL_SIZE_EMBEDDING)


@pytest.fixture(scope="module")
def sdxl_on_meta():
    with torch.device("meta"):
        return build_sdxl()


@pytest.fixture
def sdxl_host() -> StandaloneSDXLHost:
    return StandaloneSDXLHost(build_tiny_sdxl(seed=0))


def targets_of(model, with_convs=True):
    encoders = [(model.text_encoder_1, "lora_te1"), (model.text_encoder_2, "lora_te2")]
    return model_targets(ModelFamily.SDXL, model.unet, encoders, with_convs)


# --- the tree and the names at full size -----------------------------------------------------------------


def test_full_size_tree_has_every_checkpoint_tensor(sdxl_on_meta):
    keys = sdxl_on_meta.state_dict().keys()
    count = lambda prefix: sum(k.startswith(prefix) for k in keys)  # noqa: E731
    assert count("model.diffusion_model.") == 1680
    assert count("conditioner.embedders.0.transformer.") == 196
    assert count("conditioner.embedders.1.model.") == 390
    assert count("first_stage_model.") == 248
    assert sum(p.numel() for p in sdxl_on_meta.unet.parameters()) == 2_567_463_684
    assert "model.diffusion_model.label_emb.0.2.weight" in keys
    assert "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight" in keys
    assert "model.diffusion_model.input_blocks.5.1.transformer_blocks.2.attn1.to_q.weight" not in keys  # depth 2


def test_module_counts_match_kohya(sdxl_on_meta):
    unet, text = targets_of(sdxl_on_meta, with_convs=False)
    assert len(unet) == 722
    assert len([t for t in text if t.key.startswith("lora_te1_")]) == 72
    assert len([t for t in text if t.key.startswith("lora_te2_")]) == 192
    assert len(targets_of(sdxl_on_meta, with_convs=True)[0]) == 788
    keys = {t.key for t in unet + text}
    for expected in ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                     "lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj",
                     "lora_unet_output_blocks_5_1_proj_out",
                     "lora_te1_text_model_encoder_layers_11_mlp_fc2",
                     "lora_te2_text_model_encoder_layers_31_self_attn_out_proj",
                     "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"]:
        assert expected in keys, expected


def a1111_sdxl_module(key: str, mapping: dict[str, nn.Module]) -> nn.Module | None:
    """A1111 v1.10 load_network's lookup for an SDXL key, written from its source: convert_diffusers_name_to_compvis
    (te2 rule), the fused-attention `_[qkv]_proj` fallback, then the lora_unet / lora_te1 replacements."""
    key_ = key
    if m := re.fullmatch(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key):
        rest = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        key_ = f"1_model_transformer_resblocks_{m[1]}_{rest}"
    module = mapping.get(key_)
    if module is None and (m := re.fullmatch(r"(.*)_([qkv]_proj)", key_)):
        module = mapping.get(m[1])
    if module is None and "lora_unet" in key:
        module = mapping.get(key.replace("lora_unet", "diffusion_model"))
    elif module is None and "lora_te1_text_model" in key:
        module = mapping.get(key.replace("lora_te1_text_model", "0_transformer_text_model"))
    return module


def webui_sdxl_mapping(model) -> dict[str, nn.Module]:
    """network_layer_mapping for SDXL: `{i}_` + names under each embedder's `wrapped`, then sd_model.model's."""
    mapping = {f"0_transformer_{n}".replace(".", "_"): m for n, m in model.text_encoder_1.named_modules() if n}
    mapping.update({f"1_model_{n}".replace(".", "_"): m for n, m in model.text_encoder_2.named_modules() if n})
    mapping.update({f"diffusion_model_{n}".replace(".", "_"): m for n, m in model.unet.named_modules() if n})
    return mapping


def test_every_name_resolves_to_the_trained_layer_in_the_webui(sdxl_on_meta):
    mapping = webui_sdxl_mapping(sdxl_on_meta)
    unet, text = targets_of(sdxl_on_meta)
    for target in unet + text:
        found = a1111_sdxl_module(target.key, mapping)
        expected = target.module.out_proj if target.fused_part == "out" else target.module
        assert found is expected, target.key


# --- the fused OpenCLIP attention ----------------------------------------------------------------------------


def test_fused_attention_lora_equals_the_builtin_lora_merge():
    """A1111 merges q/k/v into in_proj_weight (vstack) and out into out_proj; our activation-space forward
    must give the same attention, and nothing once detached."""
    torch.manual_seed(0)
    model = build_tiny_sdxl(seed=0)
    text = model.text_encoder_2
    tokens = torch.randint(1, 49000, (2, 77))
    tokens[:, 10] = 49407
    from lib_train.hosts.openclip_text import encode_penultimate_and_pooled
    with torch.no_grad():
        base = encode_penultimate_and_pooled(text, tokens)
    encoders = [(model.text_encoder_1, "lora_te1"), (text, "lora_te2")]
    host = type("Host", (), {"family": ModelFamily.SDXL, "unet": model.unet, "device": torch.device("cpu"),
                             "text_encoders": [type("E", (), {"module": m, "key_prefix": p})() for m, p in encoders]})()
    network = LoRANetwork.for_host(host, rank=4, alpha=2.0, seed=3)
    with torch.no_grad():
        for module in network.text_encoder_modules:
            module.lora_up.weight.normal_(0, 0.05)
    state = network.kohya_state_dict()
    with network.attached(), torch.no_grad():
        hooked = encode_penultimate_and_pooled(text, tokens)
    assert hook_count(text) == 0
    with torch.no_grad():
        assert torch.equal(encode_penultimate_and_pooled(text, tokens)[0], base[0])
        for index, block in enumerate(text.transformer.resblocks):
            def delta(part):
                k = f"lora_te2_text_model_encoder_layers_{index}_{part}"
                return state[f"{k}.lora_up.weight"] @ state[f"{k}.lora_down.weight"] * (state[f"{k}.alpha"] / 4)
            block.attn.in_proj_weight += torch.cat([delta(f"self_attn_{p}_proj") for p in "qkv"])
            block.attn.out_proj.weight += delta("self_attn_out_proj")
            block.mlp.c_fc.weight += delta("mlp_fc1")
            block.mlp.c_proj.weight += delta("mlp_fc2")
        merged = encode_penultimate_and_pooled(text, tokens)
    assert not torch.allclose(hooked[0], base[0], atol=1e-4)
    assert torch.allclose(hooked[0], merged[0], atol=1e-5) and torch.allclose(hooked[1], merged[1], atol=1e-5)


def test_detaching_the_text_encoder_part_leaves_both_encoders_bare_and_the_unet_hooked(sdxl_host):
    """The preview grid hands the text encoders' part to the built-in Lora: none of ours may stay, including
    the fused OpenCLIP attention of TE2 (an instance forward that would also hide A1111's own merge)."""
    captions = ["ttconcept, red circle"]
    sizes = [SizeCondition((64, 64), (0, 0), (64, 64))]
    latents, timesteps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([500])
    with torch.no_grad():
        bare_text = sdxl_host.encode_captions(captions)
        bare_prediction = sdxl_host.predict(latents, timesteps, sdxl_host.unet_conditioning(bare_text, sizes))
    network = LoRANetwork.for_host(sdxl_host, rank=4, alpha=2.0, seed=3)
    with torch.no_grad():
        for module in network.modules_in_order():
            module.lora_up.weight.normal_(0, 0.05)
    network.attach()
    try:
        network.detach_text_encoder()
        with torch.no_grad():
            text = sdxl_host.encode_captions(captions)
            prediction = sdxl_host.predict(latents, timesteps, sdxl_host.unet_conditioning(text, sizes))
        assert all(torch.equal(text[k], bare_text[k]) for k in bare_text)
        assert not torch.allclose(prediction, bare_prediction, atol=1e-4)
    finally:
        network.detach()
    assert hook_count(sdxl_host.unet) == 0 and "forward" not in vars(sdxl_host.text_encoders[1].module.transformer.resblocks[0].attn)


# --- conditioning --------------------------------------------------------------------------------------------


def test_size_conditions_follow_kohya(tmp_path):
    make_concept_images(tmp_path / "data", count=1, size=96)
    from PIL import Image
    Image.new("RGB", (160, 96), (9, 9, 9)).save(tmp_path / "data" / "wide.png")
    (tmp_path / "data" / "wide.txt").write_text("wide")
    records = scan_training_folder(tmp_path / "data", 1)
    data = TrainingData(records, resolution=64, enable_buckets=False, min_bucket_reso=64, max_bucket_reso=64,
                        bucket_reso_steps=64, bucket_no_upscale=False, flip_aug=True, batch_size=1,
                        shuffle_caption=False, keep_tokens=0, caption_dropout_rate=0.0, seed=0)
    wide = [r.path.name for r in records].index("wide.png")
    # 160x96 covers 64x64 at 107x64: the centre crop starts 21 px in (22 px from the right when mirrored).
    assert data.size_condition(wide) == SizeCondition(original_hw=(96, 160), crop_top_left=(0, 21), target_hw=(64, 64))
    assert data.size_condition(wide, mirrored=True).crop_top_left == (0, 22)


def test_vector_carries_pooled_text_and_each_pictures_sizes(sdxl_host):
    with torch.no_grad():
        text = sdxl_host.encode_captions(["a red circle", "a red circle"])
        sizes = [SizeCondition((64, 64), (0, 0), (64, 64)), SizeCondition((96, 160), (0, 21), (64, 64))]
        cond = sdxl_host.unet_conditioning(text, sizes)
    assert cond["crossattn"].shape == (2, 77, 64) and cond["vector"].shape == (2, 32 + 6 * TINY_SDXL_SIZE_EMBEDDING)
    assert torch.equal(cond["vector"][0, :32], cond["vector"][1, :32])  # same caption, same pooled text
    assert not torch.equal(cond["vector"][0, 32:], cond["vector"][1, 32:])  # different sizes


def test_long_captions_take_more_chunks_with_the_first_chunks_pooled(sdxl_host):
    long = " ".join(["red"] * 100)  # 100 tokens: two chunks
    with torch.no_grad():
        text = sdxl_host.encode_captions([long, "short"])
        alone = sdxl_host.encode_captions(["short"])
    assert text["crossattn"].shape[1] == 154
    assert torch.allclose(text["crossattn"][1, :77], alone["crossattn"][0], atol=1e-5)
    assert torch.allclose(text["pooled"][1], alone["pooled"][0], atol=1e-5)


# --- checkpoints ---------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_and_refusals(tmp_path):
    model = build_tiny_sdxl(seed=1)
    path = tmp_path / "tiny-sdxl.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = load_sdxl_checkpoint(path, **TINY)
    assert fingerprint(loaded) == fingerprint(model)
    with pytest.raises(CheckpointError, match="SDXL checkpoint, not SD1"):
        load_sd1_checkpoint(path)

    refiner = tmp_path / "refiner.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(1), "conditioner.embedders.0.model.ln_final.weight": torch.zeros(1)},
              str(refiner))
    with pytest.raises(CheckpointError, match="an SDXL refiner checkpoint, not an SDXL base"):
        load_sdxl_checkpoint(refiner, **TINY)
    inpaint = tmp_path / "inpaint.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 9, 3, 3),
               "conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}, str(inpaint))
    with pytest.raises(CheckpointError, match="an SDXL inpainting model"):
        load_sdxl_checkpoint(inpaint, **TINY)


# --- training ------------------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_writes_kohya_sdxl_files(sdxl_host, tmp_path):
    make_concept_images(tmp_path / "data" / "4_concept", count=4)
    before = fingerprint(sdxl_host.model)
    # LoCon: the tiny SDXL, like the real one, has no attention at its top level, where a tiny model's
    # ResBlocks carry the output; attention-only LoRA barely moves its loss (SD1's tiny has attention there).
    config = tiny_config(tmp_path / "data", tmp_path / "out", epochs=8, save_every_n_epochs=0, batch_size=4,
                         unet_lr=1e-2, text_encoder_lr=5e-3, conv_rank=4, conv_alpha=4.0)
    result = train_lora(sdxl_host, config)
    assert fingerprint(sdxl_host.model) == before and hook_count(sdxl_host.model) == 0
    state = load_file(str(result.saved_files[-1]))
    modules = {k.split(".")[0] for k in state}
    unet, text = targets_of(sdxl_host.model, with_convs=True)
    assert modules == {t.key for t in unet + text}
    assert any(k.startswith("lora_te2_") and "self_attn_v_proj.lora_up" in k and state[k].abs().sum() > 0 for k in state)

    from safetensors import safe_open
    with safe_open(str(result.saved_files[-1]), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_v2"] == "False"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert json.loads(result.saved_files[-1].with_suffix(".json").read_text())["sd version"] == "SDXL"

    from lib_train.dataset.training_data import load_rgb, pixels_to_tensor
    pictures = sorted((tmp_path / "data" / "4_concept").glob("*.png"))
    with torch.no_grad():
        latents = sdxl_host.encode_images(pixels_to_tensor([load_rgb(p) for p in pictures]))
    captions = [p.with_suffix(".txt").read_text() for p in pictures]
    sizes = [SizeCondition((64, 64), (0, 0), (64, 64))] * len(captions)
    assert eval_loss(sdxl_host, latents, captions, state, sizes) < eval_loss(sdxl_host, latents, captions, None, sizes) * 0.9


def test_cached_text_encoders_train_the_unet_only_and_restore_on_stop(sdxl_host, tmp_path):
    make_concept_images(tmp_path / "data" / "2_concept", count=4)
    before = fingerprint(sdxl_host.model)
    encoded = []
    real_encode = sdxl_host.encode_captions
    sdxl_host.encode_captions = lambda captions: encoded.append(len(captions)) or real_encode(captions)

    def stop_in_epoch_two(progress):
        if progress.phase == "training" and progress.epoch == 2:
            sdxl_host.request_stop()

    sdxl_host._on_progress = stop_in_epoch_two
    result = train_lora(sdxl_host, tiny_config(tmp_path / "data", tmp_path / "out", epochs=3, text_encoder_lr=0.0,
                                               gradient_checkpointing=True))
    del sdxl_host.encode_captions
    assert result.stopped and [p.name for p in result.saved_files] == ["tiny-000001.safetensors"]
    assert sum(encoded) == 4  # each caption once, before the first step
    state = load_file(str(result.saved_files[0]))
    assert not any(k.startswith("lora_te") for k in state)
    assert fingerprint(sdxl_host.model) == before and hook_count(sdxl_host.model) == 0


def test_nan_and_exception_leave_the_sdxl_host_as_it_was(sdxl_host, tmp_path, monkeypatch):
    from lib_train.common.errors import TrainingDiverged
    make_concept_images(tmp_path / "data" / "1_concept", count=2)
    before = fingerprint(sdxl_host.model)
    real_predict = sdxl_host.predict
    monkeypatch.setattr(sdxl_host, "predict", lambda *a: real_predict(*a) * float("nan"))
    with pytest.raises(TrainingDiverged):
        train_lora(sdxl_host, tiny_config(tmp_path / "data", tmp_path / "out"))
    monkeypatch.setattr(sdxl_host, "predict", lambda *a: (_ for _ in ()).throw(RuntimeError("CUDA out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):
        train_lora(sdxl_host, tiny_config(tmp_path / "data", tmp_path / "out", gradient_checkpointing=True))
    monkeypatch.undo()
    assert fingerprint(sdxl_host.model) == before and hook_count(sdxl_host.model) == 0
    assert not (tmp_path / "out").exists()


# --- the WebUI adapter ---------------------------------------------------------------------------------------


def test_webui_sdxl_host_conditions_as_the_standalone_and_restores_the_live_model(tmp_path):
    from lib_train.webui.host import webui_host
    from lib_train.webui.host_sdxl import WebUISDXLHost

    from .webui_standin_sdxl import make_sdxl_webui

    webui = make_sdxl_webui(tmp_path / "Lora")
    host = webui_host(webui)
    assert isinstance(host, WebUISDXLHost) and host.family is ModelFamily.SDXL
    reference = webui.shared.sd_model.reference[0]
    sizes = [SizeCondition((96, 160), (0, 21), (64, 64))]
    with torch.no_grad():
        ours = host.unet_conditioning(host.encode_captions(["hat (object)"]), sizes)
        theirs = reference.unet_conditioning(reference.encode_captions(["hat (object)"]), sizes)
    assert torch.allclose(ours["crossattn"], theirs["crossattn"]) and torch.allclose(ours["vector"], theirs["vector"])

    model = webui.shared.sd_model
    model.first_stage_model.half()  # the WebUI's fp16 VAE: latents are encoded in float32, the VAE given back
    webui.devices.dtype_vae = torch.float16
    before = fingerprint(model)
    make_concept_images(tmp_path / "data" / "1_concept", count=2)
    # The WebUI's attention undo leaves another class-level forward on the VAE's attention (its sgm/ldm mix-up).
    vae_attention = type(next(m for m in model.first_stage_model.modules() if type(m).__name__ == "AttnBlock"))
    original_forward = vae_attention.__dict__.get("forward")
    webui.sd_hijack.model_hijack.apply_optimizations = lambda: setattr(vae_attention, "forward", lambda self, x: x)
    with host.training_session():
        result = train_lora(host, tiny_config(tmp_path / "data", tmp_path / "out", epochs=1))
    assert result.steps == 1 and fingerprint(model) == before and hook_count(model) == 0
    assert webui.devices.dtype_vae is torch.float16
    assert vae_attention.__dict__.get("forward") is original_forward
    state = load_file(str(result.saved_files[-1]))
    assert any(k.startswith("lora_te2_") for k in state) and any(k.startswith("lora_te1_") for k in state)
    assert any(state[k].abs().sum() > 0 for k in state if k.startswith("lora_te2_") and "lora_up" in k)


def test_zero_terminal_snr_schedule_ends_in_pure_noise_and_keeps_the_first_step():
    schedule = sd1_alphas_cumprod()
    rescaled = zero_terminal_snr(schedule)
    assert rescaled[-1] == 0 and torch.allclose(rescaled[0], schedule[0])
    assert bool((rescaled[1:] < rescaled[:-1]).all())  # still strictly decreasing noise-free share


def test_v_prediction_sdxl_trains_on_velocity_with_zero_terminal_snr(tmp_path):
    """NoobAI-style: a v-prediction SDXL trained with zero terminal SNR and min-SNR; the velocity loss falls."""
    host = StandaloneSDXLHost(build_tiny_sdxl(seed=0), prediction_type=PredictionType.V)
    make_concept_images(tmp_path / "data" / "4_concept", count=4)
    before = fingerprint(host.model)
    config = tiny_config(tmp_path / "data", tmp_path / "out", epochs=8, save_every_n_epochs=0, batch_size=4,
                         unet_lr=1e-2, text_encoder_lr=0.0, conv_rank=4, conv_alpha=4.0, zero_terminal_snr=True,
                         min_snr_gamma=5.0)
    result = train_lora(host, config)
    assert fingerprint(host.model) == before and hook_count(host.model) == 0
    from safetensors import safe_open
    with safe_open(str(result.saved_files[-1]), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["modelspec.prediction_type"] == "v" and metadata["ss_zero_terminal_snr"] == "True"

    from lib_train.dataset.training_data import load_rgb, pixels_to_tensor
    pictures = sorted((tmp_path / "data" / "4_concept").glob("*.png"))
    with torch.no_grad():
        latents = host.encode_images(pixels_to_tensor([load_rgb(p) for p in pictures]))
    captions = [p.with_suffix(".txt").read_text() for p in pictures]
    sizes = [SizeCondition((64, 64), (0, 0), (64, 64))] * len(captions)
    schedule = zero_terminal_snr(host.alphas_cumprod())
    state = load_file(str(result.saved_files[-1]))
    trained = eval_loss(host, latents, captions, state, sizes, schedule)
    assert trained < eval_loss(host, latents, captions, None, sizes, schedule) * 0.9


def test_zero_terminal_snr_on_an_epsilon_model_is_refused_before_anything_is_written(sdxl_host, tmp_path):
    make_concept_images(tmp_path / "data" / "1_concept", count=2)
    config = tiny_config(tmp_path / "data", tmp_path / "out", epochs=1, zero_terminal_snr=True)
    with pytest.raises(ConfigError, match="v-prediction"):
        train_lora(sdxl_host, config)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.safetensors"))


def test_webui_clip_skip_on_sdxl_is_recorded_only_where_the_webui_applies_it(tmp_path):
    """The WebUI's SDXL text path reads "Clip skip" only with its "Clip skip SDXL" option (and then for CLIP-L):
    without it a clip skip of 2, kept from SD1.5, changes nothing and must not be written into the file."""
    from lib_train.webui.host import text_path_clip_skip

    from .webui_standin_sdxl import make_sdxl_webui

    webui = make_sdxl_webui(tmp_path / "Lora")
    webui.shared.opts.CLIP_stop_at_last_layers = 2
    assert text_path_clip_skip(webui) == 1
    webui.shared.opts.sdxl_clip_l_skip = True
    assert text_path_clip_skip(webui) == 2

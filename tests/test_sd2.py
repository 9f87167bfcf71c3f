"""SD2.x: the model tree at full size, kohya's keys and A1111's mapping of them (23 OpenCLIP layers, Linear or
1×1-conv projections), checkpoints, real training steps on a tiny SD2 built from the same classes (epsilon and
v-prediction), the WebUI adapter on a stand-in around those modules, and the preview grid on it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lib_train.common.errors import CheckpointError, ConfigError
from lib_train.dataset.training_data import load_rgb, pixels_to_tensor
from lib_train.engine import steps
from lib_train.engine.family_defaults import family_overrides
from lib_train.engine.lora_names import model_targets
from lib_train.engine.model_guard import fingerprint, hook_count
from lib_train.engine.network import LoRANetwork
from lib_train.engine.train import train_lora
from lib_train.hosts.protocol import ModelFamily, PredictionType
from lib_train.hosts.sd1 import TINY_VAE, load_sd1_checkpoint
from lib_train.hosts.sd2 import (SD2_UNET, TINY_SD2_TEXT, TINY_SD2_UNET, SD2Model, build_sd2, build_tiny_sd2,
                                 checkpoint_prediction_type, load_sd2_checkpoint, unet_prediction_type)
from lib_train.hosts.standalone_sd2 import StandaloneSD2Host
from lib_train.webui.host import webui_host
from lib_train.webui.host_sd2 import WebUISD2Host
from lib_train.webui.jobs import Folders, TrainingJobs

from . import a1111_lora
from .conftest import make_concept_images, tiny_config
from .test_lora_names import a1111_compvis_name
from .test_training import eval_loss
from .webui_standin_sd2 import make_sd2_webui

PROJECTIONS = pytest.mark.parametrize("linear", [True, False], ids=["linear_proj", "conv_proj"])


@pytest.fixture(scope="module", params=[True, False], ids=["linear_proj", "conv_proj"])
def sd2_on_meta(request):
    with torch.device("meta"):
        return build_sd2(dict(SD2_UNET, use_linear_in_transformer=request.param))


def targets_of(model, with_convs=True, lycoris=False):
    return model_targets(ModelFamily.SD2, model.unet, [(model.text_encoder, "lora_te")], with_convs, lycoris)


def webui_sd2_mapping(model) -> dict[str, nn.Module]:
    """A1111's network_layer_mapping on SD2: cond_stage_model.wrapped's modules (its OpenCLIP under ``model``),
    then sd_model.model's (the UNet under ``diffusion_model``)."""
    mapping = {f"model_{n}".replace(".", "_"): m for n, m in model.text_encoder.named_modules() if n}
    mapping.update({f"diffusion_model_{n}".replace(".", "_"): m for n, m in model.unet.named_modules() if n})
    return mapping


def a1111_sd2_module(key: str, mapping: dict[str, nn.Module]) -> nn.Module | None:
    compvis = a1111_compvis_name(key) if key.startswith("lora_unet_") else a1111_lora.sd2_text_compvis_name(key)
    return None if compvis is None else a1111_lora.find_layer(mapping, compvis)


# --- the tree and the names at full size -----------------------------------------------------------------


def test_full_size_tree_has_every_checkpoint_tensor(sd2_on_meta):
    keys = sd2_on_meta.state_dict().keys()
    count = lambda prefix: sum(k.startswith(prefix) for k in keys)  # noqa: E731
    assert count("model.diffusion_model.") == 686
    assert count("cond_stage_model.model.") == 294  # 24 blocks of 12, embeddings, ln_final, projection, scale
    assert count("first_stage_model.") == 248
    assert sum(p.numel() for p in sd2_on_meta.unet.parameters()) == 865_910_724
    assert sd2_on_meta.text_blocks == 23  # "penultimate": the 24th block never runs
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert sd2_on_meta.unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features == 1024


def test_module_counts_and_names_match_kohya(sd2_on_meta):
    unet, text = targets_of(sd2_on_meta, with_convs=False)
    assert (len(unet), len(text)) == (192, 138)  # 23 text layers × 6
    assert len(targets_of(sd2_on_meta, with_convs=True)[0]) == 278
    keys = {t.key for t in unet + text}
    for expected in ["lora_unet_down_blocks_0_attentions_0_proj_in",
                     "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k",
                     "lora_unet_up_blocks_3_attentions_2_proj_out",
                     "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                     "lora_te_text_model_encoder_layers_22_mlp_fc2"]:
        assert expected in keys, expected
    assert not any("layers_23_" in k for k in keys)
    proj_in = next(t for t in unet if t.key == "lora_unet_down_blocks_0_attentions_0_proj_in").module
    linear = isinstance(sd2_on_meta.unet.input_blocks[1][1].proj_in, nn.Linear)
    assert isinstance(proj_in, nn.Linear if linear else nn.Conv2d)


def test_every_name_resolves_to_the_trained_layer_in_the_webui(sd2_on_meta):
    mapping = webui_sd2_mapping(sd2_on_meta)
    assert "model_transformer_resblocks_0_attn" in mapping  # how A1111 tells an SD2 text encoder
    unet, text = targets_of(sd2_on_meta, with_convs=True, lycoris=True)
    for target in unet + text:
        expected = target.module.out_proj if target.fused_part == "out" else target.module
        assert a1111_sd2_module(target.key, mapping) is expected, target.key


# --- the built-in Lora's merge equals our hooks ----------------------------------------------------------


@pytest.mark.parametrize("linear, kind", [(True, "lora"), (False, "lora"), (True, "loha"), (True, "lokr"),
                                          (True, "dora")])
def test_builtin_lora_merge_equals_the_hooked_network_and_unmerges_exactly(tmp_path, linear, kind):
    """Every key of a LoCon (LoHa, LoKr, DoRA) file is taken by the built-in Lora (the stand-in asserts each one
    resolves), 2-D tensors on Linear projections and 4-D on 1×1 convs, and the merged model computes what our hooks
    compute, OpenCLIP's fused attention included."""
    webui = make_sd2_webui(tmp_path / "Lora", linear_projections=linear)
    host = webui_host(webui)
    model = webui.shared.sd_model
    before = fingerprint(model)
    network = LoRANetwork.for_host(host, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, seed=3,
                                   network_type="lora" if kind == "dora" else kind, dora=kind == "dora")
    with torch.no_grad():  # the zero-initialised factors made small and random, so every module changes its layer
        for parameter in network.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.05)
    state = network.kohya_state_dict()
    if kind == "lora":
        proj = state["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]
        assert proj.dim() == (2 if linear else 4)
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    prompts = ["a red circle", "hat (object)"]
    with torch.no_grad():
        base = model.apply_model(x, t, model.cond_stage_model(prompts))
        with network.attached():
            hooked_cond = model.cond_stage_model(prompts)
            hooked = model.apply_model(x, t, hooked_cond)
        model.merge_builtin_lora(state, 1.0, 1.0, "sd2lora")
        merged_cond = model.cond_stage_model(prompts)
        merged = model.apply_model(x, t, merged_cond)
    assert not torch.allclose(hooked, base, atol=1e-3)
    assert torch.allclose(hooked_cond, merged_cond, atol=1e-5) and torch.allclose(hooked, merged, atol=1e-4)
    host.unmerge_builtin_lora()
    assert fingerprint(model) == before and hook_count(model) == 0


# --- checkpoints ---------------------------------------------------------------------------------------------


TINY = dict(unet_config=TINY_SD2_UNET, vae_config=TINY_VAE, text_config=TINY_SD2_TEXT)


@PROJECTIONS
def test_checkpoint_round_trip_keeps_the_files_projections(tmp_path, linear):
    model = build_tiny_sd2(seed=1, linear_projections=linear)
    path = tmp_path / "tiny-sd2.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = load_sd2_checkpoint(path, **TINY)
    assert fingerprint(loaded) == fingerprint(model)
    assert isinstance(loaded.unet.output_blocks[3][1].proj_out, nn.Linear if linear else nn.Conv2d)
    with pytest.raises(CheckpointError, match="SD2.x checkpoint, not SD1"):
        load_sd1_checkpoint(path)


def test_checkpoint_refusals_and_the_configs_prediction_type(tmp_path):
    sd1 = tmp_path / "sd1.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(1), "cond_stage_model.transformer.x": torch.zeros(1)}, str(sd1))
    with pytest.raises(CheckpointError, match="an SD1.x checkpoint, not SD2.x"):
        load_sd2_checkpoint(sd1, **TINY)
    inpaint = tmp_path / "inpaint.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3),
               "cond_stage_model.model.ln_final.weight": torch.zeros(1)}, str(inpaint))
    with pytest.raises(CheckpointError, match="inpainting or depth"):
        load_sd2_checkpoint(inpaint, **TINY)

    model = tmp_path / "sd2-768-v.safetensors"
    assert checkpoint_prediction_type(model) is None  # no config beside it
    model.with_suffix(".yaml").write_text('model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n'
                                          '  params:\n    parameterization: "v"\n    linear_start: 0.00085\n')
    assert checkpoint_prediction_type(model) is PredictionType.V
    model.with_suffix(".yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert checkpoint_prediction_type(model) is PredictionType.EPSILON
    model.with_suffix(".yaml").write_text("model: [unclosed")
    with pytest.raises(CheckpointError, match="not a readable model config"):
        checkpoint_prediction_type(model)


def test_without_a_config_the_prediction_type_is_read_from_the_unet_as_the_webui_does():
    """v2-1_768-ema-pruned.safetensors alone (the WebUI needs no .yaml since it tells v from epsilon by one UNet
    call): the command line must not train a v-prediction model on epsilon."""
    unet = build_tiny_sd2(seed=0).unet
    final = unet.out[2]  # the last convolution: what the UNet answers for a constant latent at t = 999
    with torch.no_grad():
        final.weight.zero_()
        final.bias.fill_(-3.0)  # far below the input, as a v-prediction model answers there
        assert unet_prediction_type(unet) is PredictionType.V
        final.bias.zero_()
        assert unet_prediction_type(unet) is PredictionType.EPSILON


# --- training ------------------------------------------------------------------------------------------------


def pictures_and_captions(folder):
    pictures = sorted(folder.glob("*.png"))
    return pixels_to_tensor([load_rgb(p) for p in pictures]), [p.with_suffix(".txt").read_text() for p in pictures]


def metadata_of(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


@PROJECTIONS
def test_training_lowers_the_loss_and_writes_kohya_sd2_files(tmp_path, linear):
    host = StandaloneSD2Host(build_tiny_sd2(seed=0, linear_projections=linear))
    make_concept_images(tmp_path / "data" / "4_concept", count=4)
    before = fingerprint(host.model)
    config = tiny_config(tmp_path / "data", tmp_path / "out", epochs=6, save_every_n_epochs=0, batch_size=4,
                         unet_lr=1e-2, text_encoder_lr=5e-3)
    result = train_lora(host, config)
    assert fingerprint(host.model) == before and hook_count(host.model) == 0
    state = load_file(str(result.saved_files[-1]))
    unet, text = targets_of(host.model, with_convs=False)
    assert {k.split(".")[0] for k in state} == {t.key for t in unet + text}
    assert {k.split("_layers_")[1].split("_")[0] for k in state if k.startswith("lora_te_")} == {"0", "1"}  # of 3
    assert state["lora_unet_up_blocks_1_attentions_0_proj_out.lora_up.weight"].dim() == (2 if linear else 4)
    assert any(state[k].abs().sum() > 0 for k in state if k.startswith("lora_te_") and "self_attn_v_proj.lora_up" in k)

    metadata = metadata_of(result.saved_files[-1])
    assert metadata["ss_v2"] == "True" and metadata["ss_base_model_version"] == "sd_v2"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    assert metadata["modelspec.implementation"] == "diffusers" and metadata["modelspec.prediction_type"] == "epsilon"
    assert json.loads(result.saved_files[-1].with_suffix(".json").read_text())["sd version"] == "SD2"

    with torch.no_grad():
        pixels, captions = pictures_and_captions(tmp_path / "data" / "4_concept")
        latents = host.encode_images(pixels)
    trained, untrained = eval_loss(host, latents, captions, state), eval_loss(host, latents, captions)
    print(f"SD2 eps ({'linear' if linear else 'conv'} proj): loss {untrained:.4f} -> {trained:.4f}")
    assert trained < untrained * 0.9


def test_v_prediction_sd2_trains_on_velocity(tmp_path, monkeypatch):
    """The 768-v model: every step's target is the velocity √ᾱ·ε − √(1−ᾱ)·x0, and the velocity loss falls."""
    host = StandaloneSD2Host(build_tiny_sd2(seed=0), prediction_type=PredictionType.V)
    make_concept_images(tmp_path / "data" / "4_concept", count=4)
    before = fingerprint(host.model)
    targets = []
    real_target = steps.training_target

    def recording_target(prediction_type, latents, noise, alphas_cumprod, timesteps):
        target = real_target(prediction_type, latents, noise, alphas_cumprod, timesteps)
        a = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        targets.append((prediction_type, torch.allclose(target, a.sqrt() * noise - (1 - a).sqrt() * latents)))
        return target

    monkeypatch.setattr(steps, "training_target", recording_target)
    config = tiny_config(tmp_path / "data", tmp_path / "out", epochs=6, save_every_n_epochs=0, batch_size=4,
                         unet_lr=1e-2, text_encoder_lr=5e-3, min_snr_gamma=5.0)
    result = train_lora(host, config)
    monkeypatch.undo()
    assert len(targets) == result.steps == 24 and targets == [(PredictionType.V, True)] * 24
    assert fingerprint(host.model) == before and hook_count(host.model) == 0
    metadata = metadata_of(result.saved_files[-1])
    assert metadata["ss_base_model_version"] == "sd_v2_v" and metadata["ss_v2"] == "True"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert metadata["modelspec.prediction_type"] == "v"

    state = load_file(str(result.saved_files[-1]))
    with torch.no_grad():
        pixels, captions = pictures_and_captions(tmp_path / "data" / "4_concept")
        latents = host.encode_images(pixels)
    trained, untrained = eval_loss(host, latents, captions, state), eval_loss(host, latents, captions)
    print(f"SD2 v-prediction: velocity loss {untrained:.4f} -> {trained:.4f}")
    assert trained < untrained * 0.9


def test_clip_skip_leaves_out_more_blocks_as_kohya():
    host = StandaloneSD2Host(build_tiny_sd2(seed=0))
    text = host.model.text_encoder
    with torch.no_grad():
        default = host.encode_captions(["a red circle"])
        host.clip_skip = 2
        skipped = host.encode_captions(["a red circle"])
        tokens = host.tokenizer(["a red circle"], padding="max_length", max_length=77).input_ids
        ids = torch.tensor([[0 if i > tokens[0].index(49407) else v for i, v in enumerate(tokens[0])]])
        x = (text.token_embedding(ids) + text.positional_embedding).permute(1, 0, 2)
        x = text.transformer.resblocks[0](x, attn_mask=text.attn_mask)  # 3 blocks, penultimate, clip skip 2: 1 block
    assert torch.allclose(skipped, text.ln_final(x.permute(1, 0, 2)), atol=1e-6)
    assert not torch.allclose(default, skipped)


# --- the WebUI adapter ---------------------------------------------------------------------------------------


def standalone_twin(webui_model) -> StandaloneSD2Host:
    """A standalone host over the stand-in's own modules: the reference for what the WebUI's text path gives."""
    model = SD2Model(webui_model.model.diffusion_model, webui_model.cond_stage_model.wrapped.model,
                     webui_model.first_stage_model)
    return StandaloneSD2Host(model)


def test_webui_sd2_host_encodes_as_the_standalone_and_trains_on_the_live_model(tmp_path):
    webui = make_sd2_webui(tmp_path / "models" / "Lora")
    webui.shared.opts.CLIP_stop_at_last_layers = 2  # the WebUI reads no clip skip on SD2: nor do we
    host = webui_host(webui)
    assert isinstance(host, WebUISD2Host) and host.family is ModelFamily.SD2
    assert host.prediction_type is PredictionType.V
    long_caption = ", ".join(["red circle"] * 40)  # over 75 tokens: two chunks
    with torch.no_grad():
        ours = host.encode_captions(["hat (object)", long_caption])
        reference = standalone_twin(webui.shared.sd_model).encode_captions(["hat (object)", long_caption])
    assert ours.shape == (2, 154, 32) and torch.allclose(ours, reference, atol=1e-5)

    jobs = TrainingJobs(webui, Folders(lora_dir=tmp_path / "models" / "Lora", projects_dir=tmp_path / "projects",
                                       data_dir=tmp_path, exposed=False))
    assert jobs.family_defaults(webui.shared.sd_model) == {"resolution": 768}
    make_concept_images(tmp_path / "pictures" / "2_concept", count=2, caption="hat (object), ttconcept")
    model = webui.shared.sd_model
    before = fingerprint(model)
    config = jobs.prepare(dict(name="sd2live", train_dir=str(tmp_path / "pictures"), resolution=64,
                               enable_buckets=False, rank=4, alpha=4.0, epochs=1, batch_size=2, unet_lr=1e-3,
                               text_encoder_lr=5e-4, seed=3, save_precision="fp32"))
    assert config.clip_skip == 1
    job = jobs.run(jobs.begin(), config)
    assert job.state == "done", job.error
    assert job.model_restored is True and fingerprint(model) == before and hook_count(model) == 0
    saved = job.saved_files[-1]
    metadata = metadata_of(saved)
    assert metadata["ss_base_model_version"] == "sd_v2_v" and metadata["ss_clip_skip"] == "None"
    assert metadata["ss_sd_model_name"] == "tiny-sd2.safetensors"
    state = load_file(saved)
    for key in {k.split(".")[0] for k in state}:
        model.builtin_lora_layer(key)  # every key is taken by the built-in Lora (asserts inside)
    assert any(state[k].abs().sum() > 0 for k in state if k.startswith("lora_te_") and "lora_up" in k)


def test_sd2_inpainting_and_unclip_models_are_refused(tmp_path):
    webui = make_sd2_webui(tmp_path / "Lora", parameterization="eps")
    assert webui_host(webui).prediction_type is PredictionType.EPSILON
    assert family_overrides(ModelFamily.SD2, True, True, PredictionType.EPSILON) == {}
    for conditioning in ("hybrid", "crossattn-adm"):
        webui.shared.sd_model.model.conditioning_key = conditioning
        with pytest.raises(ConfigError, match="SD2.x inpainting, depth or unCLIP"):
            webui_host(webui)


# --- the preview grid ----------------------------------------------------------------------------------------


def test_preview_grid_cells_equal_txt2img_with_the_lora_on_sd2(tmp_path):
    from .test_preview_grid import assert_cells_equal_merged_renders
    from .webui_standin_txt2img import install_txt2img

    torch.set_num_threads(1)
    webui = make_sd2_webui(tmp_path / "models" / "Lora", parameterization="eps")
    install_txt2img(webui)
    jobs = TrainingJobs(webui, Folders(lora_dir=tmp_path / "models" / "Lora", projects_dir=tmp_path / "projects",
                                       data_dir=tmp_path, exposed=False))
    make_concept_images(tmp_path / "pictures" / "2_concept", count=4)
    config = jobs.prepare(dict(name="gridlora", train_dir=str(tmp_path / "pictures"), resolution=64,
                               enable_buckets=False, rank=4, alpha=4.0, conv_rank=2, conv_alpha=1.0, epochs=2,
                               batch_size=2, unet_lr=3e-3, text_encoder_lr=3e-3, lr_scheduler="constant", seed=3,
                               trigger_words="ttconcept", save_precision="fp32"))
    job = jobs.run(jobs.begin(), config)
    assert job.state == "done", job.error
    assert_cells_equal_merged_renders(webui, jobs, tmp_path)


# --- an independent consumer -----------------------------------------------------------------------------


def test_trained_file_loads_into_diffusers_sd2_with_matching_delta(tmp_path):
    """diffusers' SD2 (Linear projections, a 23-layer HF CLIP text model, here 2 of the tiny's 3) takes every key,
    the 2-D proj_in/proj_out tensors included, with ΔW = up·down·α/r."""
    diffusers = pytest.importorskip("diffusers")
    peft_lora = pytest.importorskip("peft.tuners.lora")
    from transformers import CLIPTextConfig, CLIPTextModel

    host = StandaloneSD2Host(build_tiny_sd2(seed=0))
    make_concept_images(tmp_path / "data" / "2_concept", count=2)
    result = train_lora(host, tiny_config(tmp_path / "data", tmp_path / "out", epochs=1, conv_rank=2, conv_alpha=1.0,
                                          alpha=2.0))
    state = load_file(str(result.saved_files[-1]))

    channels = [TINY_SD2_UNET["model_channels"] * m for m in TINY_SD2_UNET["channel_mult"]]
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=TINY_SD2_TEXT["width"],
        attention_head_dim=[c // TINY_SD2_UNET["num_head_channels"] for c in channels], use_linear_projection=True,
        norm_num_groups=32)
    width = TINY_SD2_TEXT["width"]
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width,
                                                num_hidden_layers=TINY_SD2_TEXT["layers"] - 1, hidden_act="gelu",
                                                num_attention_heads=TINY_SD2_TEXT["heads"], projection_dim=width))
    lora_state, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(dict(state))
    diffusers.StableDiffusionPipeline.load_lora_into_unet(lora_state, alphas, unet=unet, adapter_name="t")
    diffusers.StableDiffusionPipeline.load_lora_into_text_encoder(lora_state, alphas, text_encoder=text_encoder,
                                                                  adapter_name="t")
    loaded = {}
    for prefix, model in (("lora_unet_", unet), ("lora_te_", text_encoder)):
        for name, module in model.named_modules():
            if isinstance(module, peft_lora.LoraLayer) and "t" in module.lora_A:
                loaded[prefix + name.replace(".", "_")] = module
    file_modules = {k.rsplit(".", 2)[0] for k in state if k.endswith(".lora_down.weight")}
    assert set(loaded) == file_modules
    for key, module in loaded.items():
        down, up = state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"]
        expected = (up.flatten(1) @ down.flatten(1)) * (float(state[f"{key}.alpha"]) / down.shape[0])
        assert torch.allclose(module.get_delta_weight("t").flatten(1), expected, atol=1e-6), key

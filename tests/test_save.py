"""Saved files: names, no-clobber atomic writes, kohya metadata and hashes, the WebUI sidecar."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from lib_train.common.errors import OutputError
from lib_train.common.files import check_output_name, write_atomically
from lib_train.engine.save import OutputPlan, precalculated_hashes
from lib_train.engine.train import train_lora

from .conftest import make_concept_images, tiny_config


def read_metadata(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


@pytest.mark.parametrize("name", ["中文角色", "my lora v2", "Émilie_01", "a.b"])
def test_names_in_any_script_are_accepted(name):
    assert check_output_name(name) == name


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", "x:y", "", "  ", "..", "bad*", "trailing."])
def test_path_like_and_reserved_names_are_refused(name):
    with pytest.raises(OutputError):
        check_output_name(name)


def test_plan_lists_epoch_files_and_refuses_existing(tmp_path):
    plan = OutputPlan.create(tmp_path, "x", epochs=4, save_every_n_epochs=2, overwrite=False)
    assert [p.name for p in plan.all_paths()] == ["x-000002.safetensors", "x-000002.json", "x.safetensors", "x.json"]
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(OutputError, match="already exist"):
        OutputPlan.create(tmp_path, "x", epochs=4, save_every_n_epochs=2, overwrite=False)
    assert OutputPlan.create(tmp_path, "x", epochs=4, save_every_n_epochs=2, overwrite=True)


def test_atomic_write_never_clobbers_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.safetensors"
    write_atomically(target, b"first", overwrite=False)
    with pytest.raises(OutputError, match="already exists"):
        write_atomically(target, b"second", overwrite=False)
    assert target.read_bytes() == b"first"
    write_atomically(target, b"third", overwrite=True)
    assert target.read_bytes() == b"third"
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_hashes_follow_kohya_definition():
    state = {"k.lora_down.weight": torch.randn(300, 1000), "k.alpha": torch.tensor(1.0)}  # > 1 MiB of data
    metadata = {"ss_output_name": "x", "ss_network_dim": "4"}
    model_hash, legacy = precalculated_hashes(state, metadata)
    data = save(state, metadata)
    header = struct.unpack("<Q", data[:8])[0]
    assert model_hash == hashlib.sha256(data[8 + header:]).hexdigest()
    assert legacy == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    # The model hash covers tensor bytes only, so other metadata does not change it.
    assert precalculated_hashes(state, {"ss_output_name": "other name"})[0] == model_hash


# The metadata keys kohya sd-scripts (main @48d368f, the commit docs/lora-format.md cites) writes for an SD1 LoRA
# of train_network.py with --train_data_dir (no dataset config), a local checkpoint, no --vae, no --no_metadata:
# its fixed dict, the legacy dataset block, the model keys, the keys set at save, the hashes and modelspec.
KOHYA_SS_KEYS = {
    "ss_session_id", "ss_training_started_at", "ss_output_name", "ss_learning_rate", "ss_text_encoder_lr",
    "ss_unet_lr", "ss_num_train_images", "ss_num_validation_images", "ss_num_reg_images", "ss_num_batches_per_epoch",
    "ss_num_epochs", "ss_gradient_checkpointing", "ss_gradient_accumulation_steps", "ss_max_train_steps",
    "ss_lr_warmup_steps", "ss_lr_scheduler", "ss_network_module", "ss_network_dim", "ss_network_alpha",
    "ss_network_dropout", "ss_mixed_precision", "ss_full_fp16", "ss_v2", "ss_base_model_version", "ss_clip_skip",
    "ss_max_token_length", "ss_cache_latents", "ss_seed", "ss_lowram", "ss_noise_offset",
    "ss_multires_noise_iterations", "ss_multires_noise_discount", "ss_adaptive_noise_scale", "ss_zero_terminal_snr",
    "ss_training_comment", "ss_sd_scripts_commit_hash", "ss_optimizer", "ss_max_grad_norm", "ss_caption_dropout_rate",
    "ss_caption_dropout_every_n_epochs", "ss_caption_tag_dropout_rate", "ss_face_crop_aug_range",
    "ss_prior_loss_weight", "ss_min_snr_gamma", "ss_scale_weight_norms", "ss_ip_noise_gamma", "ss_debiased_estimation",
    "ss_noise_offset_random_strength", "ss_ip_noise_gamma_random_strength", "ss_loss_type", "ss_huber_schedule",
    "ss_huber_scale", "ss_huber_c", "ss_fp8_base", "ss_fp8_base_unet", "ss_validation_seed", "ss_validation_split",
    "ss_max_validation_steps", "ss_validate_every_n_epochs", "ss_validate_every_n_steps", "ss_resize_interpolation",
    # legacy dataset arguments
    "ss_batch_size_per_device", "ss_total_batch_size", "ss_resolution", "ss_color_aug", "ss_flip_aug",
    "ss_random_crop", "ss_shuffle_caption", "ss_enable_bucket", "ss_bucket_no_upscale", "ss_min_bucket_reso",
    "ss_max_bucket_reso", "ss_keep_tokens", "ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_tag_frequency",
    "ss_bucket_info",
    # the base model, then what each save sets
    "ss_sd_model_hash", "ss_new_sd_model_hash", "ss_sd_model_name", "ss_epoch", "ss_training_finished_at", "ss_steps",
}
# Ours beside kohya's: sd-scripts logs its validation loss but writes no key for it.
OWN_KEYS = {"ss_validation_loss"}
KOHYA_OTHER_KEYS = {
    "sshs_model_hash", "sshs_legacy_hash",
    "modelspec.architecture", "modelspec.implementation", "modelspec.title", "modelspec.resolution",
    "modelspec.sai_model_spec", "modelspec.date", "modelspec.prediction_type", "modelspec.implementation_version",
}


def test_metadata_keys_are_the_reference_trainers(tiny_host, tmp_path):
    """Exactly kohya's key set; the optional keys only where kohya writes them for the same settings
    (network args for a conv rank, encoder layer for a clip skip, the trigger phrase as --metadata_trigger_phrase)."""
    make_concept_images(tmp_path / "data" / "1_subject", count=2)
    plain = read_metadata(train_lora(tiny_host, tiny_config(tmp_path / "data", tmp_path / "plain", epochs=1,
                                                            trigger_words="")).saved_files[-1])
    assert set(plain) == KOHYA_SS_KEYS | KOHYA_OTHER_KEYS | OWN_KEYS
    assert plain["modelspec.sai_model_spec"] == "1.0.1"
    assert plain["modelspec.implementation_version"].startswith("train-tools/")
    assert plain["ss_sd_scripts_commit_hash"] == "(unknown)" and plain["ss_training_comment"] == "None"
    assert plain["ss_huber_c"] == "0.1" and plain["ss_validation_split"] == "0.0" and plain["ss_fp8_base"] == "False"

    full = read_metadata(train_lora(tiny_host, tiny_config(tmp_path / "data", tmp_path / "full", epochs=1, conv_rank=2,
                                                           clip_skip=2, enable_buckets=True)).saved_files[-1])
    assert set(full) == KOHYA_SS_KEYS | KOHYA_OTHER_KEYS | OWN_KEYS | {
        "ss_network_args", "modelspec.encoder_layer", "modelspec.trigger_phrase"}
    assert json.loads(full["ss_bucket_info"])["buckets"] and full["ss_min_bucket_reso"] == "64"


def test_saved_file_metadata_and_sidecar(tiny_host, tmp_path):
    make_concept_images(tmp_path / "data" / "3_my subject", count=4)
    config = tiny_config(tmp_path / "data", tmp_path / "out", name="中文角色", epochs=2, conv_rank=2, clip_skip=2,
                         trigger_words="ttconcept", save_precision="fp16")
    result = train_lora(tiny_host, config)
    first, final = result.saved_files
    assert first.name == "中文角色-000001.safetensors" and final.name == "中文角色.safetensors"

    meta = read_metadata(final)
    assert meta["ss_output_name"] == "中文角色" and read_metadata(first)["ss_output_name"] == "中文角色-000001"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0", "dropout": None}
    assert meta["ss_clip_skip"] == "2" and meta["modelspec.encoder_layer"] == "2"
    assert meta["ss_epoch"] == "2" and meta["ss_num_epochs"] == "2"
    assert json.loads(meta["ss_dataset_dirs"]) == {"3_my subject": {"n_repeats": 3, "img_count": 4}}
    frequency = json.loads(meta["ss_tag_frequency"])["3_my subject"]
    assert frequency["ttconcept"] == 4 and frequency["red circle"] == 4
    # Buckets off: sd-scripts writes no bucket info and no bucket sizes.
    assert meta["ss_bucket_info"] == "null" and meta["ss_min_bucket_reso"] == meta["ss_max_bucket_reso"] == "None"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["modelspec.trigger_phrase"] == "ttconcept"
    for key in ("ss_sd_model_name", "ss_training_started_at", "ss_optimizer", "ss_lr_scheduler", "ss_seed",
                "ss_num_train_images", "ss_steps", "ss_mixed_precision", "modelspec.date", "modelspec.resolution"):
        assert key in meta, key
    assert all(isinstance(v, str) for v in meta.values())

    state = load_file(str(final))
    assert all(t.dtype == torch.float16 for t in state.values())
    ss_only = {k: v for k, v in meta.items() if k.startswith("ss_")}
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == precalculated_hashes(state, ss_only)

    sidecar = json.loads((tmp_path / "out" / "中文角色.json").read_text(encoding="utf-8"))
    assert sidecar["activation text"] == "ttconcept" and sidecar["sd version"] == "SD1"
    assert sidecar["preferred weight"] == 1.0 and "rank 4" in sidecar["notes"]

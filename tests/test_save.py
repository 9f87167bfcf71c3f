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
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert meta["ss_clip_skip"] == "2" and meta["modelspec.encoder_layer"] == "2"
    assert meta["ss_epoch"] == "2" and meta["ss_num_epochs"] == "2"
    assert json.loads(meta["ss_dataset_dirs"]) == {"3_my subject": {"n_repeats": 3, "img_count": 4}}
    frequency = json.loads(meta["ss_tag_frequency"])["3_my subject"]
    assert frequency["ttconcept"] == 4 and frequency["red circle"] == 4
    buckets = json.loads(meta["ss_bucket_info"])["buckets"]
    assert [b["resolution"] for b in buckets.values()] == [[64, 64]] and sum(b["count"] for b in buckets.values()) == 12
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

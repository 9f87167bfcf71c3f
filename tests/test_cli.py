"""The headless entry point, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from lib_train.common.errors import ConfigError
from lib_train.engine.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lib_train", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=600)


def demo_config(tmp_path: Path, extra: str = "") -> Path:
    config = (ROOT / "examples" / "demo.toml").read_text(encoding="utf-8")
    config = config.replace('train_dir = "demo_data"', f'train_dir = "{ROOT / "examples" / "demo_data"}"')
    config = config.replace('output_dir = "../out/demo"', f'output_dir = "{tmp_path / "out"}"')
    (tmp_path / "demo.toml").write_text(config + extra, encoding="utf-8")
    return tmp_path / "demo.toml"


def test_demo_trains_on_the_tiny_model_and_writes_kohya_files(tmp_path):
    demo_config(tmp_path)
    completed = run_cli("train", "--config", str(tmp_path / "demo.toml"), "--summary-json", str(tmp_path / "s.json"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "done: 36/36 steps" in completed.stdout
    final = tmp_path / "out" / "ttdemo.safetensors"
    with safe_open(str(final), "pt") as handle:
        assert handle.metadata()["ss_output_name"] == "ttdemo"
        assert len([k for k in handle.keys() if k.endswith(".alpha")]) == 277 + 12
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["steps"] == 36 and len(summary["step_seconds"]) == 36 and summary["peak_rss_mb"] > 0


def test_bf16_weights_train_on_the_cpu(tmp_path):
    """Half-precision frozen weights, as the bench's bf16 cases and the WebUI on a GPU hold them."""
    completed = run_cli("train", "--config", str(demo_config(tmp_path, 'mixed_precision = "bf16"\n')))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "done: 36/36 steps" in completed.stdout


def test_errors_are_reported_without_a_traceback(tmp_path):
    (tmp_path / "bad.toml").write_text('name = "x"\nrank = "sixteen"\n', encoding="utf-8")
    completed = run_cli("train", "--config", str(tmp_path / "bad.toml"))
    assert completed.returncode == 2
    assert "error: Setting 'rank' must be int" in completed.stderr and "Traceback" not in completed.stderr

    good = tmp_path / "good.toml"
    good.write_text(f'name = "x"\ntrain_dir = "{tmp_path}"\noutput_dir = "{tmp_path / "o"}"\n', encoding="utf-8")
    (tmp_path / "model.ckpt").write_bytes(b"x")
    completed = run_cli("train", "--config", str(good), "--checkpoint", str(tmp_path / "model.ckpt"))
    assert completed.returncode == 2 and "only .safetensors" in completed.stderr


def test_toml_paths_are_relative_to_the_file_and_unknown_keys_refused(tmp_path):
    (tmp_path / "c.toml").write_text('name = "x"\ntrain_dir = "data"\noutput_dir = "/abs/out"\n', encoding="utf-8")
    config = TrainConfig.from_toml(tmp_path / "c.toml")
    assert config.train_dir == str(tmp_path / "data") and config.output_dir == "/abs/out"
    (tmp_path / "d.toml").write_text('name = "x"\nlearning_rate = 1e-4\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"Unknown setting\(s\): learning_rate"):
        TrainConfig.from_toml(tmp_path / "d.toml")


def test_find_lr_prints_the_rates_for_the_config_and_writes_nothing_else(tmp_path):
    completed = run_cli("find-lr", "--config", str(demo_config(tmp_path)), "--steps", "60", "--json",
                        str(tmp_path / "lr.json"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    found = json.loads((tmp_path / "lr.json").read_text())
    assert found["optimizer"] == "Prodigy" and found["steps"] == 60 and len(found["history"]) == 60
    assert set(found["estimates"]) == {"unet", "text_encoder"} and all(r > 0 for r in found["estimates"].values())
    for part, rate in found["found"].items():  # the lines to paste into the TOML file
        assert f"{'unet_lr' if part == 'unet' else 'text_encoder_lr'} = {rate:.2e}" in completed.stdout
    assert "Prodigy estimated: UNet" in completed.stderr
    assert not (tmp_path / "out").exists()


def test_continue_from_the_command_line_names_changes_then_accepts_them(tmp_path):
    config = demo_config(tmp_path, 'state_dir = "state"\n')
    first = run_cli("train", "--config", str(config))
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "state" / "ttdemo.training-state.pt").is_file()  # beside the config, as the TOML says
    config.write_text(config.read_text(encoding="utf-8").replace("epochs = 3", "epochs = 4"), encoding="utf-8")
    refused = run_cli("train", "--config", str(config), "--continue")
    assert refused.returncode == 2 and "- epochs: 3 → 4" in refused.stderr, refused.stderr[-3000:]
    accepted = run_cli("train", "--config", str(config), "--continue", "--accept-changes")
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert "done: 48/48 steps" in accepted.stdout
    with safe_open(str(tmp_path / "out" / "ttdemo.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_epoch"] == "4"
    with safe_open(str(tmp_path / "out" / "ttdemo-000003.safetensors"), "pt") as handle:  # the old final, kept
        assert handle.metadata()["ss_epoch"] == "3" and handle.metadata()["ss_output_name"] == "ttdemo-000003"


def test_clip_skip_on_sdxl_is_refused_before_loading_the_checkpoint(tmp_path):
    """SDXL's text encoders always read their penultimate layer (kohya, and the WebUI without its "Clip skip SDXL"):
    a clip_skip in the config would be ignored by training yet written into the file."""
    from safetensors.torch import save_file
    import torch

    checkpoint = tmp_path / "xl.safetensors"  # only its tensor names are read before the refusal
    save_file({"model.diffusion_model.x": torch.zeros(1), "conditioner.embedders.0.x": torch.zeros(1)}, str(checkpoint))
    config = tmp_path / "c.toml"
    config.write_text(f'name = "x"\ntrain_dir = "{tmp_path}"\noutput_dir = "{tmp_path / "o"}"\nclip_skip = 2\n',
                      encoding="utf-8")
    completed = run_cli("train", "--config", str(config), "--checkpoint", str(checkpoint))
    assert completed.returncode == 2 and "clip_skip = 2 does not apply to SDXL" in completed.stderr, completed.stderr

"""Shared fixtures: a tiny SD1 built from the real classes, and small generated datasets."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_train.engine.config import TrainConfig  # noqa: E402
from lib_train.hosts.sd1 import build_tiny_sd1  # noqa: E402
from lib_train.hosts.standalone import StandaloneHost  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet_and_offline(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("TRAIN_TOOLS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    torch.set_num_threads(1)


@pytest.fixture
def tiny_host() -> StandaloneHost:
    return StandaloneHost(build_tiny_sd1(seed=0))


def make_concept_images(folder: Path, count: int = 6, size: int = 64, caption: str = "ttconcept, red circle") -> Path:
    """A learnable concept: a red disc on backgrounds of varying grey, with a caption per image."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        grey = 40 + index * 30
        image = Image.new("RGB", (size, size), (grey, grey, grey))
        draw = ImageDraw.Draw(image)
        offset = (index % 3) * size // 8
        draw.ellipse((size // 4 + offset, size // 4, 3 * size // 4 + offset, 3 * size // 4), fill=(220, 20, 20))
        image.save(folder / f"img_{index:02d}.png")
        (folder / f"img_{index:02d}.txt").write_text(f"{caption}, grey {index}", encoding="utf-8")
    return folder


def tiny_config(train_dir: Path, output_dir: Path, **overrides) -> TrainConfig:
    """Settings for a few seconds of real training on the tiny model."""
    values = dict(name="tiny", train_dir=str(train_dir), output_dir=str(output_dir), resolution=64,
                  min_bucket_reso=64, max_bucket_reso=128, enable_buckets=False, rank=4, alpha=4.0, epochs=2,
                  batch_size=2, unet_lr=1e-3, text_encoder_lr=5e-4, lr_scheduler="constant", seed=1,
                  save_every_n_epochs=1, save_precision="fp32", trigger_words="ttconcept")
    values.update(overrides)
    return TrainConfig(**values)

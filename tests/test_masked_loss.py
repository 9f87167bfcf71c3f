"""Masked loss from the alpha channel: RGBA pictures made here, the mask prepared like the picture (bucket, crop,
mirror) at latent size, no loss or gradient from outside it, real training with and without the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lib_train.common.tensor_store import CacheFolder, CacheReport, TensorStore
from lib_train.dataset.latent_cache import LatentCache
from lib_train.dataset.training_data import TrainingData, scan_training_folder
from lib_train.engine.loss import Objective
from lib_train.engine.model_guard import frozen
from lib_train.engine.network import LoRANetwork
from lib_train.engine.noise import Noising
from lib_train.engine.train import prepare_caches, train_lora
from lib_train.hosts.protocol import PredictionType
from lib_train.hosts.sd1 import build_tiny_sd1
from lib_train.hosts.standalone import StandaloneHost

from .conftest import tiny_config
from .test_dataset import SMALL, encode, expected_latent, save_gradient


def rgba_picture(path: Path, size: tuple[int, int], garbage_seed: int = 0, opaque: bool = False) -> Path:
    """A red disc on grey, opaque on the left 5/8, half transparent in a band, transparent on the right (where
    the colours are noise). Asymmetric, so a mirrored mask differs."""
    width, height = size
    rng = np.random.default_rng(garbage_seed)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    visible, band = width * 5 // 8, width // 8
    rgb[:, :visible + band] = (90, 90, 90)
    yy, xx = np.mgrid[:height, :width]
    rgb[((xx - width // 3) ** 2 + (yy - height // 2) ** 2) < (height // 4) ** 2] = (220, 20, 20)
    alpha = np.zeros((height, width), dtype=np.uint8)
    alpha[:, :visible] = 255
    alpha[:, visible:visible + band] = 128
    if opaque:
        alpha[:] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
    path.with_suffix(".txt").write_text(f"ttconcept, red circle, {path.stem}", encoding="utf-8")
    return path


def rgba_folder(folder: Path, garbage_seed: int = 0, opaque: bool = False, size=(96, 64)) -> Path:
    for index in range(3):
        rgba_picture(folder / f"pic_{index}.png", size, garbage_seed + index, opaque)
    return folder


def expected_mask(path: Path, resized: tuple[int, int], bucket: tuple[int, int], flipped: bool) -> np.ndarray:
    """Kohya's steps, written out here: the alpha resized with the picture, centre-cropped, mirrored, divided by
    255 and averaged over each 8x8 latent cell."""
    with Image.open(path) as image:
        alpha = image.getchannel("A") if image.mode == "RGBA" else None
    if alpha is None:
        return np.ones((1, bucket[1] // 8, bucket[0] // 8), dtype=np.float32)
    if alpha.size != resized:
        enlarging = resized[0] * resized[1] > alpha.size[0] * alpha.size[1]
        alpha = alpha.resize(resized, Image.Resampling.BICUBIC if enlarging else Image.Resampling.LANCZOS)
    left, top = (resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2
    values = np.asarray(alpha.crop((left, top, left + bucket[0], top + bucket[1])), dtype=np.float64) / 255.0
    if flipped:
        values = values[:, ::-1]
    cells = values.reshape(bucket[1] // 8, 8, bucket[0] // 8, 8).mean(axis=(1, 3))
    return cells[None].astype(np.float32)


def test_each_latent_gets_its_pictures_alpha_prepared_like_the_picture(tmp_path):
    folder = tmp_path / "1_a"
    rgba_picture(folder / "wide.png", (151, 100))  # bucket 128x128 from 193x128: an odd, asymmetric crop
    rgba_picture(folder / "tall.png", (60, 190))  # bucket 64x192, enlarged to 64x203 to cover it
    save_gradient(folder / "plain.png", (96, 96))  # no alpha: all of it counts
    data = TrainingData(scan_training_folder(tmp_path, 1), **{**SMALL, "flip_aug": True, "masked_loss": True})
    data.cache_latents(encode, torch.device("cpu"))
    assert {r.path.name: c.bucket for r, c in zip(data.records, data.choices)} == {
        "wide.png": (128, 128), "tall.png": (64, 192), "plain.png": (128, 128)}
    seen = set()
    for epoch in range(6):
        for batch in data.batches(epoch):
            assert batch.masks.shape == (len(batch.records), 1, *batch.latents.shape[-2:])
            for latent, mask, record in zip(batch.latents, batch.masks, batch.records):
                choice = data.choices[data.records.index(record)]
                mirrored = not torch.equal(latent, expected_latent(record, choice.bucket))
                assert torch.equal(latent, expected_latent(record, choice.bucket, mirrored))
                expected = expected_mask(record.path, choice.resized_size, choice.bucket, mirrored)
                assert np.allclose(mask.numpy(), expected, atol=1e-6), (record.path.name, mirrored)
                seen.add((record.path.name, mirrored))
    assert {(name, mirrored) for name in ("wide.png", "tall.png", "plain.png") for mirrored in (False, True)} == seen


def test_what_lies_outside_the_mask_gives_no_loss_and_no_gradient(tiny_host):
    generator = torch.Generator().manual_seed(0)
    network = LoRANetwork.for_host(tiny_host, rank=4, alpha=4.0, train_text_encoder=False)
    with torch.no_grad():  # trained-looking up weights, so the down weights get gradients too
        for module in network.unet_modules:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator) * 0.05)
    latents = torch.randn((2, 4, 8, 8), generator=generator)
    noisy, noise, timesteps = Noising(tiny_host.alphas_cumprod()).sample(latents, generator)
    mask = torch.zeros((2, 1, 8, 8))
    mask[..., :5] = 1.0
    mask[..., 5] = 0.5
    changed = noise.clone()
    changed[..., 6:] = torch.randn(changed[..., 6:].shape, generator=generator) * 10  # only where mask = 0
    objective = Objective(PredictionType.EPSILON, tiny_host.alphas_cumprod())
    with torch.no_grad():
        cond = tiny_host.unet_conditioning(tiny_host.encode_captions(["a", "b"]), None)

    def loss_and_gradients(target, weights):
        network.zero_grad()
        with frozen([tiny_host.unet]), network.attached():
            prediction = tiny_host.predict(noisy, timesteps, cond)
            loss = objective(prediction, target, timesteps, weights)
            loss.backward()
        return prediction.detach(), loss.detach(), [p.grad.clone() for p in network.parameters()]

    prediction, loss, gradients = loss_and_gradients(noise, mask)
    _, loss_changed, gradients_changed = loss_and_gradients(changed, mask)
    assert torch.equal(loss, loss_changed)
    assert all(torch.equal(a, b) for a, b in zip(gradients, gradients_changed))
    assert any(g.abs().sum() > 0 for g in gradients)
    # Averaged as kohya: the masked squared error over every element, the masked-out ones counting as 0.
    expected = (mask * (prediction - noise) ** 2).sum() / prediction.numel()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    _, unmasked, _ = loss_and_gradients(changed, None)
    assert not torch.equal(unmasked, loss)


def train(data: Path, out: Path, cache: CacheFolder | None = None, **overrides):
    config = tiny_config(data, out, epochs=2, text_encoder_lr=0.0, **overrides)
    result = train_lora(StandaloneHost(build_tiny_sd1(seed=0)), config, cache)
    return result, load_file(str(result.saved_files[-1]))


def identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_masked_training_counts_only_the_visible_parts(tmp_path):
    opaque = rgba_folder(tmp_path / "opaque" / "2_c", opaque=True)
    _, plain = train(opaque.parent, tmp_path / "plain")
    visible_result, fully_visible = train(opaque.parent, tmp_path / "visible", masked_loss=True)
    assert identical(plain, fully_visible)  # a mask of ones changes nothing, bit for bit
    # ... and the user is told that masked loss had nothing to mask (Dataset-page imports are flattened)
    assert len(visible_result.notes) == 1 and "no training picture has transparent parts" in visible_result.notes[0]

    one = rgba_folder(tmp_path / "one" / "2_c", garbage_seed=0)
    other = rgba_folder(tmp_path / "other" / "2_c", garbage_seed=50)  # other colours where alpha is 0
    before = {p: p.read_bytes() for p in [*one.iterdir(), *other.iterdir()]}
    result, masked = train(one.parent, tmp_path / "masked", masked_loss=True)
    _, masked_other = train(other.parent, tmp_path / "masked_other", masked_loss=True)
    _, unmasked = train(one.parent, tmp_path / "unmasked")
    assert identical(masked, masked_other) and not identical(masked, unmasked)
    assert result.steps == 6 and all(loss > 0 for _, loss in result.loss_history)
    assert result.notes == []
    assert {p: p.read_bytes() for p in before} == before  # the pictures are never modified
    assert sorted(p.name for p in one.iterdir()) == sorted(
        [f"pic_{i}.png" for i in range(3)] + [f"pic_{i}.txt" for i in range(3)])


def test_masks_come_back_from_the_cache_bit_identically(tmp_path):
    folder = rgba_folder(tmp_path / "data" / "2_c")
    options = dict(masked_loss=True, flip_aug=True, enable_buckets=True)
    cache = CacheFolder(tmp_path / "cache")
    _, without = train(folder.parent, tmp_path / "plain", **options)
    filling, filled = train(folder.parent, tmp_path / "fill", cache, **options)
    reusing, reused = train(folder.parent, tmp_path / "reuse", cache, **options)
    assert identical(without, filled) and identical(without, reused)
    assert (filling.cache.masks_reused, filling.cache.masks_total) == (0, 6)  # 3 pictures, each mirrored too
    assert (reusing.cache.masks_reused, reusing.cache.latents_reused) == (6, 6)
    assert reusing.cache.summary() == "6 of 6 latents from cache, 3 of 3 captions from cache, 6 of 6 masks from cache."
    assert cache.size().masks == 6 and cache.size().describe().startswith("6 latents, 3 captions, 6 masks")

    damaged = cache.masks.entries()[0]
    damaged.write_bytes(damaged.read_bytes()[:50])
    repaired, after = train(folder.parent, tmp_path / "repaired", cache, **options)
    assert identical(without, after) and repaired.cache.masks_reused == 5
    assert any("(mask of pic_" in problem for problem in repaired.cache.problems)


def test_a_cache_filled_without_masks_gives_its_latents_and_prepare_fills_the_masks(tmp_path):
    folder = rgba_folder(tmp_path / "data" / "1_c")
    cache = CacheFolder(tmp_path / "cache")
    train(folder.parent, tmp_path / "unmasked", cache)
    assert cache.size().masks == 0
    masked, state = train(folder.parent, tmp_path / "masked", cache, masked_loss=True)
    assert (masked.cache.latents_reused, masked.cache.masks_reused, masked.cache.masks_total) == (3, 0, 3)
    _, without = train(folder.parent, tmp_path / "plain", masked_loss=True)
    assert identical(state, without)

    fresh = CacheFolder(tmp_path / "fresh")
    config = tiny_config(folder.parent, tmp_path / "unused", text_encoder_lr=0.0, masked_loss=True)
    prepared = prepare_caches(StandaloneHost(build_tiny_sd1(seed=0)), config, fresh)
    assert (prepared.masks_total, fresh.size().masks) == (3, 3)
    after, _ = train(folder.parent, tmp_path / "after", fresh, masked_loss=True)
    assert after.cache.masks_reused == after.cache.masks_total == 3


def test_a_mask_entry_is_keyed_by_picture_crop_flip_and_latent_size_not_by_vae(tmp_path):
    picture = rgba_picture(tmp_path / "p.png", (96, 64))
    stores = TensorStore(tmp_path / "latents"), TensorStore(tmp_path / "masks")
    one, other = (LatentCache(*stores[:1], vae, CacheReport(), stores[1]) for vae in ("vae a", "vae b"))
    keys = {one.mask_key(picture, resized, bucket, flipped, latent)
            for resized, bucket in (((96, 64), (64, 64)), ((128, 64), (64, 64)), ((96, 64), (96, 64)))
            for flipped in (False, True) for latent in ((8, 8), (8, 12))}
    assert len(keys) == 12
    assert one.mask_key(picture, (96, 64), (64, 64), False, (8, 8)) == other.mask_key(
        picture, (96, 64), (64, 64), False, (8, 8))
    assert one.key(picture, (96, 64), (64, 64), False) != other.key(picture, (96, 64), (64, 64), False)

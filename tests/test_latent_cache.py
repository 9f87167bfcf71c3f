"""The persistent cache: real training runs on the tiny SD1/SDXL with a cache folder, real safetensors files.

A rerun from the cache trains bit-identically to a run without it; a changed picture, crop, flip or VAE
re-encodes exactly what changed; a damaged file is re-encoded with a message, never trained on."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from lib_train.common.tensor_store import CacheFolder, CacheReport, DamagedEntry, TensorStore
from lib_train.dataset.latent_cache import LatentCache
from lib_train.engine.train import prepare_caches, train_lora
from lib_train.hosts.sd1 import build_tiny_sd1
from lib_train.hosts.sdxl import build_tiny_sdxl
from lib_train.hosts.standalone import StandaloneHost
from lib_train.hosts.standalone_sdxl import StandaloneSDXLHost

from .conftest import make_concept_images, tiny_config


def fresh_host() -> StandaloneHost:
    return StandaloneHost(build_tiny_sd1(seed=0))


def train(tmp_path: Path, run: str, cache: CacheFolder | None, host=None, **overrides):
    config = tiny_config(tmp_path / "data", tmp_path / run, epochs=2, text_encoder_lr=0.0, **overrides)
    result = train_lora(host or fresh_host(), config, cache)
    return result, load_file(str(result.saved_files[-1]))


def identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def folder_state(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_rerun_from_the_cache_is_bit_identical_and_leaves_the_pictures_alone(tmp_path):
    make_concept_images(tmp_path / "data" / "2_concept", count=4)
    pictures_before = folder_state(tmp_path / "data")
    cache = CacheFolder(tmp_path / "cache")

    _, without = train(tmp_path, "plain", None, flip_aug=True)
    filling, filled = train(tmp_path, "fill", cache, flip_aug=True)
    reusing, reused = train(tmp_path, "reuse", cache, flip_aug=True)

    assert identical(without, filled) and identical(without, reused)
    assert (filling.cache.latents_reused, filling.cache.latents_total) == (0, 8)  # 4 pictures, each mirrored too
    assert (reusing.cache.latents_reused, reusing.cache.captions_reused, reusing.cache.captions_total) == (8, 4, 4)
    assert reusing.cache.summary() == "8 of 8 latents from cache, 4 of 4 captions from cache."
    assert cache.size().latents == 8 and cache.size().captions == 4
    assert folder_state(tmp_path / "data") == pictures_before  # nothing written into the training folder


def test_another_seed_draws_its_own_latents_as_a_run_without_the_cache(tmp_path):
    make_concept_images(tmp_path / "data" / "1_concept", count=2)
    cache = CacheFolder(tmp_path / "cache")
    train(tmp_path, "seed0", cache)
    _, without = train(tmp_path, "plain7", None, host=StandaloneHost(build_tiny_sd1(seed=0), seed=7))
    reseeded, cached = train(tmp_path, "cached7", cache, host=StandaloneHost(build_tiny_sd1(seed=0), seed=7))
    assert reseeded.cache.latents_reused == 0 and reseeded.cache.captions_reused == 2  # captions do not depend on it
    assert identical(without, cached)


def test_sdxl_caption_dicts_come_back_from_the_cache_bit_identically(tmp_path):
    make_concept_images(tmp_path / "data" / "1_concept", count=2)
    cache = CacheFolder(tmp_path / "cache")
    states = [train(tmp_path, run, cached, host=StandaloneSDXLHost(build_tiny_sdxl(seed=0)))
              for run, cached in (("plain", None), ("fill", cache), ("reuse", cache))]
    assert identical(states[0][1], states[1][1]) and identical(states[0][1], states[2][1])
    assert states[2][0].cache.summary() == "2 of 2 latents from cache, 2 of 2 captions from cache."
    stored = load_file(str(cache.text.entries()[0]))
    assert sorted(stored) == ["part.crossattn", "part.pooled"]


def test_a_changed_picture_or_flip_reencodes_exactly_those_entries(tmp_path):
    make_concept_images(tmp_path / "data" / "1_concept", count=4)
    cache = CacheFolder(tmp_path / "cache")
    first, _ = train(tmp_path, "a", cache)
    assert (first.cache.latents_reused, first.cache.latents_total) == (0, 4)

    flipped, _ = train(tmp_path, "b", cache, flip_aug=True)
    assert (flipped.cache.latents_reused, flipped.cache.latents_total) == (4, 8)  # only the mirrored ones encoded

    # A crop in the Dataset page rewrites the picture in pictures/: its bytes, and so its key, change.
    picture = tmp_path / "data" / "1_concept" / "img_02.png"
    Image.open(picture).crop((8, 8, 56, 56)).resize((64, 64)).save(picture)
    (tmp_path / "data" / "1_concept" / "img_02.txt").write_text("ttconcept, red circle, cropped", encoding="utf-8")
    changed, _ = train(tmp_path, "c", cache, flip_aug=True)
    assert (changed.cache.latents_reused, changed.cache.latents_total) == (6, 8)
    assert (changed.cache.captions_reused, changed.cache.captions_total) == (3, 4)  # the edited caption only
    assert cache.size().latents == 10 and cache.size().captions == 5


def test_another_size_or_crop_is_another_entry(tmp_path):
    make_concept_images(tmp_path / "data" / "1_concept", count=2, size=96)
    cache = CacheFolder(tmp_path / "cache")
    train(tmp_path, "a", cache)
    other_size, _ = train(tmp_path, "b", cache, resolution=128)  # resized differently, another crop
    assert other_size.cache.latents_reused == 0
    back, _ = train(tmp_path, "c", cache)
    assert back.cache.latents_reused == 2  # both sizes kept

    store = TensorStore(tmp_path / "unit")
    latents = LatentCache(store, "vae", CacheReport(), TensorStore(tmp_path / "unit-masks"))
    picture = tmp_path / "data" / "1_concept" / "img_00.png"
    keys = {latents.key(picture, resized, bucket, flipped)
            for resized, bucket in (((64, 64), (64, 64)), ((96, 64), (64, 64)), ((96, 64), (96, 64)))
            for flipped in (False, True)}
    assert len(keys) == 6


def test_another_vae_encoder_reencodes_everything_another_decoder_nothing(tmp_path):
    make_concept_images(tmp_path / "data" / "1_concept", count=2)
    cache = CacheFolder(tmp_path / "cache")
    train(tmp_path, "a", cache)

    new_decoder = fresh_host()
    with torch.no_grad():
        for parameter in new_decoder.model.vae.decoder.parameters():
            parameter.add_(0.01)
    same, _ = train(tmp_path, "b", cache, host=new_decoder)
    assert same.cache.latents_reused == 2  # latents come from the encoder side only

    new_encoder = fresh_host()
    with torch.no_grad():
        new_encoder.model.vae.quant_conv.weight.mul_(1.01)
    other, _ = train(tmp_path, "c", cache, host=new_encoder)
    assert other.cache.latents_reused == 0
    assert other.cache.captions_reused == 2  # the text encoder did not change

    clip_skip = StandaloneHost(build_tiny_sd1(seed=0), clip_skip=2)
    assert clip_skip.text_encoder_identity() != fresh_host().text_encoder_identity()


def test_a_truncated_or_altered_cache_file_is_encoded_again_with_a_message(tmp_path):
    make_concept_images(tmp_path / "data" / "1_concept", count=3)
    cache = CacheFolder(tmp_path / "cache")
    train(tmp_path, "a", cache)
    truncated, altered, _ = cache.latents.entries()
    truncated.write_bytes(truncated.read_bytes()[:100])
    data = bytearray(altered.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit in the tensor bytes: the file still parses
    altered.write_bytes(bytes(data))
    caption_file = cache.text.entries()[0]
    caption_file.write_bytes(caption_file.read_bytes()[:-10])

    host = fresh_host()
    result, _ = train(tmp_path, "b", cache, host=host)
    assert (result.cache.latents_reused, result.cache.captions_reused) == (1, 2)
    problems = "\n".join(result.cache.problems)
    assert len(result.cache.problems) == 3
    assert f"{truncated} was damaged: it cannot be read" in problems
    assert f"{altered} was damaged: its contents do not match their checksum" in problems
    assert "embedding of the caption 'ttconcept, red circle, grey" in problems
    assert any("3 damaged cache file(s) encoded again" in p.message for p in host.progress_log)

    again, _ = train(tmp_path, "c", cache)  # written anew, whole
    assert (again.cache.latents_reused, again.cache.captions_reused, again.cache.problems) == (3, 3, [])


def test_an_entry_of_another_key_is_refused(tmp_path):
    store = TensorStore(tmp_path)
    store.write("one", {"latent": torch.ones(2)})
    os.replace(store.path_for("one"), store.path_for("two"))
    try:
        store.read("two")
    except DamagedEntry as damaged:
        assert "it was written for another entry" in str(damaged)
    else:
        raise AssertionError("a file of another key was returned")
    assert not store.path_for("two").exists()
    assert store.read("two") is None


def test_the_cache_is_bounded_least_recently_used_first_and_can_be_cleared(tmp_path):
    cache = CacheFolder(tmp_path / "cache", limit_bytes=0)
    for number in range(4):
        cache.latents.write(f"latent {number}", {"latent": torch.full((4, 8, 8), float(number))})
    entry_bytes = cache.size().bytes // 4
    for number in range(4):
        os.utime(cache.latents.path_for(f"latent {number}"), (1000 + number, 1000 + number))
    cache.latents.read("latent 0")  # used now: the most recent
    cache.limit_bytes = 2 * entry_bytes
    assert cache.keep_within_limit() == 2
    assert [number for number in range(4) if cache.latents.path_for(f"latent {number}").exists()] == [0, 3]
    (cache.latents.folder / ".left-by-a-killed-run.safetensors.123.tmp").write_bytes(b"x")
    assert cache.clear() == 2
    assert list(cache.latents.folder.iterdir()) == []
    assert cache.size().describe() == "0 latents, 0 captions, 0.0 MB"


def test_prepare_fills_the_cache_so_training_encodes_nothing(tmp_path):
    make_concept_images(tmp_path / "data" / "2_concept", count=4)
    cache = CacheFolder(tmp_path / "cache")
    _, without = train(tmp_path, "plain", None, flip_aug=True)
    config = tiny_config(tmp_path / "data", tmp_path / "unused", epochs=2, text_encoder_lr=0.0, flip_aug=True)
    prepared = prepare_caches(fresh_host(), config, cache)
    assert (prepared.latents_reused, prepared.latents_total, prepared.captions_total) == (0, 8, 4)
    assert not (tmp_path / "unused").exists()

    result, after = train(tmp_path, "after", cache, flip_aug=True)
    assert identical(without, after)
    assert result.cache.summary() == "8 of 8 latents from cache, 4 of 4 captions from cache."


def test_prepare_stops_between_chunks(tmp_path):
    make_concept_images(tmp_path / "data" / "1_concept", count=10)
    host = fresh_host()

    def stop_after_the_first_chunk(progress):
        if progress.phase == "caching":
            host.request_stop()

    host._on_progress = stop_after_the_first_chunk
    cache = CacheFolder(tmp_path / "cache")
    prepare_caches(host, tiny_config(tmp_path / "data", tmp_path / "out"), cache)
    # Stop is seen after each chunk of 4: the chunk under way when it came is kept, the last one never encoded.
    assert cache.size().latents == 8
    assert host.progress_log[-1].message.startswith("Stopped.")


def test_weights_digest_samples_the_last_value_of_a_tensor_too_large_for_float32_indices():
    from lib_train.hosts.model_identity import sampled_weights_digest

    holder = torch.nn.Module()
    # The size of SD1.5's text-encoder token embedding (49408 x 768): a float32 linspace ends one past it.
    holder.register_buffer("weights", torch.zeros(49408 * 768, dtype=torch.uint8))
    before = sampled_weights_digest([holder])
    holder.weights[-1] = 1
    assert sampled_weights_digest([holder]) != before


def test_tag_dropout_encodes_captions_at_every_step_and_stays_seeded(tmp_path):
    make_concept_images(tmp_path / "data" / "2_concept", count=2)
    cache = CacheFolder(tmp_path / "cache")
    first, dropped = train(tmp_path, "a", cache, caption_tag_dropout_rate=0.5)
    assert first.cache.captions_total == 0 and cache.size().captions == 0  # each step's caption is another text
    _, again = train(tmp_path, "b", cache, caption_tag_dropout_rate=0.5)
    _, whole = train(tmp_path, "c", cache)
    assert identical(dropped, again) and not identical(dropped, whole)

"""Regularization (class) pictures as kohya reads them: ``<N>_<class>`` folders, as many class items per epoch as
training items, each one's loss times the prior-loss weight (0: no contribution at all), kohya's metadata keys;
on the tiny real model with real steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from lib_train.common.errors import DatasetError
from lib_train.dataset.regularization import balanced_repeats
from lib_train.dataset.training_data import ImageRecord
from lib_train.engine.loss import elementwise_loss, training_target
from lib_train.engine.network import LoRANetwork
from lib_train.engine.noise import Noising
from lib_train.engine.steps import usable_pictures
from lib_train.engine.train import train_lora
from lib_train.hosts.sd1 import build_tiny_sd1
from lib_train.hosts.standalone import StandaloneHost

from .conftest import make_concept_images, tiny_config


def class_pictures(folder: Path, count: int) -> Path:
    """Plain class pictures without captions: kohya's folder name is their caption."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.new("RGB", (64, 64), (30 * index, 120, 200)).save(folder / f"person_{index}.png")
    return folder


@pytest.fixture
def folders(tmp_path):
    make_concept_images(tmp_path / "train" / "2_concept", count=4)  # 8 training items per epoch
    class_pictures(tmp_path / "reg" / "1_person", count=3)
    return tmp_path


def records(repeats: list[int]) -> list[ImageRecord]:
    return [ImageRecord(Path(f"r{i}.png"), "person", n, "1_person", (64, 64), is_reg=True) for i, n in enumerate(repeats)]


def test_an_epoch_holds_as_many_class_items_as_training_items():
    """kohya's loop: every picture with its repeats until the count is reached, then one more repeat each in turn."""
    assert [r.repeats for r in balanced_repeats(10, records([1, 1, 1]))] == [4, 3, 3]
    assert [r.repeats for r in balanced_repeats(2, records([1] * 5))] == [1, 1]  # the other three are not used
    assert [r.repeats for r in balanced_repeats(5, records([10]))] == [10]  # a folder's repeats are kept whole
    assert [r.repeats for r in balanced_repeats(7, records([2, 2]))] == [4, 3]
    assert balanced_repeats(8, []) == []


def test_the_class_folder_is_read_in_kohyas_convention(folders):
    config = tiny_config(folders / "train", folders / "out", reg_dir=str(folders / "reg"), batch_size=4)
    data = config.training_data(usable_pictures(config).records)
    reg = [r for r in data.records if r.is_reg]
    assert [(r.path.name, r.caption, r.repeats) for r in reg] == [
        ("person_0.png", "person", 3), ("person_1.png", "person", 3), ("person_2.png", "person", 2)]
    assert data.num_train_images == 8 and data.num_reg_images == 3
    assert data.num_batches_per_epoch == 4  # 16 items: kohya's epoch doubles with class pictures
    assert data.dataset_dirs() == {"2_concept": {"n_repeats": 2, "img_count": 4}}
    assert data.reg_dataset_dirs() == {"1_person": {"n_repeats": 1, "img_count": 3}}


def test_bad_class_folders_are_named(folders):
    def refused(reg_dir, message):
        config = tiny_config(folders / "train", folders / "out", reg_dir=str(reg_dir))
        with pytest.raises(DatasetError, match=message):
            usable_pictures(config)

    refused(folders / "missing", "Regularization folder not found")
    refused(folders / "train", "overlap")
    refused(folders / "train" / "2_concept", "overlap")
    refused(class_pictures(folders / "flat", 2), "have no caption")


def test_each_class_pictures_loss_counts_times_the_prior_weight(folders):
    """The loss terms measured on one mixed batch: the step's loss is the batch mean of loss × weight, and at weight
    0 the class pictures give neither loss nor gradient."""
    losses = {}
    for weight in (0.0, 0.5, 1.0):
        tiny_host = StandaloneHost(build_tiny_sd1(seed=0))  # a fresh one: its VAE samples the same latents again
        network = LoRANetwork.for_host(tiny_host, rank=4, alpha=4.0, train_text_encoder=False, seed=0)
        with torch.no_grad():  # non-zero up weights, so every LoRA parameter gets a gradient
            for module in network.unet_modules:
                module.lora_up.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        schedule = tiny_host.alphas_cumprod()
        config = tiny_config(folders / "train", folders / "out", reg_dir=str(folders / "reg"), batch_size=16,
                             prior_loss_weight=weight, text_encoder_lr=0.0)
        data = config.training_data(usable_pictures(config).records)
        data.cache_latents(tiny_host.encode_images, tiny_host.device)
        batch = next(iter(data.batches(0)))  # the whole epoch, class and training pictures mixed
        is_reg = torch.tensor([r.is_reg for r in batch.records])
        assert is_reg.sum() == 8 and torch.equal(batch.loss_weights, torch.where(is_reg, weight, 1.0))
        noisy, noise, timesteps = Noising(schedule).sample(batch.latents, torch.Generator().manual_seed(5))
        with torch.no_grad():
            cond = tiny_host.encode_captions(batch.captions)
        with network.attached():
            prediction = tiny_host.predict(noisy, timesteps, cond)
        target = training_target(tiny_host.prediction_type, batch.latents, noise, schedule, timesteps)
        objective = config.objective(tiny_host.prediction_type, schedule)
        loss = objective(prediction, target, timesteps, None, batch.loss_weights)
        per_sample = elementwise_loss(prediction, target).mean(dim=(1, 2, 3))
        terms = {"train": per_sample[~is_reg].sum().item() / 16, "reg": per_sample[is_reg].sum().item() / 16}
        assert math.isclose(loss.item(), terms["train"] + weight * terms["reg"], rel_tol=1e-5)
        losses[weight] = loss.item()
        if weight == 0.0:  # the class pictures contribute nothing: the gradient is the training pictures' alone
            assert_same_gradient(network, loss, per_sample[~is_reg].sum() / 16)
    assert losses[0.0] < losses[0.5] < losses[1.0]
    assert math.isclose(losses[1.0] - losses[0.5], losses[0.5] - losses[0.0], rel_tol=1e-4)


def assert_same_gradient(network: LoRANetwork, loss: torch.Tensor, expected: torch.Tensor) -> None:
    parameters = [p for p in network.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, parameters, retain_graph=True)
    wanted = torch.autograd.grad(expected, parameters)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-10) for a, b in zip(got, wanted))
    assert any(a.abs().sum() > 0 for a in got)


def test_training_with_class_pictures_records_kohyas_keys(tiny_host, folders):
    results = {}
    for weight in (0.0, 1.0):
        config = tiny_config(folders / "train", folders / "out" / str(weight), reg_dir=str(folders / "reg"), epochs=1,
                             batch_size=4, prior_loss_weight=weight)
        results[weight] = train_lora(tiny_host, config)
    assert results[1.0].total_steps == 4  # 8 training + 8 class items in batches of 4
    with safe_open(str(results[1.0].saved_files[-1]), "pt") as handle:
        metadata = handle.metadata()
        trained = {key: handle.get_tensor(key) for key in handle.keys()}
    assert metadata["ss_num_reg_images"] == "3" and metadata["ss_num_train_images"] == "8"
    assert metadata["ss_prior_loss_weight"] == "1.0"
    assert json.loads(metadata["ss_reg_dataset_dirs"]) == {"1_person": {"n_repeats": 1, "img_count": 3}}
    assert json.loads(metadata["ss_dataset_dirs"]) == {"2_concept": {"n_repeats": 2, "img_count": 4}}
    with safe_open(str(results[0.0].saved_files[-1]), "pt") as handle:
        assert handle.metadata()["ss_prior_loss_weight"] == "0.0"
        assert any(not torch.equal(handle.get_tensor(key), trained[key]) for key in trained)


def test_the_validation_loss_is_measured_on_the_training_pictures_only(folders):
    """The ★ epoch is where the LoRA fits the training pictures best: the class pictures (as many items as the
    training ones, often many more pictures) would pull it towards the epoch closest to the base model, and the
    file's ss_num_validation_images counts the training pictures."""
    tiny_host = StandaloneHost(build_tiny_sd1(seed=0))
    config = tiny_config(folders / "train", folders / "out", reg_dir=str(folders / "reg"), batch_size=2)
    data = config.training_data(usable_pictures(config).records)
    data.cache_latents(tiny_host.encode_images, tiny_host.device)
    validated = [record for batch in data.fixed_batches() for record in batch.records]
    assert sorted(r.path.name for r in validated) == [f"img_{i:02d}.png" for i in range(4)]
    assert not any(r.is_reg for r in validated)

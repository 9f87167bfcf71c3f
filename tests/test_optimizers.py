"""Optimizers on the tiny SD1: each trains and lowers the loss, writes kohya's ss_optimizer, refuses what it cannot
run with a message; optimizer arguments read as kohya's --optimizer_args; schedule-free saves its averaged weights."""

from __future__ import annotations

import sys
from contextlib import ExitStack

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lib_train.common.errors import ConfigError
from lib_train.common.tensor_store import CacheReport
from lib_train.dataset.training_data import load_rgb, pixels_to_tensor
from lib_train.engine.config import TrainConfig, parse_key_values
from lib_train.engine.optim import OPTIMIZER_KINDS, OptimizerKind, describe_optimizer, optimizer_kind
from lib_train.engine.steps import check_run, epoch_steps, start_run, usable_pictures
from lib_train.engine.train import train_lora
from lib_train.hosts.sd1 import build_tiny_sd1
from lib_train.hosts.standalone import StandaloneHost

from .conftest import make_concept_images, tiny_config
from .test_training import eval_loss, full_fingerprint

# (UNet lr, text-encoder lr, optimizer arguments, epochs of 4 steps). Lion takes a smaller rate than AdamW, as its
# authors advise. The adaptive ones start from d0=1e-4, as their authors advise when d stays small (from the default
# 1e-6 Prodigy needs ~60 steps to find its rate on this model, and then the rate it finds overshoots: the loss after 80
# steps depended on the thread count and the seed, 0.74-1.02 of the start). Prodigy without bias correction and
# warmup safeguard (its training defaults hold d at d0 longer than a test runs), at d_coef 0.3: the loss then falls
# steadily to ~0.73 of the start in 80 steps for seeds 1-3. D-Adaptation's d, unbounded, also overshot here (0.88 of
# the start at step 32, then back above 1); at growth_rate 1.1 (d grows at most 10% a step) it falls to 0.75-0.78.
RECIPES = {
    "AdamW": (1e-2, 5e-3, {}, 6),
    "AdamW8bit": (1e-2, 5e-3, {}, 6),
    "Lion": (3e-3, 1.5e-3, {}, 6),
    "Lion8bit": (3e-3, 1.5e-3, {}, 6),
    "Prodigy": (1.0, 1.0, {"use_bias_correction": False, "safeguard_warmup": False, "d0": 1e-4, "d_coef": 0.3}, 20),
    "DAdaptAdam": (1.0, 1.0, {"d0": 1e-4, "growth_rate": 1.1}, 15),
    "Adafactor": (1e-2, 5e-3, {}, 6),
    "AdamWScheduleFree": (1e-2, 5e-3, {}, 6),
}


def available(name: str, device: torch.device) -> None:
    """Skip, with the reason, what this machine cannot run (CI installs every package of requirements-dev.txt)."""
    kind = OPTIMIZER_KINDS[name]
    if kind.cuda_only and device.type != "cuda":
        pytest.skip(f"{name} runs on CUDA only and this machine has no GPU")
    try:
        kind.load()
    except ConfigError as error:
        pytest.skip(str(error))


def test_every_optimizer_has_a_recipe_here():
    assert set(RECIPES) == set(OPTIMIZER_KINDS)


@pytest.mark.parametrize("name", list(RECIPES))
def test_each_optimizer_lowers_the_loss_and_is_written_as_kohya_names_it(name, tmp_path):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available(name, device)
    unet_lr, text_encoder_lr, arguments, epochs = RECIPES[name]
    make_concept_images(tmp_path / "data" / "4_concept", count=4)
    host = StandaloneHost(build_tiny_sd1(seed=0), device=str(device))
    before_training = full_fingerprint(host)
    config = tiny_config(tmp_path / "data", tmp_path / "out", epochs=epochs, save_every_n_epochs=0, batch_size=4,
                         unet_lr=unet_lr, text_encoder_lr=text_encoder_lr, optimizer=name, optimizer_args=arguments)
    result = train_lora(host, config)
    assert result.steps == 4 * epochs and full_fingerprint(host) == before_training

    pictures = sorted((tmp_path / "data" / "4_concept").glob("*.png"))
    with torch.no_grad():
        latents = host.encode_images(pixels_to_tensor([load_rgb(p) for p in pictures]).to(device))
    captions = [p.with_suffix(".txt").read_text() for p in pictures]
    before = eval_loss(host, latents, captions)
    after = eval_loss(host, latents, captions, load_file(str(result.saved_files[-1]), device=str(device)))
    assert after < 0.95 * before, (name, before, after)

    kind = OPTIMIZER_KINDS[name]
    optimizer_class = kind.load()
    assert kind.class_path == f"{optimizer_class.__module__}.{optimizer_class.__name__}"
    with safe_open(str(result.saved_files[-1]), "pt") as handle:
        written = handle.metadata()["ss_optimizer"]
    assert written == describe_optimizer(kind, config.optimizer_arguments(result.total_steps))
    assert written.startswith(f"{kind.class_path}(weight_decay=0.01")
    for key, value in arguments.items():
        assert f"{key}={value}" in written


def test_ss_optimizer_lists_the_defaults_and_the_users_arguments_as_kohya():
    config = TrainConfig(optimizer="Prodigy", optimizer_args={"d_coef": 0.5, "betas": (0.9, 0.99)})
    assert describe_optimizer(optimizer_kind("Prodigy"), config.optimizer_arguments(100)) == (
        "prodigyopt.prodigy.Prodigy(weight_decay=0.01,decouple=True,use_bias_correction=True,safeguard_warmup=True,"
        "d_coef=0.5,betas=(0.9, 0.99))")
    adafactor = TrainConfig(optimizer="Adafactor", weight_decay=0.0)
    assert describe_optimizer(optimizer_kind("Adafactor"), adafactor.optimizer_arguments(100)) == (
        "transformers.optimization.Adafactor(weight_decay=0.0,scale_parameter=False,relative_step=False,"
        "warmup_init=False)")
    free = TrainConfig(optimizer="AdamWScheduleFree", lr_scheduler="constant", lr_warmup_ratio=0.1)
    assert free.optimizer_arguments(250) == {"weight_decay": 0.01, "warmup_steps": 25}


def test_optimizer_arguments_read_as_kohyas_command_line():
    assert parse_key_values("d_coef=0.5 betas=(0.9, 0.99) decouple=true") == {
        "d_coef": 0.5, "betas": (0.9, 0.99), "decouple": True}
    # kohya's own spelling of a tuple, commas between pairs, quoted strings holding '='
    assert parse_key_values("betas=0.9,0.99, eps=1e-8,name='a=b'") == {"betas": (0.9, 0.99), "eps": 1e-8, "name": "a=b"}
    assert parse_key_values("  ") == {}
    for text, message in (("d_coef", "write key=value pairs"), ("a=1 a=2", "'a' is given twice"),
                          ("d_coef=high", "cannot read 'high'"), ("x 1=2", "write key=value pairs")):
        with pytest.raises(ConfigError, match=message):
            parse_key_values(text)


def test_optimizer_arguments_come_as_text_or_as_a_table(tmp_path):
    from_text = TrainConfig.from_dict({"optimizer": "Prodigy", "optimizer_args": "d_coef=2 betas=0.9,0.99"})
    from_json = TrainConfig.from_dict({"optimizer": "Prodigy", "optimizer_args": {"d_coef": 2, "betas": [0.9, 0.99]}})
    assert from_text.optimizer_args == from_json.optimizer_args == {"d_coef": 2, "betas": (0.9, 0.99)}
    (tmp_path / "run.toml").write_text('optimizer = "Prodigy"\n[optimizer_args]\nd_coef = 2\nbetas = [0.9, 0.99]\n')
    assert TrainConfig.from_toml(tmp_path / "run.toml").optimizer_args == from_text.optimizer_args
    with pytest.raises(ConfigError, match="'optimizer_args' must be dict"):
        TrainConfig.from_dict({"optimizer_args": 3})


def valid(**overrides) -> TrainConfig:
    return TrainConfig(name="x", train_dir="d", output_dir="o", **overrides)


@pytest.mark.parametrize("overrides, message", [
    (dict(optimizer="Prodigy", unet_lr=1.0, text_encoder_lr=1.0, optimizer_args={"d_coeff": 2}),
     "Prodigy has no argument d_coeff; it accepts: .*d_coef"),
    (dict(optimizer_args={"lr": 1e-3}), "'lr' is not set here: set the learning-rate fields"),
    (dict(optimizer_args={"weight_decay": 0.1}), "set the weight decay setting instead"),
    (dict(optimizer="Adafactor", optimizer_args={"relative_step": True}), "relative_step=False .* is not supported"),
    (dict(optimizer="Prodigy", unet_lr=1e-4, text_encoder_lr=0.0),
     "Prodigy estimates its own step size: .* 1.0 by convention .* shrink every step 10000-fold"),
    (dict(optimizer="DAdaptAdam", unet_lr=1.0, text_encoder_lr=0.5), "give the text encoder the UNet's \\(1\\)"),
    (dict(unet_lr=1.0), "below 1 for AdamW .* convention of the adaptive optimizers"),
    (dict(optimizer="AdamWScheduleFree", lr_scheduler="cosine"), "choose the constant scheduler"),
    (dict(lr_warmup_steps=10, lr_warmup_ratio=0.1), "as steps or as a ratio of the steps, not both"),
    (dict(lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=0), "cycles must be at least 1"),
    (dict(optimizer="SGD"), "Optimizer must be one of AdamW, AdamW8bit, Lion, Lion8bit, Prodigy"),
    # Lion takes either without a word: a negative decay grows every weight, NaN makes the first step NaN.
    (dict(optimizer="Lion", weight_decay=-0.1), "Weight decay must be 0 or more \\(got -0.1\\)"),
    (dict(weight_decay=float("nan")), "Weight decay must be 0 or more \\(got nan\\)"),
])
def test_settings_that_make_no_sense_for_the_optimizer_are_refused_with_a_hint(overrides, message):
    with pytest.raises(ConfigError, match=message):
        valid(**overrides).validate()


def test_adaptive_optimizers_accept_their_convention():
    valid(optimizer="Prodigy", unet_lr=1.0, text_encoder_lr=1.0, optimizer_args={"d_coef": 0.5}).validate()
    valid(optimizer="DAdaptAdam", unet_lr=1.0, text_encoder_lr=0.0).validate()


def test_a_missing_package_is_a_message_naming_it(tiny_host, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="needs the Python package no-such-package.*pip install no-such-package"):
        OptimizerKind("Nothing", "no_such_package.optim.Nothing", "no-such-package").load()
    make_concept_images(tmp_path / "data" / "1_concept", count=2)
    before = full_fingerprint(tiny_host)
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # what Python does for a package that is not installed
    monkeypatch.setitem(sys.modules, "prodigyopt.prodigy", None)
    with pytest.raises(ConfigError, match="Prodigy needs the Python package prodigyopt"):
        train_lora(tiny_host, tiny_config(tmp_path / "data", tmp_path / "out", optimizer="Prodigy", unet_lr=1.0,
                                          text_encoder_lr=1.0))
    assert full_fingerprint(tiny_host) == before and not (tmp_path / "out").exists()
    assert not any(p.phase == "caching" for p in tiny_host.progress_log)  # refused before any picture was encoded


def test_lion8bit_is_refused_on_the_cpu(tiny_host, tmp_path):
    make_concept_images(tmp_path / "data" / "1_concept", count=2)
    with pytest.raises(ConfigError, match="Lion8bit runs on a CUDA GPU only .* choose Lion"):
        train_lora(tiny_host, tiny_config(tmp_path / "data", tmp_path / "out", optimizer="Lion8bit"))


def test_schedule_free_saves_its_averaged_weights_and_trains_on(tmp_path):
    """Each epoch's file holds the eval-mode (averaged) weights; training goes on from the train-mode ones."""
    available("AdamWScheduleFree", torch.device("cpu"))
    make_concept_images(tmp_path / "data" / "2_concept", count=4)
    config = tiny_config(tmp_path / "data", tmp_path / "out", epochs=2, optimizer="AdamWScheduleFree",
                         lr_warmup_steps=2)
    result = train_lora(StandaloneHost(build_tiny_sd1(seed=0)), config)
    files = [load_file(str(path)) for path in result.saved_files]

    # The same run from the engine's own parts, switching by hand.
    host = StandaloneHost(build_tiny_sd1(seed=0))
    data = config.training_data(usable_pictures(config).records)
    with ExitStack() as cleanup:
        run = start_run(cleanup, host, config, data, None, CacheReport(), result.total_steps, check_run(host, config))
        optimizer = run.optimizers[0]
        for epoch, file in zip((1, 2), files):
            for _ in epoch_steps(host, config, run, data, epoch, 0):
                pass
            # Copies: on the CPU in float32 the state dict's tensors are the parameters themselves.
            training_weights = {k: v.clone() for k, v in run.network.kohya_state_dict().items()}
            optimizer.eval()
            averaged = {k: v.clone() for k, v in run.network.kohya_state_dict().items()}
            optimizer.train()
            assert all(torch.equal(file[key], averaged[key]) for key in file)
            assert not all(torch.equal(file[key], training_weights[key]) for key in file)

"""Kohya's loss and noise options on the tiny SD1: Huber / smooth L1 and their c schedules, debiased estimation,
pyramid and input-perturbation noise, each computed independently here and each trained for a few real steps."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lib_train.common.errors import ConfigError
from lib_train.engine.config import TrainConfig
from lib_train.engine.loss import Objective, debiased_weights, elementwise_loss, huber_thresholds, zero_terminal_snr
from lib_train.engine.noise import Noising, pyramid_noise
from lib_train.engine.train import train_lora
from lib_train.hosts.protocol import PredictionType
from lib_train.hosts.sd1 import build_tiny_sd1
from lib_train.hosts.sdxl import build_tiny_sdxl
from lib_train.hosts.standalone import StandaloneHost
from lib_train.hosts.standalone_sdxl import StandaloneSDXLHost

from .conftest import make_concept_images, tiny_config

EPS, V = PredictionType.EPSILON, PredictionType.V


def fresh_host() -> StandaloneHost:
    return StandaloneHost(build_tiny_sd1(seed=0))


def train(tmp_path, run: str, **overrides):
    """A few real steps on a fresh tiny SD1; the result and the saved file's tensors."""
    config = tiny_config(tmp_path / "data", tmp_path / run, **{"epochs": 1, **overrides})
    result = train_lora(fresh_host(), config)
    return result, load_file(str(result.saved_files[-1]))


def identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def first_losses(result) -> list[float]:
    return [loss for _, loss in result.loss_history]


@pytest.fixture
def schedule() -> torch.Tensor:
    return fresh_host().alphas_cumprod().float()


# -- Huber and smooth L1 --------------------------------------------------------------------------


def test_huber_c_per_sample_follows_each_schedule(schedule):
    c, scale, steps = 0.2, 1.5, [0, 250, 999]
    timesteps = torch.tensor(steps)
    alpha = [float(schedule[t]) for t in steps]
    sigma = [math.sqrt((1 - a) / a) for a in alpha]
    expected = {
        "exponential": [scale * c ** (t / 1000) for t in steps],  # scale at t=0, scale·c at t=T
        "snr": [(1 - c) / (1 + s) ** 2 + c for s in sigma],  # no scale, as kohya
        "constant": [c * scale] * 3,
    }
    for name, values in expected.items():
        got = huber_thresholds(name, c, scale, schedule, timesteps)
        assert got.shape == (3,)
        assert torch.allclose(got.double(), torch.tensor(values, dtype=torch.float64), rtol=1e-5), name
    ends = huber_thresholds("snr", c, scale, schedule, torch.tensor([0, 999]))
    assert ends[0] > 0.9 and ends[1] == pytest.approx(c, abs=0.01)  # near 1 (≈ L2) when clean, c when noisy


def test_huber_and_smooth_l1_are_kohyas_formula_with_each_samples_own_c():
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn((2, 4, 8, 8), generator=generator), torch.randn((2, 4, 8, 8), generator=generator)
    c = torch.tensor([0.1, 2.0])
    difference = (prediction - target).double()
    for sample in range(2):
        root = torch.sqrt(difference[sample] ** 2 + float(c[sample]) ** 2) - float(c[sample])
        huber = elementwise_loss(prediction, target, "huber", c)[sample]
        smooth = elementwise_loss(prediction, target, "smooth_l1", c)[sample]
        assert torch.allclose(huber.double(), 2 * float(c[sample]) * root, atol=1e-6)
        assert torch.allclose(smooth.double(), 2 * root, atol=1e-6)


def test_a_huge_c_makes_huber_l2_and_smooth_l1_l2_over_c(schedule):
    """2c(√(d²+c²) - c) = d² · 2c/(√(d²+c²)+c) → d² as c grows; smooth L1 is that divided by c."""
    generator = torch.Generator().manual_seed(1)
    prediction, target = torch.randn((4, 4, 8, 8), generator=generator), torch.randn((4, 4, 8, 8), generator=generator)
    timesteps = torch.tensor([0, 300, 600, 999])
    l2 = Objective(EPS, schedule)(prediction, target, timesteps)
    for loss_type, factor in (("huber", 1.0), ("smooth_l1", 100.0)):
        loss = Objective(EPS, schedule, loss_type, "constant", huber_c=100.0)(prediction, target, timesteps)
        assert float(loss) * factor == pytest.approx(float(l2), rel=1e-3), loss_type
    small = Objective(EPS, schedule, "huber", "constant", huber_c=0.01)(prediction, target, timesteps)
    assert float(small) < 0.05 * float(l2)  # ≈ 2c|d| for |d| ≫ c: large errors count linearly, and little


def test_huber_training_with_a_huge_c_follows_l2_and_a_small_c_lowers_the_loss(tmp_path):
    make_concept_images(tmp_path / "data" / "2_concept", count=4)
    l2, _ = train(tmp_path, "l2")
    huge, _ = train(tmp_path, "huge", loss_type="huber", huber_schedule="constant", huber_c=100.0)
    assert len(huge.loss_history) == len(l2.loss_history) == 4
    assert first_losses(huge) == pytest.approx(first_losses(l2), rel=1e-2)
    smooth, _ = train(tmp_path, "smooth", loss_type="smooth_l1", huber_schedule="constant", huber_c=100.0)
    assert first_losses(smooth)[0] * 100 == pytest.approx(first_losses(l2)[0], rel=1e-3)  # the same first step
    small, state = train(tmp_path, "small", loss_type="huber", huber_schedule="constant", huber_c=0.01)
    assert all(h < 0.5 * p for h, p in zip(first_losses(small), first_losses(l2)))
    assert any(t.abs().sum() > 0 for k, t in state.items() if "lora_up" in k)


# -- Debiased estimation ------------------------------------------------------------------------


def test_debiased_weights_at_chosen_timesteps(schedule):
    steps = [0, 10, 500, 999]
    snr = [min(float(schedule[t]) / (1 - float(schedule[t])), 1000.0) for t in steps]  # clipped as kohya
    eps = debiased_weights(schedule, torch.tensor(steps), EPS)
    v = debiased_weights(schedule, torch.tensor(steps), V)
    assert eps.tolist() == pytest.approx([1 / math.sqrt(s) for s in snr], rel=1e-5)
    assert v.tolist() == pytest.approx([1 / (s + 1) for s in snr], rel=1e-5)
    assert snr[0] == 1000.0 and eps[0] == pytest.approx(1 / math.sqrt(1000))  # t = 0: SNR ~ 1e4, clipped


@pytest.mark.parametrize("kind", ["sd1 epsilon", "sdxl v-prediction, zero terminal SNR"])
def test_debiased_training_weighs_each_steps_loss_by_its_timestep(tmp_path, kind):
    make_concept_images(tmp_path / "data" / "1_concept", count=1)
    v = kind.startswith("sdxl")

    def host():
        return StandaloneSDXLHost(build_tiny_sdxl(seed=0), prediction_type=V) if v else fresh_host()

    options = dict(epochs=1, batch_size=1, text_encoder_lr=0.0, zero_terminal_snr=v)
    runs = [train_lora(host(), tiny_config(tmp_path / "data", tmp_path / f"run{on}", debiased_estimation_loss=on,
                                           **options)) for on in (False, True)]
    # The first step's timestep, drawn as the loop draws it from the seed: the noise first, then t.
    generator = torch.Generator().manual_seed(1)
    torch.randn((1, 4, 8, 8), generator=generator)
    t = int(torch.randint(0, 1000, (1,), generator=generator))
    schedule = host().alphas_cumprod().double()
    alpha = float(zero_terminal_snr(schedule)[t] if v else schedule[t])
    snr = min(alpha / (1 - alpha), 1000.0)
    weight = 1 / (snr + 1) if v else 1 / math.sqrt(snr)
    plain, debiased = (first_losses(run)[0] for run in runs)
    assert debiased == pytest.approx(plain * weight, rel=1e-5)


# -- Pyramid and input-perturbation noise ---------------------------------------------------------


def neighbour_correlation(noise: torch.Tensor) -> float:
    left, right = noise[..., :-1].flatten(), noise[..., 1:].flatten()
    return float(torch.corrcoef(torch.stack([left, right]))[0, 1])


def test_pyramid_noise_is_unit_and_carries_low_frequencies():
    generator = torch.Generator().manual_seed(2)
    white = torch.randn((8, 4, 64, 64), generator=generator)
    pyramid = pyramid_noise(white.clone(), generator, iterations=6, discount=0.8)
    assert float(pyramid.std()) == pytest.approx(1.0, abs=1e-5)
    assert abs(neighbour_correlation(white)) < 0.03 and neighbour_correlation(pyramid) > 0.2
    # Each picture's mean over the latent: about 1/64 for white noise, far more with the coarse levels.
    assert float(pyramid.mean(dim=(2, 3)).std()) > 5 * float(white.mean(dim=(2, 3)).std())
    again = pyramid_noise(white.clone(), torch.Generator().manual_seed(3), iterations=6, discount=0.8)
    assert not torch.equal(again, pyramid)
    weak = pyramid_noise(white.clone(), torch.Generator().manual_seed(4), iterations=6, discount=0.3)
    assert 0.0 < neighbour_correlation(weak) < neighbour_correlation(pyramid)


def test_noising_with_pyramid_noise_trains_on_it(tmp_path, schedule):
    latents = torch.zeros((2, 4, 16, 16))
    noisy, noise, t = Noising(schedule, multires_iterations=6, multires_discount=0.8).sample(
        latents, torch.Generator().manual_seed(0))
    assert float(noise.std()) == pytest.approx(1.0, abs=1e-5) and neighbour_correlation(noise) > 0.2
    alpha = schedule[t].view(-1, 1, 1, 1)
    assert torch.allclose(noisy, (1 - alpha).sqrt() * noise)  # the target's noise is the noise applied

    make_concept_images(tmp_path / "data" / "1_concept", count=2)
    _, plain = train(tmp_path, "plain")
    result, multires = train(tmp_path, "multires", multires_noise_iterations=6, multires_noise_discount=0.3)
    assert not identical(plain, multires) and all(math.isfinite(loss) for loss in first_losses(result))


def test_input_perturbation_changes_the_input_not_the_target(tmp_path, schedule):
    latents = torch.randn((4, 4, 32, 32), generator=torch.Generator().manual_seed(5))
    plain = Noising(schedule).sample(latents, torch.Generator().manual_seed(9))
    gamma = 0.5
    perturbed = Noising(schedule, ip_noise_gamma=gamma).sample(latents, torch.Generator().manual_seed(9))
    assert torch.equal(perturbed[1], plain[1]) and torch.equal(perturbed[2], plain[2])  # noise (target), t
    alpha = schedule[plain[2]].view(-1, 1, 1, 1)
    extra = (perturbed[0] - plain[0]) / ((1 - alpha).sqrt() * gamma)  # the perturbation, recovered
    assert float(extra.std()) == pytest.approx(1.0, abs=0.05)
    assert abs(float(torch.corrcoef(torch.stack([extra.flatten(), plain[1].flatten()]))[0, 1])) < 0.05

    make_concept_images(tmp_path / "data" / "1_concept", count=2)
    base, base_state = train(tmp_path, "base")
    ip, ip_state = train(tmp_path, "ip", ip_noise_gamma=0.1)
    assert not identical(base_state, ip_state) and first_losses(ip) != first_losses(base)


# -- Defaults, settings, metadata ---------------------------------------------------------------


def test_settings_of_options_that_are_off_change_nothing(tmp_path):
    make_concept_images(tmp_path / "data" / "2_concept", count=2)
    _, default = train(tmp_path, "default", epochs=2)
    _, unused = train(tmp_path, "unused", epochs=2, huber_schedule="exponential", huber_c=0.5, huber_scale=2.0,
                      multires_noise_discount=0.9)
    assert identical(default, unused)


@pytest.mark.parametrize("overrides, message", [
    (dict(loss_type="l1"), "Loss type must be one of l2, huber, smooth_l1"),
    (dict(huber_schedule="linear"), "Huber schedule must be one of snr, exponential, constant"),
    (dict(huber_c=0.0), "Huber c must be positive"),
    (dict(huber_scale=-1.0), "Huber scale must be positive"),
    (dict(multires_noise_iterations=-1), "Multires noise iterations cannot be negative"),
    (dict(multires_noise_discount=0.0), r"Multires noise discount must be in \(0, 1\]"),
    (dict(ip_noise_gamma=1.5), r"Input perturbation noise gamma must be in \[0, 1\]"),
    (dict(caption_tag_dropout_rate=1.0), r"Tag dropout must be in \[0, 1\)"),
    (dict(loraplus_unet_lr_ratio=-2.0), "LoRA\\+ UNet ratio cannot be negative"),
])
def test_bad_values_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(name="x", train_dir="d", output_dir="o", **overrides).validate()


def test_the_options_come_from_a_toml_file(tmp_path):
    (tmp_path / "run.toml").write_text(
        'name = "x"\ntrain_dir = "d"\noutput_dir = "o"\nloss_type = "huber"\nhuber_schedule = "constant"\n'
        'huber_c = 0.3\ndebiased_estimation_loss = true\nmultires_noise_iterations = 6\nip_noise_gamma = 0.1\n'
        'caption_tag_dropout_rate = 0.1\nmasked_loss = true\nloraplus_lr_ratio = 16\n', encoding="utf-8")
    config = TrainConfig.from_toml(tmp_path / "run.toml").validate()
    assert (config.loss_type, config.huber_c, config.multires_noise_iterations, config.loraplus_lr_ratio) == (
        "huber", 0.3, 6, 16.0)
    assert config.debiased_estimation_loss and config.masked_loss and config.loraplus_ratios() == (16.0, 16.0)
    with pytest.raises(ConfigError, match="Setting 'masked_loss' must be bool"):
        TrainConfig.from_dict({"masked_loss": "sometimes"})


def test_metadata_records_the_options_as_kohya_writes_them(tiny_host, tmp_path):
    make_concept_images(tmp_path / "data" / "1_concept", count=2)
    config = tiny_config(tmp_path / "data", tmp_path / "out", epochs=1, loss_type="smooth_l1",
                         huber_schedule="exponential", huber_c=0.2, huber_scale=1.5, debiased_estimation_loss=True,
                         multires_noise_iterations=6, multires_noise_discount=0.4, ip_noise_gamma=0.1,
                         caption_tag_dropout_rate=0.25, masked_loss=True, loraplus_lr_ratio=16.0)
    with safe_open(str(train_lora(tiny_host, config).saved_files[-1]), "pt") as handle:
        meta = handle.metadata()
    assert {key: meta[key] for key in (
        "ss_loss_type", "ss_huber_schedule", "ss_huber_c", "ss_huber_scale", "ss_debiased_estimation",
        "ss_multires_noise_iterations", "ss_multires_noise_discount", "ss_ip_noise_gamma",
        "ss_caption_tag_dropout_rate", "ss_masked_loss")} == {
        "ss_loss_type": "smooth_l1", "ss_huber_schedule": "exponential", "ss_huber_c": "0.2", "ss_huber_scale": "1.5",
        "ss_debiased_estimation": "True", "ss_multires_noise_iterations": "6", "ss_multires_noise_discount": "0.4",
        "ss_ip_noise_gamma": "0.1", "ss_caption_tag_dropout_rate": "0.25", "ss_masked_loss": "True"}
    assert json.loads(meta["ss_network_args"]) == {"loraplus_lr_ratio": "16.0", "dropout": None}

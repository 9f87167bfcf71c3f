"""The learning-rate finder on the tiny SD1: a rate per part, the host as it was, nothing written, Stop, the
fallback to D-Adaptation, a divergence named as the probe's."""

from __future__ import annotations

import math
import sys

import pytest

from lib_train.common.errors import ConfigError, TrainingDiverged
from lib_train.engine.lr_finder import find_learning_rate
from lib_train.engine.model_guard import hook_count
from lib_train.engine.train import train_lora

from .conftest import make_concept_images, tiny_config
from .test_training import full_fingerprint


@pytest.fixture
def pictures(tmp_path):
    return make_concept_images(tmp_path / "data" / "4_concept", count=4).parent


def test_the_finder_reports_a_rate_per_part_and_leaves_the_host_as_it_was(tiny_host, pictures, tmp_path):
    before = full_fingerprint(tiny_host)
    config = tiny_config(pictures, tmp_path / "out", batch_size=4, lr_finder_steps=80, optimizer="Lion",
                         optimizer_args={"betas": (0.95, 0.98)})  # the user's optimizer plays no part
    finding = find_learning_rate(tiny_host, config)

    assert finding.optimizer == "Prodigy" and finding.steps == 80 and not finding.stopped
    assert set(finding.learning_rates) == {"unet", "text_encoder"}
    assert all(math.isfinite(rate) and rate > 0 for rate in finding.learning_rates.values())
    # d starts at 1e-6 and grows: the UNet's estimate left it by orders of magnitude
    assert finding.learning_rates["unet"] > 100 * finding.start_rates["unet"] and "unet" in finding.found
    assert [step for step, _ in finding.history] == list(range(1, 81)) and len(finding.loss_history) == 80
    unet = [rates["unet"] for _, rates in finding.history]
    assert unet == sorted(unet) and unet[-1] == finding.learning_rates["unet"]  # Prodigy's d never shrinks
    reported = [p.learning_rates for p in tiny_host.progress_log if p.phase == "training"]
    assert reported == [rates for _, rates in finding.history]
    assert "Prodigy estimated: UNet" in tiny_host.progress_log[-1].message

    assert full_fingerprint(tiny_host) == before and hook_count(tiny_host.model) == 0
    assert all(p.grad is None for p in tiny_host.model.parameters())
    assert not (tmp_path / "out").exists()


def test_stop_ends_the_probe_between_steps_with_no_rate_to_use(tiny_host, pictures, tmp_path):
    before = full_fingerprint(tiny_host)

    def stop_at_step_five(progress):
        if progress.phase == "training" and progress.step == 5:
            tiny_host.request_stop()

    tiny_host._on_progress = stop_at_step_five
    finding = find_learning_rate(tiny_host, tiny_config(pictures, tmp_path / "out", lr_finder_steps=50))
    assert finding.stopped and finding.steps == 5 and finding.found == {}
    assert "Stopped after 5 of 50 steps" in finding.summary() and "underestimates" in finding.summary()
    assert full_fingerprint(tiny_host) == before and hook_count(tiny_host.model) == 0


def test_without_prodigy_the_finder_uses_d_adaptation_and_without_both_it_says_what_to_install(
        tiny_host, pictures, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # as Python behaves for a package that is not installed
    monkeypatch.setitem(sys.modules, "prodigyopt.prodigy", None)
    config = tiny_config(pictures, tmp_path / "out", text_encoder_lr=0.0, lr_finder_steps=3)
    finding = find_learning_rate(tiny_host, config)
    assert finding.optimizer == "DAdaptAdam" and finding.steps == 3
    assert set(finding.learning_rates) == {"unet"}  # the text encoder is not trained, so not probed

    monkeypatch.setitem(sys.modules, "dadaptation", None)
    monkeypatch.setitem(sys.modules, "dadaptation.dadapt_adam", None)
    with pytest.raises(ConfigError, match="needs Prodigy \\(pip install prodigyopt\\) or D-Adaptation"):
        find_learning_rate(tiny_host, config)


def test_a_probe_that_diverges_says_so_and_restores_the_host(tiny_host, pictures, tmp_path, monkeypatch):
    before = full_fingerprint(tiny_host)
    real_predict = tiny_host.predict
    calls = {"n": 0}

    def diverging(*args):
        calls["n"] += 1
        return real_predict(*args) * (float("nan") if calls["n"] > 3 else 1.0)

    monkeypatch.setattr(tiny_host, "predict", diverging)
    with pytest.raises(TrainingDiverged, match="The probe's loss became NaN or infinite at step 4: Prodigy's estimate"):
        find_learning_rate(tiny_host, tiny_config(pictures, tmp_path / "out", batch_size=4, lr_finder_steps=10))
    monkeypatch.undo()
    assert full_fingerprint(tiny_host) == before and hook_count(tiny_host.model) == 0


def test_the_probe_starts_from_the_lora_the_training_starts_from(tiny_host, pictures, tmp_path):
    """With "Start from a LoRA" the probe measures from those weights, as the training that follows starts there."""
    start = train_lora(tiny_host, tiny_config(pictures, tmp_path / "first", epochs=1, unet_lr=1e-2)).saved_files[-1]
    fresh = find_learning_rate(tiny_host, tiny_config(pictures, tmp_path / "out", lr_finder_steps=2))
    continued = find_learning_rate(tiny_host, tiny_config(pictures, tmp_path / "out", lr_finder_steps=2,
                                                          initial_lora=str(start)))
    assert continued.loss_history[0][1] != fresh.loss_history[0][1]  # the first loss is the start's, before a step
    with pytest.raises(ConfigError, match="rank|layout|shape"):  # a file of another layout is refused, not ignored
        find_learning_rate(tiny_host, tiny_config(pictures, tmp_path / "out", lr_finder_steps=2, rank=8,
                                                  alpha=8.0, initial_lora=str(start)))

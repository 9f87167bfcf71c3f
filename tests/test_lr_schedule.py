"""Learning-rate schedules by kohya's names: factors at chosen steps, against transformers' schedules (which kohya
calls) where they agree, and as a training applies them (reported rates, warmup ratio, metadata)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from transformers import optimization

from lib_train.engine.lr_schedule import SCHEDULERS, make_lr_schedule, schedule_factor, warmup_steps
from lib_train.engine.train import train_lora

from .conftest import make_concept_images, tiny_config


@pytest.mark.parametrize("name, step, warmup, cycles, power, expected", [
    ("constant", 7, 0, 1, 1.0, 1.0),
    ("constant_with_warmup", 1, 4, 1, 1.0, 2 / 5),  # warmup never starts at 0: step 0 of 4 is 1/5
    ("cosine", 5, 0, 1, 1.0, 0.5),  # halfway down
    ("cosine", 4, 2, 1, 1.0, 0.5 * (1 + math.cos(math.pi * 2 / 8))),
    ("cosine_with_restarts", 2, 0, 2, 1.0, 0.5 * (1 + math.cos(math.pi * 0.4))),
    ("cosine_with_restarts", 5, 0, 2, 1.0, 1.0),  # the second cycle starts from the full rate
    ("cosine_with_restarts", 9, 0, 2, 1.0, 0.5 * (1 + math.cos(math.pi * 0.8))),
    ("linear", 0, 0, 1, 1.0, 1.0),
    ("linear", 6, 2, 1, 1.0, 0.5),
    ("polynomial", 5, 0, 1, 2.0, 0.25),
    ("polynomial", 5, 0, 1, 1.0, 0.5),  # power 1 is linear
])
def test_factors_at_chosen_steps(name, step, warmup, cycles, power, expected):
    assert schedule_factor(name, step, warmup, 10, cycles, power) == pytest.approx(expected)


@pytest.mark.parametrize("name, theirs", [
    ("cosine", lambda o: optimization.get_cosine_schedule_with_warmup(o, 0, 40)),
    ("cosine_with_restarts", lambda o: optimization.get_cosine_with_hard_restarts_schedule_with_warmup(o, 0, 40, 3)),
    ("linear", lambda o: optimization.get_linear_schedule_with_warmup(o, 0, 40)),
    # transformers' polynomial ends at lr_end=1e-7 instead of 0
    ("polynomial", lambda o: optimization.get_polynomial_decay_schedule_with_warmup(o, 0, 40, power=2.0)),
])
def test_after_warmup_the_schedules_are_the_ones_kohya_calls(name, theirs):
    ours_optimizer, their_optimizer = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0) for _ in "ab")
    ours, reference = make_lr_schedule(ours_optimizer, name, 0, 40, cycles=3, power=2.0), theirs(their_optimizer)
    for _ in range(40):
        assert ours.get_last_lr()[0] == pytest.approx(reference.get_last_lr()[0], abs=2e-7)
        for optimizer, schedule in ((ours_optimizer, ours), (their_optimizer, reference)):
            optimizer.step()  # a schedule steps after its optimizer (torch warns otherwise)
            schedule.step()


def test_unknown_schedule_fails_when_made():
    with pytest.raises(ValueError, match="Unknown learning-rate scheduler 'exponential'"):
        make_lr_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), "exponential", 0, 10)
    assert len(SCHEDULERS) == 6


def test_warmup_as_a_ratio_rounds_down_as_kohya():
    assert warmup_steps(0, 0.1, 95) == 9 and warmup_steps(5, 0.0, 95) == 5


def test_training_steps_follow_the_schedule_and_the_file_says_it_as_kohya(tiny_host, tmp_path):
    make_concept_images(tmp_path / "data" / "4_concept", count=4)
    config = tiny_config(tmp_path / "data", tmp_path / "out", epochs=3, batch_size=4, save_every_n_epochs=0,
                         lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2, lr_warmup_ratio=0.25)
    result = train_lora(tiny_host, config)
    assert result.total_steps == 12
    rates = [p.learning_rate for p in tiny_host.progress_log if p.phase == "training"]
    expected = [config.unet_lr * schedule_factor("cosine_with_restarts", step, 3, 12, cycles=2) for step in range(12)]
    assert rates == pytest.approx(expected)
    assert rates[:3] == pytest.approx([config.unet_lr * k / 4 for k in (1, 2, 3)])  # 3 warmup steps (25% of 12)
    with safe_open(str(result.saved_files[-1]), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_lr_scheduler"] == "cosine_with_restarts"
    assert metadata["ss_lr_warmup_steps"] == "0.25"  # kohya writes its float --lr_warmup_steps as given

"""Find the learning rate: a short probe on the host's model with an adaptive optimizer (Prodigy, or DAdaptAdam
when prodigyopt is missing), one per part so the UNet and the text encoder get an estimate each. The rate it
converged to, d·lr, is what to train AdamW/AdamW8bit with (the seeds' procedure: D-Adaptation first, then AdamW8bit
at its rate). Same data, network and precision as the training these settings would run; nothing is saved."""

from __future__ import annotations

import dataclasses
import itertools
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

from ..common.errors import ConfigError, TrainingDiverged
from ..common.i18n import N_, tr
from ..common.tensor_store import CacheFolder, CacheReport
from ..hosts.protocol import Progress, TrainingHost
from .config import TrainConfig
from .optim import OPTIMIZER_KINDS, effective_learning_rates
from .initial_lora import load_initial_lora
from .steps import StopRequested, check_run, epoch_steps, start_run, usable_pictures

# No bias correction and no warmup safeguard: both are for long runs with a warmup, and they hold d near its
# start for hundreds of steps, longer than a probe runs. Without them d·lr is the rate of Adam past its first steps.
_PROBE_ARGUMENTS = {"Prodigy": {"use_bias_correction": False, "safeguard_warmup": False}, "DAdaptAdam": {}}
_NAMES = {"unet": "UNet", "text_encoder": N_("text encoder")}
# Still growing: the estimate rose by more than this over the last fifth of the probe.
_GROWTH_LEFT = 1.1
# Not moved: a part whose estimate stayed within this factor of its start value found nothing (no gradient signal
# in the probe, as a text encoder with near-identical captions).
_MOVED = 10.0


@dataclass
class LearningRateFinding:
    optimizer: str  # the adaptive optimizer that probed
    learning_rates: dict[str, float] = field(default_factory=dict)  # part ("unet", "text_encoder") -> d·lr at the end
    start_rates: dict[str, float] = field(default_factory=dict)  # d0·lr, where each estimate started
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # step -> d·lr per part
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    steps: int = 0
    total_steps: int = 0
    stopped: bool = False
    seconds: float = 0.0
    cache: CacheReport = field(default_factory=CacheReport)

    @property
    def found(self) -> dict[str, float]:
        """The rates to train with: those of a probe run to the end whose estimate left its start value."""
        if self.stopped:
            return {}
        return {part: rate for part, rate in self.learning_rates.items() if rate > _MOVED * self.start_rates[part]}

    @property
    def still_growing(self) -> list[str]:
        """The parts whose estimate had not settled: it rose more than 10% over the last fifth of the steps."""
        if len(self.history) < 5:
            return list(self.learning_rates)
        earlier = self.history[len(self.history) * 4 // 5 - 1][1]
        return [part for part, rate in self.learning_rates.items() if rate > _GROWTH_LEFT * earlier[part]]

    def summary(self) -> str:
        rates = ", ".join(f"{tr(_NAMES[part])} {rate:.2e}" for part, rate in self.learning_rates.items())
        facts = dict(steps=self.steps, total_steps=self.total_steps, optimizer=self.optimizer, rates=rates)
        text = (tr("Stopped after {steps} of {total_steps} steps, {optimizer} estimated: {rates} (d·lr).", **facts)
                if self.stopped else tr("After {steps} of {total_steps} steps, {optimizer} estimated: {rates} (d·lr).",
                                        **facts))
        if self.stopped:
            return text + tr(" A stopped probe underestimates: run it to the end before using these.")
        found = self.found
        unmoved = [tr(_NAMES[part]) for part in self.learning_rates if part not in found]
        if unmoved:
            text += tr(" The {parts} estimate never left its start value: no rate found for it, keep yours (or probe "
                       "with more steps or pictures).", parts=tr(" and ").join(unmoved))
        growing = [tr(_NAMES[part]) for part in self.still_growing if part in found]
        if growing:
            text += tr(" The {parts} estimate was still growing: more steps (Learning-rate finder steps) give a "
                       "higher, steadier number.", parts=tr(" and ").join(growing))
        return text + (tr(" Train with AdamW or AdamW8bit at the rates found.") if found else "")


def probe_optimizer() -> str:
    """Prodigy when prodigyopt is installed, else DAdaptAdam; a ConfigError naming both packages otherwise."""
    for name in _PROBE_ARGUMENTS:
        try:
            OPTIMIZER_KINDS[name].load()
            return name
        except ConfigError:
            continue
    raise ConfigError(tr("Finding the learning rate needs Prodigy (pip install prodigyopt) or D-Adaptation (pip "
                         "install dadaptation); the WebUI installs both at its next start."))


def probe_config(config: TrainConfig, optimizer: str) -> TrainConfig:
    """The settings of the probe: the user's data, network, loss and precision; the adaptive optimizer at lr 1 for
    each part that trains, with no schedule (nothing to warm up or decay in a probe)."""
    return dataclasses.replace(
        config, optimizer=optimizer, optimizer_args=dict(_PROBE_ARGUMENTS[optimizer]), unet_lr=1.0,
        text_encoder_lr=1.0 if config.train_text_encoder else 0.0, lr_scheduler="constant", lr_warmup_steps=0,
        lr_warmup_ratio=0.0,
    )


def find_learning_rate(host: TrainingHost, config: TrainConfig, cache: CacheFolder | None = None) -> LearningRateFinding:
    """Run ``config.lr_finder_steps`` optimizer steps (across epochs as needed); Stop ends it between steps. The host
    is left exactly as it was; no file is written (with ``cache``, latents and captions are kept there for the
    training that follows)."""
    started = time.time()
    probe = probe_config(config, probe_optimizer()).validate()
    amp_dtype = check_run(host, probe)
    data = probe.training_data(usable_pictures(probe).records)
    finding = LearningRateFinding(optimizer=probe.optimizer, total_steps=probe.lr_finder_steps)

    run = None
    with ExitStack() as cleanup:
        try:
            run = start_run(cleanup, host, probe, data, cache, finding.cache, finding.total_steps, amp_dtype,
                            optimizer_per_part=True)
            if probe.initial_lora:  # probed from where the training will start
                load_initial_lora(run.network, probe.initial_lora)
            steps = itertools.chain.from_iterable(epoch_steps(host, probe, run, data, epoch, finding.steps)
                                                  for epoch in itertools.count(1))
            for step in itertools.islice(steps, finding.total_steps):
                finding.steps += 1
                rates = {o.param_groups[0]["name"]: effective_learning_rates(o)[0] for o in run.optimizers}
                finding.start_rates = finding.start_rates or {
                    o.param_groups[0]["name"]: o.param_groups[0]["lr"] * o.d0 for o in run.optimizers}
                finding.learning_rates = rates
                finding.history.append((finding.steps, rates))
                finding.loss_history.append((finding.steps, step.loss))
                host.report(Progress("training", finding.steps, finding.total_steps, step.epoch, 0, loss=step.loss,
                                     learning_rate=rates["unet"], learning_rates=rates))
        except StopRequested:
            finding.stopped = True
        except TrainingDiverged:
            reached = ", ".join(f"{tr(_NAMES[part])} {rate:.2e}" for part, rate in finding.learning_rates.items())
            raise TrainingDiverged(
                tr("The probe's loss became NaN or infinite at step {value}: {optimizer}'s estimate ({reached}) "
                   "overshot for these pictures and settings. Train well below it (a third, say), or probe again "
                   "with fewer steps; nothing was saved.", value=finding.steps + 1, optimizer=finding.optimizer,
                   reached=reached)) from None
        finally:
            run = data = None  # noqa: F841  (their memory is given back before the caller's next job)

    finding.seconds = time.time() - started
    host.report(Progress("done", finding.steps, finding.total_steps, message=finding.summary()))
    return finding

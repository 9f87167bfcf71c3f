"""The LoRA training loop. Reads top to bottom: plan outputs, load data, set up (latents, LoRA, optimizer; see
``steps.py``, shared with the learning-rate finder), train epoch by epoch, save, render the samples the caller
asked for (``samples.py``). The host model is left exactly as it was, whatever happens."""

from __future__ import annotations

import math
import random
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from ..common.i18n import tr
from ..common.tensor_store import CacheFolder, CacheReport
from ..hosts.protocol import Progress, TrainingHost
from .config import TrainConfig
from .metadata import RunFacts, lora_metadata, sidecar
from .model_guard import frozen
from .network import LoRANetwork
from .optim import evaluation_weights
from .samples import TrainingSamples
from .save import SAVE_DTYPES, OutputPlan, write_lora, write_sidecar
from .steps import StopRequested, cache_latents, caption_conditioning, check_run, epoch_steps, start_run, usable_pictures


@dataclass
class TrainResult:
    saved_files: list[Path] = field(default_factory=list)
    stopped: bool = False  # the user asked to stop; saved_files holds what was finished before
    steps: int = 0
    total_steps: int = 0
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    setup_seconds: float = 0.0  # start until the first training step
    step_seconds: list[float] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)  # unusable pictures left out (skip_unusable_files)
    cache: CacheReport = field(default_factory=CacheReport)  # what came from the cache folder, if one was given


def train_lora(host: TrainingHost, config: TrainConfig, cache: CacheFolder | None = None,
               samples: TrainingSamples | None = None) -> TrainResult:
    """Train a LoRA on the host's model; with ``cache``, latents and caption embeddings are kept there between
    runs (the result is bit-identical with or without it); with ``samples``, sample pictures are rendered on
    their schedule (the result is bit-identical with or without them)."""
    started = time.time()
    config.validate()
    plan = OutputPlan.create(config.output_dir, config.name, config.epochs, config.save_every_n_epochs, config.overwrite)
    amp_dtype = check_run(host, config)

    scan = usable_pictures(config)
    data = config.training_data(scan.records)
    steps_per_epoch = math.ceil(data.num_batches_per_epoch / config.gradient_accumulation_steps)
    result = TrainResult(total_steps=steps_per_epoch * config.epochs, skipped_files=scan.unusable)
    if scan.unusable:
        host.report(Progress("caching", message=tr("Skipping {count_unusable} unusable file(s); nothing was "
                                                   "modified.", count_unusable=len(scan.unusable))))
    facts = RunFacts(
        family=host.family, prediction_type=host.prediction_type, base_model=host.base_model,
        session_id=random.randint(0, 2**32 - 1), started_at=started, num_train_images=data.num_train_images,
        num_batches_per_epoch=data.num_batches_per_epoch, max_train_steps=result.total_steps,
        dataset_dirs=data.dataset_dirs(), tag_frequency=data.tag_frequency(), bucket_info=data.bucket_info(),
        num_reg_images=data.num_reg_images, reg_dataset_dirs=data.reg_dataset_dirs(),
    )

    run = None
    with ExitStack() as cleanup:
        try:
            run = start_run(cleanup, host, config, data, cache, result.cache, result.total_steps, amp_dtype)
            result.setup_seconds = time.time() - started

            for epoch in range(1, config.epochs + 1):
                for step in epoch_steps(host, config, run, data, epoch, result.steps):
                    result.steps += 1
                    result.loss_history.append((result.steps, step.loss))
                    result.step_seconds.append(step.seconds)
                    host.report(Progress("training", result.steps, result.total_steps, epoch, config.epochs,
                                         loss=step.loss, learning_rate=step.learning_rate))
                    if samples is not None:
                        samples.after_step(host, run, epoch, result.steps, result.total_steps)
                if plan.saves_after_epoch(epoch):
                    with evaluation_weights(run.optimizers):  # schedule-free: the averaged weights are the model
                        _save_epoch(host, config, plan, facts, run.network, epoch, result)
                if samples is not None:
                    samples.after_epoch(host, run, epoch, result.steps, result.total_steps)
        except StopRequested:
            result.stopped = True
        finally:
            # Tracebacks keep frames alive: drop the big objects so their memory (VRAM) is given back.
            run = data = None  # noqa: F841

    host.report(Progress("done", result.steps, result.total_steps, message=tr("Stopped.") if result.stopped else tr("Done."),
                         saved_files=[str(p) for p in result.saved_files]))
    return result


def prepare_caches(host: TrainingHost, config: TrainConfig, cache: CacheFolder) -> CacheReport:
    """What ``train_lora`` encodes before its first step, put in ``cache`` ahead of time (the "Prepare for
    training" job): the same pictures, chunks and host state, so the training that follows finds every entry."""
    config.validate()
    data = config.training_data(usable_pictures(config).records)
    report = CacheReport()
    with host.training_session(), frozen([host.unet, *(encoder.module for encoder in host.text_encoders)]):
        try:
            cache_latents(host, data, cache, report)
            caption_conditioning(host, config, cache, report).prefill([record.caption for record in data.records])
        except StopRequested:
            pass
    cache.keep_within_limit()
    host.report(Progress("done", message=(tr("Stopped. ") if host.should_stop() else "") + report.summary()))
    return report


def _save_epoch(host: TrainingHost, config: TrainConfig, plan: OutputPlan, facts: RunFacts, network: LoRANetwork,
                epoch: int, result: TrainResult) -> None:
    host.report(Progress("saving", result.steps, result.total_steps, epoch, config.epochs,
                         message=tr("Saving {name}", name=plan.lora_path(epoch).name)))
    state = network.kohya_state_dict(SAVE_DTYPES[config.save_precision])
    metadata = lora_metadata(config, facts, output_name=plan.stem(epoch), epoch=epoch, steps=result.steps)
    write_lora(plan.lora_path(epoch), state, metadata, config.overwrite)
    result.saved_files.append(plan.lora_path(epoch))
    write_sidecar(plan.sidecar_path(epoch), sidecar(config, host.family, epoch), config.overwrite)
    host.report(Progress("saved", result.steps, result.total_steps, epoch, config.epochs,
                         message=tr("Saved {name}", name=plan.lora_path(epoch).name), saved_files=[str(plan.lora_path(epoch))]))

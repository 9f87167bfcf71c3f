"""The LoRA training loop. Reads top to bottom: plan outputs, load data (and, to continue, the saved state), set
up (latents, LoRA, optimizer; see ``steps.py``, shared with the learning-rate finder), train epoch by epoch,
measure the validation loss, save the epoch's file and training state, render the samples the caller asked for
(``samples.py``). The host model is left exactly as it was, whatever happens."""

from __future__ import annotations

import math
import random
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from ..common.errors import ConfigError, OutputError
from ..common.i18n import tr
from ..common.tensor_store import CacheFolder, CacheReport
from ..hosts.protocol import Progress, TrainingHost
from .config import TrainConfig
from .initial_lora import load_initial_lora
from .metadata import RunFacts, lora_metadata, sidecar
from .model_guard import frozen
from .optim import evaluation_weights
from .samples import TrainingSamples
from .save import SAVE_DTYPES, OutputPlan, keep_final_as_epoch, write_lora, write_sidecar
from .save_now import SaveNow
from .steps import (Run, StopRequested, cache_latents, caption_conditioning, check_run, epoch_steps, start_run,
                    usable_pictures)
from .training_state import SavedRun, check_continuation, dataset_digest, load_state, restore, save_state, state_path
from .validation import ValidationLoss


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
    validation_history: list[tuple[int, int, float]] = field(default_factory=list)  # (epoch, step, loss)
    continued_from_epoch: int = 0  # 0: a run from the start
    changes: list[str] = field(default_factory=list)  # what a continued run accepted to change
    notes: list[str] = field(default_factory=list)  # what the user should know of how the run went


def train_lora(host: TrainingHost, config: TrainConfig, cache: CacheFolder | None = None,
               samples: TrainingSamples | None = None, *, resume: bool = False, accept_changes: bool = False,
               save_now: SaveNow | None = None) -> TrainResult:
    """Train a LoRA on the host's model; with ``cache``, latents and caption embeddings are kept there between
    runs (the result is bit-identical with or without it); with ``samples``, sample pictures are rendered on
    their schedule (the result is bit-identical with or without them). ``resume`` continues from the training state in
    ``config.state_dir`` (changed settings or pictures are refused, named, unless ``accept_changes``);
    ``save_now`` lets another thread ask for an extra file while the training goes on."""
    started = time.time()
    config.validate()
    amp_dtype = check_run(host, config)

    scan = usable_pictures(config)
    dataset = dataset_digest(scan.records, config.train_dir, config.reg_dir) if config.state_dir or resume else {}
    saved = _saved_run(host, config, dataset, accept_changes) if resume else None
    first_epoch = saved.epoch + 1 if saved else 1
    if saved and saved.epoch == saved.settings.get("epochs"):  # trained longer: the old final is an epoch now
        keep_final_as_epoch(Path(config.output_dir), config.name, saved.epoch, saved.session_id)
    plan = OutputPlan.create(config.output_dir, config.name, config.epochs, config.save_every_n_epochs, config.overwrite,
                             first_epoch)
    data = config.training_data(scan.records)
    steps_per_epoch = math.ceil(data.num_batches_per_epoch / config.gradient_accumulation_steps)
    result = TrainResult(total_steps=steps_per_epoch * config.epochs, skipped_files=scan.unusable)
    if saved:
        result.steps, result.continued_from_epoch, result.changes = saved.step, saved.epoch, saved.changes
        result.loss_history, result.validation_history = list(saved.loss_history), list(saved.validation_history)
    if scan.unusable:
        host.report(Progress("caching", message=tr("Skipping {count_unusable} unusable file(s); nothing was "
                                                   "modified.", count_unusable=len(scan.unusable))))
    facts = RunFacts(
        family=host.family, prediction_type=host.prediction_type, base_model=host.base_model,
        # A continued run is the same run: its files keep the session id that ties the epochs together.
        session_id=saved.session_id if saved else random.randint(0, 2**32 - 1),
        started_at=saved.started_at if saved else started, num_train_images=data.num_train_images,
        num_batches_per_epoch=data.num_batches_per_epoch, max_train_steps=result.total_steps,
        dataset_dirs=data.dataset_dirs(), tag_frequency=data.tag_frequency(), bucket_info=data.bucket_info(),
        num_reg_images=data.num_reg_images, reg_dataset_dirs=data.reg_dataset_dirs(),
    )

    run = None
    with ExitStack() as cleanup:
        try:
            run = start_run(cleanup, host, config, data, cache, result.cache, result.total_steps, amp_dtype)
            if config.masked_loss and data.masked_pictures == 0:  # else it would train the whole pictures unsaid
                result.notes.append(tr("Masked loss is on, but no training picture has transparent parts: every "
                                       "picture counts whole. Pictures imported on the Dataset page are flattened "
                                       "onto their background; for masked loss, train from a folder of PNG "
                                       "pictures with an alpha channel."))
                host.report(Progress("caching", message=result.notes[-1]))
            if saved:
                restore(run, saved, config.optimizer_arguments(result.total_steps))
            elif config.initial_lora:
                load_initial_lora(run.network, config.initial_lora)
            validation = ValidationLoss(data, config.seed) if config.validation_loss else None
            result.setup_seconds = time.time() - started

            for epoch in range(first_epoch, config.epochs + 1):
                for step in epoch_steps(host, config, run, data, epoch, result.steps):
                    result.steps += 1
                    result.loss_history.append((result.steps, step.loss))
                    result.step_seconds.append(step.seconds)
                    host.report(Progress("training", result.steps, result.total_steps, epoch, config.epochs,
                                         loss=step.loss, learning_rate=step.learning_rate))
                    if save_now is not None and save_now.take():
                        _save_now(host, config, plan, facts, run, epoch, result)
                    if samples is not None:
                        samples.after_step(host, run, epoch, result.steps, result.total_steps)
                saves = plan.saves_after_epoch(epoch)
                if validation or saves:
                    with evaluation_weights(run.optimizers):  # schedule-free: the averaged weights are the model
                        validation_loss = _validate(host, config, validation, run, epoch, result)
                        if saves:
                            _save_epoch(host, config, plan, facts, run, epoch, result, validation_loss)
                # The state after the averaged weights are swapped back: training goes on from these.
                if saves and config.state_dir:
                    _save_training_state(host, config, run, dataset, facts, epoch, result)
                if samples is not None:
                    samples.after_epoch(host, run, epoch, result.steps, result.total_steps)
            # A click after the last step (during the last epoch's validation, saving or samples) is written now;
            # later ones are refused (``SaveNow.close``).
            if save_now is not None and save_now.close():
                _save_now(host, config, plan, facts, run, config.epochs, result, goes_on=False)
        except StopRequested:
            result.stopped = True
        finally:
            if save_now is not None:
                save_now.close()
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


def _saved_run(host: TrainingHost, config: TrainConfig, dataset: dict[str, str], accept_changes: bool) -> SavedRun:
    """The state to continue from, checked against these settings and pictures before any model work."""
    if not config.state_dir:
        raise ConfigError(tr("Continue needs the folder of the training states (state_dir): the WebUI uses the "
                             "project's."))
    saved = load_state(state_path(config.state_dir, config.name))
    saved.changes = check_continuation(saved, config, host.family, dataset, accept_changes)
    return saved


def _validate(host: TrainingHost, config: TrainConfig, validation: ValidationLoss | None, run: Run, epoch: int,
              result: TrainResult) -> float | None:
    if validation is None:
        return None
    loss = validation.evaluate(host, run)
    result.validation_history.append((epoch, result.steps, loss))
    host.report(Progress("validated", result.steps, result.total_steps, epoch, config.epochs, validation_loss=loss,
                         message=tr("Validation loss after epoch {epoch}: {loss:.5f}", epoch=epoch, loss=loss)))
    return loss


def _save_epoch(host: TrainingHost, config: TrainConfig, plan: OutputPlan, facts: RunFacts, run: Run, epoch: int,
                result: TrainResult, validation_loss: float | None) -> None:
    host.report(Progress("saving", result.steps, result.total_steps, epoch, config.epochs,
                         message=tr("Saving {name}", name=plan.lora_path(epoch).name)))
    _write_file(config, plan.lora_path(epoch), plan.sidecar_path(epoch), facts, run, host, epoch, result.steps,
                validation_loss)
    result.saved_files.append(plan.lora_path(epoch))
    host.report(Progress("saved", result.steps, result.total_steps, epoch, config.epochs,
                         message=tr("Saved {name}", name=plan.lora_path(epoch).name), saved_files=[str(plan.lora_path(epoch))]))


def _save_training_state(host: TrainingHost, config: TrainConfig, run: Run, dataset: dict[str, str], facts: RunFacts,
                         epoch: int, result: TrainResult) -> None:
    save_state(state_path(config.state_dir, config.name), run, family=host.family, config=config, dataset=dataset,
               epoch=epoch, step=result.steps, session_id=facts.session_id, started_at=facts.started_at,
               loss_history=result.loss_history, validation_history=result.validation_history)


def _save_now(host: TrainingHost, config: TrainConfig, plan: OutputPlan, facts: RunFacts, run: Run, epoch: int,
              result: TrainResult, goes_on: bool = True) -> None:
    """The network after this step as an extra file; a file that cannot be written is reported, and the training
    goes on (``goes_on`` False: after the last step, where the messages say nothing of going on)."""
    path = plan.extra_path(result.steps)
    try:
        with evaluation_weights(run.optimizers):
            _write_file(config, path, path.with_suffix(".json"), facts, run, host, epoch, result.steps, None)
    except OutputError as error:
        host.report(Progress("saving", result.steps, result.total_steps, epoch, config.epochs,
                             message=tr("Save now failed: {error} Training goes on.", error=error) if goes_on else
                             tr("Save now failed: {error}", error=error)))
        return
    result.saved_files.append(path)
    host.report(Progress("saved", result.steps, result.total_steps, epoch, config.epochs,
                         message=tr("Saved {name} (step {step}); training goes on.", name=path.name, step=result.steps)
                         if goes_on else tr("Saved {name} (step {step}, the last).", name=path.name, step=result.steps),
                         saved_files=[str(path)]))


def _write_file(config: TrainConfig, path: Path, card: Path, facts: RunFacts, run: Run, host: TrainingHost, epoch: int,
                steps: int, validation_loss: float | None) -> None:
    state = run.network.kohya_state_dict(SAVE_DTYPES[config.save_precision])
    metadata = lora_metadata(config, facts, output_name=path.stem, epoch=epoch, steps=steps,
                             validation_loss=validation_loss)
    write_lora(path, state, metadata, config.overwrite)
    write_sidecar(card, sidecar(config, host.family, epoch), config.overwrite)

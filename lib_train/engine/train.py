"""The LoRA training loop. Reads top to bottom: plan outputs, load data, cache latents, attach LoRA,
train epoch by epoch, save. The host model is left exactly as it was, whatever happens."""

from __future__ import annotations

import math
import random
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..common.errors import ConfigError, DatasetError, TrainingDiverged
from ..common.tensor_store import CacheFolder, CacheReport
from ..dataset.latent_cache import LatentCache
from ..dataset.training_data import FolderScan, TrainingData, survey_training_folder
from ..hosts.protocol import PredictionType, Progress, TrainingHost
from .config import TrainConfig
from .loss import training_target, zero_terminal_snr
from .metadata import RunFacts, lora_metadata, sidecar
from .model_guard import checkpointed_blocks, frozen, gradient_checkpointing
from .network import LoRANetwork
from .optim import make_lr_schedule, make_optimizer
from .save import SAVE_DTYPES, OutputPlan, write_lora, write_sidecar
from .text_cache import CaptionStore, ConditioningCache


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


class _StopRequested(Exception):
    pass


def train_lora(host: TrainingHost, config: TrainConfig, cache: CacheFolder | None = None) -> TrainResult:
    """Train a LoRA on the host's model; with ``cache``, latents and caption embeddings are kept there between
    runs (the result is bit-identical with or without it)."""
    started = time.time()
    config.validate()
    plan = OutputPlan.create(config.output_dir, config.name, config.epochs, config.save_every_n_epochs, config.overwrite)
    amp_dtype = _autocast_dtype(config, host)
    if config.zero_terminal_snr and host.prediction_type is not PredictionType.V:
        raise ConfigError("Zero terminal SNR needs a v-prediction model (at SNR 0 there is no noise left to predict); "
                          "the loaded model predicts noise (epsilon). Turn the option off.")

    scan = _usable_pictures(config)
    data = config.training_data(scan.records)
    steps_per_epoch = math.ceil(data.num_batches_per_epoch / config.gradient_accumulation_steps)
    result = TrainResult(total_steps=steps_per_epoch * config.epochs, skipped_files=scan.unusable)
    if scan.unusable:
        host.report(Progress("caching", message=f"Skipping {len(scan.unusable)} unusable file(s); nothing was modified."))
    facts = RunFacts(
        family=host.family, prediction_type=host.prediction_type, base_model=host.base_model,
        session_id=random.randint(0, 2**32 - 1), started_at=started, num_train_images=data.num_train_images,
        num_batches_per_epoch=data.num_batches_per_epoch, max_train_steps=result.total_steps,
        dataset_dirs=data.dataset_dirs(), tag_frequency=data.tag_frequency(), bucket_info=data.bucket_info(),
    )

    network = optimizer = None
    text_encoder_modules = [encoder.module for encoder in host.text_encoders]
    with ExitStack() as cleanup:
        try:
            cleanup.enter_context(host.training_session())
            cleanup.enter_context(frozen([host.unet, *text_encoder_modules]))
            _cache_latents(host, data, cache, result.cache)

            network = LoRANetwork.for_host(
                host, rank=config.rank, alpha=config.alpha, conv_rank=config.conv_rank, conv_alpha=config.conv_alpha,
                network_type=config.network_type, dora=config.dora, lokr_factor=config.lokr_factor,
                decompose_both=config.decompose_both, train_text_encoder=config.train_text_encoder, seed=config.seed,
            )
            cleanup.enter_context(network.attached())
            if config.gradient_checkpointing:
                trained_encoders = text_encoder_modules if config.train_text_encoder else []
                cleanup.enter_context(gradient_checkpointing(checkpointed_blocks(host.unet, trained_encoders)))

            groups = network.parameter_groups(config.unet_lr, config.text_encoder_lr, *config.loraplus_ratios())
            optimizer = make_optimizer(config.optimizer, groups, config.weight_decay, host.device)
            schedule = make_lr_schedule(optimizer, config.lr_scheduler, config.lr_warmup_steps, result.total_steps)
            scaler = _grad_scaler() if amp_dtype == torch.float16 else None
            autocast = torch.autocast(host.device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
            generator = torch.Generator(device=host.device).manual_seed(config.seed)
            alphas_cumprod = host.alphas_cumprod().to(host.device, torch.float32)
            if config.zero_terminal_snr:
                alphas_cumprod = zero_terminal_snr(alphas_cumprod)
            noising = config.noising(alphas_cumprod)
            objective = config.objective(host.prediction_type, alphas_cumprod)
            conditioning = _conditioning(host, config, cache, result.cache)
            # Encoded up front, so offloading hosts (the WebUI's --medvram) swap the text encoder in only once.
            conditioning.prefill([record.caption for record in data.records])
            if cache is not None:
                cache.keep_within_limit()
                host.report(Progress("caching", message=result.cache.summary()))
            if conditioning.complete():
                cleanup.enter_context(host.text_encoders_parked())
            trainable = [p for group in optimizer.param_groups for p in group["params"]]
            result.setup_seconds = time.time() - started

            for epoch in range(1, config.epochs + 1):
                batches = list(data.batches(epoch - 1))
                step_loss, step_started = 0.0, time.time()
                for index, batch in enumerate(batches):
                    if host.should_stop():
                        raise _StopRequested
                    with autocast:
                        cond = host.unet_conditioning(conditioning.encode(batch.captions), batch.sizes)
                        noisy, noise, timesteps = noising.sample(batch.latents, generator)
                        prediction = host.predict(noisy, timesteps, cond)
                    target = training_target(host.prediction_type, batch.latents, noise, alphas_cumprod, timesteps)
                    loss = objective(prediction, target, timesteps, batch.masks)
                    loss_value = loss.item()
                    if not math.isfinite(loss_value):
                        raise TrainingDiverged(
                            f"The loss became {loss_value} at step {result.steps + 1} (epoch {epoch}); training stopped. "
                            f"{_divergence_advice(config, amp_dtype)} Files saved before are kept.")
                    loss = loss / config.gradient_accumulation_steps
                    (scaler.scale(loss) if scaler else loss).backward()
                    step_loss += loss_value / config.gradient_accumulation_steps

                    if (index + 1) % config.gradient_accumulation_steps and index + 1 < len(batches):
                        continue
                    if scaler:
                        scaler.unscale_(optimizer)
                    if config.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
                    if scaler:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    learning_rate = schedule.get_last_lr()[0]
                    schedule.step()
                    result.steps += 1
                    result.loss_history.append((result.steps, step_loss))
                    result.step_seconds.append(time.time() - step_started)
                    host.report(Progress("training", result.steps, result.total_steps, epoch, config.epochs,
                                         loss=step_loss, learning_rate=learning_rate))
                    step_loss, step_started = 0.0, time.time()

                if plan.saves_after_epoch(epoch):
                    _save_epoch(host, config, plan, facts, network, epoch, result)
        except _StopRequested:
            result.stopped = True
        finally:
            # Tracebacks keep frames alive: drop the big objects so their memory (VRAM) is given back.
            network = optimizer = data = conditioning = None  # noqa: F841

    host.report(Progress("done", result.steps, result.total_steps, message="Stopped." if result.stopped else "Done.",
                         saved_files=[str(p) for p in result.saved_files]))
    return result


def prepare_caches(host: TrainingHost, config: TrainConfig, cache: CacheFolder) -> CacheReport:
    """What ``train_lora`` encodes before its first step, put in ``cache`` ahead of time (the "Prepare for
    training" job): the same pictures, chunks and host state, so the training that follows finds every entry."""
    config.validate()
    data = config.training_data(_usable_pictures(config).records)
    report = CacheReport()
    with host.training_session(), frozen([host.unet, *(encoder.module for encoder in host.text_encoders)]):
        try:
            _cache_latents(host, data, cache, report)
            _conditioning(host, config, cache, report).prefill([record.caption for record in data.records])
        except _StopRequested:
            pass
    cache.keep_within_limit()
    host.report(Progress("done", message=("Stopped. " if host.should_stop() else "") + report.summary()))
    return report


def _usable_pictures(config: TrainConfig) -> FolderScan:
    """The training folder's pictures. Unusable ones stop the run, listed, unless the user chose to skip them."""
    scan = survey_training_folder(config.train_dir, config.repeats)
    if scan.unusable and not scan.records:
        raise DatasetError(scan.unusable_report() + "\nNo picture of the folder can be used.")
    if scan.unusable and not config.skip_unusable_files:
        raise DatasetError(scan.unusable_report() + f"\nFix or remove them, or choose 'Skip unusable files' to train "
                           f"on the other {len(scan.records)} picture(s) (nothing is modified).")
    return scan


def _autocast_dtype(config: TrainConfig, host: TrainingHost) -> torch.dtype | None:
    requested = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision)
    if requested is torch.float16 and host.device.type != "cuda":
        raise ConfigError("fp16 mixed precision needs a CUDA GPU; on the CPU choose bf16 or no.")
    if requested is None and host.dtype != torch.float32:
        return host.dtype  # half-precision weights (the WebUI on a GPU) only run under autocast
    return requested


def _divergence_advice(config: TrainConfig, amp_dtype: torch.dtype | None) -> str:
    """What can help, for the precision this run computed in."""
    if amp_dtype is torch.float16:
        if config.mixed_precision == "fp16":
            return "Lower the learning rate, or choose bf16 or no mixed precision: fp16 overflows easily."
        return ("The loaded model runs in fp16 (the WebUI's half precision): lower the learning rate, or choose "
                "bf16 mixed precision if the GPU has it.")
    if amp_dtype is torch.bfloat16:
        return "Lower the learning rate, or choose no mixed precision (fp32)."
    return "The run was already in full precision (fp32): lower the learning rate."


def _grad_scaler():
    """torch.amp.GradScaler from torch 2.3; torch.cuda.amp.GradScaler before (the WebUI ships 2.1)."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()


def _cache_latents(host: TrainingHost, data: TrainingData, cache: CacheFolder | None, report: CacheReport) -> None:
    def on_progress(done: int, total: int) -> None:
        if host.should_stop():
            raise _StopRequested
        host.report(Progress("caching", done, total, message=f"Encoding images {done}/{total}"))

    stored = LatentCache(cache.latents, host.vae_identity(), report, cache.masks) if cache is not None else None
    data.cache_latents(host.encode_images, host.device, on_progress, cache=stored)


def _conditioning(host: TrainingHost, config: TrainConfig, cache: CacheFolder | None,
                  report: CacheReport) -> ConditioningCache:
    cacheable = not (config.train_text_encoder or config.shuffle_caption or config.caption_dropout_rate > 0
                     or config.caption_tag_dropout_rate > 0)
    stored = CaptionStore(cache.text, host.text_encoder_identity(), report) if cache is not None and cacheable else None
    return ConditioningCache(host, cacheable, stored)


def _save_epoch(host: TrainingHost, config: TrainConfig, plan: OutputPlan, facts: RunFacts, network: LoRANetwork,
                epoch: int, result: TrainResult) -> None:
    host.report(Progress("saving", result.steps, result.total_steps, epoch, config.epochs,
                         message=f"Saving {plan.lora_path(epoch).name}"))
    state = network.kohya_state_dict(SAVE_DTYPES[config.save_precision])
    metadata = lora_metadata(config, facts, output_name=plan.stem(epoch), epoch=epoch, steps=result.steps)
    write_lora(plan.lora_path(epoch), state, metadata, config.overwrite)
    result.saved_files.append(plan.lora_path(epoch))
    write_sidecar(plan.sidecar_path(epoch), sidecar(config, host.family, epoch), config.overwrite)
    host.report(Progress("saved", result.steps, result.total_steps, epoch, config.epochs,
                         message=f"Saved {plan.lora_path(epoch).name}", saved_files=[str(plan.lora_path(epoch))]))

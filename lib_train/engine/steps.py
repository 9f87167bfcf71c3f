"""What a training and the learning-rate finder share: the checks before anything runs, the set-up in order
(latents, LoRA modules, checkpointing, optimizers and schedules, precision, captions) and an epoch's optimizer
steps. The caller owns the ExitStack, so the host model is put back whatever happens."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..common.errors import ConfigError, DatasetError, TrainingDiverged
from ..common.i18n import tr
from ..common.tensor_store import CacheFolder, CacheReport
from ..dataset.latent_cache import LatentCache
from ..dataset.regularization import REG_FOLDER_KIND, as_regularization, check_separate_folders
from ..dataset.training_data import FolderScan, TrainingData, survey_training_folder
from ..hosts.protocol import PredictionType, Progress, TrainingHost
from .config import TrainConfig
from .loss import Objective, training_target, zero_terminal_snr
from .lr_schedule import make_lr_schedule
from .model_guard import checkpointed_blocks, frozen, gradient_checkpointing
from .network import LoRANetwork
from .noise import Noising
from .optim import check_device, effective_learning_rates, make_optimizer, optimizer_kind
from .text_cache import CaptionStore, ConditioningCache


class StopRequested(Exception):
    pass


@dataclass
class Run:
    """Everything the optimizer steps use, set up by ``start_run``."""

    network: LoRANetwork
    optimizers: list[torch.optim.Optimizer]  # one, or one per part (UNet, text encoder) for the finder
    schedules: list[LambdaLR]
    scaler: Any  # a GradScaler for fp16, else None
    autocast: Any
    amp_dtype: torch.dtype | None
    generator: torch.Generator
    alphas_cumprod: torch.Tensor
    noising: Noising
    objective: Objective
    conditioning: ConditioningCache
    trainable: list[torch.nn.Parameter]


@dataclass
class Step:
    """One optimizer step done."""

    epoch: int
    loss: float
    learning_rate: float  # the UNet's step size (adaptive optimizers: times their estimate)
    seconds: float


def check_run(host: TrainingHost, config: TrainConfig) -> torch.dtype | None:
    """What can be refused before any work: precision and prediction type, the optimizer's device and package.
    Returns the autocast dtype."""
    amp_dtype = _autocast_dtype(config, host)
    if config.zero_terminal_snr and host.prediction_type is not PredictionType.V:
        raise ConfigError(tr("Zero terminal SNR needs a v-prediction model (at SNR 0 there is no noise left to "
                             "predict); the loaded model predicts noise (epsilon). Turn the option off."))
    kind = optimizer_kind(config.optimizer)
    check_device(kind, host.device)
    kind.load()
    return amp_dtype


def usable_pictures(config: TrainConfig) -> FolderScan:
    """The training folder's pictures, then the regularization folder's (marked). Unusable ones stop the run,
    listed, unless the user chose to skip them."""
    scan = survey_training_folder(config.train_dir, config.repeats)
    if config.reg_dir.strip():
        check_separate_folders(config.reg_dir, config.train_dir)
        reg = as_regularization(survey_training_folder(config.reg_dir, 1, kind=REG_FOLDER_KIND))
        scan = FolderScan(scan.records + reg.records, scan.unusable + reg.unusable)
    if scan.unusable and not scan.records:
        raise DatasetError(scan.unusable_report() + tr("\nNo picture of the folder can be used."))
    if scan.unusable and not config.skip_unusable_files:
        raise DatasetError(scan.unusable_report() + tr("\nFix or remove them, or choose 'Skip unusable files' to "
                                                       "train on the other {count_records} picture(s) (nothing is "
                                                       "modified).", count_records=len(scan.records)))
    return scan


def start_run(cleanup: ExitStack, host: TrainingHost, config: TrainConfig, data: TrainingData,
              cache: CacheFolder | None, report: CacheReport, total_steps: int, amp_dtype: torch.dtype | None,
              optimizer_per_part: bool = False) -> Run:
    """Set up on the host inside ``cleanup``; ``optimizer_per_part`` gives the UNet and the text encoder an
    optimizer each (so an adaptive one estimates a step size for each)."""
    text_encoder_modules = [encoder.module for encoder in host.text_encoders]
    cleanup.enter_context(host.training_session())
    cleanup.enter_context(frozen([host.unet, *text_encoder_modules]))
    cache_latents(host, data, cache, report)

    network = LoRANetwork.for_host(
        host, rank=config.rank, alpha=config.alpha, conv_rank=config.conv_rank, conv_alpha=config.conv_alpha,
        network_type=config.network_type, dora=config.dora, lokr_factor=config.lokr_factor,
        decompose_both=config.decompose_both, train_text_encoder=config.train_text_encoder, seed=config.seed,
    )
    cleanup.enter_context(network.attached())
    if config.gradient_checkpointing:
        trained_encoders = text_encoder_modules if config.train_text_encoder else []
        cleanup.enter_context(gradient_checkpointing(checkpointed_blocks(host.unet, trained_encoders)))

    kind = optimizer_kind(config.optimizer)
    arguments = config.optimizer_arguments(total_steps)
    groups = network.parameter_groups(config.unet_lr, config.text_encoder_lr, *config.loraplus_ratios())
    optimizers = [make_optimizer(kind, part, arguments, host.device)
                  for part in (_groups_per_part(groups) if optimizer_per_part else [groups])]
    # Schedule-free optimizers run their own warmup and no schedule beside it.
    warmup = 0 if kind.schedule_free else config.warmup_steps(total_steps)
    schedules = [make_lr_schedule(optimizer, config.lr_scheduler, warmup, total_steps, config.lr_scheduler_num_cycles,
                                  config.lr_scheduler_power) for optimizer in optimizers]
    alphas_cumprod = host.alphas_cumprod().to(host.device, torch.float32)
    if config.zero_terminal_snr:
        alphas_cumprod = zero_terminal_snr(alphas_cumprod)
    conditioning = caption_conditioning(host, config, cache, report)
    # Encoded up front, so offloading hosts (the WebUI's --medvram) swap the text encoder in only once.
    conditioning.prefill([record.caption for record in data.records])
    if cache is not None:
        cache.keep_within_limit()
        host.report(Progress("caching", message=report.summary()))
    if conditioning.complete():
        cleanup.enter_context(host.text_encoders_parked())
    return Run(
        network=network, optimizers=optimizers, schedules=schedules,
        scaler=_grad_scaler() if amp_dtype == torch.float16 else None,
        autocast=torch.autocast(host.device.type, dtype=amp_dtype) if amp_dtype else nullcontext(),
        amp_dtype=amp_dtype, generator=torch.Generator(device=host.device).manual_seed(config.seed),
        alphas_cumprod=alphas_cumprod, noising=config.noising(alphas_cumprod),
        objective=config.objective(host.prediction_type, alphas_cumprod), conditioning=conditioning,
        trainable=[p for group in groups for p in group["params"]],
    )


def epoch_steps(host: TrainingHost, config: TrainConfig, run: Run, data: TrainingData, epoch: int,
                steps_before: int) -> Iterator[Step]:
    """The optimizer steps of one epoch (gradients accumulated over ``gradient_accumulation_steps`` batches)."""
    batches = list(data.batches(epoch - 1))
    done, step_loss, step_started = 0, 0.0, time.time()
    for index, batch in enumerate(batches):
        if host.should_stop():
            raise StopRequested
        with run.autocast:
            cond = host.unet_conditioning(run.conditioning.encode(batch.captions), batch.sizes)
            noisy, noise, timesteps = run.noising.sample(batch.latents, run.generator)
            prediction = host.predict(noisy, timesteps, cond)
        target = training_target(host.prediction_type, batch.latents, noise, run.alphas_cumprod, timesteps)
        loss = run.objective(prediction, target, timesteps, batch.masks, batch.loss_weights)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise TrainingDiverged(
                tr("The loss became {loss_value} at step {value} (epoch {epoch}); training stopped. {value2} Files "
                   "saved before are kept.", loss_value=loss_value, value=steps_before + done + 1, epoch=epoch,
                   value2=_divergence_advice(config, run.amp_dtype)))
        loss = loss / config.gradient_accumulation_steps
        (run.scaler.scale(loss) if run.scaler else loss).backward()
        step_loss += loss_value / config.gradient_accumulation_steps

        if (index + 1) % config.gradient_accumulation_steps and index + 1 < len(batches):
            continue
        _optimizer_step(config, run)
        # After the step: an adaptive optimizer's estimate includes what this step learned.
        learning_rate = effective_learning_rates(run.optimizers[0])[0]
        for schedule in run.schedules:
            schedule.step()
        done += 1
        yield Step(epoch, step_loss, learning_rate, time.time() - step_started)
        step_loss, step_started = 0.0, time.time()


def _groups_per_part(groups: list[dict]) -> list[list[dict]]:
    """The UNet's groups and the text encoder's apart (LoRA+ gives each part a second group, "unet plus"...)."""
    parts: dict[str, list[dict]] = {}
    for group in groups:
        parts.setdefault(group["name"].split()[0], []).append(group)
    return list(parts.values())


def _optimizer_step(config: TrainConfig, run: Run) -> None:
    if run.scaler:
        for optimizer in run.optimizers:
            run.scaler.unscale_(optimizer)
    if config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(run.trainable, config.max_grad_norm)
    for optimizer in run.optimizers:
        if run.scaler:
            run.scaler.step(optimizer)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if run.scaler:
        run.scaler.update()


def cache_latents(host: TrainingHost, data: TrainingData, cache: CacheFolder | None, report: CacheReport) -> None:
    def on_progress(done: int, total: int) -> None:
        if host.should_stop():
            raise StopRequested
        host.report(Progress("caching", done, total, message=tr("Encoding images {done}/{total}", done=done,
                                                                total=total)))

    stored = LatentCache(cache.latents, host.vae_identity(), report, cache.masks) if cache is not None else None
    data.cache_latents(host.encode_images, host.device, on_progress, cache=stored)


def caption_conditioning(host: TrainingHost, config: TrainConfig, cache: CacheFolder | None,
                         report: CacheReport) -> ConditioningCache:
    cacheable = not (config.train_text_encoder or config.shuffle_caption or config.caption_dropout_rate > 0
                     or config.caption_tag_dropout_rate > 0)
    stored = CaptionStore(cache.text, host.text_encoder_identity(), report) if cache is not None and cacheable else None
    return ConditioningCache(host, cacheable, stored)


def _autocast_dtype(config: TrainConfig, host: TrainingHost) -> torch.dtype | None:
    requested = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision)
    if requested is torch.float16 and host.device.type != "cuda":
        raise ConfigError(tr("fp16 mixed precision needs a CUDA GPU; on the CPU choose bf16 or no."))
    if requested is None and host.dtype != torch.float32:
        return host.dtype  # half-precision weights (the WebUI on a GPU) only run under autocast
    return requested


def _divergence_advice(config: TrainConfig, amp_dtype: torch.dtype | None) -> str:
    """What can help, for the precision this run computed in."""
    if amp_dtype is torch.float16:
        if config.mixed_precision == "fp16":
            return tr("Lower the learning rate, or choose bf16 or no mixed precision: fp16 overflows easily.")
        return (tr("The loaded model runs in fp16 (the WebUI's half precision): lower the learning rate, or choose "
                   "bf16 mixed precision if the GPU has it."))
    if amp_dtype is torch.bfloat16:
        return tr("Lower the learning rate, or choose no mixed precision (fp32).")
    return tr("The run was already in full precision (fp32): lower the learning rate.")


def _grad_scaler():
    """torch.amp.GradScaler from torch 2.3; torch.cuda.amp.GradScaler before (the WebUI ships 2.1)."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()

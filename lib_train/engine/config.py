"""Training settings: one dataclass shared by the tab, the HTTP API and the TOML file of the command line."""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..common.errors import ConfigError
from ..common.i18n import tr
from ..dataset.training_data import ImageRecord, TrainingData
from ..hosts.protocol import PredictionType
from .loss import HUBER_SCHEDULES, LOSS_TYPES, Objective
from .noise import Noising
from .network_spec import LABELS
from .sample_prompts import parse_sample_prompts

from .lr_schedule import SCHEDULERS, warmup_steps
from .optim import OPTIMIZER_KINDS, optimizer_arguments, optimizer_kind

OPTIMIZERS = tuple(OPTIMIZER_KINDS)
MIXED_PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = ("fp16", "bf16", "fp32")
NETWORK_TYPES = tuple(LABELS)


@dataclass
class TrainConfig:
    """Every setting of a LoRA training run.

    The defaults are a sensible first SD1.5 LoRA: rank 16 / alpha 8 (scale 0.5) is small enough to
    generalise from 15-50 pictures; 1e-4 for the UNet and half of it for the text encoder is what
    the common GUIs ship; cosine decay keeps late epochs from overshooting.
    """

    # Project
    name: str = ""
    train_dir: str = ""
    output_dir: str = ""
    trigger_words: str = ""
    overwrite: bool = False

    # Data
    repeats: int = 1  # for a flat folder; `<N>_<name>` subfolders carry their own N
    resolution: int = 512
    enable_buckets: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    flip_aug: bool = False
    skip_unusable_files: bool = False  # train on the other pictures when some cannot be read (listed, untouched)
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0  # each tag after the first keep_tokens dropped with this chance
    clip_skip: int = 1

    # Network
    rank: int = 16
    alpha: float = 8.0
    conv_rank: int = 0  # 0: no 3x3 convs (with "lora", a conv rank makes it LoCon, as before)
    conv_alpha: float = 1.0
    network_type: str = "lora"  # lora, locon, loha, lokr (LyCORIS algo)
    dora: bool = False  # weight decomposition on lora/locon (LyCORIS dora_wd)
    lokr_factor: int = -1  # LyCORIS factor: -1 splits each weight side near its square root
    decompose_both: bool = False  # LoKr: the small Kronecker factor low-rank too

    # Optimisation
    epochs: int = 10
    batch_size: int = 1
    unet_lr: float = 1e-4
    text_encoder_lr: float = 5e-5  # 0 trains the UNet only
    optimizer: str = "AdamW"
    optimizer_args: dict[str, Any] = field(default_factory=dict)  # kohya's --optimizer_args: "key=value ..." or a dict
    weight_decay: float = 0.01
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 0
    lr_warmup_ratio: float = 0.0  # warmup as a ratio of all steps (kohya's float --lr_warmup_steps); 0: use steps
    lr_scheduler_num_cycles: int = 1  # cosine_with_restarts
    lr_scheduler_power: float = 1.0  # polynomial
    lr_finder_steps: int = 150  # "Find learning rate": the probe's optimizer steps
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    min_snr_gamma: float = 0.0  # 0: off
    noise_offset: float = 0.0
    zero_terminal_snr: bool = False  # v-prediction models only (NoobAI v-pred was trained with it)
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int = 42

    # Loss and noise (kohya's options; the defaults are plain L2 on plain noise)
    loss_type: str = "l2"  # l2, huber or smooth_l1
    huber_schedule: str = "snr"  # how Huber's c follows the timestep: snr, exponential or constant
    huber_c: float = 0.1
    huber_scale: float = 1.0  # multiplies c in the exponential and constant schedules (not snr, as kohya)
    debiased_estimation_loss: bool = False
    multires_noise_iterations: int = 0  # 0: off; kohya suggests 6-10
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float = 0.0  # 0: off; the paper suggests 0.1
    masked_loss: bool = False  # transparent parts of a picture (alpha 0) do not count
    loraplus_lr_ratio: float = 0.0  # 0: off; up weights train at lr x ratio (LoRA+ suggests 16)
    loraplus_unet_lr_ratio: float = 0.0  # 0: loraplus_lr_ratio
    loraplus_text_encoder_lr_ratio: float = 0.0  # 0: loraplus_lr_ratio

    # Regularization (kohya's reg folder: `<N>_<class>` subfolders of class pictures, see dataset/regularization.py)
    reg_dir: str = ""  # "": none
    prior_loss_weight: float = 1.0  # multiplies each regularization picture's loss (kohya's --prior_loss_weight)

    # Samples during training (rendered by the host's sampler: the WebUI's txt2img; see engine/samples.py)
    sample_every_n_epochs: int = 0  # 0: off (the WebUI turns it on on a GPU)
    sample_every_n_steps: int = 0  # 0: off
    sample_prompts: str = ""  # kohya's prompt lines (--n --w --h --d --s --l --ss, and --m Lora multiplier); "": made
    sample_count: int = 2  # prompts made from the trigger words and the most frequent tags when none are given
    sample_sampler: str = "Euler a"
    sample_steps: int = 20
    sample_cfg_scale: float = 7.0

    # Saving
    save_every_n_epochs: int = 1  # 0: only the final file
    save_precision: str = "fp16"
    comment: str = ""
    validation_loss: bool = True  # after every epoch, every picture at fixed noise and timesteps (validation.py)
    state_dir: str = ""  # where each saved epoch's training state goes (the project's folder), "" for none
    initial_lora: str = ""  # a .safetensors of this run's network shape to start from instead of fresh weights

    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def train_text_encoder(self) -> bool:
        return self.text_encoder_lr > 0

    def validate(self) -> "TrainConfig":
        """Raise ConfigError naming the first bad setting; return self for chaining."""

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(bool(self.name.strip()), tr("Give the LoRA a name."))
        need(bool(self.train_dir), tr("Choose the training folder."))
        need(bool(self.output_dir), tr("Choose the output folder."))
        need(self.resolution >= 64 and self.resolution % 64 == 0,
             tr("Resolution must be a multiple of 64 and at least 64 (got {resolution}).", resolution=self.resolution))
        need(self.bucket_reso_steps % 64 == 0 and self.bucket_reso_steps > 0,
             tr("Bucket step must be a multiple of 64 (got {bucket_reso_steps}).",
                bucket_reso_steps=self.bucket_reso_steps))
        need(not self.enable_buckets or 64 <= self.min_bucket_reso <= self.resolution <= self.max_bucket_reso,
             tr("Bucket sizes must satisfy 64 <= min ({min_bucket_reso}) <= resolution ({resolution}) <= max "
                "({max_bucket_reso}).", min_bucket_reso=self.min_bucket_reso, resolution=self.resolution,
                max_bucket_reso=self.max_bucket_reso))
        need(self.repeats >= 1, tr("Repeats must be at least 1 (got {repeats}).", repeats=self.repeats))
        need(self.keep_tokens >= 0, tr("Keep tokens cannot be negative."))
        need(0.0 <= self.caption_dropout_rate < 1.0, tr("Caption dropout must be in [0, 1)."))
        need(0.0 <= self.caption_tag_dropout_rate < 1.0,
             tr("Tag dropout must be in [0, 1) (got {caption_tag_dropout_rate}).",
                caption_tag_dropout_rate=self.caption_tag_dropout_rate))
        need(1 <= self.clip_skip <= 12, tr("Clip skip must be between 1 and 12 (got {clip_skip}).",
                                           clip_skip=self.clip_skip))
        need(self.rank >= 1, tr("Rank must be at least 1 (got {rank}).", rank=self.rank))
        need(self.alpha > 0, tr("Alpha must be positive (got {alpha}).", alpha=self.alpha))
        need(self.conv_rank >= 0, tr("Conv rank cannot be negative."))
        need(self.conv_rank == 0 or self.conv_alpha > 0, tr("Conv alpha must be positive."))
        self._validate_network_type(need)
        need(self.epochs >= 1, tr("Epochs must be at least 1 (got {epochs}).", epochs=self.epochs))
        need(self.batch_size >= 1, tr("Batch size must be at least 1 (got {batch_size}).", batch_size=self.batch_size))
        self._check_optimisation(need)
        need(self.gradient_accumulation_steps >= 1, tr("Gradient accumulation must be at least 1."))
        need(self.max_grad_norm >= 0, tr("Max gradient norm cannot be negative (0 turns clipping off)."))
        need(self.min_snr_gamma >= 0, tr("Min-SNR gamma cannot be negative (0 turns it off)."))
        need(0 <= self.noise_offset < 1, tr("Noise offset must be in [0, 1)."))
        need(self.mixed_precision in MIXED_PRECISIONS,
             tr("Mixed precision must be one of {value}.", value=', '.join(MIXED_PRECISIONS)))
        self._validate_loss_and_noise(need)
        self._validate_regularization_and_samples(need)
        need(self.save_every_n_epochs >= 0, tr("Save every N epochs cannot be negative."))
        need(self.save_precision in SAVE_PRECISIONS,
             tr("Save precision must be one of {value}.", value=', '.join(SAVE_PRECISIONS)))
        need(not self.initial_lora or Path(self.initial_lora).suffix == ".safetensors",
             tr("The LoRA file to start from must be a .safetensors file (got {initial_lora}).",
                initial_lora=self.initial_lora))
        return self

    def _validate_loss_and_noise(self, need) -> None:
        need(self.loss_type in LOSS_TYPES, tr("Loss type must be one of {value} (got {loss_type!r}).",
                                              value=', '.join(LOSS_TYPES), loss_type=self.loss_type))
        need(self.huber_schedule in HUBER_SCHEDULES,
             tr("Huber schedule must be one of {value} (got {huber_schedule!r}).", value=', '.join(HUBER_SCHEDULES),
                huber_schedule=self.huber_schedule))
        need(math.isfinite(self.huber_c) and self.huber_c > 0, tr("Huber c must be positive (got {huber_c}).",
                                                                  huber_c=self.huber_c))
        need(math.isfinite(self.huber_scale) and self.huber_scale > 0,
             tr("Huber scale must be positive (got {huber_scale}).", huber_scale=self.huber_scale))
        need(self.multires_noise_iterations >= 0, tr("Multires noise iterations cannot be negative (0 turns it off)."))
        need(0 < self.multires_noise_discount <= 1,
             tr("Multires noise discount must be in (0, 1] (got {multires_noise_discount}).",
                multires_noise_discount=self.multires_noise_discount))
        need(0 <= self.ip_noise_gamma <= 1, tr("Input perturbation noise gamma must be in [0, 1] (got "
                                               "{ip_noise_gamma}).", ip_noise_gamma=self.ip_noise_gamma))
        for label, ratio in ((tr("LoRA+ ratio"), self.loraplus_lr_ratio),
                             (tr("LoRA+ UNet ratio"), self.loraplus_unet_lr_ratio),
                             (tr("LoRA+ text encoder ratio"), self.loraplus_text_encoder_lr_ratio)):
            need(math.isfinite(ratio) and ratio >= 0, tr("{label} cannot be negative (0 turns it off; got {ratio}).",
                                                         label=label, ratio=ratio))

    def _validate_regularization_and_samples(self, need) -> None:
        need(math.isfinite(self.prior_loss_weight) and self.prior_loss_weight >= 0,
             tr("Prior-loss weight must be 0 or more (got {prior_loss_weight}); 1 weighs a class picture like a "
                "training picture.", prior_loss_weight=self.prior_loss_weight))
        need(self.sample_every_n_epochs >= 0 and self.sample_every_n_steps >= 0,
             tr("Sample every N epochs / steps cannot be negative (0 turns it off)."))
        need(1 <= self.sample_count <= 16, tr("Sample prompts to make must be between 1 and 16 (got {sample_count}).",
                                              sample_count=self.sample_count))
        need(1 <= self.sample_steps <= 1000, tr("Sample steps must be between 1 and 1000 (got {sample_steps}).",
                                                sample_steps=self.sample_steps))
        need(math.isfinite(self.sample_cfg_scale) and self.sample_cfg_scale >= 0,
             tr("Sample CFG scale must be 0 or more (got {sample_cfg_scale}).", sample_cfg_scale=self.sample_cfg_scale))
        if self.sample_every_n_epochs or self.sample_every_n_steps:  # lines kept while samples are off may wait
            parse_sample_prompts(self.sample_prompts)  # raises ConfigError naming the line

    def loraplus_ratios(self) -> tuple[float, float]:
        """(UNet, text encoder) LoRA+ ratios, 0 for off: the part's own ratio, else the common one (kohya's rule)."""
        return (self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio,
                self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio)

    def noising(self, alphas_cumprod: torch.Tensor) -> Noising:
        return Noising(alphas_cumprod, self.noise_offset, self.multires_noise_iterations,
                       self.multires_noise_discount, self.ip_noise_gamma)

    def objective(self, prediction_type: PredictionType, alphas_cumprod: torch.Tensor) -> Objective:
        return Objective(prediction_type, alphas_cumprod, self.loss_type, self.huber_schedule, self.huber_c,
                         self.huber_scale, self.min_snr_gamma, self.debiased_estimation_loss)

    def _validate_network_type(self, need) -> None:
        need(self.network_type in NETWORK_TYPES, tr("Network type must be one of {value} (got {network_type!r}).",
                                                    value=', '.join(NETWORK_TYPES), network_type=self.network_type))
        need(self.network_type != "locon" or self.conv_rank > 0,
             tr("LoCon also trains the 3x3 convolutions: give it a conv rank above 0, or choose LoRA."))
        need(not self.dora or self.network_type in ("lora", "locon"),
             tr("DoRA (weight decomposition) applies to LoRA and LoCon only, not to {value}: turn DoRA off or "
                "choose LoRA/LoCon.", value=LABELS.get(self.network_type)))
        need(self.network_type == "lokr" or (self.lokr_factor == -1 and not self.decompose_both),
             tr("LoKr factor and decompose-both apply to LoKr only: choose LoKr, or set the factor back to -1 and "
                "turn decompose-both off."))
        need(self.lokr_factor == -1 or self.lokr_factor >= 1,
             tr("LoKr factor must be -1 (automatic) or at least 1 (got {lokr_factor}).", lokr_factor=self.lokr_factor))

    def warmup_steps(self, total_steps: int) -> int:
        return warmup_steps(self.lr_warmup_steps, self.lr_warmup_ratio, total_steps)

    def optimizer_arguments(self, total_steps: int) -> dict[str, Any]:
        """What the optimizer is built with beside parameters and learning rates (ss_optimizer lists the same)."""
        return optimizer_arguments(optimizer_kind(self.optimizer), self.weight_decay, self.optimizer_args,
                                   self.warmup_steps(total_steps))

    def _check_optimisation(self, need) -> None:
        """Learning rates that fit the optimizer (adaptive ones take ≈1.0), its arguments, the schedule."""
        kind = optimizer_kind(self.optimizer)
        lrs = (("UNet", self.unet_lr), (tr("Text encoder"), self.text_encoder_lr))
        need(all(math.isfinite(lr) and lr >= 0 for _, lr in lrs), tr("The learning rates must be finite and not "
                                                                     "negative (got UNet {unet_lr}, text encoder "
                                                                     "{text_encoder_lr}).", unet_lr=self.unet_lr,
                                                                     text_encoder_lr=self.text_encoder_lr))
        need(self.unet_lr > 0, tr("The UNet learning rate must be positive."))
        if kind.adaptive:
            need(0.1 <= self.unet_lr <= 10,
                 tr("{name} estimates its own step size: the learning rate multiplies that estimate and is 1.0 by "
                    "convention (0.5-2 to lean lower or higher), so {unet_lr:g} would shrink every step "
                    "{value:.0f}-fold. Set the UNet learning rate to 1.0 (to find a rate for AdamW, use Find "
                    "learning rate).", name=kind.name, unet_lr=self.unet_lr, value=1 / self.unet_lr))
            need(self.text_encoder_lr in (0, self.unet_lr),
                 tr("{name} takes one learning rate for everything it trains: give the text encoder the UNet's "
                    "({unet_lr:g}), or 0 to train the UNet only.", name=kind.name, unet_lr=self.unet_lr))
        else:
            for label, lr in lrs:
                need(lr < 1, tr("{label} learning rate must be below 1 for {name} (got {lr:g}); 1.0 is the "
                                "convention of the adaptive optimizers (Prodigy, DAdaptAdam).", label=label,
                                name=kind.name, lr=lr))
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             tr("Weight decay must be 0 or more (got {weight_decay}); 0 turns it off.", weight_decay=self.weight_decay))
        kind.check_arguments(self.optimizer_args)
        need(self.lr_scheduler in SCHEDULERS, tr("Scheduler must be one of {value}.", value=', '.join(SCHEDULERS)))
        need(not kind.schedule_free or self.lr_scheduler == "constant",
             tr("{name} replaces the learning-rate schedule: choose the constant scheduler (Advanced → Optimizer); "
                "its warmup is the warmup setting.", name=kind.name))
        need(self.lr_warmup_steps >= 0, tr("Warmup steps cannot be negative."))
        need(0 <= self.lr_warmup_ratio < 1, tr("Warmup ratio must be in [0, 1) (got {lr_warmup_ratio}).",
                                               lr_warmup_ratio=self.lr_warmup_ratio))
        need(not (self.lr_warmup_ratio > 0 and self.lr_warmup_steps > 0),
             tr("Give the warmup as steps or as a ratio of the steps, not both."))
        need(self.lr_scheduler_num_cycles >= 1, tr("Scheduler cycles must be at least 1."))
        need(self.lr_scheduler_power > 0, tr("Scheduler power must be positive."))
        need(self.lr_finder_steps >= 1, tr("The learning-rate finder needs at least 1 step."))

    def training_data(self, records: Sequence[ImageRecord]) -> TrainingData:
        """The records in this run's buckets, batches, caption handling and seed."""
        return TrainingData(
            records,
            resolution=self.resolution,
            enable_buckets=self.enable_buckets,
            min_bucket_reso=self.min_bucket_reso,
            max_bucket_reso=self.max_bucket_reso,
            bucket_reso_steps=self.bucket_reso_steps,
            bucket_no_upscale=self.bucket_no_upscale,
            flip_aug=self.flip_aug,
            batch_size=self.batch_size,
            shuffle_caption=self.shuffle_caption,
            keep_tokens=self.keep_tokens,
            caption_dropout_rate=self.caption_dropout_rate,
            caption_tag_dropout_rate=self.caption_tag_dropout_rate,
            masked_loss=self.masked_loss,
            seed=self.seed,
            prior_loss_weight=self.prior_loss_weight,
        )

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values.pop("extra")
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from plain values (TOML, JSON); unknown keys are an error, not silently ignored."""
        known = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(tr("Unknown setting(s): {value}.", value=', '.join(unknown)))
        converted = {}
        for key, value in values.items():
            default = known[key].default
            if default is dataclasses.MISSING:
                default = known[key].default_factory()
            try:
                converted[key] = _coerce(value, type(default))
            except (TypeError, ValueError):
                raise ConfigError(tr("Setting '{key}' must be {kind}, got {value!r}.", key=key,
                                     kind=type(default).__name__, value=value)) from None
        return cls(**converted)

    @classmethod
    def from_toml(cls, path: str | Path) -> "TrainConfig":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10 (the WebUI's tested version): install.py provides tomli
            import tomli as tomllib
        path = Path(path)
        try:
            with path.open("rb") as handle:
                values = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(tr("Config file not found: {path}", path=path)) from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(tr("Config file {path} is not valid TOML: {error}", path=path, error=error)) from None
        # Relative folders in a config file are relative to the file, not to the working directory.
        for key in ("train_dir", "output_dir", "reg_dir", "state_dir", "initial_lora"):
            if key in values and values[key] and not Path(values[key]).is_absolute():
                values[key] = str((path.parent / values[key]).resolve())
        return cls.from_dict(values)


def _coerce(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise TypeError
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise TypeError
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise TypeError
        return value
    if kind is dict:
        if isinstance(value, str):
            return parse_key_values(value)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise TypeError
        return {key: _literal_value(item) for key, item in value.items()}
    return value


# A key at the start or after a blank or a comma, outside brackets and quotes: "a=1 b=(0.9, 0.99), c=True".
_KEY = re.compile(r"([A-Za-z_]\w*)\s*=(?!=)")


def parse_key_values(text: str) -> dict[str, Any]:
    """kohya's ``--optimizer_args`` as one line: ``key=value`` pairs apart by blanks or commas, each value a
    Python literal (numbers, True/False (any case), None, strings, tuples: ``betas=0.9,0.99`` or ``(0.9, 0.99)``)."""
    starts, depth, quote = [], 0, None
    for index, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0 and (index == 0 or text[index - 1] in " \t\n,") and _KEY.match(text, index):
            starts.append(index)
    if text[:starts[0] if starts else len(text)].strip(" \t\n,"):
        raise ConfigError(tr("Cannot read the optimizer arguments {value!r}: write key=value pairs, e.g. d_coef=0.5 "
                             "betas=(0.9, 0.99).", value=text.strip()))
    values: dict[str, Any] = {}
    for start, end in zip(starts, [*starts[1:], len(text)]):
        match = _KEY.match(text, start)
        key, raw = match.group(1), text[match.end():end].strip(" \t\n,")
        if key in values:
            raise ConfigError(tr("Optimizer argument '{key}' is given twice.", key=key))
        values[key] = _literal_value(_read_literal(key, raw))
    return values


def _read_literal(key: str, raw: str) -> Any:
    words = {"true": True, "false": False, "none": None}
    if raw.lower() in words:
        return words[raw.lower()]
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise ConfigError(tr("Optimizer argument '{key}': cannot read {raw!r} (give a number, True/False, a quoted "
                             "string or a tuple such as (0.9, 0.99)).", key=key, raw=raw)) from None


def _literal_value(value: Any) -> Any:
    """JSON and TOML have no tuples: lists become the tuples the optimizers take (betas=(0.9, 0.99))."""
    return tuple(_literal_value(item) for item in value) if isinstance(value, (list, tuple)) else value

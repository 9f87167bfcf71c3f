"""Headless training: ``python -m lib_train train --config FILE [--checkpoint PATH] [--device cuda]``, and the
learning-rate finder on the same settings: ``python -m lib_train find-lr --config FILE [...]``.

With ``--checkpoint`` it trains on an SD1.x, SD2.x or SDXL ``.safetensors`` checkpoint; without, on the built-in tiny
model (a demo that runs in seconds on a CPU and writes a real kohya-format LoRA).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from .common.errors import ConfigError, TrainToolsError
from .common.i18n import tr
from .common.tensor_store import CacheFolder
from .engine.config import TrainConfig
from .engine.lr_finder import find_learning_rate
from .engine.train import train_lora
from .hosts.checkpoint_hashes import legacy_hash, sha256_of_file
from .hosts.protocol import BaseModelInfo, PredictionType, Progress
from .hosts.sd1 import build_tiny_sd1, load_sd1_checkpoint
from .hosts.sd2 import SD2Model, checkpoint_prediction_type, load_sd2_checkpoint, unet_prediction_type
from .hosts.sdxl import SDXLModel, load_sdxl_checkpoint
from .hosts.standalone import StandaloneHost
from .hosts.standalone_sd2 import StandaloneSD2Host
from .hosts.standalone_sdxl import StandaloneSDXLHost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_train")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a LoRA from a TOML config")
    find_lr = commands.add_parser("find-lr", help="find the learning rate for a TOML config's training (Prodigy's "
                                  "estimate per part; nothing is saved)")
    for command in (train, find_lr):
        command.add_argument("--config", required=True, help="TOML file with the training settings")
        command.add_argument("--checkpoint", help="SD1.x, SD2.x or SDXL .safetensors checkpoint (default: the built-in tiny "
                             "demo model)")
        command.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
        command.add_argument("--v-prediction", action="store_true",
                             help="the checkpoint predicts velocity (read from its 'v_pred' key, or the "
                             "'parameterization' of its .yaml config beside it, when it has one; an SD2 "
                             "checkpoint without one is tested as the WebUI tests it)")
        command.add_argument("--cache-dir", help="keep latents and caption embeddings in this folder between runs "
                             "(a rerun then starts without encoding; the result is the same)")
    train.add_argument("--summary-json", help="write timings and memory of the run to this file (for bench/)")
    train.add_argument("--continue", dest="resume", action="store_true",
                       help="continue from the training state in the config's state_dir (after its last saved epoch)")
    train.add_argument("--accept-changes", action="store_true",
                       help="with --continue: go on even if settings or pictures differ from the saved run's")
    find_lr.add_argument("--steps", type=int, help="the probe's optimizer steps (default: lr_finder_steps)")
    find_lr.add_argument("--json", help="write the rates found, their history and the loss to this file")
    args = parser.parse_args(argv)
    if args.command == "find-lr":
        return _find_lr(args)
    started = time.time()

    try:
        config = TrainConfig.from_toml(args.config).validate()
        host = _load_host(args.checkpoint, args.device, config, args.v_prediction)
        loading_seconds = time.time() - started
        resident_cuda = torch.cuda.memory_allocated() if torch.cuda.is_available() else None
        result = train_lora(host, config, CacheFolder(args.cache_dir) if args.cache_dir else None,
                            resume=args.resume, accept_changes=args.accept_changes)
    except TrainToolsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    status = "stopped" if result.stopped else "done"
    print(f"{status}: {result.steps}/{result.total_steps} steps, setup {result.setup_seconds:.1f}s")
    for path in result.saved_files:
        print(f"saved {path}")
    if args.summary_json:
        summary = {
            "steps": result.steps,
            # from the start of the command (model loading included) to the first training step
            "setup_seconds": loading_seconds + result.setup_seconds if result.step_seconds else None,
            "cache": result.cache.summary() if args.cache_dir else None,
            "step_seconds": result.step_seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
            # the model as loaded, before training: what the WebUI would already hold
            "resident_cuda_mb": resident_cuda / 2**20 if resident_cuda is not None else None,
        }
        Path(args.summary_json).write_text(json.dumps(summary, indent=2))
    return 0


def _find_lr(args: argparse.Namespace) -> int:
    try:
        config = TrainConfig.from_toml(args.config)
        if args.steps is not None:
            config.lr_finder_steps = args.steps
        host = _load_host(args.checkpoint, args.device, config.validate(), args.v_prediction)
        finding = find_learning_rate(host, config, CacheFolder(args.cache_dir) if args.cache_dir else None)
    except TrainToolsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for part, rate in finding.found.items():
        print(f"{'unet_lr' if part == 'unet' else 'text_encoder_lr'} = {rate:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "optimizer": finding.optimizer, "found": finding.found, "estimates": finding.learning_rates,
            "steps": finding.steps, "seconds": finding.seconds, "still_growing": finding.still_growing,
            "history": finding.history, "loss_history": finding.loss_history}, indent=2))
    return 0


def _load_host(checkpoint: str | None, device: str, config: TrainConfig, v_prediction: bool) -> StandaloneHost:
    started = time.time()
    weights_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision)
    if checkpoint is None:
        model, info = build_tiny_sd1(seed=0), BaseModelInfo(name="train-tools-tiny-demo")
    else:
        path = Path(checkpoint)
        keys = _header_keys(path)
        # NoobAI's v-prediction releases mark themselves with an empty 'v_pred' tensor (the WebUI's dev branch
        # reads the same key).
        v_prediction = v_prediction or "v_pred" in keys
        if any(key.startswith("conditioner.") for key in keys):
            if config.clip_skip > 1:  # refused before the minute the loading takes
                raise ConfigError(tr("clip_skip = {clip_skip} does not apply to SDXL: its text encoders read their "
                                     "penultimate layer (as in kohya, and in the WebUI without its \"Clip skip "
                                     "SDXL\" option). Remove clip_skip from the config.", clip_skip=config.clip_skip))
            model = load_sdxl_checkpoint(path, dtype=weights_dtype or torch.float32)
        elif any(key.startswith("cond_stage_model.model.") for key in keys):
            model = load_sd2_checkpoint(path)
            # The 768-v models' config (v2-inference-v.yaml beside the file) says so; without one, the UNet's answer
            # to a test input tells, as the WebUI finds out.
            declared = checkpoint_prediction_type(path) or unet_prediction_type(model.unet)
            v_prediction = v_prediction or declared is PredictionType.V
        else:
            model = load_sd1_checkpoint(path)
        info = BaseModelInfo(name=path.name, legacy_hash=legacy_hash(path), sha256=sha256_of_file(path))
    # Like the WebUI on a GPU (and kohya), frozen weights are held in the mixed-precision dtype. Norm layers
    # stay float32: ldm's GroupNorm32 computes in float32 and CPU autocast does not cast its weights. The VAE
    # stays float32 so latents are cached at full precision.
    if weights_dtype is not None:
        text_encoders = [model.text_encoder_1, model.text_encoder_2] if isinstance(model, SDXLModel) else [model.text_encoder]
        for module in (model.unet, *text_encoders):
            module.to(weights_dtype)
        for norm in model.unet.modules():
            if isinstance(norm, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                norm.float()
    print(f"model ready in {time.time() - started:.1f}s", file=sys.stderr)
    host_class = (StandaloneSDXLHost if isinstance(model, SDXLModel) else StandaloneSD2Host if isinstance(model, SD2Model)
                  else StandaloneHost)
    prediction = PredictionType.V if v_prediction else PredictionType.EPSILON
    return host_class(model, device=device, clip_skip=config.clip_skip, base_model=info,
                      on_progress=_print_progress, seed=config.seed, prediction_type=prediction)


def _header_keys(path: Path) -> set[str]:
    """The tensor names of a checkpoint, from its header only (SDXL holds the conditioner's weights); nothing
    for a file that is not readable safetensors: the loader names that problem."""
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return set()
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), "pt") as handle:
            return set(handle.keys())
    except (SafetensorError, OSError, ValueError):
        return set()


def _print_progress(progress: Progress) -> None:
    if progress.phase == "training":
        print(f"epoch {progress.epoch}/{progress.total_epochs} step {progress.step}/{progress.total_steps} "
              f"loss {progress.loss:.4f}", file=sys.stderr)
    elif progress.message:
        print(progress.message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

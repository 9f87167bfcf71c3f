"""Click → first training step, without the cache, on a first run that fills it, and on a rerun that reads it.

    python bench/bench_cache.py [--size 64] [--count 8] [--checkpoint sd15.safetensors | --random-sd15] [--device cuda]
    python bench/bench_cache.py --url http://127.0.0.1:7861 [--pictures-dir <a folder the WebUI may read>] [--size 512]

Standalone (default: the built-in tiny SD1; ``--random-sd15`` the random-weight full SD1.5 of bench_train.py,
``--checkpoint`` a real one): each run trains in this process on a freshly loaded model, as a WebUI holds one,
and prints ``setup_seconds`` (train_lora's start to its first step; model loading is not part of a click).
WebUI: a first run (the folder's cache cleared before) and a rerun through the HTTP API; from the Train request to
the start of the first step (the job's ``setup_seconds`` less ``first_step_seconds``), and that step. Every run
is stopped after its first step; UNet only (so caption embeddings are cached too), seed 0.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_train import CACHE, build_checkpoint, build_dataset  # noqa: E402

def settings(data: Path, size: int, text_encoder_lr: float) -> dict:
    return dict(name="bench_cache", train_dir=str(data), overwrite=True, resolution=size, enable_buckets=False,
                rank=16, alpha=8.0, epochs=1, batch_size=1, unet_lr=1e-4, text_encoder_lr=text_encoder_lr,
                lr_scheduler="constant", save_every_n_epochs=0, repeats=1, seed=0)


def standalone(args, data: Path, scratch: Path) -> None:
    from lib_train.common.tensor_store import CacheFolder
    from lib_train.engine.config import TrainConfig
    from lib_train.engine.train import train_lora
    from lib_train.hosts.sd1 import build_tiny_sd1, load_sd1_checkpoint
    from lib_train.hosts.standalone import StandaloneHost

    checkpoint = args.checkpoint
    if args.random_sd15:
        checkpoint = CACHE / "sd15-random-fp16.safetensors"
        if not checkpoint.exists():
            build_checkpoint(checkpoint)
    cache = CacheFolder(scratch / "cache")
    for label, cached in (("without cache", False), ("first run (fills the cache)", True),
                          ("rerun (from the cache)", True)):
        model = load_sd1_checkpoint(checkpoint) if checkpoint else build_tiny_sd1(seed=0)
        host = StandaloneHost(model, device=args.device, seed=0)
        host._on_progress = lambda progress: progress.phase == "training" and host.request_stop()  # one step is enough
        config = TrainConfig(**settings(data, args.size, args.text_encoder_lr), output_dir=str(scratch / "out"))
        result = train_lora(host, config, cache if cached else None)
        print(f"{label:<30} setup_seconds {result.setup_seconds:7.2f}  {result.cache.summary() if cached else ''}",
              flush=True)


def webui(args, data: Path) -> None:
    """In the WebUI every training uses the cache: a first run after clearing it, then a rerun."""
    sys.path.insert(0, str(ROOT / "tests" / "webui"))
    from webui_api import request, wait_for_job

    api = args.url.rstrip("/")
    request(api + "/train-tools/v1/cache/clear", {"train_dir": str(data)})

    def stop_after_the_first_step(status: dict) -> None:
        # The step counts encoded pictures while caching: only a training step ends the measurement.
        if status.get("phase") == "training" and status.get("step", 0) >= 1 and status["state"] == "running":
            request(api + "/train-tools/v1/stop", {})

    for label in ("first run (fills the cache)", "rerun (from the cache)"):
        request(api + "/train-tools/v1/train", settings(data, args.size, args.text_encoder_lr))
        status = wait_for_job(api, stop_after_the_first_step)
        if status["state"] not in ("done", "stopped"):
            sys.exit(f"{label}: {status['state']}: {status.get('error')}")
        cache = status.get("cache") or {}
        step = status.get("first_step_seconds") or 0.0
        print(f"{label:<30} click->first step begins {status['setup_seconds'] - step:7.2f} s, first step {step:6.2f} s  "
              f"{cache.get('latents_reused')} of {cache.get('latents_total')} latents from cache", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", help="a running WebUI with Train Tools (else: standalone, in this process)")
    parser.add_argument("--pictures-dir", type=Path, help="where to write the pictures (WebUI: a folder it may read)")
    parser.add_argument("--size", type=int, default=None, help="picture and training size (tiny: 64, else 512)")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--text-encoder-lr", type=float, default=0.0)
    parser.add_argument("--checkpoint", type=Path, help="an SD1.x .safetensors checkpoint")
    parser.add_argument("--random-sd15", action="store_true", help="bench_train.py's random-weight SD1.5")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.size is None:
        args.size = 512 if args.url or args.checkpoint or args.random_sd15 else 64

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data = (args.pictures_dir or scratch) / f"bench_cache_{int(time.time())}"
        build_dataset(data, count=args.count, size=args.size)
        print(f"{args.count} pictures at {args.size}², "
              f"{'WebUI ' + args.url if args.url else 'standalone ' + ('SD1.5' if args.checkpoint or args.random_sd15 else 'tiny SD1')}")
        if args.url:
            webui(args, data)
        else:
            standalone(args, data, scratch)


if __name__ == "__main__":
    main()

"""Training speed and memory through the headless entry point, on the full SD1.5 or SDXL architecture.

    python bench/bench_train.py [--family sd1|sdxl] [--device cpu|cuda] [--only NAME]

Builds once (cached in bench/.cache) a random-weight SD1.5 checkpoint in the original LDM key layout
and a small generated dataset, then for each case runs ``python -m lib_train train --checkpoint ...``
in a fresh process and prints sec_per_step (median after the first two steps), peak_rss_mb and
setup_seconds (command start to the first step, model loading included).

Cases (8 steps each: 8 images, 1 epoch): 256x256, batch 1, rank 16, alpha 8, AdamW lr 1e-4, cached latents; UNet+TE and UNet only,
each in fp32 and bf16 autocast.

SDXL (a random full-size checkpoint, ~7 GB fp16, built once): the SDXL defaults — UNet only, cached latents and
text, gradient checkpointing — at 256² in bf16 on the CPU (the proxy for machines without a GPU), and on CUDA
at 1024² with AdamW8bit in fp16 and bf16, where peak_vram_over_resident_gib is the peak allocation above the
loaded model (what a training adds to the WebUI's ~7 GB; the target is at most 3 GiB).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache"
CASES = {
    "unet_te_fp32": dict(text_encoder_lr=1e-4, mixed_precision="no"),
    "unet_te_bf16": dict(text_encoder_lr=1e-4, mixed_precision="bf16"),
    "unet_only_fp32": dict(text_encoder_lr=0.0, mixed_precision="no"),
    "unet_only_bf16": dict(text_encoder_lr=0.0, mixed_precision="bf16"),
}
_SDXL_DEFAULTS = dict(text_encoder_lr=0.0, gradient_checkpointing=True)
SDXL_CASES = {
    "sdxl_cpu_proxy_256_bf16": dict(_SDXL_DEFAULTS, mixed_precision="bf16"),
    "sdxl_1024_fp16_8bit": dict(_SDXL_DEFAULTS, mixed_precision="fp16", resolution=1024, optimizer="AdamW8bit"),
    "sdxl_1024_bf16_8bit": dict(_SDXL_DEFAULTS, mixed_precision="bf16", resolution=1024, optimizer="AdamW8bit"),
}


def build_checkpoint(path: Path) -> None:
    """Full SD1.5 with random weights, fp16, LDM keys; ldm's zero-initialised output convs get σ=0.02
    so the UNet output depends on its input (as a trained model's does)."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT))
    from lib_train.hosts.sd1 import SD15_TEXT, SD15_UNET, SD15_VAE, build_sd1

    torch.manual_seed(0)
    model = build_sd1(SD15_UNET, SD15_VAE, SD15_TEXT)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.unet.parameters():
            if parameter.dim() > 1 and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    state = {k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items()
             if not k.endswith("position_ids")}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path.with_suffix(".tmp")))
    path.with_suffix(".tmp").rename(path)


def build_sdxl_checkpoint(path: Path) -> None:
    """Full SDXL base with random fp16 weights under the checkpoint's key names, made tensor by tensor (a float32
    model would need 14 GB): matrices ~N(0, 1/fan_in) so activations stay finite, norms at 1, biases at 0."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT))
    from lib_train.hosts.sdxl import build_sdxl

    with torch.device("meta"):
        model = build_sdxl()
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("position_ids"):
            continue
        if tensor.dim() >= 2:
            fan_in = tensor[0].numel()
            value = torch.randn(tensor.shape, generator=generator) * fan_in ** -0.5
        else:
            value = torch.ones(tensor.shape) if name.endswith("weight") or name.endswith("logit_scale") else torch.zeros(tensor.shape)
        state[name] = value.to(torch.float16)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path.with_suffix(".tmp")))
    path.with_suffix(".tmp").rename(path)


def build_dataset(folder: Path, count: int = 8, size: int = 256) -> None:
    from PIL import Image, ImageDraw

    sub = folder / "1_bench"
    sub.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = Image.new("RGB", (size, size), (30 * index % 255, 90, 160))
        ImageDraw.Draw(image).ellipse((40 + 8 * index, 60, 200, 220), fill=(230, 40, 40))
        image.save(sub / f"{index:02d}.png")
        (sub / f"{index:02d}.txt").write_text(f"benchsubject, red disc, blue background, picture {index}", encoding="utf-8")


def write_config(path: Path, data: Path, output: Path, overrides: dict) -> None:
    values = dict(name="bench", train_dir=str(data), output_dir=str(output), overwrite=True, resolution=256,
                  enable_buckets=False, rank=16, alpha=8.0, epochs=1, batch_size=1, unet_lr=1e-4,
                  optimizer="AdamW", lr_scheduler="constant", save_every_n_epochs=0, repeats=1, seed=0)
    values.update(overrides)
    lines = [f"{k} = {json.dumps(v)}" if isinstance(v, str) else f"{k} = {str(v).lower() if isinstance(v, bool) else v}"
             for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--family", choices=("sd1", "sdxl"), default="sd1")
    parser.add_argument("--only", choices=sorted(CASES) + sorted(SDXL_CASES), action="append")
    args = parser.parse_args()

    sdxl = args.family == "sdxl"
    cases = SDXL_CASES if sdxl else CASES
    checkpoint = CACHE / ("sdxl-random-fp16.safetensors" if sdxl else "sd15-random-fp16.safetensors")
    if not checkpoint.exists():
        started = time.time()
        (build_sdxl_checkpoint if sdxl else build_checkpoint)(checkpoint)
        print(f"built {checkpoint.name} in {time.time() - started:.0f}s", file=sys.stderr)
    data = CACHE / ("data-1024" if sdxl else "data")
    if not data.exists():
        build_dataset(data, size=1024 if sdxl else 256)  # 1024² pictures serve every SDXL case

    default_cases = [n for n in cases if (n.startswith("sdxl_cpu") == (args.device == "cpu"))] if sdxl else list(cases)
    print(f"{'case':<24} {'sec_per_step':>12} {'peak_rss_mb':>12} {'peak_cuda_mb':>12} "
          f"{'peak_vram_over_resident_gib':>27} {'setup_seconds':>13}")
    for name in args.only or default_cases:
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            write_config(scratch / "train.toml", data, scratch / "out", cases[name])
            summary_path = scratch / "summary.json"
            command = [sys.executable, "-m", "lib_train", "train", "--config", str(scratch / "train.toml"),
                       "--checkpoint", str(checkpoint), "--device", args.device, "--summary-json", str(summary_path)]
            completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            if completed.returncode != 0:
                print(f"{name}: failed\n{completed.stderr[-2000:]}", file=sys.stderr)
                continue
            summary = json.loads(summary_path.read_text())
        steady = summary["step_seconds"][2:] or summary["step_seconds"]
        cuda = f"{summary['peak_cuda_mb']:.0f}" if summary["peak_cuda_mb"] else "-"
        over = (f"{(summary['peak_cuda_mb'] - summary['resident_cuda_mb']) / 1024:.2f}" if summary["peak_cuda_mb"]
                else "-")
        print(f"{name:<24} {statistics.median(steady):>12.3f} {summary['peak_rss_mb']:>12.0f} {cuda:>12} "
              f"{over:>27} {summary['setup_seconds']:>13.1f}", flush=True)


if __name__ == "__main__":
    main()

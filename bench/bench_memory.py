"""The WebUI's resident memory around a training: idle before, peak during, and after the job, in a real running
WebUI (on the CPU the run's tensors live in RAM; after it the process should be back within a few percent).

    python bench/bench_memory.py --url http://127.0.0.1:7861 --pid <WebUI process id> [--size 512] [--count 8] [--runs 2]

The WebUI must be idle. Trains a throwaway LoRA (1 epoch, rank 4, UNet and text encoder, learning rates low enough for a random-weight test model) on generated pictures
in a temporary folder; its files go to models/Lora/<name>/ like any other training and can be deleted afterwards.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "webui"))
from webui_api import request, wait_for_job  # noqa: E402


def resident_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) / 1024


def make_pictures(folder: Path, size: int, count: int) -> Path:
    sub = folder / "1_memtest"
    sub.mkdir(parents=True)
    for index in range(count):
        image = Image.new("RGB", (size, size), (25 * index % 255, 90, 160))
        ImageDraw.Draw(image).ellipse((size // 8, size // 6, size - size // 5, size - size // 8), fill=(230, 40, 40))
        image.save(sub / f"{index}.png")
        (sub / f"{index}.txt").write_text(f"memtest, red disc, picture {index}", encoding="utf-8")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:7861")
    parser.add_argument("--pid", type=int, required=True, help="the WebUI's process id")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as temporary:
        pictures = make_pictures(Path(temporary), args.size, args.count)
        started = resident_mb(args.pid)
        print(f"idle before any run: {started:.0f} MB")
        for run in range(1, args.runs + 1):
            idle = resident_mb(args.pid)
            peak, done = idle, threading.Event()

            def sample() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, resident_mb(args.pid))
                    time.sleep(0.2)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            name = f"memtest-{int(time.time())}"
            request(args.url + "/train-tools/v1/train", dict(
                name=name, train_dir=str(pictures), trigger_words="memtest", resolution=args.size, epochs=1,
                rank=4, alpha=4, unet_lr=2e-5, text_encoder_lr=1e-5, enable_buckets=False, batch_size=1, seed=1,
                save_precision="fp16"))
            status = wait_for_job(args.url)
            time.sleep(3)  # what the process holds once the job has ended
            done.set()
            sampler.join()
            after = resident_mb(args.pid)
            print(f"run {run} ({status['state']}, {status.get('step')} steps, {name}): idle {idle:.0f} MB -> "
                  f"peak {peak:.0f} MB -> after {after:.0f} MB ({(after - idle) / idle * 100:+.1f} % of idle, "
                  f"{(after - started) / started * 100:+.1f} % of the first idle)")


if __name__ == "__main__":
    main()

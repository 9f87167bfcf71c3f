"""End-to-end check of the learning-rate finder inside a real, running WebUI (not run by CI: CI has no WebUI).

    python tests/webui/check_find_lr.py --url http://127.0.0.1:7861 --lora-dir <webui>/models/Lora [--steps 150] \
        [--pictures 2 --resolution 256]

Finds the learning rate on generated pictures (2 at 256 px by default: a random-weight SD1.5 goes to NaN on
some pictures at any learning rate, as plain training on them does) through the HTTP API while watching the WebUI's progress,
then checks: a finite positive rate per part, the live model hash-identical, no file in the Lora folder, a
fixed-seed txt2img identical before and after, and Stop ending a second probe early. Prints the rates and the
seconds it took. Exits non-zero on the first failed check.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from webui_api import check, make_pictures, request, txt2img, wait_for_job  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:7861")
    parser.add_argument("--lora-dir", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--pictures", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256)
    args = parser.parse_args()
    api = args.url.rstrip("/")
    name = f"ttlr{int(time.time()) % 100000}"

    with tempfile.TemporaryDirectory() as scratch:
        pictures = make_pictures(Path(scratch), "ttlr", count=args.pictures)
        before = txt2img(api, "ttlr, red disc")
        settings = dict(name=name, train_dir=str(pictures), trigger_words="ttlr", resolution=args.resolution, enable_buckets=False,
                        batch_size=1, rank=4, alpha=4.0, text_encoder_lr=5e-5, lr_finder_steps=args.steps)
        started = time.time()
        job = request(api + "/train-tools/v1/find-lr", settings)
        check(job["kind"] == "find-lr", "the finder's job started")
        progress_seen = []
        status = wait_for_job(api, lambda s: progress_seen.append(
            request(api + "/sdapi/v1/progress?skip_current_image=true")["progress"]))
        seconds = time.time() - started
        print(f"     {status['message']} ({seconds:.0f} s)")
        check(status["state"] == "done", "the probe finished")
        check(status["model_restored"] is True, "live model hash-identical after the probe")
        check(max(progress_seen) > 0, "the WebUI's progress moved during the probe")
        rates = status["learning_rates"]
        check("unet" in rates and all(math.isfinite(r) and r > 0 for r in rates.values()), f"rates found: {rates}")
        check(len(status["lr_history"]) == args.steps, "an estimate per step in the status")
        check(not (args.lora_dir / name).exists(), "nothing written into the Lora folder")
        check(np.array_equal(before, txt2img(api, "ttlr, red disc")), "fixed-seed txt2img identical after the probe")

        request(api + "/train-tools/v1/find-lr", dict(settings, lr_finder_steps=10 * args.steps))
        stopped = False

        def stop_after_a_few_steps(status: dict) -> None:
            nonlocal stopped
            if not stopped and status.get("step", 0) >= 3:
                request(api + "/train-tools/v1/stop", {})
                stopped = True

        status = wait_for_job(api, stop_after_a_few_steps)
        check(status["state"] == "stopped" and status["step"] < 10 * args.steps, "Stop ends the probe")
        check(status["model_restored"] is True and status["learning_rates"] == {},
              "live model hash-identical after Stop, no rate offered from a stopped probe")
    print("all checks passed")


if __name__ == "__main__":
    main()

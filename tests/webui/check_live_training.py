"""End-to-end check of Train Tools inside a real, running WebUI (not run by CI: CI has no WebUI).

    python tests/webui/check_live_training.py --url http://127.0.0.1:7861 --lora-dir <webui>/models/Lora \
        [--log <webui log, started with SD_WEBUI_LOG_LEVEL=DEBUG>]

Trains 2 epochs on 8 generated 128-px pictures through the HTTP API while watching the WebUI's progress,
then checks: files with metadata in the Lora folder, a fixed-seed txt2img identical before and after,
<lora:NAME:1> changing the image with every key matched, and Stop mid-epoch leaving no partial file.
Exits non-zero on the first failed check.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from webui_api import check, make_pictures, request, txt2img  # noqa: E402


def train(api: str, settings: dict, stop_in_epoch: int | None = None) -> dict:
    job = request(api + "/train-tools/v1/train", settings)
    progress_seen = []
    while True:
        status = request(api + "/train-tools/v1/status")
        webui_progress = request(api + "/sdapi/v1/progress?skip_current_image=true")
        progress_seen.append(webui_progress["progress"])
        if stop_in_epoch and status["phase"] == "training" and status["epoch"] >= stop_in_epoch:
            request(api + "/train-tools/v1/stop", {})
            stop_in_epoch = None
        if status["state"] not in ("queued", "running"):
            break
        time.sleep(1)
    status["progress_seen"] = progress_seen
    print(f"     job {job['id']}: {status['state']} {status['message']} {status['error']}")
    return status


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:7861")
    parser.add_argument("--lora-dir", required=True, type=Path)
    parser.add_argument("--log", type=Path, help="the WebUI log, written with SD_WEBUI_LOG_LEVEL=DEBUG")
    args = parser.parse_args()
    api = args.url.rstrip("/")
    run_name = f"ttlive{int(time.time()) % 100000}"

    with tempfile.TemporaryDirectory() as scratch:
        pictures = make_pictures(Path(scratch), "ttlive")
        before = txt2img(api, "ttlive, red disc")
        settings = dict(name=run_name, train_dir=str(pictures), trigger_words="ttlive", resolution=128,
                        enable_buckets=False, epochs=2, batch_size=1, rank=4, alpha=4.0, unet_lr=1e-3,
                        text_encoder_lr=5e-4, lr_scheduler="constant", save_every_n_epochs=1)
        status = train(api, settings)
        check(status["state"] == "done", "training finished")
        check(status["model_restored"] is True, "live model hash-identical after training")
        check(max(status["progress_seen"]) > 0, "the WebUI's progress moved during training")
        out = args.lora_dir / run_name
        names = sorted(p.name for p in out.iterdir())
        check(names == sorted([f"{run_name}-000001.safetensors", f"{run_name}-000001.json",
                               f"{run_name}.safetensors", f"{run_name}.json"]), f"files in {out}: {names}")
        loras = {item["name"]: item for item in request(api + "/sdapi/v1/loras")}
        check(run_name in loras and f"{run_name}-000001" in loras, "both epochs listed by the WebUI without restart")
        check(loras[run_name]["metadata"].get("ss_output_name") == run_name, "metadata read by the WebUI")

        after = txt2img(api, "ttlive, red disc")
        check(np.array_equal(before, after), "fixed-seed txt2img identical before and after training")
        with_lora = txt2img(api, f"ttlive, red disc <lora:{run_name}:1>")
        check(np.abs(with_lora - before).max() > 0, "<lora:NAME:1> changes the image")
        if args.log:
            unmatched = [line for line in args.log.read_text(errors="replace").splitlines()
                         if "didn't match keys" in line and run_name in line]
            check(not unmatched, f"every key matched by the built-in Lora ({len(unmatched)} complaints)")

        stop_name = run_name + "s"
        status = train(api, dict(settings, name=stop_name, epochs=3), stop_in_epoch=2)
        check(status["state"] == "stopped", "Stop ends the run")
        check(status["model_restored"] is True, "live model hash-identical after Stop")
        stopped_files = sorted(p.name for p in (args.lora_dir / stop_name).iterdir())
        check(stopped_files == sorted([f"{stop_name}-000001.safetensors", f"{stop_name}-000001.json"]),
              f"only finished epochs kept, no partial file: {stopped_files}")
        check(np.array_equal(before, txt2img(api, "ttlive, red disc")), "fixed-seed txt2img identical after Stop")
    print("all checks passed")


if __name__ == "__main__":
    main()

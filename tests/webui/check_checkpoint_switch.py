"""End-to-end check: switching the WebUI's checkpoint while Train Tools trains (not run by CI: CI has no WebUI).

    python tests/webui/check_checkpoint_switch.py --url http://127.0.0.1:7861 --lora-dir <webui>/models/Lora \
        --other <title of another checkpoint>

Starts a short training on the loaded checkpoint, asks the WebUI for another checkpoint through
``POST /sdapi/v1/options`` during the training's steps (as the checkpoint dropdown does), and checks: the switch
waits for the training (the WebUI queues it under the queue lock the training holds), the training finishes on
the model it started with (its files name that model and family) with the model hash-identical, the switch
then happens, and switching back gives the original weights. Needs the harness-info extension's
``/harness/model-info``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from webui_api import check, make_pictures, request, txt2img, wait_for_job  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:7861")
    parser.add_argument("--lora-dir", required=True, type=Path)
    parser.add_argument("--other", required=True, help="the title of the checkpoint to switch to")
    args = parser.parse_args()
    api = args.url.rstrip("/")
    name = f"ttswitch{int(time.time()) % 100000}"

    original = request(api + "/sdapi/v1/options")["sd_model_checkpoint"]
    txt2img(api, "a plain picture", steps=1)  # the built-in Lora un-merges a Lora an earlier generation left merged
    before = request(api + "/harness/model-info")
    check(before["modules_with_networks_applied"] == 0, "the checkpoint's own weights to start from")
    switch = {}

    def switch_checkpoint() -> None:
        switch["asked"] = time.time()
        request(api + "/sdapi/v1/options", {"sd_model_checkpoint": args.other})
        switch["returned"] = time.time()

    with tempfile.TemporaryDirectory() as scratch:
        pictures = make_pictures(Path(scratch), name, count=2)
        request(api + "/train-tools/v1/train", dict(
            name=name, train_dir=str(pictures), trigger_words=name, resolution=128, enable_buckets=False, epochs=2,
            batch_size=1, rank=4, alpha=4, unet_lr=1e-4, text_encoder_lr=5e-5, lr_scheduler="constant", seed=3))
        thread = None

        def ask_during_training(status: dict) -> None:
            nonlocal thread
            if thread is None and status["phase"] == "training":
                thread = threading.Thread(target=switch_checkpoint)
                thread.start()

        status = wait_for_job(api, ask_during_training)
        ended = time.time()
        check(thread is not None, "the switch was asked for during the training's steps")
        thread.join()

    check(status["state"] == "done", f"training finished: {status['message']} {status['error']}")
    check(status["model_restored"] is True, "live model hash-identical after the training")
    check(switch["returned"] >= ended - 2, f"the switch waited for the training ({ended - switch['asked']:.1f} s "
                                         f"queued, returned {switch['returned'] - ended:+.1f} s after the end)")
    with safe_open(str(args.lora_dir / name / f"{name}.safetensors"), "pt") as lora:
        metadata = lora.metadata()
    check(metadata["ss_sd_model_hash"] and metadata["ss_sd_model_name"] in before["checkpoint"],
          f"the file names the model it was trained on: {metadata['ss_sd_model_name']} "
          f"({metadata.get('ss_base_model_version')})")
    switched = request(api + "/harness/model-info")
    check(switched["checkpoint"] != before["checkpoint"], f"then the WebUI switched to {Path(switched['checkpoint']).name}")
    request(api + "/sdapi/v1/options", {"sd_model_checkpoint": original})
    back = request(api + "/harness/model-info")
    check(back["sha256"] == before["sha256"], "switching back gives the original weights (hash)")
    print("all checks passed")


if __name__ == "__main__":
    main()

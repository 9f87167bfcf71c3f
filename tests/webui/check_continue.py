"""Stop, restart the WebUI, Continue, finish: inside a real, running WebUI (not run by CI: CI has no WebUI).

    python tests/webui/check_continue.py --url http://127.0.0.1:7861 --work <folder> --phase stop
    (restart the WebUI)
    python tests/webui/check_continue.py --url http://127.0.0.1:7861 --work <folder> --phase continue \
        --lora-dir <webui>/models/Lora

"stop" trains one LoRA 3 epochs uninterrupted and another with the same settings stopped in epoch 2 (through
/stop), which keeps epoch 1's training state in its project folder. "continue", after the
restart, continues the stopped run (its saved settings) with one Save now during it, then checks: the final
file's tensors are byte-identical to the uninterrupted run's, the extra file exists, the validation losses of
the three epochs are the uninterrupted run's, and /recommend names the lowest. Exits non-zero on the first failed
check.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from webui_api import check, make_pictures, request, wait_for_job  # noqa: E402


def settings(name: str, pictures: Path) -> dict:
    return dict(name=name, train_dir=str(pictures), trigger_words="ttcont", resolution=128, enable_buckets=False,
                epochs=3, batch_size=1, rank=4, alpha=4.0, unet_lr=1e-3, text_encoder_lr=5e-4, lr_scheduler="cosine",
                save_every_n_epochs=1, shuffle_caption=True, save_precision="fp32")


def stop_phase(api: str, work: Path) -> None:
    stamp = int(time.time()) % 100000
    names = {"whole": f"ttwhole{stamp}", "parts": f"ttparts{stamp}"}
    pictures = make_pictures(work / "pictures", "ttcont", count=4)
    request(api + "/train-tools/v1/train", settings(names["whole"], pictures))
    whole = wait_for_job(api)
    check(whole["state"] == "done", f"uninterrupted run done ({whole['message']} {whole['error']})")
    check(len(whole["validation_history"]) == 3, "a validation loss after each of its 3 epochs")

    request(api + "/train-tools/v1/train", settings(names["parts"], pictures))
    stopped = {"sent": False}

    def stop_in_epoch_two(status: dict) -> None:
        if not stopped["sent"] and status.get("phase") == "training" and status.get("epoch") == 2:
            request(api + "/train-tools/v1/stop", {})
            stopped["sent"] = True
    parts = wait_for_job(api, stop_in_epoch_two)
    check(parts["state"] == "stopped", "the second run stopped in epoch 2")
    (work / "names.json").write_text(json.dumps({**names, "whole_validation": whole["validation_history"]}))
    print("     now restart the WebUI, then run --phase continue")


def continue_phase(api: str, work: Path, lora_dir: Path) -> None:
    names = json.loads((work / "names.json").read_text())
    job = request(api + "/train-tools/v1/continue", {"name": names["parts"]})
    check(job["kind"] == "continue", "Continue started")
    asked = {"done": False}

    def save_now_once(status: dict) -> None:
        if not asked["done"] and status.get("phase") == "training" and status.get("epoch") == 3:
            request(api + "/train-tools/v1/save-now", {})
            asked["done"] = True
    status = wait_for_job(api, save_now_once)
    check(status["state"] == "done", f"continued run done ({status['message']} {status['error']})")
    check(status["continued_from_epoch"] == 1, "it continued after epoch 1")
    check(status["model_restored"] is True, "the live model is unchanged (hash)")
    final = load_file(str(lora_dir / names["parts"] / f"{names['parts']}.safetensors"))
    reference = load_file(str(lora_dir / names["whole"] / f"{names['whole']}.safetensors"))
    same = final.keys() == reference.keys() and all(
        final[key].numpy().tobytes() == reference[key].numpy().tobytes() for key in final)
    check(same, f"the final file's {len(final)} tensors equal the uninterrupted run's byte for byte")
    check(any("-step" in Path(path).name for path in status["saved_files"]), "Save now wrote an extra file")
    validation = [list(entry) for entry in status["validation_history"]]
    check(validation == names["whole_validation"], "the validation losses are the uninterrupted run's")
    found = request(api + f"/train-tools/v1/recommend?name={names['parts']}")
    lowest = min(validation, key=lambda entry: entry[2])
    check(found.get("epoch") == lowest[0], f"/recommend names epoch {lowest[0]} ({found.get('message')})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:7861")
    parser.add_argument("--work", required=True, type=Path, help="a folder kept between the two phases")
    parser.add_argument("--phase", required=True, choices=("stop", "continue"))
    parser.add_argument("--lora-dir", type=Path, help="the WebUI's Lora folder (phase continue)")
    args = parser.parse_args()
    api = args.url.rstrip("/")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.phase == "stop":
        stop_phase(api, args.work)
    else:
        if args.lora_dir is None:
            parser.error("--lora-dir is needed for the continue phase")
        continue_phase(api, args.work, args.lora_dir)


if __name__ == "__main__":
    main()

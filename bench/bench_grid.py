"""Preview grid speed: our E×W grid against rendering each cell with <lora:name-epoch:w> (what the X/Y/Z plot
does), on the same grid, in a real running WebUI. Prints both times and their ratio next to the 1.2/W target.

    python bench/bench_grid.py --url http://127.0.0.1:7861 --name <a LoRA trained by Train Tools with several epochs>
        [--weights "0.4, 0.6, 0.8, 1"] [--size 256] [--steps 8] [--sampler Euler]

The WebUI must be idle. Timings include everything a user waits for (HTTP, model hooks, VAE decode, saving).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "webui"))
from webui_api import request, txt2img, wait_for_job  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:7861")
    parser.add_argument("--name", required=True)
    parser.add_argument("--prompt", default="")
    parser.add_argument("--weights", default="0.4, 0.6, 0.8, 1")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--sampler", default="Euler")
    args = parser.parse_args()
    api, prompt = args.url, args.prompt or args.name
    settings = dict(negative_prompt="", steps=args.steps, cfg_scale=7, width=args.size, height=args.size)

    txt2img(api, prompt, sampler_name=args.sampler, **settings)  # warm-up: first-call costs are nobody's
    started = time.perf_counter()
    request(api + "/train-tools/v1/grid", dict(name=args.name, prompt=prompt, sampler=args.sampler, seeds="1234",
                                               weights=args.weights, **settings))
    status = wait_for_job(api)
    grid_seconds = time.perf_counter() - started
    if status["state"] != "done":
        sys.exit(f"grid failed: {status['error']}")
    cells = json.loads((Path(status["grid_folder"]) / "grid.json").read_text("utf-8"))["cells"]

    started = time.perf_counter()
    for cell in cells:
        alias = Path(cell["file"]).stem
        txt2img(api, f"{prompt} <lora:{alias}:{cell['weight']:g}>", sampler_name=args.sampler, seed=cell["seed"],
                **settings)
    cell_seconds = time.perf_counter() - started

    weights = len({cell["weight"] for cell in cells})
    epochs = len(cells) // weights
    print(json.dumps({"grid": f"{epochs} epochs x {weights} weights", "size": args.size, "steps": args.steps,
                      "grid_seconds": round(grid_seconds, 1), "per_cell_seconds": round(cell_seconds, 1),
                      "ratio": round(grid_seconds / cell_seconds, 3), "target_ratio": round(1.2 / weights, 3)}))


if __name__ == "__main__":
    main()

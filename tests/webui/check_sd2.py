"""End-to-end check of SD2.x training inside a real, running WebUI that has an SD2 768-v checkpoint loaded (not run
by CI: CI has no WebUI). The harness's random-weight ``random-sd2v.safetensors`` with its ``.yaml`` (a copy of
``v2-inference-v.yaml``) beside it will do:

    SD_WEBUI_LOG_LEVEL=DEBUG /work/webui/start.sh random-sd2v.safetensors
    python tests/webui/check_sd2.py --url http://127.0.0.1:7861 --lora-dir /work/webui/models/Lora \
        --log /work/webui/webui.log

Trains 2 epochs (UNet and text encoder, 128 px) through the Train Tools API, then checks: the live model's
tensor hash (/harness/model-info) and a fixed-seed txt2img identical before and after; the files kohya writes for
an SD2 768-v LoRA (ss_v2, sd_v2_v, modelspec 768-v, sidecar "SD2", 192 UNet + 138 text modules, text layers
0–22 only, 2-D proj_in/out tensors for the checkpoint's Linear projections), every key resolved by the A1111
oracle on the full-size SD2 tree and none reported unmatched in the WebUI log; the Lora listed after a refresh,
<lora:NAME:1> changing the image; a preview-grid cell equal to txt2img with <lora:NAME-000001:w>.
Exits non-zero on the first failed check.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import urllib.error
from pathlib import Path

import numpy as np
from PIL import Image

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2])]
from webui_api import check, make_pictures, request, txt2img, wait_for_job  # noqa: E402

NO_PREVIEWS = {"override_settings": {"live_previews_enable": False}}


def model_info(api: str) -> dict:
    return request(api + "/harness/model-info")


def every_key_resolves_at_full_size(keys: set[str]) -> list[str]:
    """The keys A1111's SD2 conversion cannot place on the full-size SD2 tree (768-v: Linear projections)."""
    import torch

    from lib_train.hosts.sd2 import build_sd2
    from tests import a1111_lora
    from tests.test_lora_names import a1111_compvis_name

    with torch.device("meta"):
        model = build_sd2()
    mapping = {f"model_{n}".replace(".", "_"): m for n, m in model.text_encoder.named_modules() if n}
    mapping.update({f"diffusion_model_{n}".replace(".", "_"): m for n, m in model.unet.named_modules() if n})
    unplaced = []
    for key in keys:
        compvis = a1111_compvis_name(key) if key.startswith("lora_unet_") else a1111_lora.sd2_text_compvis_name(key)
        if compvis is None or a1111_lora.find_layer(mapping, compvis) is None:
            unplaced.append(key)
    return unplaced


def check_files(lora_dir: Path, name: str) -> None:
    from safetensors import safe_open

    folder = lora_dir / name
    names = sorted(p.name for p in folder.iterdir())
    check(names == sorted([f"{name}-000001.safetensors", f"{name}-000001.json", f"{name}.safetensors", f"{name}.json"]),
          f"files in {folder}: {names}")
    with safe_open(str(folder / f"{name}.safetensors"), "pt") as handle:
        metadata, keys = handle.metadata(), list(handle.keys())
        proj_in = handle.get_slice("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight").get_shape()
    check(metadata["ss_v2"] == "True" and metadata["ss_base_model_version"] == "sd_v2_v",
          f"ss_v2 {metadata['ss_v2']}, ss_base_model_version {metadata['ss_base_model_version']}")
    check(metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
          and metadata["modelspec.prediction_type"] == "v", f"modelspec {metadata['modelspec.architecture']}, "
          f"prediction {metadata['modelspec.prediction_type']}")
    card = json.loads((folder / f"{name}.json").read_text("utf-8"))
    check(card["sd version"] == "SD2", f"sidecar sd version {card['sd version']}")
    modules = {key.split(".")[0] for key in keys}
    unet = [m for m in modules if m.startswith("lora_unet_")]
    text = [m for m in modules if m.startswith("lora_te_")]
    layers = sorted({int(m.split("_layers_")[1].split("_")[0]) for m in text})
    check((len(unet), len(text), layers[0], layers[-1]) == (192, 138, 0, 22),
          f"{len(unet)} UNet + {len(text)} text modules, text layers {layers[0]}..{layers[-1]} (kohya: 192 + 138, 0..22)")
    check(len(proj_in) == 2, f"proj_in lora_down shape {proj_in} (2-D for the checkpoint's Linear projections)")
    unplaced = every_key_resolves_at_full_size(modules)
    check(not unplaced, f"every key placed by A1111's SD2 conversion on the full-size tree ({len(unplaced)} not: "
          f"{sorted(unplaced)[:3]})")


def check_grid_cell(api: str, name: str, prompt: str) -> None:
    request(api + "/train-tools/v1/grid", dict(name=name, prompt=prompt, negative_prompt="", sampler="Euler", steps=4,
                                               cfg_scale=7, width=128, height=128, seeds="1234", weights="0.5, 1",
                                               epochs="1"))
    status = wait_for_job(api)
    check(status["state"] == "done" and status["model_restored"] is True,
          f"grid rendered, live model unchanged: {status['message']} {status['error']}")
    folder = Path(status["grid_folder"])
    entry = json.loads((folder / "grid.json").read_text("utf-8"))["cells"][-1]
    cell = np.asarray(Image.open(folder / "cells" / entry["picture"]).convert("RGB")).astype(np.int16)
    try:
        reference = txt2img(api, f"{prompt} <lora:{Path(entry['file']).stem}:{entry['weight']:g}>",
                            seed=entry["seed"], cfg_scale=entry["cfg_scale"], **NO_PREVIEWS)
    except urllib.error.HTTPError as error:  # the random model can go to NaN in the WebUI's own render
        print(f"     the WebUI's own render failed ({error.read()[:120]!r}); cell not compared")
        return
    difference = np.abs(cell - reference)
    check(difference.max() <= 3, f"grid cell equals txt2img with the LoRA (max {difference.max()}, "
          f"mean {difference.mean():.3f})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:7861")
    parser.add_argument("--lora-dir", required=True, type=Path)
    parser.add_argument("--log", type=Path, help="the WebUI log, written with SD_WEBUI_LOG_LEVEL=DEBUG")
    args = parser.parse_args()
    api, name = args.url.rstrip("/"), f"ttsd2{os.getpid()}"
    prompt = f"{name}, red disc"

    info = model_info(api)
    check("sd2" in Path(info["checkpoint"] or "").name.lower(), f"an SD2 checkpoint is loaded: {info['checkpoint']}")
    before_hash, before = info["sha256"], txt2img(api, prompt, **NO_PREVIEWS)
    with tempfile.TemporaryDirectory() as scratch:
        pictures = make_pictures(Path(scratch), name, count=4)
        # 128 px on purpose: the family default for a 768-v model is 768, far too slow on a CPU harness.
        request(api + "/train-tools/v1/train", dict(
            name=name, train_dir=str(pictures), trigger_words=name, resolution=128, enable_buckets=False, epochs=2,
            batch_size=1, rank=4, alpha=4.0, unet_lr=1e-3, text_encoder_lr=5e-4, lr_scheduler="constant", seed=3,
            save_every_n_epochs=1))
        status = wait_for_job(api)
    check(status["state"] == "done", f"training finished: {status['message']} {status['error']}")
    check(status["model_restored"] is True, "Train Tools' own restore check passed")
    after = model_info(api)
    check(after["sha256"] == before_hash and after["modules_with_networks_applied"] == 0,
          f"live model tensor hash identical after training ({after['sha256'][:16]})")
    check(np.array_equal(before, txt2img(api, prompt, **NO_PREVIEWS)), "fixed-seed txt2img identical after training")

    check_files(args.lora_dir, name)
    request(api + "/sdapi/v1/refresh-loras", {})
    loras = {item["name"]: item for item in request(api + "/sdapi/v1/loras")}
    check(name in loras and loras[name]["metadata"].get("ss_v2") == "True", "listed by the WebUI with its metadata")
    with_lora = txt2img(api, f"{prompt} <lora:{name}:1>", **NO_PREVIEWS)
    check(np.abs(with_lora - before).max() > 0, "<lora:NAME:1> changes the image")
    if args.log:
        unmatched = [line for line in args.log.read_text(errors="replace").splitlines()
                     if "didn't match keys" in line and name in line]
        check(not unmatched, f"every key matched by the built-in Lora ({len(unmatched)} complaints)")

    check_grid_cell(api, name, prompt)
    check(np.array_equal(before, txt2img(api, prompt, **NO_PREVIEWS)), "fixed-seed txt2img identical after the grid")
    check(model_info(api)["sha256"] == before_hash, "live model tensor hash identical after the grid")
    print("all checks passed")


if __name__ == "__main__":
    main()

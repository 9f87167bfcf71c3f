"""Small HTTP helpers for the checks and benchmarks that drive a real, running WebUI (not run by CI)."""

from __future__ import annotations

import base64
import io
import json
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def request(url: str, payload: dict | None = None, method: str | None = None):
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method=method or ("GET" if data is None else "POST"),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=1800) as response:
        return json.loads(response.read() or b"null")


def check(condition: bool, message: str) -> None:
    print(("ok   " if condition else "FAIL ") + message, flush=True)
    if not condition:
        sys.exit(1)


def make_pictures(folder: Path, trigger: str, count: int = 8) -> Path:
    """``count`` 128-px pictures of a red disc with captions, in ``<folder>/1_<trigger>``."""
    sub = folder / f"1_{trigger}"
    sub.mkdir(parents=True)
    for index in range(count):
        image = Image.new("RGB", (128, 128), (20 * index, 80, 160))
        ImageDraw.Draw(image).ellipse((20 + 4 * index, 30, 100, 110), fill=(230, 40, 40))
        image.save(sub / f"{index}.png")
        (sub / f"{index}.txt").write_text(f"{trigger}, red disc (shape), picture {index}", encoding="utf-8")
    return folder


def txt2img(api: str, prompt: str, **settings) -> np.ndarray:
    payload = {"prompt": prompt, "seed": 1234, "steps": 4, "width": 128, "height": 128, "sampler_name": "Euler",
               "cfg_scale": 7, **settings}
    result = request(api + "/sdapi/v1/txt2img", payload)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(result["images"][0]))).convert("RGB")).astype(np.int16)


def wait_for_job(api: str, on_status=None) -> dict:
    """Poll Train Tools' status until its job ends."""
    while True:
        status = request(api + "/train-tools/v1/status")
        if on_status is not None:
            on_status(status)
        if status["state"] not in ("queued", "running"):
            return status
        time.sleep(1)

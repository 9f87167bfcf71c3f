"""Run by the WebUI (as a subprocess, at every start) to install what the extension needs.

Idempotent, and it never installs or upgrades anything the WebUI pins (torch, transformers, gradio,
numpy, safetensors, ...): the engine uses those as the WebUI has them. Optional packages are installed only
when missing, pinned, and with --no-deps, so pip cannot move a pin while resolving theirs.
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Callable

# The optimizers beyond AdamW: pure Python, needing only torch (and typing-extensions, which the WebUI has).
OPTIMIZER_PACKAGES = {"prodigyopt": "1.1.2", "dadaptation": "3.2", "lion-pytorch": "0.2.5", "schedulefree": "1.4.1"}


def bitsandbytes_for(torch_version: str) -> str | None:
    """The bitsandbytes release for this torch (8-bit AdamW/Lion): 0.45.5 is the last one for torch 2.0-2.2 (the
    WebUI ships 2.1), 0.48.2 needs 2.3 or later; none before torch 2.0."""
    major, minor = (int(part) for part in torch_version.split("+")[0].split(".")[:2])
    if (major, minor) < (2, 0):
        return None
    return "bitsandbytes==0.45.5" if (major, minor) < (2, 3) else "bitsandbytes==0.48.2"


def optional_requirements(installed: Callable[[str], bool], torch_version: str, torch_cuda_build: bool,
                          gpu_present: Callable[[], bool]) -> list[str]:
    """What to install now: each missing optimizer package, and bitsandbytes on a CUDA GPU only (asked last, as
    ``gpu_present`` may import torch)."""
    wanted = [f"{name}=={version}" for name, version in OPTIMIZER_PACKAGES.items() if not installed(name)]
    if not installed("bitsandbytes") and torch_cuda_build:
        pin = bitsandbytes_for(torch_version)
        if pin is not None and gpu_present():
            wanted.append(pin)
    return wanted


def _torch_cuda_build() -> bool:
    """Without importing torch: a CUDA wheel says so in its version (2.1.2+cu121) or needs NVIDIA's runtime."""
    version = importlib.metadata.version("torch")
    return "+cu" in version or any(r.startswith("nvidia-cuda-runtime") for r in importlib.metadata.requires("torch") or [])


def _gpu_present() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    import launch

    # The engine reads TOML settings with tomllib, which Python has from 3.11; the WebUI's tested Python is 3.10.
    if sys.version_info < (3, 11) and not launch.is_installed("tomli"):
        launch.run_pip("install tomli", "tomli for Train Tools")
    for requirement in optional_requirements(launch.is_installed, importlib.metadata.version("torch"),
                                             _torch_cuda_build(), _gpu_present):
        launch.run_pip(f"install --no-deps {requirement}", f"{requirement} for Train Tools")


if __name__ == "__main__":
    main()

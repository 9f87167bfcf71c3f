"""install.py as the WebUI runs it, with a stand-in for the WebUI's ``launch`` module that records the pip calls:
each optional package pinned and only when missing, never with its dependencies, bitsandbytes on CUDA GPUs only."""

from __future__ import annotations

import importlib.metadata
import runpy
import sys
import types
from pathlib import Path

import pytest

INSTALL = Path(__file__).resolve().parents[1] / "install.py"
install = runpy.run_path(str(INSTALL))  # its functions, without running main


def run_installer(monkeypatch, installed) -> list[str]:
    calls = []
    launch = types.ModuleType("launch")
    launch.is_installed = installed
    launch.run_pip = lambda command, description: calls.append(command)
    monkeypatch.setitem(sys.modules, "launch", launch)
    runpy.run_path(str(INSTALL), run_name="__main__")
    return calls


def test_a_fresh_webui_gets_each_optimizer_pinned_and_without_dependencies(monkeypatch):
    calls = run_installer(monkeypatch, lambda name: False)
    optimizers = [f"install --no-deps {name}=={version}" for name, version in install["OPTIMIZER_PACKAGES"].items()]
    assert [c for c in calls if "tomli" not in c] == optimizers  # this machine's torch is a CPU build: no bitsandbytes
    assert ("install tomli" in calls) == (sys.version_info < (3, 11))


def test_a_second_start_installs_nothing(monkeypatch):
    assert run_installer(monkeypatch, lambda name: True) == []


def test_the_pins_are_the_versions_the_tests_ran_with():
    for name, version in install["OPTIMIZER_PACKAGES"].items():
        assert importlib.metadata.version(name) == version  # also proves the names resolve as the WebUI looks them up


@pytest.mark.parametrize("torch_version, cuda_build, gpu, expected", [
    ("2.1.2+cu121", True, True, "bitsandbytes==0.45.5"),  # the WebUI's own torch
    ("2.4.1+cu124", True, True, "bitsandbytes==0.48.2"),
    ("2.3.0", True, True, "bitsandbytes==0.48.2"),  # a CUDA wheel from PyPI: no local version tag
    ("2.1.2+cu121", True, False, None),  # a CUDA build on a machine without a GPU
    ("2.1.2+cpu", False, True, None),
    ("1.13.1+cu117", True, True, None),  # older than any bitsandbytes that fits
])
def test_bitsandbytes_only_for_a_cuda_gpu_in_a_release_that_fits_its_torch(torch_version, cuda_build, gpu, expected):
    asked = []

    def gpu_present() -> bool:
        asked.append(True)
        return gpu

    wanted = install["optional_requirements"](lambda name: name != "bitsandbytes", torch_version, cuda_build, gpu_present)
    assert wanted == ([expected] if expected else [])
    if not cuda_build:
        assert asked == []  # a CPU build never imports torch to ask


def test_an_installed_bitsandbytes_is_left_alone():
    wanted = install["optional_requirements"](lambda name: True, "2.1.2+cu121", True, lambda: True)
    assert wanted == []

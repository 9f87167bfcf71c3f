"""The packages of lib_train form layers: each may import only the layers below it, and none imports gradio
or a WebUI module (the WebUI's modules are handed to lib_train.webui by scripts/)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "lib_train"

# Lowest first. A package may import the packages it lists; tagging and engine sit side by side on the dataset.
ALLOWED = {
    "common": set(),
    "hosts": {"common"},
    "dataset": {"common", "hosts"},
    "engine": {"common", "hosts", "dataset"},
    "tagging": {"common", "hosts", "dataset"},
    "preview": {"common", "hosts", "dataset", "engine"},
    "webui": {"common", "hosts", "dataset", "engine", "tagging", "preview"},
}
WEBUI_AND_UI_MODULES = {"gradio", "modules", "launch", "webui", "extensions", "ldm_patched"}


def imported_modules(path: Path, lib: Path = LIB) -> list[tuple[int, str]]:
    """Absolute names of everything a file imports (relative imports resolved against its package)."""
    package = path.relative_to(lib.parent).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if node.module is None:  # from . import x
                found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, module))
    return found


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "lib_train" and len(parts) > 1 and parts[1] in ALLOWED else None


def library_files() -> list[Path]:
    return sorted(LIB.rglob("*.py"))


def test_every_module_is_in_a_layer_package():
    loose = [p.name for p in LIB.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert not loose, f"modules at lib_train's top level: {loose}"
    assert {p.name for p in LIB.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(ALLOWED)


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(LIB)))
def test_imports_only_go_down(path: Path):
    own = path.relative_to(LIB).parts[0] if path.parent != LIB else None
    if own is None:  # __init__ / __main__ (the command line) may use every layer
        return
    wrong = [f"line {line}: {module}" for line, module in imported_modules(path)
             if (layer := layer_of(module)) is not None and layer != own and layer not in ALLOWED[own]]
    assert not wrong, f"{own} may import only {sorted(ALLOWED[own])}: " + "; ".join(wrong)


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(LIB)))
def test_no_gradio_or_webui_import(path: Path):
    wrong = [f"line {line}: {module}" for line, module in imported_modules(path)
             if module.split(".")[0] in WEBUI_AND_UI_MODULES]
    assert not wrong, "lib_train must not import gradio or WebUI modules: " + "; ".join(wrong)


def test_the_checks_see_a_violation(tmp_path):
    """Relative imports are resolved the way Python does, so a wrong one is caught."""
    path = tmp_path / "lib_train" / "hosts" / "example.py"
    path.parent.mkdir(parents=True)
    path.write_text("from ..engine.train import train_lora\nfrom . import protocol\nimport gradio as gr\n"
                    "from modules import shared\n")
    names = [name for _, name in imported_modules(path, tmp_path / "lib_train")]
    assert names == ["lib_train.engine.train", "lib_train.hosts.protocol", "gradio", "modules"]
    assert layer_of(names[0]) == "engine" not in ALLOWED["hosts"]
    assert {name.split(".")[0] for name in names[2:]} <= WEBUI_AND_UI_MODULES

"""Names and writes for files the user will see: a name that is safe as a file and a prompt alias, and
writes that are never seen half done and never replace a file unasked."""

from __future__ import annotations

import io
import os
import re
import secrets
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .errors import OutputError
from .i18n import tr

_FORBIDDEN_NAME = re.compile(r'[\\/:*?"<>|\x00-\x1f]')


def check_output_name(name: str) -> str:
    """A LoRA name becomes a file name and the alias in ``<lora:NAME:1>``: any script is fine (中文),
    path parts and the characters Windows or the prompt syntax reserve are not."""
    cleaned = name.strip()
    if not cleaned:
        raise OutputError(tr("Give the LoRA a name."))
    if cleaned in (".", "..") or ".." in cleaned.split("/") or _FORBIDDEN_NAME.search(cleaned):
        raise OutputError(tr("The name {name!r} cannot be used: it must not contain / \\ : * ? \" < > | or '..'.",
                             name=name))
    if cleaned.startswith(".") or cleaned.endswith("."):
        raise OutputError(tr("The name {name!r} cannot start or end with a dot.", name=name))
    if len(cleaned.encode("utf-8")) > 200:
        raise OutputError(tr("The name is too long (at most 200 bytes)."))
    return cleaned


def write_atomically(path: Path, data: bytes, overwrite: bool) -> None:
    """Nobody ever sees a half-written file: the WebUI lists ``*.safetensors`` and the temporary
    name does not end so. Without ``overwrite`` an existing file is never replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The name is cut short: a file of up to 255 bytes must not need a longer temporary one.
    temporary = path.with_name(f".{path.name[:48]}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    handle = open(temporary, "xb")  # exclusive: never another writer's file, which the cleanup would delete
    try:
        with handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(temporary, path)
            return
        try:
            os.link(temporary, path)  # atomic and fails if the name exists
        except FileExistsError:
            raise OutputError(tr("{name} already exists in {parent}; it was not overwritten.", name=path.name,
                                 parent=path.parent)) from None
        except OSError:  # file systems without hard links
            if path.exists():
                raise OutputError(tr("{name} already exists in {parent}; it was not overwritten.", name=path.name,
                                     parent=path.parent)) from None
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def png_bytes(image: Image.Image, parameters: str) -> bytes:
    """PNG with the infotext under "parameters", where the WebUI's PNG Info tab reads it."""
    info = PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()

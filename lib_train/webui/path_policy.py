"""Which server folders a request may name when the WebUI is exposed to other machines."""

from __future__ import annotations

from pathlib import Path

from ..common.errors import ConfigError
from ..common.i18n import tr


def exposed_to_network(cmd_opts) -> bool:
    """Whether the WebUI is reachable from other machines without --enable-insecure-extension-access: its own
    ``disable_extension_access`` where it sets one, else the same flags (--share, --listen, --ngrok, --server-name)."""
    verdict = getattr(cmd_opts, "disable_extension_access", None)
    if verdict is not None:
        return bool(verdict)
    flags = ("share", "listen", "ngrok", "server_name")
    return any(getattr(cmd_opts, flag, None) for flag in flags) and not getattr(
        cmd_opts, "enable_insecure_extension_access", False)


def confine(path: str | Path, allowed_roots: list[Path], what: str) -> Path:
    """The resolved path, if it lies inside one of ``allowed_roots`` (links resolved, so no escape by symlink)."""
    resolved = Path(path).expanduser().resolve()
    for root in allowed_roots:
        if resolved == root.resolve() or resolved.is_relative_to(root.resolve()):
            return resolved
    roots = ", ".join(str(r) for r in allowed_roots)
    raise ConfigError(tr("The {what} {path} is outside the folders this WebUI allows when it is shared on the "
                         "network ({roots}). Put the pictures there, or start the WebUI with "
                         "--enable-insecure-extension-access.", what=what, path=path, roots=roots))

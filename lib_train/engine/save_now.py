"""Save now: the tab or the API asks, from another thread, for the network as it is after the current step, written
as an extra file while the training goes on."""

from __future__ import annotations

import threading


class SaveNow:
    """A request that the loop takes after its next optimizer step (several clicks before it are one save)."""

    def __init__(self) -> None:
        self._requested = threading.Event()

    def request(self) -> None:
        self._requested.set()

    def take(self) -> bool:
        """True once per request."""
        if not self._requested.is_set():
            return False
        self._requested.clear()
        return True

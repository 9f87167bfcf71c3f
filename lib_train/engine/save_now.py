"""Save now: the tab or the API asks, from another thread, for the network as it is after the current step, written
as an extra file while the training goes on."""

from __future__ import annotations

import threading


class SaveNow:
    """A request that the loop takes after its next optimizer step (several clicks before it are one save). A
    request left when the last step is done is taken once more after the loop (``close``); after that, requests are
    refused, so a click is never silently dropped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requested = False
        self._closed = False

    def request(self) -> bool:
        """False when the training has closed it (its steps are done): nothing will be written."""
        with self._lock:
            if self._closed:
                return False
            self._requested = True
            return True

    def take(self) -> bool:
        """True once per request."""
        with self._lock:
            requested, self._requested = self._requested, False
            return requested

    def close(self) -> bool:
        """No more requests; True when one was still waiting (the caller writes it now)."""
        with self._lock:
            self._closed = True
            requested, self._requested = self._requested, False
            return requested

"""Process titles, so that `ps` shows what every process is doing.

A busy worker's title carries the age of its request (``worker 3 gen 5 busy 1.2s
GET /search``).  The main thread is inside the application then, so a small
ticker thread rewrites the title once a second while a request runs; it sleeps
on an event otherwise and costs nothing between requests.
"""

from __future__ import annotations

import threading
import time

try:
    from setproctitle import setproctitle as _set
except ImportError:  # pragma: no cover - setproctitle is a dependency
    def _set(title: str) -> None:
        return None

PREFIX = "fcgidaemon: "


def set_title(text: str) -> None:
    _set(PREFIX + text)


class BusyTitle:
    """The worker's title: idle/retiring text, or busy with a request's age, kept current."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._lock = threading.Lock()
        self._request: tuple[float, str] | None = None  # (started, "GET /path") while busy
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def set(self, state: str) -> None:
        with self._lock:
            self._request = None
            set_title(f"{self.prefix} {state}")

    def busy(self, what: str) -> None:
        with self._lock:
            self._request = (time.monotonic(), what)
            set_title(f"{self.prefix} busy 0.0s {what}")
        if self._thread is None:
            self._thread = threading.Thread(target=self._tick, name="title", daemon=True)
            self._thread.start()
        self._wake.set()

    def _tick(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(1.0)
            with self._lock:
                if self._request is None:
                    self._wake.clear()
                    continue
                started, what = self._request
                set_title(f"{self.prefix} busy {time.monotonic() - started:.1f}s {what}")

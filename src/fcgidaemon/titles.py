"""Process titles, so that `ps` shows what every process is doing.

A busy worker's title carries its request and the request's age (``worker 3 gen 5
busy 1.2s GET /search``).  Writing the title costs two system calls, too much
for every request, so the request path only records what it is doing (two
attribute writes) and a small ticker thread writes the title: it shows a request
once it has run for `TICK` seconds, updates its age, and puts "idle" back within
a tick after it ends.  Between requests the ticker sleeps on an event.
"""

from __future__ import annotations

import logging
import threading
import time

try:
    from setproctitle import setproctitle as _set
except ImportError:  # pragma: no cover - setproctitle is a dependency
    def _set(title: str) -> None:
        return None

PREFIX = "fcgidaemon: "


def set_title(text: str) -> None:
    """Control characters (a client's request line may hold any: NUL made setproctitle raise
    ValueError, which ended the ticker thread and froze the title for the worker's life) are
    shown as "?"."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else "?" for c in text)
    _set(PREFIX + text)


TICK = 0.25  # seconds: a request younger than this does not show; the age is this accurate


class BusyTitle:
    """The worker's title: its state (idle, retiring), or its request and the request's age."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.state = ""
        self._request: tuple[float, str] | None = None  # (started, "GET /path") while busy
        self._shown: str | None = None  # the title written last
        self._lock = threading.Lock()  # the ticker and set() both write the title
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def set(self, state: str) -> None:
        """A state change (rare): written at once."""
        self._request = None
        self.state = state
        self._show(f"{self.prefix} {state}")

    def busy(self, what: str, now: float | None = None) -> None:
        """A request starts (at `now`, time.monotonic()): recorded only, the ticker shows it
        if it lasts."""
        self._request = (time.monotonic() if now is None else now, what)
        if not self._wake.is_set():
            if self._thread is None:
                self._start_ticker()
            self._wake.set()

    def _start_ticker(self) -> None:
        """The ticker is cosmetic: when no thread can be started (a process limit reached),
        titles stop showing requests, and the request is served all the same."""
        self._thread = threading.Thread(target=self._tick, name="title", daemon=True)
        try:
            self._thread.start()
        except RuntimeError as exc:
            logging.getLogger("fcgidaemon").warning(
                "cannot start the process-title thread (%s); titles will not show requests", exc)

    def done(self) -> None:
        """The request ended: the ticker puts the state back."""
        self._request = None

    def _show(self, title: str) -> None:
        with self._lock:
            if title != self._shown:
                set_title(title)
                self._shown = title

    def _tick(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(TICK)
            request = self._request
            if request is None:
                self._wake.clear()
                if self._request is not None:  # a request started between the two lines
                    self._wake.set()
                self._show(f"{self.prefix} {self.state}")
                continue
            started, what = request
            self._show(f"{self.prefix} busy {time.monotonic() - started:.1f}s {what}")

"""Process titles, so that `ps` shows what every process is doing."""

from __future__ import annotations

try:
    from setproctitle import setproctitle as _set
except ImportError:  # pragma: no cover - setproctitle is a dependency
    def _set(title: str) -> None:
        return None

PREFIX = "fcgidaemon: "


def set_title(text: str) -> None:
    _set(PREFIX + text)

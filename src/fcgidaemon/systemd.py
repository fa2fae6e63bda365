"""The only importer of python-systemd.  Outside systemd every call is a no-op.

Under systemd the manager tells the service manager its state with sd_notify
(READY=1, RELOADING=1, STATUS=..., STOPPING=1, WATCHDOG=1, MAINPID=...) and takes
sockets passed by socket activation.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("fcgidaemon")

try:  # python-systemd is a hard dependency, but a build without it still runs
    from systemd import daemon as _daemon
    from systemd import journal as _journal
except ImportError:  # pragma: no cover - only on machines without libsystemd
    _daemon = None
    _journal = None


def under_systemd() -> bool:
    return bool(os.environ.get("NOTIFY_SOCKET"))


def notify(*fields: str) -> bool:
    """Send 'KEY=VALUE' fields in one datagram; False (and nothing sent) outside systemd."""
    if not fields or _daemon is None or not under_systemd():
        return False
    try:
        return bool(_daemon.notify("\n".join(fields)))
    except OSError as exc:
        log.warning("sd_notify failed: %s", exc)
        return False


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        return None


def listen_sockets() -> list[socket.socket]:
    """Sockets passed by socket activation (LISTEN_FDS for this pid), else []."""
    if _daemon is None or not os.environ.get("LISTEN_FDS"):
        return []
    fds = _daemon.listen_fds(unset_environment=True)
    return [socket.socket(fileno=fd) for fd in fds]


def journal_handler() -> logging.Handler | None:
    """A journald handler when the service runs under systemd, else None."""
    if _journal is None or not os.environ.get("JOURNAL_STREAM"):
        return None
    return _journal.JournalHandler(SYSLOG_IDENTIFIER="fcgidaemon")

"""The only importer of python-systemd.  Outside systemd every call is a no-op.

Under systemd the manager tells the service manager its state with sd_notify
(READY=1, RELOADING=1, STATUS=..., STOPPING=1, WATCHDOG=1), takes sockets passed
by socket activation, and logs to journald with its native protocol (one entry
per event, tracebacks included, structured fields) when stderr is the journal.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import time
from typing import Any, Mapping, MutableMapping

log = logging.getLogger("fcgidaemon")

_modules: dict[str, Any] = {}


def _systemd(name: str) -> Any:
    """python-systemd's `daemon` or `journal`, imported on first use (None if missing).

    Outside systemd neither is ever needed, and not importing them keeps the manager,
    whose memory every worker shares, smaller (under systemd: imported at start, below).
    python-systemd is a hard dependency, but a build without it still runs.
    """
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"systemd.{name}")
        except ImportError:  # pragma: no cover - only on machines without libsystemd
            _modules[name] = None
    return _modules[name]


def under_systemd() -> bool:
    return bool(os.environ.get("NOTIFY_SOCKET"))


# Under systemd they are imported now, at start, as the user that started us: the first
# sd_notify comes after --user has dropped privileges, and that user may not be able to
# read the installation.
if any(os.environ.get(name) for name in ("NOTIFY_SOCKET", "LISTEN_FDS", "JOURNAL_STREAM")):
    _systemd("daemon")
    _systemd("journal")


def notify(*fields: str) -> bool:
    """Send 'KEY=VALUE' fields in one datagram; False (and nothing sent) outside systemd."""
    if not fields or not under_systemd() or _systemd("daemon") is None:
        return False
    try:
        return bool(_systemd("daemon").notify("\n".join(fields)))
    except OSError as exc:
        log.warning("sd_notify failed: %s", exc)
        return False


def hand_over_main_pid(pid: int, status: str) -> bool:
    """Make `pid` (the manager that replaces us after an upgrade) the service's main process.

    Only the current main process can do this: with NotifyAccess=main systemd drops
    whatever the successor sends until then, and when we exit it would take the
    service for dead and SIGKILL the successor with the rest of the cgroup.
    """
    return notify(f"MAINPID={pid}", f"STATUS={status}")


def successor_environment(env: MutableMapping[str, str], pid: int) -> None:
    """Adjust the environment of a manager exec'd as `pid` to replace us: the watchdog
    pings become its job (WATCHDOG_PID names the process systemd watches)."""
    if "WATCHDOG_PID" in env:
        env["WATCHDOG_PID"] = str(pid)


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as systemd wants it in MONOTONIC_USEC=."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None.

    Pings are for the process systemd watches: WATCHDOG_PID, when set, must be
    ours (workers inherit the environment and must stay silent).
    """
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 / 2 if value > 0 else None


def listen_sockets() -> list[socket.socket]:
    """Sockets passed by socket activation (LISTEN_FDS for this pid), else []."""
    if not os.environ.get("LISTEN_FDS") or _systemd("daemon") is None:
        return []
    fds = _systemd("daemon").listen_fds(unset_environment=True)
    return [socket.socket(fileno=fd) for fd in fds]


def stderr_is_journal() -> bool:
    """True when our stderr is the journal stream systemd connected (JOURNAL_STREAM=dev:ino).

    The variable is inherited by processes whose stderr was redirected elsewhere,
    so it only counts when it names the file that fd 2 really is.
    """
    dev, sep, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep or _systemd("journal") is None:
        return False
    try:
        st = os.fstat(2)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def journal_send(message: str, fields: Mapping[str, str | int]) -> None:
    """One journal entry over the native protocol: a multi-line MESSAGE stays one entry."""
    journal = _systemd("journal")
    if journal is None:  # pragma: no cover - stderr_is_journal() is False then
        return
    journal.send(message, **fields)  # CODE_LINE must stay an int; the rest is str()-ed

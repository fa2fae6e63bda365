"""Logging for operators: one line per event, each with role, pid and generation.

Under systemd (stderr is the journal stream) records go to journald over its
native protocol, one entry per event -- a traceback stays inside its entry's
MESSAGE -- with the logging level as PRIORITY (so ``journalctl -u fcgidaemon -p
err`` finds application tracebacks) and structured fields: GENERATION, WORKER_PID
(in workers), REQUEST_URI (application errors), FCGIDAEMON_ROLE.  Otherwise
records go to stderr as text lines.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from . import systemd

_context = {"role": "manager", "generation": 0}

SYSLOG_IDENTIFIER = "fcgidaemon"
FORMAT = "%(asctime)s %(levelname)s [%(role)s %(pid)d gen %(generation)d] %(message)s"
# journald records the sender's pid (_PID) and time itself
JOURNAL_FORMAT = "[%(role)s gen %(generation)d] %(message)s"


class Throttle:
    """For an event that can repeat many times a second (a crash loop, accept() out of
    descriptors, a full disk under the access log): report the first at once, then at most one
    line per `every` seconds, carrying how many happened since the last line."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.count = 0
        self.reported: float | None = None

    def due(self) -> int:
        """Count one more; how many to report now (this one included), or 0 while quiet."""
        self.count += 1
        now = time.monotonic()
        if self.reported is not None and now - self.reported < self.every:
            return 0
        count, self.count, self.reported = self.count, 0, now
        return count


def workers(count: int) -> str:
    """"1 worker", "3 workers": for log lines and titles an operator reads."""
    return f"{count} worker" if count == 1 else f"{count} workers"


def set_context(role: str | None = None, generation: int | None = None) -> None:
    if role is not None:
        _context["role"] = role
    if generation is not None:
        _context["generation"] = generation


class ContextFilter(logging.Filter):
    """Stamps each record with this process's role, pid and generation."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _context["role"]
        record.generation = _context["generation"]
        record.pid = os.getpid()
        return True


def priority(levelno: int) -> int:
    """syslog priority of a logging level (3 = err, 4 = warning, 6 = info, 7 = debug)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def journal_fields(record: logging.LogRecord) -> dict[str, str | int]:
    """The journal fields of one record, besides MESSAGE."""
    fields: dict[str, str | int] = {
        "PRIORITY": priority(record.levelno),
        "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
        "LOGGER": record.name,
        "CODE_FILE": record.pathname,
        "CODE_LINE": record.lineno,
        "CODE_FUNC": record.funcName,
        "FCGIDAEMON_ROLE": getattr(record, "role", ""),
        "GENERATION": getattr(record, "generation", 0),
    }
    if getattr(record, "role", "") == "worker":
        fields["WORKER_PID"] = getattr(record, "pid", os.getpid())
    uri = getattr(record, "request_uri", None)
    if uri:
        fields["REQUEST_URI"] = uri
    return fields


class JournalHandler(logging.Handler):
    """Sends each record as one journal entry (the formatted message includes any traceback)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            systemd.journal_send(self.format(record), journal_fields(record))
        except Exception:  # noqa: BLE001 - logging must never take the process down
            self.handleError(record)


def make_handler() -> logging.Handler:
    if systemd.stderr_is_journal():
        handler: logging.Handler = JournalHandler()
        handler.setFormatter(logging.Formatter(JOURNAL_FORMAT))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(ContextFilter())
    return handler


def setup(level: int) -> None:
    root = logging.getLogger("fcgidaemon")
    root.handlers.clear()
    root.setLevel(level)
    root.propagate = False
    root.addHandler(make_handler())

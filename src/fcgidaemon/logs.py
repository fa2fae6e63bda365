"""Logging for operators: one line per event, each with role, pid and generation.

Under systemd (JOURNAL_STREAM set) records go to journald with structured fields
(WORKER_PID, GENERATION, REQUEST_URI) so `journalctl -u fcgidaemon -p err` finds
application tracebacks; otherwise to stderr.
"""

from __future__ import annotations

import logging
import os
import sys

from . import systemd

_context = {"role": "manager", "generation": 0}


def set_context(role: str | None = None, generation: int | None = None) -> None:
    if role is not None:
        _context["role"] = role
    if generation is not None:
        _context["generation"] = generation


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _context["role"]
        record.generation = _context["generation"]
        record.pid = os.getpid()
        # structured fields for journald
        record.WORKER_PID = record.pid if record.role == "worker" else ""
        record.GENERATION = record.generation
        uri = getattr(record, "request_uri", None)
        if uri:
            record.REQUEST_URI = uri
        return True


FORMAT = "%(asctime)s %(levelname)s [%(role)s %(pid)d gen %(generation)d] %(message)s"


def setup(level: int) -> None:
    root = logging.getLogger("fcgidaemon")
    root.handlers.clear()
    root.setLevel(level)
    root.propagate = False
    handler = systemd.journal_handler()
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
    else:
        handler.setFormatter(logging.Formatter("[%(role)s %(pid)d gen %(generation)d] %(message)s"))
    handler.addFilter(ContextFilter())
    root.addHandler(handler)

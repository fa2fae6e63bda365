"""Optional access log (``--access-log FILE|-``): the combined format plus time and worker pid.

Off by default: the web server logs requests already.  Each worker writes its own
lines with one ``write`` on an O_APPEND descriptor, so lines from different
workers never interleave.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Iterable

from .logs import Throttle

WSGIApp = Callable[..., Iterable[bytes]]


def open_log(target: str) -> int:
    if target == "-":
        return os.dup(1)
    return os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)


def middleware(app: WSGIApp, fd: int) -> WSGIApp:
    pid = os.getpid()

    def handle(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        started = time.monotonic()
        seen: dict[str, Any] = {"status": "-", "bytes": 0}

        def recording_start_response(status: str, headers: list, exc_info: Any = None) -> Any:
            seen["status"] = status.split(" ", 1)[0]
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        result = app(environ, recording_start_response)
        try:
            for chunk in result:
                seen["bytes"] += len(chunk)
                yield chunk
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
            write_line(fd, environ, seen, time.monotonic() - started, pid)

    return handle


def _q(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def write_line(fd: int, environ: dict[str, Any], seen: dict[str, Any], took: float, pid: int) -> None:
    request = (f"{environ.get('REQUEST_METHOD', '-')} {environ.get('REQUEST_URI', '-')} "
               f"{environ.get('SERVER_PROTOCOL', '-')}")
    line = (f"{environ.get('REMOTE_ADDR', '-')} - {environ.get('REMOTE_USER') or '-'} "
            f"[{time.strftime('%d/%b/%Y:%H:%M:%S %z')}] \"{_q(request)}\" {seen['status']} "
            f"{seen['bytes'] or '-'} \"{_q(environ.get('HTTP_REFERER', '-'))}\" "
            f"\"{_q(environ.get('HTTP_USER_AGENT', '-'))}\" {int(took * 1e6)} {pid}\n")
    try:
        os.write(fd, line.encode("latin-1", "replace"))
    except OSError as exc:
        _write_failed(exc)


_lost = Throttle(60.0)


def _write_failed(exc: OSError) -> None:
    """A full disk (or a closed pipe) under the access log must not cost the response it was
    logging: the line is dropped, and said so at most once a minute."""
    count = _lost.due()
    if count:
        logging.getLogger("fcgidaemon").warning("access log write failed: %s (%d line(s) lost since "
                                                "the last such warning)", exc.strerror or exc, count)

"""Optional access log (``--access-log FILE|-``): the combined format plus time and worker pid.

Off by default: the web server logs requests already.  Each worker writes its own
lines with one ``write`` on an O_APPEND descriptor, so lines from different
workers never interleave.  A FILE moved or removed (logrotate) is reopened by
each worker within a second, with no signal: see `AccessLog`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Iterable, Iterator

from .logs import Throttle

WSGIApp = Callable[..., Iterable[bytes]]


log = logging.getLogger("fcgidaemon")


class AccessLog:
    """The log's descriptor, reopened once its path names another file or none.

    logrotate's default (`create`) renames the file and creates a new one; the
    workers would go on writing to the renamed one.  The other ways out are worse:
    a SIGHUP reload reopens it, but also deploys whatever code is on disk at that
    moment, and `copytruncate` loses the lines written between the copy and the
    truncation.  The worker calls `reopen_if_moved` from its sweep (at most 4 times
    a second, at least once: one stat() each).
    """

    def __init__(self, target: str) -> None:
        self.path = None if target == "-" else target
        self.fd = os.dup(1) if self.path is None else self.open(self.path)
        self.identity = _identity(self.fd)
        self.failures = Throttle(60.0)

    @staticmethod
    def open(path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def reopen_if_moved(self) -> None:
        if self.path is None:
            return
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self.identity:
                return
        except FileNotFoundError:
            pass  # removed: a new one is created
        try:
            fd = self.open(self.path)
        except OSError as exc:  # lines keep going to the file we have, said once a minute
            count = self.failures.due()
            if count:
                log.warning("cannot reopen the access log %s: %s (%d time(s) since the last such "
                            "line); still writing to the file it was", self.path, exc.strerror or exc,
                            count)
            return
        old, self.fd, self.identity = self.fd, fd, _identity(fd)
        os.close(old)
        log.info("access log %s was moved or removed; reopened", self.path)


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def middleware(app: WSGIApp, access: AccessLog) -> WSGIApp:
    """One line per request, after its body, with the status the client got: an application
    that raises before its body is sent gets the server's 500, and its line says 500 (it had no
    line when app() itself raised, and the application's own status when the first block did)."""
    pid = os.getpid()

    def handle(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        started = time.monotonic()
        seen: dict[str, Any] = {"status": "-", "bytes": 0}

        def recording_start_response(status: str, headers: list, exc_info: Any = None) -> Any:
            seen["status"] = status.split(" ", 1)[0]
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        try:
            result = app(environ, recording_start_response)
        except BaseException:
            seen["status"] = "500"
            write_line(access.fd, environ, seen, time.monotonic() - started, pid)
            raise
        if isinstance(result, (list, tuple)):  # passed on as it is: sent in one piece
            seen["bytes"] = sum(len(chunk) for chunk in result)
            write_line(access.fd, environ, seen, time.monotonic() - started, pid)
            return result
        return _logged(result, access, environ, seen, started, pid)

    return handle


def _logged(result: Iterable[bytes], access: AccessLog, environ: dict[str, Any], seen: dict[str, Any],
            started: float, pid: int) -> Iterator[bytes]:
    try:
        for chunk in result:
            seen["bytes"] += len(chunk)
            yield chunk
    except BaseException:
        if not seen["bytes"]:  # nothing sent yet: the client gets the server's 500
            seen["status"] = "500"
        raise
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
        write_line(access.fd, environ, seen, time.monotonic() - started, pid)


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
        log.warning("access log write failed: %s (%d line(s) lost since "
                                                "the last such warning)", exc.strerror or exc, count)

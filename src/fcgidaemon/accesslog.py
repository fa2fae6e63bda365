"""Optional access log (``--access-log FILE|-``): the combined format plus time and worker pid.

Off by default: the web server logs requests already.  Each worker writes its own
lines with one ``write`` on an O_APPEND descriptor, so lines from different
workers never interleave.  A FILE moved or removed (logrotate) is reopened by
each worker within a second, with no signal: see `AccessLog`.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

from .logs import Throttle

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
        self.pid = os.getpid()  # opened in the worker

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

    def record(self, params: dict[str, str], user: Any, status: str, size: int,
               started: float) -> None:
        """One line for a request, with what the client got (wsgi.make_handler decides)."""
        write_line(self.fd, params, user, status, size, time.monotonic() - started, self.pid)


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


# what a line never holds as it came: quotes and backslashes (they end or escape a field),
# control characters (a newline forged a line of its own, an escape sequence drove the
# terminal of whoever read the log) and anything outside printable ASCII: each is \xhh (the
# quote and backslash \" and \\), as nginx and Apache write them
_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')


def _escape(char: re.Match) -> str:
    c = char.group()
    return "\\" + c if c in '"\\' else "\\x%02x" % ord(c) if ord(c) < 256 else "\\u%04x" % ord(c)


def _q(value: str) -> str:
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return value
    return _UNSAFE.sub(_escape, value)


def _text(value: Any) -> str:
    """REMOTE_USER as an application may leave it: an int or bytes made the line fail (and,
    before that was caught, the response it was for)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return value.decode("latin-1")
    return str(value)


def write_line(fd: int, params: dict[str, str], user: Any, status: str, size: int, took: float,
               pid: int) -> None:
    request = (f"{params.get('REQUEST_METHOD', '-')} {params.get('REQUEST_URI', '-')} "
               f"{params.get('SERVER_PROTOCOL', '-')}")
    name = _q(_text(user) if user else "-").replace(" ", "\\x20")  # one field: no space
    line = (f"{_q(params.get('REMOTE_ADDR', '-'))} - {name} "
            f"[{time.strftime('%d/%b/%Y:%H:%M:%S %z')}] \"{_q(request)}\" {status} "
            f"{size or '-'} \"{_q(params.get('HTTP_REFERER', '-'))}\" "
            f"\"{_q(params.get('HTTP_USER_AGENT', '-'))}\" {int(took * 1e6)} {pid}\n")
    try:
        os.write(fd, line.encode("ascii"))
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

"""--reload-check: a new worker serves one GET to itself before it reports ready.

The request goes through the same code a real one takes (the FastCGI connection, the WSGI
adapter and its rules), over an in-memory stand-in for the socket. The check used to call the
application with an environ and a start_response of its own: a str body or a header value that
is not latin-1 passed it and got a 500 when served; an application that used
``wsgi.file_wrapper`` failed it (KeyError) though it would have served. So code that imports
but fails on its first request never replaces working code, and code that works is not refused.
"""

from __future__ import annotations

import logging
import socket
import struct
from typing import Any, Callable

from flup.server import fcgi_base as flup

from .fastcgi import HEADER, ConnectionLost, Connection, Limits, ProtocolError, RequestAborted, Server
from .loader import summarize
from .wsgi import make_handler

log = logging.getLogger("fcgidaemon")


class MemorySocket:
    """What a Connection uses of a socket: `request` is what it reads, `sent` what it wrote."""

    family = socket.AF_UNIX

    def __init__(self, request: bytes) -> None:
        self._in = request
        self.sent = bytearray()

    def recv_into(self, buffer: memoryview, size: int = 0, flags: int = 0) -> int:
        size = min(size or len(buffer), len(buffer))
        data, self._in = self._in[:size], self._in[size:]
        buffer[:len(data)] = data
        return len(data)

    def send(self, data: Any, flags: int = 0) -> int:
        self.sent += data
        return len(data)

    def sendmsg(self, buffers: Any, ancdata: Any = (), flags: int = 0) -> int:
        before = len(self.sent)
        for data in buffers:
            self.sent += data
        return len(self.sent) - before

    def fileno(self) -> int:
        return -1

    def setblocking(self, flag: bool) -> None:
        """Never blocks: everything is in memory."""

    def shutdown(self, how: int) -> None:
        """Nothing to end."""

    def close(self) -> None:
        """Nothing to release."""


def request_bytes(path: str) -> bytes:
    """A GET of `path` as a web server sends it: BEGIN_REQUEST, PARAMS, an empty STDIN."""
    target, _, query = path.partition("?")
    params = {"GATEWAY_INTERFACE": "CGI/1.1", "REQUEST_METHOD": "GET", "REQUEST_URI": path,
              "SCRIPT_NAME": "", "PATH_INFO": target, "QUERY_STRING": query,
              "SERVER_NAME": "localhost", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
              "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": "localhost"}
    blob = b"".join(flup.encode_pair(k.encode("latin-1"), v.encode("latin-1")) for k, v in params.items())
    begin = struct.pack(flup.FCGI_BeginRequestBody, flup.FCGI_RESPONDER, 0)
    return b"".join(_record(rtype, content) for rtype, content in (
        (flup.FCGI_BEGIN_REQUEST, begin), (flup.FCGI_PARAMS, blob), (flup.FCGI_PARAMS, b""),
        (flup.FCGI_STDIN, b"")))


def _record(rtype: int, content: bytes) -> bytes:
    padding = -len(content) & 7
    return HEADER.pack(flup.FCGI_VERSION_1, rtype, 1, len(content), padding) + content + bytes(padding)


def status_of(answer: bytes) -> str | None:
    """The Status line of the response in `answer` (FastCGI records); None if it never ended."""
    pos, stdout, ended = 0, b"", False
    while len(answer) - pos >= flup.FCGI_HEADER_LEN:
        _, rtype, _, length, padding = HEADER.unpack_from(answer, pos)
        start = pos + flup.FCGI_HEADER_LEN
        if rtype == flup.FCGI_STDOUT:
            stdout += answer[start:start + length]
        ended |= rtype == flup.FCGI_END_REQUEST
        pos = start + length + padding
    if not ended:
        return None
    head = stdout.partition(b"\r\n\r\n")[0].decode("latin-1")
    for line in head.split("\r\n"):
        name, _, value = line.partition(":")
        if name.lower() == "status":
            return value.strip()
    return "200 OK"


class _Errors(logging.Filter):
    """Keeps the errors the adapter logs during the check (the application's traceback) for
    the reason the reload fails, instead of logging them as well: the manager logs that."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        self.records.append(record)
        return False


def self_check(app: Callable[..., Any], path: str) -> str | None:
    """Serve one GET of `path` to the application; None if it answered 2xx, else why not."""
    sock = MemorySocket(request_bytes(path))
    conn = Connection(sock, Server(make_handler(app), Limits()))  # type: ignore[arg-type]
    errors = _Errors()
    log.addFilter(errors)
    try:
        conn.receive()
        conn.parse_available()
        if conn.request is not None and conn.request.runnable:
            conn.run_request()
    except (ConnectionLost, ProtocolError, RequestAborted) as exc:
        if not errors.records:
            return f"--reload-check {path}: {exc}"
    except BaseException as exc:  # noqa: BLE001 - reported as the reason the reload fails
        return f"--reload-check {path}: {summarize(exc)}"
    finally:
        log.removeFilter(errors)
    if errors.records:
        record = errors.records[0]
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            return f"--reload-check {path}: {summarize(record.exc_info[1])}\n{text}"
        return f"--reload-check {path}: {record.getMessage()}"
    status = status_of(bytes(sock.sent))
    if status is None:
        return f"--reload-check {path}: no complete response"
    if not status.startswith("2"):
        return f"--reload-check {path}: answered {status}"
    return None

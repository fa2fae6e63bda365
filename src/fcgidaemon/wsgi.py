"""The WSGI (PEP 3333) adapter: one fresh environ per request, latin-1 headers, plain 500s.

Nothing from one request can reach the next: the environ is a new dict built
from that request's own PARAMS, and the response goes into that request's own
output stream.  An application exception before the headers are sent becomes a
plain 500 for the client and a full traceback in the log; after the headers,
the connection is dropped so the web server knows the response is incomplete.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Any, Callable, Iterable
from urllib.parse import unquote_to_bytes

from .fastcgi import TOO_LARGE, BodyTooLarge, ConnectionLost, ProtocolError, Request, RequestAborted

log = logging.getLogger("fcgidaemon")
app_log = logging.getLogger("fcgidaemon.app")

# fullmatch(), not match() with "$": "$" matches before a final newline too, and "200 OK\n" let
# a newline split the header block; the reason phrase is RFC 9110's (tab, space, visible, obs-text)
STATUS_RE = re.compile(r"[1-9]\d\d(?: [\t\x20-\x7e\x80-\xff]*)?")
HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# control characters RFC 9110 allows in no field value (tab is allowed): CR and LF would split the
# header block; NUL and the others make nginx and Apache answer 502 for the whole response
BAD_VALUE_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# statuses and header names that passed the checks: the same few come with every request. Two
# tables: with one, a status spelled like a checked header name ("Content-Type") skipped its check
_CHECKED_STATUSES: dict[str, bool] = {}  # status -> whether its response has no body (1xx, 204, 304)
_NAMES: dict[str, int] = {}  # header name -> its kind (_check_name)
_CHECKED_MAX = 1024  # an application inventing names cannot grow them without bound


ORDINARY, CONTENT_LENGTH, HOP = 0, 1, 2  # what a response header name is to start_response


def _check_name(name: Any) -> int:
    """Validate a header name not seen before; what kind of header it is."""
    if not isinstance(name, str) or not HEADER_NAME_RE.fullmatch(name):
        raise ValueError(f"bad response header name {name!r}")
    lower = name.lower()
    kind = CONTENT_LENGTH if lower == "content-length" else HOP if lower in DROPPED else ORDINARY
    if len(_NAMES) < _CHECKED_MAX:
        _NAMES[name] = kind
    return kind


def _without_hop(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The headers less the hop-by-hop ones (dropped as gunicorn does) and Status; one
    warning a name."""
    kept = []
    for name, value in headers:
        lower = name.lower()
        if lower in DROPPED:
            if lower not in _hop_warned:
                _hop_warned.add(lower)
                log.warning("the application sent the %s %s: dropped (%s); said once",
                            "header" if lower == "status" else "hop-by-hop header", name, DROPPED[lower])
            continue
        kept.append((name, value))
    return kept


def _check_status(status: Any) -> bool:
    """Validate a status not seen before; whether its response has no body."""
    if not isinstance(status, str) or not STATUS_RE.fullmatch(status):
        raise ValueError(f"bad WSGI status {status!r}")
    status.encode("latin-1")
    bodiless = has_no_body(status)
    if len(_CHECKED_STATUSES) < _CHECKED_MAX:
        _CHECKED_STATUSES[status] = bodiless
    return bodiless


ERROR_500 = (b"Status: 500 Internal Server Error\r\nContent-Type: text/plain; charset=utf-8\r\n"
             b"Content-Length: 21\r\n\r\nInternal Server Error")
ERROR_BODY_LENGTH = len(ERROR_500.partition(b"\r\n\r\n")[2])
TOO_LARGE_BODY = len(TOO_LARGE.partition(b"\r\n\r\n")[2])
REQUIRED = (("REQUEST_METHOD", "GET"), ("SERVER_NAME", "localhost"), ("SERVER_PORT", "80"),
            ("SERVER_PROTOCOL", "HTTP/1.0"))


class ErrorStream:
    """``wsgi.errors``: what the application writes goes to the log, line by line."""

    def __init__(self) -> None:
        self._partial = ""

    def write(self, text: str) -> int:
        lines = (self._partial + str(text)).split("\n")
        self._partial = lines.pop()
        for line in lines:
            app_log.error("%s", line)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self._partial:
            app_log.error("%s", self._partial)
            self._partial = ""


class FileWrapper:
    """``wsgi.file_wrapper``: iterate a file-like object in blocks; close() closes it."""

    def __init__(self, filelike: Any, blksize: int = 65536) -> None:
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self) -> "FileWrapper":
        return self

    def __next__(self) -> bytes:
        data = self.filelike.read(self.blksize)
        if data:
            return data
        raise StopIteration


# wsgi.input_terminated: wsgi.input ends where the body does (at the end of FCGI_STDIN), so an
# application may read a body that comes without CONTENT_LENGTH (Apache streams a chunked one so);
# Werkzeug reads no such body unless this is set
CONSTANT_KEYS = {"wsgi.version": (1, 0), "wsgi.multithread": False, "wsgi.multiprocess": True,
                 "wsgi.run_once": False, "wsgi.file_wrapper": FileWrapper, "wsgi.input_terminated": True}


def build_environ(req: Request) -> dict[str, Any]:
    """A new environ from this request's params, normalised for WSGI."""
    environ: dict[str, Any] = dict(req.params)
    for name, default in REQUIRED:
        if name not in environ:
            environ[name] = default
    normalise_paths(environ)
    https = environ.get("HTTPS", "off").lower() in ("on", "1") or environ.get("REQUEST_SCHEME") == "https"
    environ.update(CONSTANT_KEYS)
    environ["wsgi.url_scheme"] = "https" if https else "http"
    environ["wsgi.input"] = req.stdin
    environ["wsgi.errors"] = ErrorStream()
    return environ


def normalise_paths(environ: dict[str, Any]) -> None:
    """Make SCRIPT_NAME + PATH_INFO the decoded request path, so URL building is right.

    Front ends disagree: nginx's stock fastcgi_params put the whole path in
    SCRIPT_NAME and leave PATH_INFO empty; Apache's mod_proxy_fcgi sends the
    matched URL as SCRIPT_NAME and PATH_INFO only with proxy-fcgi-pathinfo.  A
    split is kept only when it is a real one (PATH_INFO not empty, and the two add
    up to REQUEST_URI's path); otherwise the application is mounted at the root
    and PATH_INFO is the whole decoded path.
    """
    uri = environ.get("REQUEST_URI")
    script = environ.get("SCRIPT_NAME", "")
    path_info = environ.get("PATH_INFO", "")
    if uri is None:
        environ["SCRIPT_NAME"], environ["PATH_INFO"] = script, path_info
        environ.setdefault("QUERY_STRING", "")
        return
    raw_path, _, query = uri.partition("?")
    if "QUERY_STRING" not in environ:  # sent empty, it is empty: an nginx rewrite ending in "?"
        environ["QUERY_STRING"] = query  # drops the query, and REQUEST_URI still has it
    path = unquote_to_bytes(raw_path.encode("latin-1")).decode("latin-1") if "%" in raw_path else raw_path
    if ("//" in path or "/." in path) and _unsettled(path) and script + path_info != path:
        # Dot segments or repeated slashes (%2e%2e counts: decoded above): the front end matched
        # its locations and rules against the path after resolving them, so the application must
        # route on that one too, or "/admin/%2e%2e/public/x", allowed as /public/x, would reach
        # it as /admin/../public/x. The front end's own result, when it sent one; else resolved
        # here as nginx and Apache (MergeSlashes on, the default) do. A front end whose variables
        # still have them (nginx merge_slashes off, Apache MergeSlashes Off) matched the path as
        # it is: merged here, /app//admin/ passed nginx's rule for /app/admin/ and reached the
        # application as /app/admin/, and a split's mount was lost.
        path = script + path_info if script + path_info and not _unsettled(script + path_info) \
            else resolve_path(path)
    if path_info and script + path_info == path:
        environ["SCRIPT_NAME"], environ["PATH_INFO"] = script, path_info
    else:
        environ["SCRIPT_NAME"], environ["PATH_INFO"] = "", path


def _unsettled(path: str) -> bool:
    return "//" in path or "/." in path and ("/./" in path or "/../" in path
                                             or path.endswith(("/.", "/..")))


def resolve_path(path: str) -> str:
    """Repeated slashes merged, then "." and ".." segments resolved (RFC 3986, 5.2.4); ".."
    never climbs above the root."""
    out: list[str] = []
    segments = [seg for seg in path.split("/") if seg]
    for seg in segments:
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
    trailing = path.endswith("/") or (segments and segments[-1] in (".", ".."))
    return "/" + "/".join(out) + ("/" if trailing and out else "")


# hop-by-hop headers (RFC 9110 7.6.1): PEP 3333 forbids them to applications, and each front
# end did its own thing with them: Apache passed "Connection: close" to its client
HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "te", "trailer", "trailers", "transfer-encoding", "upgrade"))
# and Status, CGI's own: the line we write from the status given to start_response. The
# application's came after it, and front ends take the last one: an application passing an
# upstream's Status on replaced its own status, and a value that is not one gave a 502.
DROPPED = {**dict.fromkeys(HOP_BY_HOP, "PEP 3333 forbids it; the web server decides the connection"),
           "status": "the status is the one given to start_response"}
_hop_warned: set[str] = set()
NO_BODY = ("204", "304")  # and 1xx: statuses whose responses end with their headers


def has_no_body(status: str) -> bool:
    return status[:3] in NO_BODY or status[:1] == "1"


class Response:
    """start_response and write for one request; headers go out with the first body bytes.

    `head_sent` says the headers are written into the connection's buffer; `committed`, that
    some of the response has been handed to the kernel. Until then a failure can still become
    our 500 (PEP 3333: only headers actually sent bind the application)."""

    # defaults read from the class until a response sets its own: fewer stores per request
    status: str | None = None
    head_sent = False
    sent = 0  # body bytes written, for the access log
    length: int | None = None  # the application's Content-Length
    limit: int | None = None  # at most this many body bytes go out
    overflowed = False  # the application wrote past `limit` (said once)

    mark = 0  # the connection's bytes sent when the headers were written (`committed`)

    def __init__(self, req: Request) -> None:
        self.req = req
        self.headers: list[tuple[str, str]] = []

    @property
    def committed(self) -> bool:
        return self.head_sent and self.req._conn.sent != self.mark

    def replaced(self, status: str, size: int) -> None:
        """The server's own answer went out instead (our 500, the 413): what the client got."""
        self.status, self.sent, self.head_sent = status, size, True

    def outcome(self) -> tuple[str, int]:
        """What the client got: the status once the headers went out, with the body bytes
        sent (of a response cut off, those sent so far); "-" when nothing did."""
        if self.head_sent and self.status:
            return self.status.partition(" ")[0], self.sent
        return "-", 0

    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: Any = None) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if self.committed:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
            if self.head_sent:  # written, but still ours: replaced by this response
                self.req._conn.discard_output()
                self.req.stdout.dataWritten = False
                self.head_sent, self.sent = False, 0
        elif self.status is not None:
            raise AssertionError("start_response called twice without exc_info")
        bodiless = _CHECKED_STATUSES.get(status)
        if bodiless is None:
            bodiless = _check_status(status)
        if self.limit is not None:  # an earlier start_response's (exc_info)
            self.length = self.limit = None
        hop = False
        for name, value in headers:
            kind = _NAMES.get(name)
            if kind is None:
                kind = _check_name(name)
            if not isinstance(value, str) or not value.isprintable() and BAD_VALUE_RE.search(value):
                raise ValueError(f"bad value for response header {name}")
            value.encode("latin-1")  # UnicodeEncodeError: not representable
            if kind:
                if kind != CONTENT_LENGTH:
                    hop = True
                elif value.isdigit() and value.isascii() and self.length is None:
                    self.length = self.limit = int(value)  # the usual case, inline
                else:
                    self._declare(value)
        self.status, self.headers = status, (_without_hop(headers) if hop else list(headers))
        if bodiless:
            self.limit = 0
        return self.write_now

    def _declare(self, value: str) -> None:
        """The application's Content-Length (inlined in start_response for the usual case):
        PEP 3333 has the server send no more than it, and treat a response that ends short of
        it as failed."""
        values = {v.strip(" \t") for v in value.split(",")}  # "5 " and "5, 5" as HTTP reads them
        if len(values) != 1 or not all(v.isdigit() and v.isascii() for v in values):
            raise ValueError(f"bad Content-Length {value!r}")
        length = int(values.pop())
        if self.length is not None and length != self.length:
            raise ValueError("two different Content-Length headers")
        self.length = self.limit = length

    def head(self) -> bytes:
        lines = [f"Status: {self.status}\r\n"]
        for name, value in self.headers:
            lines.append(f"{name}: {value}\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    def write(self, data: bytes) -> None:
        if self.status is None:
            raise AssertionError("write() before start_response()")
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"response body must be bytes, not {type(data).__name__}")
        size = len(data)
        if self.limit is not None and self.sent + size > self.limit:
            data = self._cut(data)
            size = len(data)
        self.sent += size
        if not self.head_sent:
            self.mark = self.req._conn.sent  # not at the start: a management record answered
            # meanwhile is not the response; head and body go out together, not joined (a copy
            # of the body): bytes(), so a bytearray the application changes later is not
            self.req.stdout.write_after(self.head(), bytes(data))
            self.head_sent = True
        elif data:
            self.req.stdout.write(bytes(data))

    def _cut(self, data: bytes) -> bytes:
        """What fits in the declared length (none for 204, 304, 1xx); the rest is dropped, and
        said once per response. Passed on, Apache gave its client all 37 bytes of a response
        declared as 5, and nginx warned of a 204 with a body."""
        assert self.limit is not None
        if not self.overflowed:
            self.overflowed = True
            why = (f"its Content-Length {self.length}" if self.limit == self.length
                   else f"status {(self.status or '')[:3]}, which has no body,")
            log.warning("application sent more body than %s allows on %s; the rest is dropped",
                        why, self.req.params.get("REQUEST_URI", ""))
        return bytes(data[:max(0, self.limit - self.sent)])

    def short(self) -> bool:
        """The body ended before the declared Content-Length (HEAD's may: it has none)."""
        return (self.length is not None and self.sent < self.length and self.limit == self.length
                and self.req.params.get("REQUEST_METHOD") != "HEAD")

    def write_now(self, data: bytes) -> None:
        """The write() callable start_response returns: the block is sent before it returns
        (PEP 3333: a server must not delay the transmission of any block)."""
        self.write(data)
        self.req._conn.flush()

    def add_length_if_known(self, result: Any) -> None:
        """A one-block body has a known length: say it. Not for a status that has no body (1xx,
        204, 304: RFC 9110 forbids the header on 204, and on 304 it would be the GET's), nor for
        HEAD, whose body the application may leave empty."""
        if isinstance(result, (list, tuple)) and len(result) == 1 and isinstance(result[0], bytes):
            if self.length is not None:
                return
            if has_no_body(self.status or "") or self.req.params.get("REQUEST_METHOD") == "HEAD":
                return
            self.headers.append(("Content-Length", str(len(result[0]))))


# (the request's params as received, REMOTE_USER as the application left it, status, bytes, start)
ResponseHook = Callable[[dict[str, str], Any, str, int, float], None]


def make_handler(app: Callable[..., Any], on_response: ResponseHook | None = None
                 ) -> Callable[[Request], int]:
    """The per-request function the protocol layer calls; returns the FastCGI app status.

    `on_response(params, remote_user, status, body_bytes, started)` (the access log) is told
    the request as the web server sent it (an application rewriting its environ changes no
    line), REMOTE_USER as the application left it (an authenticating middleware sets it),
    and what the client got, decided here: our 500 when the application failed before its headers went out, the
    status and the bytes sent when the response was cut off, "-" when nothing was sent. Told
    by a middleware around the application, it missed write() and said 200 for a body that
    became our 500."""

    owner = os.getpid()  # the worker's

    def handle(req: Request) -> int:
        environ = build_environ(req)
        response = Response(req)
        result = None
        started = time.monotonic() if on_response is not None else 0.0
        try:
            result = app(environ, response.start_response)
            leave_if_forked(owner, "returned")
            if response.status is not None:
                response.add_length_if_known(result)
            if isinstance(result, (list, tuple)):  # all there: sent with END_REQUEST, one send
                # every item is checked before any is written (write() raises for the first
                # that is not bytes): output is flushed at 256 KiB (FLUSH_AT), and a str item
                # after that much got half a 200 and a reset, not the 500 nothing-sent allows
                for chunk in result:
                    if not isinstance(chunk, (bytes, bytearray)):
                        response.write(chunk)
                for chunk in result:
                    if chunk:
                        response.write(chunk)
            else:  # each block sent before the application makes the next (PEP 3333): a
                for chunk in result:  # stream of events or progress must not wait for the end
                    if chunk:
                        response.write(chunk)
                        req._conn.flush()
            response.write(b"")
            if response.length is not None and response.sent < response.length and response.short():
                return response_short(req, response, environ)
            return 0
        except APP_EXITS as exc:  # sys.exit() in a request: answered, then the worker is replaced
            leave_if_forked(owner, f"raised {exc!r}")
            exit_asked(req, exc)
            return application_failed(req, response, environ)
        except BaseException as exc:  # noqa: BLE001 - the application's failure, reported, not
            # fatal; BaseException, not Exception: asyncio's CancelledError and gevent's
            # GreenletExit are not Exceptions, and one of them ended the worker, its request
            # unanswered and every connection it held dropped
            leave_if_forked(owner, f"raised {type(exc).__name__}: {exc}")
            fault = transport_fault(exc)
            if isinstance(fault, BodyTooLarge):
                if not response.committed:
                    req._conn.refuse_body(req, fault)
                    response.replaced("413", TOO_LARGE_BODY)
                    return 0
                log.warning("%s (--max-body) after part of the response went out: %s", fault,
                            req.params.get("REQUEST_URI", ""))
                req._conn.abort()  # cut, visibly: see answer_500
                raise ConnectionLost(f"{fault}; the response was cut") from None
            if fault is not None:
                raise fault from None
            return application_failed(req, response, environ)
        finally:
            close_result(result, req, environ)
            environ["wsgi.errors"].flush()
            if on_response is not None:
                try:
                    on_response(req.params, environ.get("REMOTE_USER"), *response.outcome(), started)
                except Exception:  # noqa: BLE001 - the line is lost, not the response it was for
                    log.error("access log line failed for %s", req.params.get("REQUEST_URI", ""),
                              exc_info=True)

    return handle


def leave_if_forked(worker: int, how: str) -> None:
    """Called where the application's call returns or raises: a process the application forked
    in a request that comes back into our code (it returned, or raised: sys.exit(), an error)
    instead of ending with os._exit leaves here. It went on as a second
    worker on the same connections, epoll set and manager channel: it answered the parent's
    request a second time, asked the manager to replace the worker, or took the listener out
    of the shared epoll set, and the real worker never accepted again. It leaves now, said."""
    if os.getpid() == worker:
        return
    log.error("process %d, forked by the application in worker %d, %s instead of ending with "
              "os._exit; it exits", os.getpid(), worker, how)
    os._exit(1)


TRANSPORT_FAULTS = (ConnectionLost, RequestAborted, ProtocolError)
# What an application raises to end its process (sys.exit(), or a KeyboardInterrupt it raised
# itself: the worker's SIGINT handler exits without raising). Let through, it ended the worker
# with its request unanswered and every connection the worker held dropped; the request gets a
# 500 instead, and the worker leaves as --max-requests does, once its replacement is ready.
APP_EXITS = (SystemExit, KeyboardInterrupt)


def exit_asked(req: Request, exc: BaseException) -> None:
    if req.server.on_exit_asked is not None:
        req.server.on_exit_asked(f"{type(exc).__name__}({exc})" if str(exc) else type(exc).__name__)


def transport_fault(exc: BaseException | None) -> BaseException | None:
    """The web server's failure behind `exc`, if there is one: raised while the application
    read wsgi.input, directly or wrapped by it (``raise BadRequest() from exc``). That
    connection is closed with a warning; reported as an application error, it would send an
    operator after a traceback through code that did nothing wrong."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, TRANSPORT_FAULTS):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def application_failed(req: Request, response: Response, environ: dict[str, Any]) -> int:
    uri = environ.get("REQUEST_URI") or environ.get("PATH_INFO", "")
    log.error("application error on %s %s", environ.get("REQUEST_METHOD"), uri,
              exc_info=sys.exc_info(), extra={"request_uri": uri})
    return answer_500(req, response)


def answer_500(req: Request, response: Response) -> int:
    """Our 500 instead of what the application wrote, while none of it has gone out; once
    some has, the connection is reset (Connection.abort) so the web server knows the
    response is incomplete."""
    if response.committed:
        reason = "the response failed after part of it was sent; reset, so the web server sees it cut"
        log.info("connection closed: %s", reason)
        req._conn.abort()
        raise ConnectionLost(reason)
    req._conn.discard_output()
    req.stdout.dataWritten = False
    req.stdout.write(ERROR_500)
    response.replaced("500", ERROR_BODY_LENGTH)
    return 1


def response_short(req: Request, response: Response, environ: dict[str, Any]) -> int:
    """The body ended short of its Content-Length (PEP 3333: the server treats it as an error).
    A normal end had Apache add the last chunk: its client took the short body as complete."""
    uri = environ.get("REQUEST_URI") or environ.get("PATH_INFO", "")
    log.error("application error on %s %s: it sent %d of the %d bytes its Content-Length declared",
              environ.get("REQUEST_METHOD"), uri, response.sent, response.length,
              extra={"request_uri": uri})
    return answer_500(req, response)


def close_result(result: Any, req: Request, environ: dict[str, Any]) -> None:
    close = getattr(result, "close", None)
    if close is None:
        return
    try:
        close()
    except BaseException as exc:  # noqa: BLE001 - reported; the response is decided
        if isinstance(exc, APP_EXITS):
            exit_asked(req, exc)
        log.error("application error in close() on %s", environ.get("REQUEST_URI", ""),
                  exc_info=True)

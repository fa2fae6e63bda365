"""A small, strict FastCGI 1.0 client (the web-server side) for tests.

Written from the FastCGI 1.0 specification, stdlib only.  The client is
deliberately strict: anything the specification does not allow in a
response (bad version, foreign request ids, data after END_REQUEST, a
missing CGI header block, ...) raises :class:`ProtocolError`.
"""
from __future__ import annotations

import select
import socket
import struct
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, NamedTuple, Union

Address = Union[tuple[str, int], str]
ParamMap = Mapping[Union[str, bytes], Union[str, bytes]]

FCGI_VERSION_1, FCGI_HEADER_LEN, FCGI_MAX_CONTENT, FCGI_NULL_REQUEST_ID = 1, 8, 0xFFFF, 0
# Record types.
FCGI_BEGIN_REQUEST, FCGI_ABORT_REQUEST, FCGI_END_REQUEST = 1, 2, 3
FCGI_PARAMS, FCGI_STDIN, FCGI_STDOUT, FCGI_STDERR, FCGI_DATA = 4, 5, 6, 7, 8
FCGI_GET_VALUES, FCGI_GET_VALUES_RESULT, FCGI_UNKNOWN_TYPE = 9, 10, 11
# Roles, the BEGIN_REQUEST flag, END_REQUEST protocol statuses.
FCGI_RESPONDER, FCGI_AUTHORIZER, FCGI_FILTER = 1, 2, 3
FCGI_KEEP_CONN = 1
FCGI_REQUEST_COMPLETE, FCGI_CANT_MPX_CONN, FCGI_OVERLOADED, FCGI_UNKNOWN_ROLE = 0, 1, 2, 3
# Management variable names for FCGI_GET_VALUES.
FCGI_MAX_CONNS, FCGI_MAX_REQS = "FCGI_MAX_CONNS", "FCGI_MAX_REQS"
FCGI_MPXS_CONNS = "FCGI_MPXS_CONNS"

_HEADER = struct.Struct("!BBHHBx")


class ProtocolError(Exception):
    """The server sent something that is not a valid FastCGI response."""


class ConnectionClosed(ProtocolError):
    """The connection ended before the response was complete."""


class ResponseTimeout(ProtocolError, TimeoutError):
    """No progress on the connection within the client's timeout."""


class Record(NamedTuple):
    """One decoded FastCGI record (padding stripped)."""

    type: int
    request_id: int
    content: bytes


@dataclass
class Response:
    """A complete FastCGI responder reply, with the CGI header block parsed."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    stderr: bytes = b""
    app_status: int = 0
    protocol_status: int = FCGI_REQUEST_COMPLETE
    raw_stdout: bytes = b""
    stdout_terminated: bool = field(default=True, repr=False)

    def header(self, name: str, default: str | None = None) -> str | None:
        """Return the first header called ``name`` (case-insensitive)."""
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), default)


def _b(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


def encode_record(type: int, request_id: int, content: bytes = b"",
                  padding: int | None = None) -> bytes:
    """Encode one record; by default pad the content to a multiple of 8."""
    if len(content) > FCGI_MAX_CONTENT:
        raise ValueError(f"record content too long: {len(content)} bytes")
    if padding is None:
        padding = -len(content) % 8
    header = _HEADER.pack(FCGI_VERSION_1, type, request_id, len(content), padding)
    return header + content + b"\0" * padding


def take_records(buf: bytearray) -> Iterator[Record]:
    """The complete records at the head of `buf`, each removed as it is yielded; a record
    still coming stays (for a reader that appends what each recv() brings)."""
    while len(buf) >= FCGI_HEADER_LEN:
        _, rtype, rid, clen, plen = _HEADER.unpack_from(buf)
        if len(buf) < FCGI_HEADER_LEN + clen + plen:
            return
        content = bytes(buf[FCGI_HEADER_LEN:FCGI_HEADER_LEN + clen])
        del buf[:FCGI_HEADER_LEN + clen + plen]
        yield Record(rtype, rid, content)


def decode_records(data: bytes) -> list[Record]:
    """Decode a byte string holding whole records; raise on truncation."""
    records, pos = [], 0
    while pos < len(data):
        if len(data) - pos < FCGI_HEADER_LEN:
            raise ProtocolError("truncated record header")
        version, rtype, rid, clen, plen = _HEADER.unpack_from(data, pos)
        if version != FCGI_VERSION_1:
            raise ProtocolError(f"bad record version {version}")
        end = pos + FCGI_HEADER_LEN + clen + plen
        if end > len(data):
            raise ProtocolError("truncated record body")
        records.append(Record(rtype, rid, data[pos + 8:pos + 8 + clen]))
        pos = end
    return records


def _encode_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    if n > 0x7FFFFFFF:
        raise ValueError(f"name/value too long: {n} bytes")
    return struct.pack("!I", n | 0x80000000)


def encode_params(params: ParamMap) -> bytes:
    """Encode name-value pairs (str is encoded as UTF-8)."""
    out = bytearray()
    for name, value in params.items():
        name, value = _b(name), _b(value)
        out += _encode_length(len(name)) + _encode_length(len(value)) + name + value
    return bytes(out)


def decode_params(data: bytes) -> dict[bytes, bytes]:
    """Decode a name-value pair stream; raise ProtocolError if malformed."""
    result: dict[bytes, bytes] = {}
    pos = 0

    def length() -> int:
        nonlocal pos
        if pos >= len(data):
            raise ProtocolError("truncated name-value length")
        if data[pos] < 0x80:
            pos += 1
            return data[pos - 1]
        if pos + 4 > len(data):
            raise ProtocolError("truncated 4-byte name-value length")
        pos += 4
        return struct.unpack_from("!I", data, pos - 4)[0] & 0x7FFFFFFF

    while pos < len(data):
        nlen, vlen = length(), length()
        if pos + nlen + vlen > len(data):
            raise ProtocolError("truncated name-value data")
        name, value = data[pos:pos + nlen], data[pos + nlen:pos + nlen + vlen]
        result[name] = value
        pos += nlen + vlen
    return result


def _stream(rtype: int, request_id: int, data: bytes, chunk: int) -> bytes:
    """Encode ``data`` as a stream of records followed by the empty record."""
    chunk = max(1, min(chunk, FCGI_MAX_CONTENT))
    parts = [encode_record(rtype, request_id, data[i:i + chunk])
             for i in range(0, len(data), chunk)]
    parts.append(encode_record(rtype, request_id, b""))
    return b"".join(parts)


def build_request(params: ParamMap | bytes, body: bytes = b"", *,
                  keep_conn: bool = False, request_id: int = 1,
                  stdin_chunk: int = FCGI_MAX_CONTENT,
                  role: int = FCGI_RESPONDER) -> bytes:
    """All bytes of one request: BEGIN_REQUEST, PARAMS stream, STDIN stream.

    ``params`` may be pre-encoded bytes (e.g. deliberately malformed).
    """
    begin = struct.pack("!HB5x", role, FCGI_KEEP_CONN if keep_conn else 0)
    blob = params if isinstance(params, bytes) else encode_params(params)
    return (encode_record(FCGI_BEGIN_REQUEST, request_id, begin)
            + _stream(FCGI_PARAMS, request_id, blob, FCGI_MAX_CONTENT)
            + _stream(FCGI_STDIN, request_id, body, stdin_chunk))


def parse_cgi_response(stdout: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    """Split CGI output into (status, headers, body); status 200 if absent."""
    ends = [(i, len(sep)) for sep in (b"\r\n\r\n", b"\n\n")
            if (i := stdout.find(sep)) >= 0]
    if not ends:
        raise ProtocolError(f"no end of CGI headers in stdout: {stdout[:200]!r}")
    idx, seplen = min(ends)
    status, headers = 200, []
    for line in stdout[:idx].decode("latin-1").splitlines():
        name, colon, value = line.partition(":")
        if not colon or not name.strip() or name != name.strip():
            raise ProtocolError(f"malformed CGI header line: {line!r}")
        headers.append((name, value.strip()))
        if name.lower() == "status":
            code = (value.split() or [""])[0]
            if not (code.isdigit() and len(code) == 3):
                raise ProtocolError(f"malformed Status header: {line!r}")
            status = int(code)
    return status, headers, stdout[idx + seplen:]


def make_params(method: str = "GET", uri: str = "/", body_len: int = 0,
                extra: Mapping[str, str | bytes | None] | None = None,
                **kw: str | bytes) -> dict[str, str | bytes]:
    """Build CGI params like nginx's fastcgi_params for ``method uri``.

    Keyword arguments override params by upper-cased name
    (``server_port="8080"``); ``extra`` is merged last, a ``None`` value
    removes that param.
    """
    path, _, query = uri.partition("?")
    params: dict[str, str | bytes] = {
        "GATEWAY_INTERFACE": "CGI/1.1",
        "SERVER_SOFTWARE": "nginx",
        "REQUEST_METHOD": method,
        "REQUEST_URI": uri,
        "DOCUMENT_URI": path,
        "SCRIPT_NAME": "",
        "PATH_INFO": urllib.parse.unquote_to_bytes(path),
        "QUERY_STRING": query,
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_ADDR": "127.0.0.1",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "50000",
        "HTTP_HOST": "localhost",
    }
    if body_len:
        params["CONTENT_LENGTH"] = str(body_len)
        params["CONTENT_TYPE"] = "application/octet-stream"
    params.update({k.upper(): v for k, v in kw.items()})
    for key, value in (extra or {}).items():
        if value is None:
            params.pop(key, None)
        else:
            params[key] = value
    return params


class FCGIClient:
    """A FastCGI connection to ``("host", port)`` or a unix socket path.

    The socket is (re)opened lazily by :meth:`request`; after any error
    the connection is closed so the next request starts afresh.
    """

    def __init__(self, address: Address, timeout: float = 10.0,
                 connect: bool = True) -> None:
        self.address = address
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._eof = False
        if connect:
            self.connect()

    def __enter__(self) -> "FCGIClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self) -> None:
        """Open a fresh connection (closing any existing one)."""
        self.close()
        family = (socket.AF_UNIX if isinstance(self.address, str) else
                  socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.address)
            if family == socket.AF_INET:  # as nginx does for upstreams
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        self._sock, self._buf, self._eof = sock, bytearray(), False

    def close(self) -> None:
        """Close the connection; safe to call repeatedly."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        return self._sock

    def send_raw(self, data: bytes) -> None:
        """Send arbitrary bytes (connecting first if needed)."""
        self._socket().sendall(data)

    def abort(self, request_id: int) -> None:
        """Send FCGI_ABORT_REQUEST for ``request_id``."""
        self.send_raw(encode_record(FCGI_ABORT_REQUEST, request_id))

    def _send(self, data: bytes) -> None:
        """Send ``data`` while buffering anything the server sends meanwhile.

        Avoids deadlock when the server streams output before it has read
        all of a large body.  If the peer goes away the send stops quietly;
        the following read reports what actually happened.
        """
        sock, view, sent = self._socket(), memoryview(data), 0
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLOUT)
        while sent < len(view) and not self._eof:
            events = poller.poll(self.timeout * 1000)
            if not events:
                raise ResponseTimeout(f"send stalled after {sent} bytes")
            ev = events[0][1]
            if ev & select.POLLIN:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                self._eof = not chunk
                self._buf += chunk
            if ev & (select.POLLOUT | select.POLLERR | select.POLLHUP):
                try:
                    sent += sock.send(view[sent:sent + 262144])
                except (BrokenPipeError, ConnectionResetError):
                    return

    def _fill(self, n: int, deadline: float | None) -> bool:
        """Buffer at least ``n`` bytes; False on EOF first."""
        sock = self._socket()
        while len(self._buf) < n:
            if self._eof:
                return False
            remaining = self.timeout if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise ResponseTimeout("timed out waiting for data")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(max(65536, n - len(self._buf)))
            except socket.timeout:
                raise ResponseTimeout(f"no data within {remaining:.1f}s") from None
            except ConnectionResetError:
                chunk = b""
            finally:
                sock.settimeout(self.timeout)
            if not chunk:
                self._eof = True
            self._buf += chunk
        return True

    def read_record(self, deadline: float | None = None) -> Record | None:
        """Read one record; None on EOF at a record boundary."""
        if not self._fill(FCGI_HEADER_LEN, deadline):
            if self._buf:
                raise ConnectionClosed(f"EOF inside record header ({len(self._buf)} bytes)")
            return None
        version, rtype, rid, clen, plen = _HEADER.unpack_from(self._buf)
        if version != FCGI_VERSION_1:
            raise ProtocolError(f"bad record version {version}: {bytes(self._buf[:8])!r}")
        total = FCGI_HEADER_LEN + clen + plen
        if not self._fill(total, deadline):
            raise ConnectionClosed(f"EOF inside record body (type {rtype})")
        content = bytes(self._buf[FCGI_HEADER_LEN:FCGI_HEADER_LEN + clen])
        del self._buf[:total]
        return Record(rtype, rid, content)

    def recv_records(self, timeout: float | None = None) -> Iterator[Record]:
        """Yield records until EOF or until ``timeout`` (default: client timeout)
        elapses; a record truncated by EOF raises ConnectionClosed."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            try:
                record = self.read_record(deadline)
            except ResponseTimeout:
                return
            if record is None:
                return
            yield record

    def request(self, params: ParamMap | bytes, body: bytes = b"",
                keep_conn: bool = False, request_id: int = 1,
                stdin_chunk: int = FCGI_MAX_CONTENT) -> Response:
        """Send one RESPONDER request and read its complete response."""
        try:
            self._send(build_request(params, body, keep_conn=keep_conn,
                                     request_id=request_id, stdin_chunk=stdin_chunk))
            return self.read_response(request_id, keep_conn)
        except BaseException:
            self.close()
            raise

    def read_response(self, request_id: int = 1, keep_conn: bool = True) -> Response:
        """Read records for ``request_id`` up to its END_REQUEST.

        With ``keep_conn=False`` also require the server to close the
        connection afterwards (and close our side).
        """
        stdout, stderr = bytearray(), bytearray()
        closed = {FCGI_STDOUT: False, FCGI_STDERR: False}
        while True:
            rec = self.read_record()
            if rec is None:
                raise ConnectionClosed(f"EOF before END_REQUEST (request {request_id}, "
                                       f"{len(stdout)} stdout bytes)")
            if rec.request_id != request_id:
                raise ProtocolError(f"record type {rec.type} for request "
                                    f"{rec.request_id}, expected {request_id}")
            if rec.type in closed:
                if closed[rec.type]:
                    raise ProtocolError(f"type {rec.type} data after end of stream")
                closed[rec.type] = not rec.content
                (stdout if rec.type == FCGI_STDOUT else stderr).extend(rec.content)
            elif rec.type == FCGI_END_REQUEST:
                if len(rec.content) != 8:
                    raise ProtocolError(f"END_REQUEST body of {len(rec.content)} bytes")
                app_status, proto_status = struct.unpack("!IB3x", rec.content)
                break
            else:
                raise ProtocolError(f"unexpected record type {rec.type} in response")
        if not keep_conn:
            self._expect_close()
        raw = bytes(stdout)
        if raw or proto_status == FCGI_REQUEST_COMPLETE:
            status, headers, body = parse_cgi_response(raw)
        else:
            status, headers, body = 0, [], b""
        return Response(status, headers, body, bytes(stderr), app_status,
                        proto_status, raw, closed[FCGI_STDOUT])

    def _expect_close(self) -> None:
        # bytes that came in the same recv() as END_REQUEST are already buffered: asking
        # _fill for one byte more than the buffer holds would only look at later arrivals
        if self._buf:
            raise ProtocolError(f"data after END_REQUEST: {bytes(self._buf[:40])!r}")
        try:
            more = self._fill(len(self._buf) + 1, None)
        except ResponseTimeout:
            raise ProtocolError("server kept the connection open without "
                                "FCGI_KEEP_CONN") from None
        if more:
            raise ProtocolError(f"data after END_REQUEST: {bytes(self._buf[:40])!r}")
        self.close()

    def get_values(self, names: Iterable[str] = (FCGI_MAX_CONNS, FCGI_MAX_REQS,
                                                  FCGI_MPXS_CONNS)) -> dict[str, str]:
        """Query management variables with FCGI_GET_VALUES."""
        query = encode_params({name: b"" for name in names})
        try:
            self._send(encode_record(FCGI_GET_VALUES, FCGI_NULL_REQUEST_ID, query))
            rec = self.read_record()
            if rec is None:
                raise ConnectionClosed("EOF before GET_VALUES_RESULT")
            if rec.type != FCGI_GET_VALUES_RESULT or rec.request_id != 0:
                raise ProtocolError(f"expected GET_VALUES_RESULT, got {rec}")
        except BaseException:
            self.close()
            raise
        return {k.decode("latin-1"): v.decode("latin-1")
                for k, v in decode_params(rec.content).items()}

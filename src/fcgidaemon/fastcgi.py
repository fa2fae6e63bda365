"""FastCGI over flup6's protocol classes, driven per record from our own loop.

flup6's `Connection.run()` blocks on one connection until the web server closes
it, which pins a preforked worker to an idle kept connection.  So we use only
flup's protocol pieces (its constants, name-value pair codec, `Request` and its
input/output streams) and drive them from a buffer that the worker's event loop
fills.  Workarounds for flup6's defects live here, each with a test:

* records are parsed from a buffer, in place, and the response's records are
  encoded straight into one output buffer that is sent with one ``sendall`` per
  response (flup sends each record in up to three ``send`` calls, which costs a
  delayed ACK per response on kept connections, and builds an object per record);
* FCGI_GET_VALUES is answered with real values (flup answers empty);
* unknown management records get FCGI_UNKNOWN_TYPE (flup raises NameError);
* name-value pairs whose lengths exceed their record are a protocol error
  (flup silently truncates them);
* a second BEGIN_REQUEST on a busy connection gets FCGI_CANT_MPX_CONN, an
  unknown role gets FCGI_UNKNOWN_ROLE, an abort ends the request.

Why one module of this size (over 1,100 lines, a third of them comments and docstrings that
say what was measured): `Connection` is most of it, and its parts (reading into the buffer,
parsing records in place, a request's life from BEGIN_REQUEST to END_REQUEST, the send path
with its partial writes, and how a connection ends: FIN, reset or hand-over) share one buffer
and one set of invariants about which bytes are read and which response is in flight. Split
into modules, each part would reach into the others' private state.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from flup.server import fcgi_base as flup

from .logs import Throttle

try:
    from ._speedups import decode_params as _c_decode_params, scan_request as _c_scan_request, \
        take_stdin as _c_take_stdin
except ImportError:  # built without a C compiler (setup.py: optional): the Python decoder
    _c_decode_params = _c_scan_request = _c_take_stdin = None

log = logging.getLogger("fcgidaemon")

HEADER = struct.Struct(flup.FCGI_Header)
END_BODY = struct.Struct(flup.FCGI_EndRequestBody)
BEGIN_BODY = struct.Struct(flup.FCGI_BeginRequestBody)
UNKNOWN_BODY = struct.Struct(flup.FCGI_UnknownTypeBody)
MAX_CONTENT = 65535
FLUSH_AT = 256 * 1024  # bytes of response buffered before a send
MAX_PIECES = 512  # buffers handed to one sendmsg() (the kernel takes up to IOV_MAX, 1024)
RECV_BODY = 256 * 1024  # read size while the application streams a request body
RECV_FIRST = 64 * 1024  # read size of a connection the worker's wait found readable
DRAIN_LIMIT = 30.0  # seconds an answered request's unread body is read and thrown away
TOO_LARGE = (b"Status: 413 Content Too Large\r\nContent-Type: text/plain\r\nContent-Length: 24\r\n\r\n"
             b"Request body too large.\n")
BAD_LENGTH = (b"Status: 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 28\r\n\r\n"
              b"Content-Length not a number\n")


# send() errors that mean the web server closed the connection (others are logged with theirs)
GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF)
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets (Connection.abort)
NO_LINGER = struct.pack("ii", 0, 0)
POISON = bytes(8)  # a record header of FastCGI version 0: the end of a failed response (abort)
# records of a type no request uses, for the active request: each is ignored, but a web server
# (or anyone allowed to connect) sending them by the thousand must not flood the log
IGNORED_RECORDS = Throttle(10.0)


class ProtocolError(Exception):
    """Malformed FastCGI traffic: the connection is closed, the worker lives on."""


class BodyTooLarge(ProtocolError):
    """The body outgrew --max-body while the application read it (more than its CONTENT_LENGTH
    declared, or none declared): answered 413 when no response has begun (wsgi.handle), else
    the connection is closed."""


class ConnectionLost(Exception):
    """The web server closed the connection, stalled past the read timeout, or reset it."""


class RequestAborted(Exception):
    """The web server sent FCGI_ABORT_REQUEST for the request being served."""


@dataclass
class Limits:
    read_timeout: float = 30.0
    max_params: int = 1024 * 1024  # bytes of FCGI_PARAMS per request
    max_body: int = 0  # bytes of FCGI_STDIN per request, 0 = unlimited


@dataclass
class Server:
    """What flup's streams expect at ``conn.server``, plus our own settings."""

    handler: Callable[["Request"], int]  # runs the application, returns the app status
    limits: Limits = field(default_factory=Limits)
    max_conns: int = 1
    max_reqs: int = 1
    # FCGI_GET_VALUES: how many workers there are (or may be) when asked; max_reqs without it
    pool_size: Callable[[], int] | None = None
    # read by flup's InputStream and OutputStream (its _write, which ours replaces, splits by it)
    maxwrite: int = MAX_CONTENT + flup.FCGI_HEADER_LEN
    inputStreamShrinkThreshold: int = 102400 - 8192
    on_done: Callable[["Request"], None] | None = None  # bookkeeping before the response leaves
    # the application raised SystemExit or KeyboardInterrupt (which, as text): the worker asks
    # for its replacement
    on_exit_asked: Callable[[str], None] | None = None
    # the worker is stopping (not retiring into a new generation, which takes the kept
    # connections over): a kept connection ends with the response that leaves it idle
    closing: bool = False
    # The buffer every read on this worker's connections lands in before it is copied to the
    # connection's own: one request at a time runs, and each read is copied out before the
    # next. recv() made a new bytes object of the read size for each read, freed once copied:
    # behind nginx, a 1 MiB POST made 8 brk() calls (the heap grown and given back) and the
    # page faults of fresh memory at every read, 1.2 ms of system time per request against
    # 0.4 ms with this buffer (and 3,500 against 5,400 req/s). Private anonymous memory: a
    # shared map would be one buffer for every process forked after it (workers, or an
    # application's children); its pages are only touched as far as reads fill them (a hello
    # request: one page). Made with the Server, in the worker before it serves: made on first
    # use, a failed map was reported as that connection's receive failure, and every later one.
    scratch: memoryview = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        self.scratch = memoryview(mmap.mmap(-1, RECV_BODY, flags=private))

    def capabilities(self) -> dict[bytes, bytes]:
        workers = self.pool_size() if self.pool_size is not None else None
        return {
            flup.FCGI_MAX_CONNS.encode(): str(workers * 64 if workers else self.max_conns).encode(),
            flup.FCGI_MAX_REQS.encode(): str(workers or self.max_reqs).encode(),
            flup.FCGI_MPXS_CONNS.encode(): b"0",
        }


def record_at(buf: bytearray | memoryview, pos: int, size: int) -> tuple[int, int, int, int, int] | None:
    """The record whose header is at `pos` (at least a header's length before `size`), when
    all of it is there: (type, request id, content start, content length, end), else None.
    Offsets, not content: the caller copies it once (content_of) and drops what it took from
    the buffer once, at the end. The usual request does not come here (_speedups.c)."""
    version, rtype, request_id, length, padding = HEADER.unpack_from(buf, pos)
    if version != flup.FCGI_VERSION_1:
        raise ProtocolError(f"unsupported FastCGI version {version}")
    start = pos + flup.FCGI_HEADER_LEN
    end = start + length + padding
    return None if end > size else (rtype, request_id, start, length, end)


def content_of(buf: bytearray | memoryview, start: int, length: int) -> bytes:
    """A record's content, copied once when it is large: bytes(buf[a:b]) copies twice (a
    bytearray, then bytes), which costs less than a view up to a few KiB (0.30 against 0.65 us
    for 8 bytes; 4.2 against 2.4 us for 64 KiB). The view is released before the buffer is
    resized: a bytearray with a view open refuses to change size."""
    if length <= 4096:
        return bytes(buf[start:start + length])
    with memoryview(buf) as view:
        return bytes(view[start:start + length])


END_RECORD = struct.Struct("!" + flup.FCGI_Header[1:] + flup.FCGI_EndRequestBody[1:])


SIOCINQ = 0x541B  # linux/sockios.h (= FIONREAD): bytes waiting to be read
SIOCOUTQ = 0x5411  # linux/sockios.h (= TIOCOUTQ): bytes of ours not yet sent (or acknowledged)


def readable(sock: socket.socket) -> bool:
    """Whether `sock` has input (or EOF) waiting, without waiting for it."""
    poller = select.poll()  # not select(): descriptors may be above 1024
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


TCP_INFO_LAST_DATA_RECV = 52  # offset of tcpi_last_data_recv (ms, u32) in struct tcp_info


def peer_idle(sock: socket.socket) -> float:
    """Seconds since the peer last sent data on this TCP connection, as the kernel counts it
    (TCP_INFO), so that a connection's idle time survives being handed to another process;
    0 for other sockets (a unix socket has no such count) or when the kernel cannot say."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return 0.0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return 0.0
    if len(info) < TCP_INFO_LAST_DATA_RECV + 4:
        return 0.0
    return struct.unpack_from("I", info, TCP_INFO_LAST_DATA_RECV)[0] / 1000


def queued(sock: socket.socket, which: int) -> int:
    """Bytes in one of the socket's kernel queues: SIOCINQ (waiting to be read) or SIOCOUTQ
    (ours, not yet sent); 0 when the kernel cannot say (the socket has gone)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), which, b"\0" * 4))[0]
    except OSError:
        return 0


def end_record(request_id: int, app_status: int, protocol_status: int) -> bytes:
    return END_RECORD.pack(flup.FCGI_VERSION_1, flup.FCGI_END_REQUEST, request_id, END_BODY.size, 0,
                           app_status, protocol_status)


def decode_params(data: bytes | bytearray) -> dict[str, str]:
    """Name-value pairs as WSGI wants them: native strings holding latin-1 bytes.

    The C decoder (fcgidaemon/_speedups.c) when it was built: 9.5 of the 54 us of our own
    time per kept-connection hello went to the Python loop (bench/micro.py). It takes the
    buffer as it is (no copy), and answers None when a name repeats: merged here.
    """
    if _c_decode_params is None:
        return decode_params_py(bytes(data))
    try:
        params = _c_decode_params(data)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
    if params is None:
        data = bytes(data)
        return _merged(data, data.decode("latin-1"))
    return params


def decode_params_py(data: bytes) -> dict[str, str]:
    """decode_params in Python: the fallback without a C compiler, and the reference
    tests/test_codec.py holds the C decoder to.

    Our own decoder, not flup's `decode_pair`: that one calls struct.unpack per
    length and silently truncates a pair longer than its stream; decoding the
    params was a quarter of the per-request time.  Every length is checked against
    the stream; tests/test_codec.py proves it reads what flup's `encode_pair` writes.
    """
    params: dict[str, str] = {}
    text = data.decode("latin-1")  # once; the names and values are slices of it
    pos, size, pairs = 0, len(data), 0
    try:
        while pos < size:
            pairs += 1
            n = data[pos]
            if n < 128:
                pos += 1
            else:
                n = ((n & 0x7F) << 24) | (data[pos + 1] << 16) | (data[pos + 2] << 8) | data[pos + 3]
                pos += 4
            v = data[pos]
            if v < 128:
                pos += 1
            else:
                v = ((v & 0x7F) << 24) | (data[pos + 1] << 16) | (data[pos + 2] << 8) | data[pos + 3]
                pos += 4
            middle = pos + n
            end = middle + v
            if end > size:
                raise ProtocolError("name-value pair longer than its stream")
            params[text[pos:middle]] = text[middle:end]
            pos = end
    except IndexError:
        raise ProtocolError("truncated name-value pair") from None
    if pairs != len(params):
        return _merged(data, text)
    return params


def _merged(data: bytes, text: str) -> dict[str, str]:
    """Params in which a name came more than once. nginx passes each of a repeated request
    header (two Cookie lines, or HTTP/2's cookies, which come one per field) as a param of its
    own, and the last one overwrote the rest: the application lost cookies. They are joined as
    HTTP joins them (RFC 9110 5.3; cookies with "; ", RFC 6265), as Apache does before sending;
    for any other name the last one wins (nginx configurations override SCRIPT_NAME so)."""
    params: dict[str, str] = {}
    for name, value in _pairs(data, text):
        if name in params and name.startswith("HTTP_"):
            params[name] += ("; " if name == "HTTP_COOKIE" else ", ") + value
        else:
            params[name] = value
    return params


def _pairs(data: bytes, text: str) -> Iterator[tuple[str, str]]:
    """Each pair in order (the stream was checked by decode_params, whose loop reads the
    lengths inline: a call per length was a measurable share of the request)."""
    pos, size = 0, len(data)
    while pos < size:
        n, pos = _length(data, pos)
        v, pos = _length(data, pos)
        yield text[pos:pos + n], text[pos + n:pos + n + v]
        pos += n + v


def _length(data: bytes, pos: int) -> tuple[int, int]:
    """A name or value length at `pos` (one byte, or four with the top bit set); the next pos."""
    if data[pos] < 128:
        return data[pos], pos + 1
    return int.from_bytes(data[pos:pos + 4], "big") & 0x7FFFFFFF, pos + 4


class InputStream(flup.InputStream):
    """flup's stdin stream, counting bytes against the body limit, with a `readline` of our own.

    flup's readline(size) returns a whole buffered line whatever `size` says; with size -1
    (io's "no limit") and no newline buffered yet it returns b"" and moves the read position
    back, so the next read loses bytes; and while no newline comes it copies and searches the
    whole line again for every record (a 32 MiB body without a newline: 7.8 s, against 0.23 s
    for read()). read(None) and readlines(None) raised TypeError.
    """

    def __init__(self, conn: "Connection") -> None:
        super().__init__(conn)
        self.received = 0
        self.refused = False  # answered 413 (refuse_body): drain() leaves the rest to end_request

    def read(self, size: int | None = -1) -> bytes:
        """Up to `size` bytes (None or < 0: all), waiting for them as flup's read does. A record's
        data is handed on whole when it fits, else cut once. flup's read grew its buffer by
        concatenation at every call and sliced it again: 4 to 5 copies of every byte of a body
        (a 1 MiB POST: 1 ms of CPU, bench/micro.py).

        The state is flup's: the piece being read (`_buf`, from `_pos`), the pieces received
        after it (`_bufList`), and `_avail`, the bytes of all of them together."""
        n = -1 if size is None or size < 0 else size
        while not self._eof and (n < 0 or self._avail - self._pos < n):
            self._waitForData()
        want = self._avail - self._pos if n < 0 else min(n, self._avail - self._pos)
        parts: list[tuple[bytes, int, int]] = []  # (piece, start, stop): copied once, at the end
        if want and self._pos < len(self._buf):  # the rest of the piece being read, first
            stop = min(len(self._buf), self._pos + want)
            parts.append((self._buf, self._pos, stop))
            want -= stop - self._pos
            self._pos = stop
        if want:  # then the next pieces: whole, and the start of the last one
            taken = 0
            for piece in self._bufList:
                taken += 1
                if len(piece) < want:
                    parts.append((piece, 0, len(piece)))
                    want -= len(piece)
                    continue
                parts.append((piece, 0, want))
                self._buf, self._pos = piece, want  # the last one taken is read from now on
                break
            del self._bufList[:taken]
        if self._pos == len(self._buf):  # read to its end: let it go
            self._buf, self._pos = b"", 0
        self._avail = len(self._buf) + sum(map(len, self._bufList))
        if len(parts) == 1:
            piece, start, stop = parts[0]
            return piece if start == 0 and stop == len(piece) else piece[start:stop]
        return b"".join([memoryview(piece)[start:stop] for piece, start, stop in parts])

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        """io's readlines(hint): lines until their total reaches `hint` (None or <= 0: all).
        flup's compared `0 < hint` and raised TypeError for None."""
        return super().readlines(0 if hint is None else hint)

    def readline(self, size: int | None = -1) -> bytes:
        """Up to and including the next newline, at most `size` bytes (None or < 0: no limit).
        Each byte is searched and copied once: what is taken leaves the buffer as we go."""
        limit = -1 if size is None or size < 0 else size
        parts: list[bytes] = []
        while limit != 0:
            if self._bufList:
                self._buf = self._buf[self._pos:] + b"".join(self._bufList)
                self._bufList = []
                self._avail -= self._pos
                self._pos = 0
            start = self._pos
            newline = self._buf.find(b"\n", start)
            stop = len(self._buf) if newline < 0 else newline + 1
            if limit > 0:
                stop = min(stop, start + limit)
                limit -= stop - start
            parts.append(self._buf[start:stop])
            self._pos = stop
            if (newline >= 0 and stop == newline + 1) or self._eof and self._pos == self._avail:
                break
            if limit != 0 and self._pos == self._avail:
                self._waitForData()
        self._shrinkBuffer()
        return b"".join(parts)

    def add_chunks(self, chunks: list[bytes], total: int, ended: bool) -> None:
        """Several records' contents at once (_speedups.take_stdin's), as add_data takes them
        one by one; only without --max-body, so there is no limit to count them against."""
        self.received += total
        if chunks:
            self._bufList += chunks
            self._avail += total
        if ended:
            self._eof = True

    def add_data(self, data: bytes) -> None:
        self.received += len(data)
        limit = self._conn.server.limits.max_body
        if limit and self.received > limit:
            raise BodyTooLarge(f"request body larger than {limit} bytes")
        super().add_data(data)

    @property
    def eof(self) -> bool:
        return self._eof

    def drain(self) -> None:
        """Read and drop what the application left unread, so the next record lines up."""
        if self._eof and not self._avail or self.refused:
            return  # the common GET: an empty stdin, already complete
        while not self._eof:
            self._bufList.clear()
            self._conn.process_input()
        self._bufList.clear()
        self._buf = b""
        self._pos = self._avail = 0


class OutputStream(flup.OutputStream):
    """flup's stdout/stderr stream, encoding straight into the connection's output buffer
    (flup builds a Record object per chunk and hands it to `writeRecord`)."""

    def __init__(self, conn: "Connection", req: "Request", rtype: int, buffered: bool = False) -> None:
        super().__init__(conn, req, rtype, buffered)
        # The stream keeps its request's id, not the request (flup's `_req`, read only by the
        # two methods below): a request and its stream referring to each other made every
        # request five objects of cyclic garbage, left for the cyclic collector to find and free
        # (783,000 objects collected in a micro-benchmark run, one collection per ~140 requests).
        self._req = None
        self.request_id = req.requestId

    def _write(self, data: bytes) -> None:
        self._conn.write_stream(self._type, self.request_id, data)

    def write_after(self, head: bytes, data: bytes | memoryview) -> None:
        """`head` then `data` on the stream, without joining them (a copy of the body)."""
        assert not self.closed and not self._buffered
        if head or data:
            self.dataWritten = True
            self._conn.write_stream(self._type, self.request_id, head, data)

    def close(self) -> None:
        if not self.closed and self.dataWritten:
            self.flush()
            self._conn.write_stream(self._type, self.request_id, b"")  # end of stream
            self.closed = True


class Request(flup.Request):
    """One FastCGI request: flup's Request and streams, plus the raw PARAMS stream."""

    def __init__(self, conn: "Connection", request_id: int, role: int, flags: int) -> None:
        # not flup's __init__: it builds a fourth stream, for FCGI_DATA, which only the
        # filter role uses (refused with FCGI_UNKNOWN_ROLE): FCGI_DATA records are ignored
        self._conn = conn
        self.server = conn.server
        self.requestId, self.role, self.flags = request_id, role, flags
        self.params: dict[str, str] = {}
        self.stdin = InputStream(conn)
        self.stdout = OutputStream(conn, self, flup.FCGI_STDOUT)
        self._stderr: OutputStream | None = None  # see `stderr`
        self.aborted = False
        self.params_raw = bytearray()
        self.early_input = 0  # bytes of FCGI_STDIN received before the end of the params
        self.runnable = False  # PARAMS complete: the application may start

    @property
    def stderr(self) -> OutputStream:
        """flup's FCGI_STDERR stream, made on first use: wsgi.errors goes to our log, so most
        requests never write to it."""
        if self._stderr is None:
            self._stderr = OutputStream(self._conn, self, flup.FCGI_STDERR, buffered=True)
        return self._stderr

    @property
    def keep_conn(self) -> bool:
        return bool(self.flags & flup.FCGI_KEEP_CONN)


class Connection:
    """A connection from the web server; holds at most one request at a time."""

    def __init__(self, sock: socket.socket, server: Server) -> None:
        self.sock = sock
        self.fd = sock.fileno()  # kept after close, to find our entries by it
        self.server = server
        self.inbuf = bytearray()
        self._out: list[bytes | memoryview] = []
        self._out_size = 0
        self.request: Request | None = None
        self.served = 0
        self.adopted = False  # handed over by a retiring worker: a kept connection, not a new one
        self.on_close: Callable[["Connection"], None] | None = None  # see close()
        self.keep = True  # False once a request without FCGI_KEEP_CONN was seen
        self.closed = False
        self.lost: str | None = None  # why receive() found the connection gone, if not a reset
        self.received = 0  # bytes read from the socket
        # stopping: `received` plus what waited in the kernel when the worker began to stop.
        # What came up to there is served; then the connection is let go (served_what_waited)
        self.stop_mark: int | None = None
        # the stop ended it (let_go, or its last response): its drain may end as soon as all of
        # ours has left; a refused body's drain (413) may not (closed, the web server still
        # sending its body gets a reset: 502, not the 413)
        self.let_go_by_stop = False
        self.draining = False  # answered before its body was read: reading it to the end (drain)
        self.drain_started = 0.0
        self.last_active = time.monotonic()
        self.tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        self.nodelay = not self.tcp  # set once needed
        self.sent = 0  # bytes handed to the kernel: a response counted here has (begun to) go out
        self.lingering = False  # SO_LINGER 0 is set: closed, it resets (_linger)
        # Non-blocking, with our own bounded waits: a Python socket with a timeout polls
        # before every recv and send, two extra system calls per request.
        sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    # ------------------------------------------------------------------ input

    def receive(self, flags: int = 0) -> bool:
        """Read what the socket has (it is readable, or `flags` has MSG_DONTWAIT);
        False when the peer closed. A failure other than a reset is kept in `lost`, for the
        one line the caller logs when it closes the connection."""
        try:
            got = self.sock.recv_into(self.server.scratch, RECV_FIRST, flags)
        except BlockingIOError:
            return True
        except OSError as exc:  # reset, or the web server's host gone (ETIMEDOUT, EHOSTUNREACH)
            if exc.errno != errno.ECONNRESET:
                self.lost = f"receive failed: {exc.strerror or exc}"
            return False
        if not got:
            return False
        self.inbuf += self.server.scratch[:got]
        self.received += got
        self.last_active = time.monotonic()
        return True

    def _wait(self, event: int, what: str) -> None:
        """Wait up to the read timeout for the socket to be readable or writable."""
        poller = select.poll()
        poller.register(self.sock, event)
        if not poller.poll(self.server.limits.read_timeout * 1000):
            raise ConnectionLost(f"{what} for {self.server.limits.read_timeout:g}s")

    def _recv_blocking(self) -> int:
        """One read into the worker's scratch buffer, waiting (bounded) for it; the bytes read."""
        while True:
            try:
                got = self.sock.recv_into(self.server.scratch)
                break
            except BlockingIOError:
                # What is ready of the response leaves before we wait: an application that
                # answers without reading the body had it held until the whole body was in.
                self.flush()
                self._wait(select.POLLIN, "no input")
            except OSError as exc:
                raise ConnectionLost(f"receive failed: {exc.strerror or exc}") from None
        if not got:
            raise ConnectionLost("web server closed the connection in the middle of a request")
        self.received += got
        return got

    def parse_available(self) -> None:
        """Handle the buffered records until a request is ready to run or the buffer runs dry.
        Records are read at an offset and the consumed bytes dropped once, at the end."""
        if self.draining:
            self.inbuf.clear()
            return
        if self.request is None and _c_scan_request is not None and not self.closed:
            found = _c_scan_request(self.inbuf, self.server.limits.max_params)
            if found is not None:  # the usual request, whole: taken in one step (_speedups.c)
                self._scanned(*found)
                return
        buf, pos, size = self.inbuf, 0, len(self.inbuf)
        try:
            while size - pos >= flup.FCGI_HEADER_LEN and not self.closed and not self.draining:
                req = self.request
                if req is not None and req.runnable:
                    pos = self._take_stdin_end(req, pos)
                    return
                rec = record_at(buf, pos, size)
                if rec is None:
                    return
                rtype, request_id, start, length, pos = rec
                self._dispatch(rtype, request_id, content_of(buf, start, length))
        finally:
            if pos:
                del buf[:pos]

    def _scanned(self, request_id: int, flags: int, params: dict[str, str], end: int,
                 stdin_done: bool) -> None:
        """What the record loop below makes of a responder's BEGIN_REQUEST, its whole PARAMS
        stream and (`stdin_done`) an empty STDIN, which scan_request found at the buffer's
        start, up to `end`."""
        req = Request(self, request_id, flup.FCGI_RESPONDER, flags)
        self._open(req)
        req.params = params
        req.runnable = True
        if stdin_done:
            req.stdin.add_data(b"")
        del self.inbuf[:end]

    def _take_stdin_end(self, req: Request, pos: int) -> int:
        """A runnable request's empty STDIN record (the end of its body: a GET's whole body)
        when it is already buffered at `pos`: taken now, the request's input is complete and
        drain() after the application returns at once, without a trip through
        process_input(). Anything else stays for the application to read. The offset after."""
        if req.stdin.eof:
            return pos
        version, rtype, request_id, length, padding = HEADER.unpack_from(self.inbuf, pos)
        end = pos + flup.FCGI_HEADER_LEN + padding
        if (rtype != flup.FCGI_STDIN or length or request_id != req.requestId
                or version != flup.FCGI_VERSION_1 or end > len(self.inbuf)):
            return pos
        req.stdin.add_data(b"")
        return end

    def process_input(self) -> None:
        """Called by flup's InputStream: wait (bounded) for more of the current request's input."""
        req = self.request
        assert req is not None
        if req.aborted:  # read again after the abort it was told of: no more input will come
            raise RequestAborted(f"request {req.requestId} aborted by the web server")
        while not self._take_input(req):
            if self._read_input(req):
                return

    def _read_input(self, req: Request) -> bool:
        """Read once, and take the records of that read straight from the scratch buffer;
        whether any of `req`'s body came. Only a record begun in an earlier read (completed
        first, in `inbuf`), the start of one this read cut, and what follows the body's end
        are copied to `inbuf`. Copied there whole, as before, a 1 MiB POST grew `inbuf` by each
        256 KiB read and shrank it again: with the bytes objects recv() made, 8 brk() calls a
        request and the page faults of fresh memory (1.2 ms of system time behind nginx)."""
        got = self._recv_blocking()
        data = self.server.scratch[:got]
        moved = self._complete_record(data) if self.inbuf else 0
        if moved:
            try:
                body = self._take_input(req)
            except BaseException:
                self._keep_rest(data, moved)  # for the connection's next request, if it serves on
                raise
            if self.inbuf or body and (req.stdin.eof or self.server.limits.max_body):
                # the record is still not whole (all of this read moved), or it was the body's
                # end (what follows is the next request's) or its one record (--max-body)
                self._keep_rest(data, moved)
                return body
            return self._take_input(req, data[moved:]) or body
        return self._take_input(req, data)

    def _complete_record(self, data: memoryview) -> int:
        """`inbuf` holds the start of a record: as much of `data` is moved there as completes it
        (all of it, when that is not enough); how much was moved."""
        moved = max(0, min(flup.FCGI_HEADER_LEN - len(self.inbuf), len(data)))
        self.inbuf += data[:moved]
        if len(self.inbuf) < flup.FCGI_HEADER_LEN:
            return moved
        _, _, _, length, padding = HEADER.unpack_from(self.inbuf)
        more = min(flup.FCGI_HEADER_LEN + length + padding - len(self.inbuf), len(data) - moved)
        self.inbuf += data[moved:moved + more]
        return moved + more

    def _keep_rest(self, data: memoryview, taken: int) -> None:
        """What of `data` was not taken waits in `inbuf`, after what is there."""
        if taken < len(data) and not self.closed:
            self.inbuf += data[taken:]

    def _take_input(self, req: Request, data: memoryview | None = None) -> bool:
        """Handle the complete records buffered (or in `data`, fresh from the scratch buffer:
        what is not taken of it is kept in `inbuf`), up to the end of `req`'s body; whether any
        of its body came. Taken at an offset and dropped from the buffer once: dropped record by
        record, the rest of a 256 KiB read moved down after each 64 KiB record. With --max-body,
        one record of body at a time: a body is refused when the application reads past the
        limit, not when more of it happens to be buffered than it asked for. Without it, an
        abort buffered behind body records ends the read that would have returned them (the
        web server has given up on the response either way)."""
        buf = self.inbuf if data is None else data
        pos, size = 0, len(buf)
        one = bool(self.server.limits.max_body)
        fast = _c_take_stdin is not None and not one  # runs of body records, taken in C
        body = False
        try:
            while size - pos >= flup.FCGI_HEADER_LEN and not self.closed:
                if fast:
                    found = _c_take_stdin(buf, pos, size, req.requestId)
                    if found is not None:
                        chunks, total, pos, ended = found
                        req.stdin.add_chunks(chunks, total, ended)
                        body = True
                        if ended:  # what follows is the next request's
                            break
                        continue
                rec = record_at(buf, pos, size)
                if rec is None:
                    break
                rtype, request_id, start, length, pos = rec
                self._dispatch(rtype, request_id, content_of(buf, start, length))
                if req.aborted:
                    raise RequestAborted(f"request {req.requestId} aborted by the web server")
                if request_id == req.requestId and rtype == flup.FCGI_STDIN:
                    body = True
                    if one or not length:  # at its end, what follows is the next request's
                        break
        finally:
            if data is not None:
                self._keep_rest(data, pos)
            elif pos:
                del buf[:pos]
        return body

    @property
    def has_partial_input(self) -> bool:
        """Bytes of an unfinished record or request are buffered here (not in the kernel), or
        an answered request's body is still coming (draining)."""
        return bool(self.inbuf) or self.request is not None or self.draining

    def _dispatch(self, rtype: int, request_id: int, content: bytes) -> None:
        if request_id == flup.FCGI_NULL_REQUEST_ID:
            self._management(rtype, content)
            return
        if rtype == flup.FCGI_BEGIN_REQUEST:
            self._begin(request_id, content)
            return
        req = self.request
        if req is None or request_id != req.requestId:
            return  # records for a request that is not active are ignored (spec 3.3)
        if rtype == flup.FCGI_PARAMS:
            self._params(req, content)
        elif rtype == flup.FCGI_STDIN:
            if not req.runnable:
                self._early_input(req, len(content))
            req.stdin.add_data(content)
        elif rtype == flup.FCGI_ABORT_REQUEST:
            req.aborted = True
            if not req.runnable:
                self.end_request(req, 0)
        else:  # FCGI_DATA too: a responder has no data stream (buffered, it grew without bound)
            count = IGNORED_RECORDS.due()
            if count:
                log.warning("ignoring FastCGI record of type %d for request %d (%d such record(s) "
                            "since the last such line)", rtype, request_id, count)

    def _management(self, rtype: int, content: bytes) -> None:
        if rtype == flup.FCGI_GET_VALUES:
            caps = self.server.capabilities()
            wanted = decode_params(content)
            answer = b"".join(flup.encode_pair(name.encode("latin-1"), caps[name.encode("latin-1")])
                              for name in wanted if name.encode("latin-1") in caps)
            self.write_stream(flup.FCGI_GET_VALUES_RESULT, 0, answer)
        else:
            self.write_stream(flup.FCGI_UNKNOWN_TYPE, 0, UNKNOWN_BODY.pack(rtype))
        self._send_answer("management records")

    def _send_answer(self, to: str) -> None:
        """Send an answer to a record that is not part of a response: one no request waits
        for, sent without waiting unless a running request keeps the worker busy anyway."""
        if self.request is not None and self.request.runnable:  # the worker is busy with it,
            self.flush()  # and --timeout bounds that (a request still in its params is not)
        elif not self._send_now():
            # Between requests the worker is idle to the manager (no --timeout), and a blocking
            # send held it for --read-timeout per stall while the peer sent records it never
            # read (400,000 unknown types: other clients waited 5.5 s of a 6 s timeout, again
            # at each stall). nginx and Apache send none; a peer that asks reads the answer.
            raise ProtocolError(f"the peer does not read the answers to its {to}")

    def _begin(self, request_id: int, content: bytes) -> None:
        if len(content) != BEGIN_BODY.size:
            raise ProtocolError(f"BEGIN_REQUEST body of {len(content)} bytes")
        role, flags = BEGIN_BODY.unpack(content)
        if self.request is not None:
            if request_id == self.request.requestId:  # refusing it would end the active one
                raise ProtocolError(f"BEGIN_REQUEST for request {request_id}, already active")
            self._append(end_record(request_id, 0, flup.FCGI_CANT_MPX_CONN))
            self._send_answer("second requests")  # the first may still be in its params
            return
        req = Request(self, request_id, role, flags)
        self._open(req)
        if role != flup.FCGI_RESPONDER:
            self.end_request(req, 0, flup.FCGI_UNKNOWN_ROLE)

    def _open(self, req: Request) -> None:
        """`req` becomes the connection's request."""
        self.keep = req.keep_conn
        if self.keep and not self.nodelay:
            # kept connection: without TCP_NODELAY each response waits for a delayed ACK
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.nodelay = True
        self.request = req

    def _early_input(self, req: Request, size: int) -> None:
        """Body sent before the end of the params is buffered until the application runs:
        bounded by --max-params as the params are (400 MiB of it held a worker's memory)."""
        req.early_input += size
        if req.early_input > self.server.limits.max_params:
            raise ProtocolError(f"more than {self.server.limits.max_params} bytes of FCGI_STDIN "
                                f"before the end of the params")

    def _params(self, req: Request, content: bytes) -> None:
        if req.runnable:
            raise ProtocolError("FCGI_PARAMS after the end of the params stream")
        if content:
            req.params_raw += content
            if len(req.params_raw) > self.server.limits.max_params:
                raise ProtocolError(f"params larger than {self.server.limits.max_params} bytes")
            return
        req.params = decode_params(req.params_raw)
        req.params_raw = bytearray()
        req.runnable = True

    # ------------------------------------------------------------------ running

    def run_request(self) -> None:
        """Run the runnable request to the end: application, unread input, END_REQUEST."""
        req = self.request
        assert req is not None and req.runnable
        if self._too_large(req):
            return
        try:
            app_status = self.server.handler(req)
        except RequestAborted as exc:
            self._aborted(req, exc)
            return
        if self.request is not req:  # the handler ended or dropped it
            return
        if req.aborted:
            # The application caught the RequestAborted its read raised (a "bad body -> 400"
            # handler catches every exception) and returned: the web server sends no more input
            # and waits for END_REQUEST. drain() waited for the rest of the body instead, for
            # --read-timeout, holding the worker, then reset the kept connection.
            self._aborted(req, RequestAborted(f"request {req.requestId} aborted by the web server"))
            return
        try:
            req.stdin.drain()
        except RequestAborted as exc:
            self._aborted(req, exc)
            return
        except BodyTooLarge as exc:  # in the drain: the application has answered what it read
            log.warning("%s (--max-body), after the application's answer: %s", exc,
                        req.params.get("REQUEST_URI", ""))
            req.flags &= ~flup.FCGI_KEEP_CONN  # the rest is read and thrown away, then closed
        self.end_request(req, app_status)

    def _aborted(self, req: Request, exc: RequestAborted) -> None:
        """FCGI_ABORT_REQUEST while the request's body was being read: what is not sent of the
        response is dropped and END_REQUEST ends it (spec 5.4), so a kept connection serves on;
        closed instead, the web server lost the connection it meant to reuse."""
        log.info("%s; response ended", exc)
        if self.request is not req or self.closed:
            return
        self.discard_output()
        req.stdout.closed = True  # no end-of-stream record: the response was abandoned
        self.end_request(req, 0)

    def _too_large(self, req: Request) -> bool:
        """Answer 413 without running the application, and close: the body is not parsed, only
        read and thrown away (end_request)."""
        limit = self.server.limits.max_body
        if not limit:  # the length is the application's to read (and to judge)
            return False
        try:
            declared = int(req.params.get("CONTENT_LENGTH") or 0)
        except ValueError:  # its size cannot be judged: refused, answered (not dropped)
            log.warning("request with CONTENT_LENGTH %r refused (--max-body needs a number): %s",
                        req.params.get("CONTENT_LENGTH"), req.params.get("REQUEST_URI", ""))
            answer = BAD_LENGTH
        else:
            if declared <= limit:
                return False
            log.warning("request body of %d bytes refused (--max-body %d): %s", declared, limit,
                        req.params.get("REQUEST_URI", ""))
            answer = TOO_LARGE
        req.flags &= ~flup.FCGI_KEEP_CONN
        req.stdout.write(answer)
        self.end_request(req, 0)
        return True

    def refuse_body(self, req: Request, exc: BodyTooLarge) -> None:
        """The body outgrew --max-body while the application read it, before any response: the
        413 replaces what it had buffered, and the connection ends after it (end_request reads
        the rest and throws it away). Closed at once instead, the web server still sending got
        a reset: its client a 502, not the 413."""
        log.warning("%s (--max-body; CONTENT_LENGTH %s): %s; answered 413", exc,
                    req.params.get("CONTENT_LENGTH") or "none", req.params.get("REQUEST_URI", ""))
        self.discard_output()
        req.stdout.dataWritten = False
        req.flags &= ~flup.FCGI_KEEP_CONN
        req.stdin.refused = True
        req.stdout.write(TOO_LARGE)

    def end_request(self, req: Request, app_status: int,
                    protocol_status: int = flup.FCGI_REQUEST_COMPLETE) -> None:
        """Close the streams, send END_REQUEST with everything buffered in one send.

        On a TCP connection the web server did not keep, the response's last segment and the
        connection's end (FIN) go out together: the send says more is coming (MSG_MORE) and
        shutdown() sends both. One segment fewer for both ends to process per request (8 us
        less of our CPU per request behind Apache without enablereuse, 5 us behind nginx).
        shutdown(), not close(): close() ends nothing while another process holds the socket
        (a child the application forked), and the held segment then waited 200 ms."""
        if protocol_status == flup.FCGI_REQUEST_COMPLETE:
            req.stdout.close()
            if req._stderr is not None:
                req._stderr.close()
        self._append(end_record(req.requestId, app_status, protocol_status))
        if self.server.on_done is not None:
            self.server.on_done(req)  # counted before the web server can see the response
        # Stopping, a kept connection ends with the response that serves the last of what had
        # come when the stop began: its FIN leaves with END_REQUEST (MSG_MORE, then shutdown),
        # so a web server checking it before reuse finds it closed. Closed at the worker's next
        # turn instead, one that reused it at once met the close mid-request (Apache's
        # enablereuse does not retry: 503); and a peer that pipelines gets what it had sent,
        # not every request it goes on sending (a stop waited for --graceful-timeout's SIGKILL).
        last = not req.keep_conn or (self.server.closing and self.served_what_waited())
        if self.lingering:  # the response is whole: its end is a FIN again
            self._linger(False)
        if req.runnable:
            self.flush(more=last and self.tcp, final=True)
        else:  # ended before it ran (aborted in its params, a role we do not play): the worker
            self._send_answer("requests ended before they ran")  # is idle to the manager

        self.request = None
        self.served += 1
        self.last_active = time.monotonic()
        if last:
            # unread input (the body, or requests sent after the stop began): closed, the
            # kernel would answer it with a reset, dropping what of the response is still unsent
            unread = not req.stdin.eof or (self.server.closing and readable(self.sock))
            self.let_go_by_stop = req.keep_conn and req.stdin.eof  # kept until the stop ended it
            if (self.tcp or unread) and not self.closed:
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                except OSError as exc:  # the web server has gone: close() follows all the same
                    log.debug("shutdown failed: %s", exc)
                    unread = False
            if unread and not self.closed:
                self._drain_then_close()
            else:
                self.close()

    def served_what_waited(self) -> bool:
        """Stopping: whether everything that had come when the stop began (buffered, or in the
        kernel) has been taken; marked at the first call."""
        if self.stop_mark is None:
            self.stop_mark = self.received + queued(self.sock, SIOCINQ)
        return self.received - len(self.inbuf) >= self.stop_mark

    def let_go(self) -> None:
        """Stopping, between requests: close, as a FIN. Input that came after the stop began is
        read and thrown away (drain) rather than left unread: closed with unread input, the
        kernel sends a reset and drops what of the last response is still unsent (a 16 MiB
        response cut at 13 MB, with nothing logged)."""
        if self.closed:
            return
        if not readable(self.sock):
            self.end()
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            log.debug("shutdown failed: %s", exc)
            self.close()
            return
        self.let_go_by_stop = True
        self._drain_then_close()

    def output_sent(self) -> bool:
        """Whether the kernel holds none of our output unsent (SIOCOUTQ): closing with unread
        input then drops nothing of ours."""
        return queued(self.sock, SIOCOUTQ) == 0

    def _drain_then_close(self) -> None:
        """The request was answered before its body was read (413, an abort, an unknown role)
        and the web server may still be sending it. Closed now, with the body unread, the
        kernel answers with a reset, and a web server still writing fails: behind nginx a
        20 MB POST refused by --max-body 1k got 502, not 413. So the response has gone and
        the FIN with it (shutdown); what arrives is read and thrown away until the web server
        closes its end, or for at most DRAIN_LIMIT (the worker's sweep), as Apache's own
        lingering close does. The worker serves others meanwhile."""
        self.draining = True  # parse_available() stops, and from now on throws input away
        self.drain_started = time.monotonic()

    # ------------------------------------------------------------------ output

    def write_stream(self, rtype: int, request_id: int, data: bytes,
                     body: bytes | memoryview = b"") -> None:
        """`data` (then `body`, if any: a response's head, then the start of its body) as
        records of `rtype` (a stream's, or one management record); empty `data` gives one empty
        record, a stream's end. The pieces are kept as they are, not joined: flush() hands them
        to the kernel in one sendmsg(). On a closed connection it raises: an application that
        swallowed the error of a failed send and wrote on had every later write kept in memory
        (400 MiB of an export loop, measured), with no error to stop it."""
        if self.closed:
            raise ConnectionLost(self.lost or "the connection to the web server is closed")
        size = len(data) + len(body)
        if size <= MAX_CONTENT:  # one record: the usual case
            header = HEADER.pack(flup.FCGI_VERSION_1, rtype, request_id, size, 0)
            self._out += (header, data, body) if body else (header, data)
            self._out_size += size + flup.FCGI_HEADER_LEN
        elif len(data) < MAX_CONTENT and body:  # the head, and as much body as fits with it
            first = MAX_CONTENT - len(data)
            view = memoryview(body)
            self._out += (HEADER.pack(flup.FCGI_VERSION_1, rtype, request_id, MAX_CONTENT, 0), data,
                          view[:first])
            self._out_size += flup.FCGI_HEADER_LEN + MAX_CONTENT
            self._records(rtype, request_id, view[first:])
        else:
            whole = (bytes(data) + bytes(body)) if body else data  # a head of 64 KiB or more
            self._records(rtype, request_id, memoryview(whole))
        if self._out_size >= FLUSH_AT:
            self.flush()

    def _records(self, rtype: int, request_id: int, view: memoryview) -> None:
        for pos in range(0, len(view), MAX_CONTENT):
            chunk = view[pos:pos + MAX_CONTENT]
            self._out += (HEADER.pack(flup.FCGI_VERSION_1, rtype, request_id, len(chunk), 0), chunk)
            self._out_size += flup.FCGI_HEADER_LEN + len(chunk)

    def _append(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionLost(self.lost or "the connection to the web server is closed")
        self._out.append(data)
        self._out_size += len(data)
        if self._out_size >= FLUSH_AT:
            self.flush()

    def discard_output(self) -> None:
        self._out.clear()
        self._out_size = 0

    def flush(self, more: bool = False, final: bool = False) -> None:
        """Send what is buffered; `more`: the connection ends right after (see end_request);
        `final`: this is the request's end (END_REQUEST is in it)."""
        if not self._out or self.closed:
            return
        if not final and not self.lingering and self.tcp and self.request is not None \
                and not self.request.keep_conn:
            self._linger(True)
        pieces, size = self._out, self._out_size
        self._out, self._out_size = [], 0
        self.sent += size
        try:
            self._send_pieces(pieces, size, socket.MSG_MORE if more else 0)
        except (OSError, ConnectionLost) as exc:
            # Closed at once: the send may have stopped inside a record, and an application
            # that swallows the error and writes on would put bytes after the cut record,
            # which the web server reads as its rest, and the rest of the stream as garbage
            # headers. Closed, later writes go nowhere and the worker drops the connection;
            # the line is logged here, as the application may never let the error through.
            if isinstance(exc, ConnectionLost):
                lost = exc
            elif exc.errno in GONE:
                lost = ConnectionLost("web server closed the connection during the response")
            else:
                lost = ConnectionLost(f"send failed: {exc.strerror or exc}")
            # A reset on TCP, the request's last send too (end_request had turned it off, the
            # response then whole): with a FIN, a web server without kept connections read what
            # had arrived before a stall as the whole response.
            log.info("connection closed: %s", lost)
            if self.tcp and not self.lingering:
                self._linger(True)
            self.close()
            raise lost from None

    @property
    def between_requests(self) -> bool:
        """A kept connection waiting for its next request (not a new one waiting for its first)."""
        return (self.served > 0 or self.adopted) and not self.has_partial_input

    def _linger(self, reset: bool) -> None:
        """While part of a response has gone out on a connection the web server did not keep,
        the connection's end is a reset, whoever ends it: a worker killed mid-response (by
        --timeout, or at --graceful-timeout) had the kernel close it with a FIN, which nginx
        without fastcgi_keep_conn read as the response's end (20,000 of 40,000 bytes as a
        complete chunked body). Two system calls, only for a response sent in parts."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET if reset else NO_LINGER)
            self.lingering = reset
        except OSError as exc:
            log.debug("SO_LINGER failed: %s", exc)

    def abort(self) -> None:
        """Close so that the web server sees the response fail, not end: a reset on TCP.
        A FIN after part of a response read as its end to nginx without fastcgi_keep_conn,
        which then gave its client that part as the whole response (a complete chunked body,
        or with the application's Content-Length, the next response read as its rest).
        With SO_LINGER 0, close() sends a reset and drops what is still unsent. A unix socket
        has no reset: there a record header no FastCGI peer accepts (version 0) goes last, and
        the web server fails the response on it (nginx: "upstream sent unsupported FastCGI
        protocol version: 0"; Apache: AH01068) instead of ending it."""
        if self.closed:
            return
        self.discard_output()  # what is not sent of a failed response is dropped
        try:
            if self.tcp:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            else:  # behind the response's last bytes: a full buffer (a slow reader) waits, as
                self._send_all(POISON)  # any write does, up to --read-timeout
        except OSError as exc:  # the web server has gone: nobody to tell
            log.debug("cannot mark the response failed: %s", exc)
        except ConnectionLost as exc:  # it stopped reading: it ends as it can
            log.info("cannot mark the response failed for the web server: %s", exc)
        self.close()

    def _send_now(self) -> bool:
        """Send what is buffered without waiting; False when the socket did not take it all
        (the caller closes the connection: what is left is not kept for later)."""
        data = b"".join(self._out)
        self.discard_output()
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            return False
        except OSError as exc:
            self.close()
            raise ConnectionLost(f"send failed: {exc.strerror or exc}") from None
        self.sent += sent
        return sent == len(data)

    def _send_pieces(self, pieces: list[bytes | memoryview], size: int, flags: int) -> None:
        """All of `pieces` (`size` bytes), in one sendmsg() when the kernel takes them: joined
        first, a 64 KiB response was copied once more in our process before the kernel copied
        it. What a send leaves (a full socket buffer) is joined and sent as before; so are
        more pieces than one call may take (IOV_MAX is 1024)."""
        if len(pieces) == 1 or len(pieces) > MAX_PIECES:
            self._send_all(pieces[0] if len(pieces) == 1 else b"".join(pieces), flags)
            return
        try:
            sent = self.sock.sendmsg(pieces, (), flags)
        except BlockingIOError:
            sent = 0
        if sent < size:
            self._send_all(memoryview(b"".join(pieces))[sent:], flags)

    def _send_all(self, data: bytes | memoryview, flags: int = 0) -> None:
        """All of `data`, waiting (up to the read timeout) while the web server does not read."""
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view, flags):]
            except BlockingIOError:
                self._wait(select.POLLOUT, "web server stopped reading the response")

    def end(self) -> None:
        """Close an idle connection as a FIN that leaves now: shutdown() first. close() alone
        ends nothing while another process holds the socket (a child the application forked
        in another request inherits every connection open then): a kept connection closed for
        --keep-conn-idle or a stop stayed open under the web server, whose next request on it
        waited for an answer that could not come, for as long as the child lived."""
        if not self.closed:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError as exc:  # the peer has gone: close() follows all the same
                log.debug("shutdown failed: %s", exc)
        self.close()

    def close(self) -> None:
        """Close the socket, after `on_close`: the worker takes it out of its epoll set first.
        Closing our descriptor does not do that while another process holds the same open file
        (a child the application forked): the closed connection stayed in the set, and once the
        web server closed its end, level-triggered EPOLLIN woke the worker at every wait (a full
        core until the child exited)."""
        if self.closed:
            return
        self.closed = True
        self.discard_output()
        if self.on_close is not None:
            self.on_close(self)
        try:
            self.sock.close()
        except OSError as exc:
            log.debug("close failed: %s", exc)
        # a request and its connection refer to each other: without this, a dropped request's
        # buffered input stayed until the cyclic garbage collector ran
        self.request = None
        self.inbuf.clear()

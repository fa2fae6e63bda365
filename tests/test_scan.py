"""The C scan of a request's first records (scan_request in fcgidaemon/_speedups.c) changes
nothing but speed: for any bytes, Connection.parse_available leaves the connection exactly as
its record-by-record Python loop does (the reference, run here with the scan switched off).

The scan only ever takes the usual case whole (a responder's BEGIN_REQUEST, its PARAMS, the
empty STDIN) and answers None for anything else; these tests check both halves: that it is
taken for what nginx and Apache send, and that whatever it takes, or leaves, ends the same.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from typing import Any, Iterator

import pytest
from flup.server.fcgi_base import encode_pair
from hypothesis import given, settings
from hypothesis import strategies as st

from fcgidaemon import fastcgi
from fcgidaemon.config import parse_params_size
from fcgidaemon.fastcgi import Connection, Limits, Server

BEGIN, PARAMS, STDIN, ABORT = 1, 4, 5, 2


def record(rtype: int, content: bytes = b"", request_id: int = 1, padding: int | None = None,
           version: int = 1) -> bytes:
    pad = -len(content) & 7 if padding is None else padding
    return struct.pack("!BBHHBx", version, rtype, request_id, len(content), pad) + content + bytes(pad)


def begin(request_id: int = 1, role: int = 1, flags: int = 0) -> bytes:
    return record(BEGIN, struct.pack("!HB5x", role, flags), request_id)


NGINX = {"QUERY_STRING": "", "REQUEST_METHOD": "GET", "CONTENT_TYPE": "", "CONTENT_LENGTH": "",
         "SCRIPT_NAME": "/hello", "REQUEST_URI": "/hello", "DOCUMENT_URI": "/hello",
         "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1", "SERVER_PORT": "8080"}
PAIRS = b"".join(encode_pair(k.encode(), v.encode()) for k, v in NGINX.items())


def usual(flags: int = 0, request_id: int = 1) -> bytes:
    return (begin(request_id, flags=flags) + record(PARAMS, PAIRS, request_id)
            + record(PARAMS, b"", request_id) + record(STDIN, b"", request_id))


@contextlib.contextmanager
def connection(c_function: str, on: bool, limits: Limits | None = None
               ) -> Iterator[tuple[Connection, socket.socket]]:
    """A Connection on a socketpair, and its peer (non-blocking), with fastcgi's C function
    `c_function` switched off unless `on`: the Python path is the reference."""
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    saved = getattr(fastcgi, c_function)
    if not on:
        setattr(fastcgi, c_function, None)
    try:
        yield Connection(ours, Server(lambda req: 0, limits or Limits())), peer
    finally:
        setattr(fastcgi, c_function, saved)
        ours.close()
        peer.close()


def outcome(data: bytes, scan: bool, max_params: int = 1 << 20) -> dict[str, Any]:
    """Everything parse_available leaves behind for `data`, with or without the C scan."""
    with connection("_c_scan_request", scan, Limits(max_params=max_params)) as (conn, peer):
        conn.inbuf += data
        try:
            conn.parse_available()
            error = None
        except Exception as exc:  # noqa: BLE001 - compared, not swallowed
            error = (type(exc).__name__, str(exc))
        req = conn.request
        return {
            "error": error, "inbuf": bytes(conn.inbuf), "closed": conn.closed, "keep": conn.keep,
            "draining": conn.draining, "out": b"".join(conn._out), "answered": answered(peer),
            "request": None if req is None else (
                req.requestId, req.role, req.flags, req.params, req.runnable, req.stdin.eof,
                bytes(req.params_raw), req.aborted, req.stdin.received),
        }


def answered(peer: socket.socket) -> bytes:
    """What the connection has sent its peer (a non-blocking socket) so far."""
    try:
        return peer.recv(65536)
    except BlockingIOError:
        return b""


@pytest.mark.parametrize("name", ["scan_request", "take_stdin"])
def test_the_c_functions_are_built(name):
    from fcgidaemon import _speedups

    assert getattr(fastcgi, f"_c_{name}") is getattr(_speedups, name)


@pytest.mark.parametrize("data", [
    usual(),
    usual(flags=1),  # nginx fastcgi_keep_conn, Apache enablereuse
    usual(request_id=65535),
    # params in three records, with odd padding
    begin() + record(PARAMS, PAIRS[:5], padding=0) + record(PARAMS, PAIRS[5:300], padding=255)
    + record(PARAMS, PAIRS[300:]) + record(PARAMS, b"") + record(STDIN, b""),
    begin() + record(PARAMS, PAIRS) + record(PARAMS, b""),  # the body's end not here yet
    begin() + record(PARAMS, b""),  # no params at all
], ids=["usual", "keep-conn", "id-65535", "split-params", "no-stdin-yet", "empty-params"])
def test_the_usual_request_is_scanned(data):
    found = fastcgi._c_scan_request(bytearray(data), 1 << 20)
    assert found is not None
    assert outcome(data, scan=True) == outcome(data, scan=False)


@pytest.mark.parametrize("data", [
    usual()[:-1],  # the STDIN record cut short: the scan takes the rest, leaves it
    begin(role=2) + record(PARAMS, b"") + record(STDIN, b""),  # an authorizer
    begin() + record(PARAMS, b"\x05\x05abc") + record(PARAMS, b""),  # a pair past its stream
    begin() + record(PARAMS, PAIRS + PAIRS) + record(PARAMS, b""),  # repeated names
    record(9, b"", 0) + usual(),  # a management record first
    begin() + record(PARAMS, PAIRS, request_id=2) + record(PARAMS, b""),  # another request's
    begin() + record(PARAMS, PAIRS, version=2) + record(PARAMS, b""),
    begin() + record(ABORT) + record(PARAMS, b""),
    begin() + record(STDIN, b"early") + record(PARAMS, PAIRS) + record(PARAMS, b""),
    begin(request_id=0) + record(PARAMS, b"", 0),
    record(BEGIN, b"\x00\x01\x00", 1) + record(PARAMS, b""),  # a short BEGIN body
    begin() + record(PARAMS, PAIRS) + record(PARAMS, b"") + record(STDIN, b"body"),
    begin() + record(PARAMS, PAIRS) + record(PARAMS, b"") + record(STDIN, b"", 2),
    begin() + record(PARAMS, PAIRS) + record(PARAMS, b"") + record(STDIN, b"", version=2),
])
def test_what_the_scan_leaves_ends_the_same(data):
    assert outcome(data, scan=True) == outcome(data, scan=False)


def test_params_over_the_limit_end_the_same():
    data = usual()
    for limit in (0, len(PAIRS) - 1, len(PAIRS), len(PAIRS) + 1):
        assert outcome(data, True, limit) == outcome(data, False, limit), limit


@pytest.mark.parametrize("limit", [parse_params_size("1e30"), 2 ** 63, 2 ** 63 - 1, -1, -(10 ** 30)])
def test_any_params_limit_ends_the_same(limit):
    """--max-params takes sizes past a C integer's range (1e30 is accepted): the scan raised
    OverflowError for them, and the worker closed every connection with an internal error."""
    found = outcome(usual(), True, limit)
    assert found == outcome(usual(), False, limit)
    assert (found["error"] is None) == (limit > 0), found["error"]


pieces = st.one_of(
    st.builds(begin, st.sampled_from([0, 1, 2, 65535]), st.sampled_from([1, 1, 1, 2, 3, 256]),
              st.integers(0, 255)),
    st.builds(lambda c, i, p: record(PARAMS, c, i, p), st.sampled_from([PAIRS, PAIRS[:40], b""]),
              st.sampled_from([1, 1, 1, 2]), st.sampled_from([None, 0, 7])),
    st.builds(lambda c, i: record(STDIN, c, i), st.sampled_from([b"", b"", b"x"]), st.sampled_from([1, 2])),
    st.builds(record, st.integers(0, 12), st.binary(max_size=20), st.sampled_from([0, 1]),
              st.sampled_from([None, 0, 3]), st.sampled_from([1, 1, 0, 2])),
)


@settings(max_examples=1500, deadline=None)
@given(parts=st.lists(pieces, max_size=7), prefix=st.booleans(),
       cut=st.one_of(st.none(), st.integers(0, 2000)),
       flip=st.one_of(st.none(), st.tuples(st.integers(0, 2000), st.integers(0, 7))))
def test_any_records_end_the_same(parts, prefix, cut, flip):
    """Records in any order and mix, whole, cut short anywhere, or with one bit flipped."""
    data = bytearray((begin() + record(PARAMS, PAIRS) + record(PARAMS, b"") if prefix else b"")
                     + b"".join(parts))
    if flip is not None and data:
        data[flip[0] % len(data)] ^= 1 << flip[1]
    if cut is not None:
        data = data[:len(data) - cut % (len(data) + 1)]
    assert outcome(bytes(data), scan=True) == outcome(bytes(data), scan=False)


# ---------------------------------------------------------------- a body's records (take_stdin)

def body_outcome(data: bytes, fast: bool, scratch: bool) -> dict[str, Any]:
    """What Connection._take_input leaves for `data` arriving while the application reads the
    body of request 1 (in the connection's buffer, or fresh in a read's scratch buffer), with
    runs of body records taken in C (take_stdin) or record by record in Python."""
    with connection("_c_take_stdin", fast) as (conn, peer):
        conn.inbuf += begin() + record(PARAMS, PAIRS) + record(PARAMS, b"")
        conn.parse_available()
        req = conn.request
        assert req is not None and req.runnable
        if not scratch:
            conn.inbuf += data
        try:
            body = conn._take_input(req, memoryview(data) if scratch else None)
            error = None
        except Exception as exc:  # noqa: BLE001 - compared, not swallowed
            body, error = None, (type(exc).__name__, str(exc))
        stdin = req.stdin
        return {"body": body, "error": error, "inbuf": bytes(conn.inbuf), "closed": conn.closed,
                "out": b"".join(conn._out), "answered": answered(peer), "aborted": req.aborted,
                "stdin": (b"".join(stdin._bufList), stdin._avail, stdin.eof, stdin.received)}


@pytest.mark.parametrize("data", [
    record(STDIN, b"a" * 8192) * 3 + record(STDIN, b""),  # Apache's records, then the end
    record(STDIN, b"x" * 65535, padding=255) + record(STDIN, b"y", padding=0),
    record(STDIN, b"abc") + record(STDIN, b"") + usual(request_id=2),  # the next request after
    record(STDIN, b"abc") + record(9, b"", 0) + record(STDIN, b"def"),  # a management record
    record(STDIN, b"abc") + record(ABORT) + record(STDIN, b"def"),
    record(STDIN, b"abc") + record(STDIN, b"def", 2) + record(STDIN, b"ghi"),  # another request's
    record(STDIN, b"abc") + record(STDIN, b"def", version=0),
    record(STDIN, b"abc") + record(STDIN, b"def")[:-3],  # the second cut short
    record(STDIN, b"abc")[:7],
    b"",
], ids=["apache", "padding", "next-request", "management", "abort", "other-id", "bad-version",
        "cut", "cut-header", "empty"])
@pytest.mark.parametrize("scratch", [False, True], ids=["inbuf", "scratch"])
def test_a_body_taken_in_c_ends_the_same(data, scratch):
    assert body_outcome(data, True, scratch) == body_outcome(data, False, scratch)


body_pieces = st.one_of(
    st.builds(lambda c, p: record(STDIN, c, 1, p), st.sampled_from([b"", b"x", b"y" * 300, b"z" * 8192]),
              st.sampled_from([None, 0, 7, 255])),
    st.builds(lambda c, i: record(STDIN, c, i), st.sampled_from([b"", b"x"]), st.sampled_from([0, 2])),
    st.builds(record, st.integers(0, 12), st.binary(max_size=20), st.sampled_from([0, 1]),
              st.sampled_from([None, 0, 3]), st.sampled_from([1, 1, 0, 2])),
)


@settings(max_examples=800, deadline=None)
@given(parts=st.lists(body_pieces, max_size=8), cut=st.one_of(st.none(), st.integers(0, 20000)),
       flip=st.one_of(st.none(), st.tuples(st.integers(0, 20000), st.integers(0, 7))),
       scratch=st.booleans())
def test_any_body_records_end_the_same(parts, cut, flip, scratch):
    """Body records in any mix with others, whole, cut short anywhere, or with one bit flipped:
    taken in C or in Python, the stream, the buffer and the answers end the same."""
    data = bytearray(b"".join(parts))
    if flip is not None and data:
        data[flip[0] % len(data)] ^= 1 << flip[1]
    if cut is not None:
        data = data[:len(data) - cut % (len(data) + 1)]
    assert body_outcome(bytes(data), True, scratch) == body_outcome(bytes(data), False, scratch)


def test_take_stdin_reads_only_within_its_bounds():
    """`pos` and `size` bound what it reads: a record past `size` is not there yet; a negative
    position or size, or a position past the size, takes nothing."""
    data = bytearray(record(STDIN, b"abc") + record(STDIN, b"def"))
    take = fastcgi._c_take_stdin
    assert take(data, 0, len(data), 1) == ([b"abc", b"def"], 6, len(data), False)
    assert take(data, 0, len(data) - 1, 1) == ([b"abc"], 3, 16, False)
    assert take(data, 16, len(data), 1) == ([b"def"], 3, len(data), False)
    assert take(data, 0, 1 << 40, 1) == ([b"abc", b"def"], 6, len(data), False)  # clipped
    assert take(data, -8, len(data), 1) is None
    assert take(data, 0, len(data), 2) is None
    # past the end, or a negative size: nothing read (once read out of bounds, a crash)
    assert take(data, 1 << 62, -(1 << 62) - 8, 1) is None
    assert take(data, 17, 16, 1) is None
    assert take(data, 0, -1, 1) is None

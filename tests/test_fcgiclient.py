"""Unit tests for the FastCGI test client (fcgiclient) and load generator (load).

The integration tests run a tiny, independently written FastCGI responder
in threads on 127.0.0.1 that echoes the request body (or, for bodiless
requests, the query string) back with Status 200.
"""
from __future__ import annotations

import http.server
import os
import socket
import struct
import threading
import time

import pytest
from hypothesis import given, strategies as st

import fcgiclient as fc
from load import fcgi_checker, http_checker, run_load

pytestmark = pytest.mark.timeout(120)


# --------------------------------------------------------------------------
# Encoding / decoding
# --------------------------------------------------------------------------

def test_encode_record_header_and_default_padding():
    assert fc.encode_record(fc.FCGI_STDIN, 1, b"abc") == (
        b"\x01\x05\x00\x01\x00\x03\x05\x00" + b"abc" + b"\0" * 5)
    assert fc.encode_record(fc.FCGI_PARAMS, 0x1234, b"") == b"\x01\x04\x12\x34\0\0\0\0"
    rec = fc.encode_record(fc.FCGI_STDOUT, 7, b"x" * 8)
    assert len(rec) == 16 and rec[6] == 0


def test_encode_record_explicit_padding_and_limits():
    assert fc.encode_record(fc.FCGI_STDIN, 1, b"ab", padding=0) == b"\x01\x05\0\x01\0\x02\0\0ab"
    assert fc.encode_record(fc.FCGI_STDIN, 1, b"ab", padding=3).endswith(b"ab\0\0\0")
    assert len(fc.encode_record(fc.FCGI_STDIN, 1, b"y" * 65535)) == 8 + 65535 + 1
    with pytest.raises(ValueError):
        fc.encode_record(fc.FCGI_STDIN, 1, b"y" * 65536)
    with pytest.raises(struct.error):
        fc.encode_record(fc.FCGI_STDIN, 65536, b"")


@given(st.integers(0, 0xFFFF), st.integers(1, 11), st.binary(max_size=300))
def test_record_round_trip(request_id, rtype, content):
    data = fc.encode_record(rtype, request_id, content)
    assert len(data) % 8 == 0
    assert fc.decode_records(data) == [fc.Record(rtype, request_id, content)]


def test_param_lengths_one_vs_four_bytes():
    assert fc.encode_params({"A": "bc"}) == b"\x01\x02Abc"
    assert fc.encode_params({b"n" * 127: b""}) == b"\x7f\x00" + b"n" * 127
    assert fc.encode_params({b"n" * 128: b""}) == b"\x80\x00\x00\x80\x00" + b"n" * 128
    assert fc.encode_params({b"k": b"v" * 300}) == b"\x01\x80\x00\x01\x2ck" + b"v" * 300
    assert fc.encode_params({"É": "ü"}) == b"\x02\x02\xc3\x89\xc3\xbc"


@given(st.dictionaries(st.binary(max_size=200), st.binary(max_size=400), max_size=8))
def test_params_round_trip(params):
    assert fc.decode_params(fc.encode_params(params)) == params


def test_decode_params_rejects_every_truncation():
    first = fc.encode_params({"A": "x" * 200})
    blob = first + fc.encode_params({"B" * 130: "y"})
    assert fc.decode_params(blob) == {b"A": b"x" * 200, b"B" * 130: b"y"}
    for cut in range(1, len(blob)):
        if cut == len(first):
            continue
        with pytest.raises(fc.ProtocolError):
            fc.decode_params(blob[:cut])


def test_decode_records_rejects_bad_input():
    good = fc.encode_record(fc.FCGI_STDOUT, 1, b"hello")
    with pytest.raises(fc.ProtocolError):
        fc.decode_records(good[:-1])
    with pytest.raises(fc.ProtocolError):
        fc.decode_records(b"\x02" + good[1:])


def test_build_request_splits_large_params_and_stdin():
    params = {"SMALL": "1", "BIG": "z" * 200_000}
    recs = fc.decode_records(fc.build_request(params, b"q" * 100, keep_conn=True,
                                              request_id=9, stdin_chunk=30))
    assert recs[0] == fc.Record(fc.FCGI_BEGIN_REQUEST, 9, b"\0\x01\x01\0\0\0\0\0")
    assert {r.request_id for r in recs} == {9}
    prm = [r.content for r in recs if r.type == fc.FCGI_PARAMS]
    assert len(prm) >= 5 and prm[-1] == b"" and all(0 < len(c) <= 65535 for c in prm[:-1])
    assert fc.decode_params(b"".join(prm)) == {b"SMALL": b"1", b"BIG": b"z" * 200_000}
    assert [len(r.content) for r in recs if r.type == fc.FCGI_STDIN] == [30, 30, 30, 10, 0]
    no_keep = fc.decode_records(fc.build_request({}, keep_conn=False))
    assert no_keep[0].content[2] == 0
    assert [r.type for r in no_keep[1:]] == [fc.FCGI_PARAMS, fc.FCGI_STDIN]


def test_parse_cgi_response():
    assert fc.parse_cgi_response(b"Content-Type: text/plain\r\n\r\nhi\r\n\r\n") == (
        200, [("Content-Type", "text/plain")], b"hi\r\n\r\n")
    status, headers, body = fc.parse_cgi_response(b"Status: 404 Not Found\nX-A: \xe9\n\nnope")
    assert (status, body) == (404, b"nope") and headers[1] == ("X-A", "\xe9")
    for bad in (b"Content-Type: text/plain\r\n", b"garbage line\r\n\r\n",
                b"Status: abc\r\n\r\n", b" Indented: x\r\n\r\n"):
        with pytest.raises(fc.ProtocolError):
            fc.parse_cgi_response(bad)


def test_make_params():
    p = fc.make_params("POST", "/a%20b/c?x=1&y=2", body_len=5, server_port="8080",
                       extra={"HTTP_X_TEST": "1", "REMOTE_PORT": None})
    assert p["REQUEST_METHOD"] == "POST" and p["REQUEST_URI"] == "/a%20b/c?x=1&y=2"
    assert p["PATH_INFO"] == b"/a b/c" and p["QUERY_STRING"] == "x=1&y=2"
    assert p["SCRIPT_NAME"] == "" and p["CONTENT_LENGTH"] == "5" and "CONTENT_TYPE" in p
    assert p["SERVER_PORT"] == "8080" and p["HTTP_X_TEST"] == "1" and "REMOTE_PORT" not in p
    assert "CONTENT_LENGTH" not in fc.make_params()


# --------------------------------------------------------------------------
# A tiny echoing FastCGI responder (independent record writer, padding 0)
# --------------------------------------------------------------------------

def _rec(rtype: int, rid: int, content: bytes = b"") -> bytes:
    return struct.pack("!BBHHBx", 1, rtype, rid, len(content), 0) + content


class EchoServer:
    """Threaded FastCGI responder.  Param TEST_MODE selects misbehaviour:
    ``eof`` (close mid-response), ``garbage`` (non-FastCGI bytes), ``hang``."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.address = self.listener.getsockname()[:2]
        self.connections = 0
        self.received: list[tuple[int, int]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn, conn.makefile("rb") as reader:
            reqs: dict[int, dict] = {}
            while not self.stop.is_set():
                header = reader.read(8)
                if len(header) < 8:
                    return
                _, rtype, rid, clen, plen = struct.unpack("!BBHHBx", header)
                content = reader.read(clen)
                reader.read(plen)
                self.received.append((rtype, rid))
                if rtype == fc.FCGI_GET_VALUES:
                    wanted = {fc.FCGI_MAX_CONNS: "10", fc.FCGI_MPXS_CONNS: "0"}
                    names = fc.decode_params(content)
                    reply = {n: wanted[n.decode()] for n in names if n.decode() in wanted}
                    conn.sendall(_rec(fc.FCGI_GET_VALUES_RESULT, 0, fc.encode_params(reply)))
                elif rtype == fc.FCGI_BEGIN_REQUEST:
                    reqs[rid] = {"keep": content[2] & 1, "params": b"", "stdin": b""}
                elif rtype == fc.FCGI_PARAMS:
                    reqs[rid]["params"] += content
                elif rtype == fc.FCGI_STDIN and content:
                    reqs[rid]["stdin"] += content
                elif rtype == fc.FCGI_STDIN:
                    req = reqs.pop(rid)
                    if not self._respond(conn, rid, req) or not req["keep"]:
                        return
                elif rtype == fc.FCGI_ABORT_REQUEST:
                    reqs.pop(rid, None)
                    conn.sendall(_rec(fc.FCGI_END_REQUEST, rid, struct.pack("!IB3x", 1, 0)))
                else:
                    conn.sendall(_rec(fc.FCGI_UNKNOWN_TYPE, 0, bytes([rtype]) + b"\0" * 7))

    def _respond(self, conn: socket.socket, rid: int, req: dict) -> bool:
        params = fc.decode_params(req["params"])
        mode = params.get(b"TEST_MODE", b"")
        body = req["stdin"] or params.get(b"QUERY_STRING", b"")
        out = (b"Status: 200 OK\r\nContent-Type: application/octet-stream\r\n"
               b"X-Path: " + params.get(b"PATH_INFO", b"") + b"\r\n\r\n" + body)
        if mode == b"garbage":
            conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
            return False
        if mode == b"hang":
            self.stop.wait(5)
            return False
        records = [_rec(fc.FCGI_STDOUT, rid, out[i:i + 65535])
                   for i in range(0, len(out), 65535)]
        if mode == b"eof":
            conn.sendall(records[0])
            return False
        conn.sendall(b"".join(records) + _rec(fc.FCGI_STDERR, rid, b"rid=%d" % rid)
                     + _rec(fc.FCGI_STDERR, rid) + _rec(fc.FCGI_STDOUT, rid)
                     + _rec(fc.FCGI_END_REQUEST, rid, struct.pack("!IB3x", 0, 0)))
        return True

    def close(self) -> None:
        self.stop.set()
        self.threads[0].join(5)
        self.listener.close()
        for thread in self.threads[1:]:
            thread.join(5)


@pytest.fixture
def server():
    srv = EchoServer()
    yield srv
    srv.close()


def test_request_round_trip_without_keep_conn(server):
    client = fc.FCGIClient(server.address, timeout=5)
    resp = client.request(fc.make_params("POST", "/echo?q=1", body_len=5), b"hello")
    assert (resp.status, resp.body, resp.stderr) == (200, b"hello", b"rid=1")
    assert resp.header("x-path") == "/echo" and resp.header("missing") is None
    assert (resp.app_status, resp.protocol_status) == (0, fc.FCGI_REQUEST_COMPLETE)
    assert resp.raw_stdout.endswith(b"\r\n\r\nhello") and resp.stdout_terminated
    assert not client.connected  # server closed; client noticed and closed too
    assert client.request(fc.make_params(uri="/?again")).body == b"again"
    assert server.connections == 2


def test_keep_conn_reuses_one_connection_for_100_requests(server):
    with fc.FCGIClient(server.address, timeout=5) as client:
        for i in range(100):
            body = b"request-%d" % i
            resp = client.request(fc.make_params("POST", "/", len(body)), body,
                                  keep_conn=True, request_id=1 + i % 3)
            assert (resp.status, resp.body) == (200, body)
            assert client.connected
    assert server.connections == 1


@pytest.mark.parametrize("chunk", [65535, 4096])
def test_one_megabyte_body_round_trip(server, chunk):
    body = os.urandom(1 << 20)
    with fc.FCGIClient(server.address, timeout=10) as client:
        resp = client.request(fc.make_params("PUT", "/big", len(body)), body,
                              keep_conn=True, stdin_chunk=chunk)
    assert resp.status == 200 and resp.body == body


def test_get_values(server):
    with fc.FCGIClient(server.address, timeout=5) as client:
        assert client.get_values() == {"FCGI_MAX_CONNS": "10", "FCGI_MPXS_CONNS": "0"}
        assert client.request(fc.make_params(uri="/?x"), keep_conn=True).body == b"x"


@pytest.mark.parametrize("mode, exc", [("eof", fc.ConnectionClosed),
                                       ("garbage", fc.ProtocolError),
                                       ("hang", fc.ResponseTimeout)])
def test_broken_responses_raise(server, mode, exc):
    client = fc.FCGIClient(server.address, timeout=0.5)
    with pytest.raises(exc):
        client.request(fc.make_params(extra={"TEST_MODE": mode}))
    assert not client.connected


def test_recv_records_and_abort(server):
    with fc.FCGIClient(server.address, timeout=5) as client:
        client.send_raw(fc.encode_record(42, 0, b""))
        client.send_raw(fc.build_request(fc.make_params(), keep_conn=True)[:16])
        client.abort(1)
        records = list(client.recv_records(timeout=0.5))
    assert records[0] == fc.Record(fc.FCGI_UNKNOWN_TYPE, 0, b"\x2a" + b"\0" * 7)
    assert records[1] == fc.Record(fc.FCGI_END_REQUEST, 1, b"\0\0\0\x01\0\0\0\0")
    assert (fc.FCGI_ABORT_REQUEST, 1) in server.received


def test_eof_before_end_request_on_kept_connection(server):
    client = fc.FCGIClient(server.address, timeout=5)
    client.send_raw(fc.build_request(fc.make_params(extra={"TEST_MODE": "eof"})))
    with pytest.raises(fc.ConnectionClosed):
        client.read_response(1)


# --------------------------------------------------------------------------
# Load generator
# --------------------------------------------------------------------------

@pytest.mark.parametrize("keep_conn", [True, False])
def test_run_load_fcgi_checker(server, keep_conn):
    with fcgi_checker(server.address, keep_conn=keep_conn, timeout=5) as check:
        result = run_load(check, clients=4, duration=5, max_requests=200)
    assert result.ok, result.summary()
    assert result.requests == 200 and len(result.latencies) == 200
    assert server.connections == (4 if keep_conn else 200)


def test_run_load_records_failures_and_is_bounded():
    def flaky(client: int, seq: int) -> None:
        time.sleep(0.001)
        if seq % 2:
            raise AssertionError(f"bad {client}-{seq % 50}")

    t0 = time.monotonic()
    result = run_load(flaky, clients=3, duration=0.5)
    assert time.monotonic() - t0 < 3
    assert result.requests > 10 and result.failures >= result.requests // 2 - 3
    assert len(result.errors) == 20 and result.errors[0].startswith("AssertionError: bad")
    assert not result.ok and result.p99 >= result.p50 > 0


def test_run_load_counts_stuck_threads():
    release = threading.Event()
    result = run_load(lambda c, s: release.wait(10), clients=2, duration=0.1, grace=0.2)
    release.set()
    assert result.stuck == 2 and result.failures == 2 and not result.ok


def test_http_checker_detects_crosstalk():
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def do_GET(self):
            body = self.path.encode() if "bad" not in self.path else b"other"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        port = httpd.server_address[1]
        with http_checker("127.0.0.1", port) as check:
            good = run_load(check, clients=3, duration=5, max_requests=60)
        with http_checker("127.0.0.1", port, "/bad?id={uid}") as check:
            bad = run_load(check, clients=2, duration=5, max_requests=4)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert good.ok, good.summary()
    assert bad.failures == 4 and "id missing" in bad.errors[0]

"""Hostile or broken FastCGI input closes that connection only; the worker lives on.

Each live case checks that the worker pids are unchanged and that a normal
request right after succeeds. The parser and the connection state machine are
also fuzzed in-process with Hypothesis, at a bounded budget.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fcgiclient import (FCGI_ABORT_REQUEST, FCGI_BEGIN_REQUEST, FCGI_END_REQUEST, FCGI_KEEP_CONN, FCGI_PARAMS, FCGI_STDIN, ConnectionClosed,
                        FCGIClient, build_request, encode_params, encode_record, make_params,
                        parse_cgi_response)
from test_lifecycle import get

BEGIN = encode_record(FCGI_BEGIN_REQUEST, 1, bytes([0, 1, FCGI_KEEP_CONN, 0, 0, 0, 0, 0]))


@pytest.fixture
def daemon(start_daemon):
    return start_daemon("testapp", "--read-timeout", "1", "--max-body", "100k", "--max-params", "64k",
                        workers=1)


def closed_within(address, data: bytes, seconds: float) -> float:
    """Send `data`, then time how long until the daemon closes the connection."""
    sock = socket.create_connection(address, timeout=seconds + 5)
    t0 = time.monotonic()
    try:
        sock.sendall(data)
        t0 = time.monotonic()
        while sock.recv(65536):
            pass
        return time.monotonic() - t0
    except ConnectionResetError:
        return time.monotonic() - t0
    finally:
        sock.close()


def assert_worker_unharmed(daemon, before):
    assert daemon.workers() == before
    assert get(daemon.address, "/hello").status == 200


STALLS = {
    "truncated-header": BEGIN[:5],
    "absurd-content-length": struct.pack("!BBHHBx", 1, FCGI_PARAMS, 1, 65535, 0) + b"x" * 10,
    "params-never-end": BEGIN + encode_record(FCGI_PARAMS, 1, encode_params(make_params())),
    "half-a-record-slowloris": BEGIN + encode_record(FCGI_PARAMS, 1, encode_params(make_params()))[:30],
    "body-never-ends": BEGIN + encode_record(FCGI_PARAMS, 1, encode_params(make_params("POST", "/echo", 500)))
    + encode_record(FCGI_PARAMS, 1) + encode_record(FCGI_STDIN, 1, b"y" * 100),
}


@pytest.mark.parametrize("data", STALLS.values(), ids=STALLS.keys())
def test_stalled_input_is_closed_after_read_timeout(daemon, data):
    before = daemon.wait_workers(1)
    took = closed_within(daemon.address, data, 5)
    assert 0.9 <= took < 3.5, took
    assert_worker_unharmed(daemon, before)


def test_slowloris_does_not_block_other_requests(daemon):
    """While a connection dribbles half a record, the same (only) worker serves others."""
    before = daemon.wait_workers(1)
    sock = socket.create_connection(daemon.address)
    try:
        sock.sendall(STALLS["half-a-record-slowloris"])
        t0 = time.monotonic()
        assert get(daemon.address, "/hello", timeout=5).status == 200
        assert time.monotonic() - t0 < 0.5
    finally:
        sock.close()
    assert_worker_unharmed(daemon, before)


def test_declared_body_over_limit_gets_413(daemon):
    before = daemon.wait_workers(1)
    with FCGIClient(daemon.address, timeout=5) as client:
        resp = client.request(make_params("POST", "/echo", body_len=200_000), b"z" * 200_000)
    assert resp.status == 413
    assert_worker_unharmed(daemon, before)
    daemon.wait_log(r"request body of 200000 bytes refused")


@pytest.mark.parametrize("uri", ["/echo", "/echo-wrapped"])
@pytest.mark.parametrize("declared", [None, "10"])
def test_a_body_outgrowing_the_limit_gets_413_then_the_connection_ends(daemon, uri, declared):
    """A body over --max-body (100k) that its CONTENT_LENGTH did not announce (none, or 10):
    the application reading past the limit gets our error (/echo-wrapped raises its own from
    ours, as frameworks do: still not the application's fault), and the client our 413; /echo
    reading the 10 declared answers what it read. Either way the rest is read and thrown away and
    the connection ends after the answer. It was closed unanswered, with a reset while the web
    server still sent: its client got a 502."""
    before = daemon.wait_workers(1)
    params = make_params("POST", uri, extra={"CONTENT_LENGTH": declared})
    with FCGIClient(daemon.address, timeout=5) as client:
        resp = client.request(params, b"z" * 300_000)  # then EOF, or ProtocolError
    print(f"\nCONTENT_LENGTH {declared}: {resp.status} {resp.body[:30]!r}")
    if declared is None or uri == "/echo-wrapped":  # that one reads to the end, whatever declared
        assert (resp.status, resp.body) == (413, b"Request body too large.\n")
        daemon.wait_log(rf"request body larger than 102400 bytes \(--max-body; CONTENT_LENGTH "
                        rf"{declared or 'none'}\): {uri}; answered 413")
    else:
        assert (resp.status, resp.body) == (200, b"z" * 10)
        daemon.wait_log(rf"request body larger than 102400 bytes \(--max-body\), after the "
                        rf"application's answer: {uri}")
    assert_worker_unharmed(daemon, before)
    assert_not_blamed_on_the_application(daemon)


def test_malformed_record_while_the_app_reads_the_body(daemon):
    """A broken record in the middle of a body the application is reading: the web server's
    fault, so the connection closes with a protocol warning, and no "application error" with a
    traceback sends an operator after the application."""
    before = daemon.wait_workers(1)
    with FCGIClient(daemon.address, timeout=5) as client:
        head = build_request(make_params("POST", "/echo", body_len=5000), b"", keep_conn=True)
        head = head[: head.rindex(encode_record(FCGI_STDIN, 1))]  # no end of stdin
        broken = struct.pack("!BBHHBx", 7, FCGI_STDIN, 1, 10, 0) + b"x" * 10  # version 7
        client.send_raw(head + encode_record(FCGI_STDIN, 1, b"q" * 1000) + broken)
        records = list(client.recv_records(timeout=3))
    assert all(r.type != 6 for r in records), records  # no response: the request is lost anyway
    daemon.wait_log(r"protocol error: unsupported FastCGI version 7")
    assert_not_blamed_on_the_application(daemon)
    assert_worker_unharmed(daemon, before)


@pytest.mark.parametrize("rtype", [42, 8], ids=["unknown", "FCGI_DATA"])
def test_a_flood_of_unknown_records_is_one_log_line(daemon, rtype):
    """Records of a type no request uses, for the active request, are ignored; 3,000 of them
    inside one request gave 3,000 warnings (one per record), so anyone allowed to connect could
    fill the disk under the log. Now: the request is answered, and one line carries the count.
    FCGI_DATA belongs to the filter role only (refused): for a responder it was buffered, with
    no bound and no word in the log; it is ignored the same way."""
    before = daemon.wait_workers(1)
    flood = 3000
    blob = build_request(make_params("GET", "/hello"), keep_conn=True)
    cut = blob.index(encode_record(FCGI_STDIN, 1))
    junk = encode_record(rtype, 1, b"junk" * 1000) * flood
    with FCGIClient(daemon.address, timeout=10) as client:
        client.send_raw(blob[:cut] + junk + blob[cut:])
        response = client.read_response(1, keep_conn=True)
    lines = daemon.count(rf"ignoring FastCGI record of type {rtype}")
    print(f"\n{flood} unknown records in one request: status {response.status}, {lines} log line(s)")
    assert response.status == 200 and response.body.startswith(b"hello ")
    assert lines == 1  # the rest are counted into the next line, due 10 s later
    assert daemon.count(rf"ignoring FastCGI record of type {rtype} for request 1 \(1 such record") == 1
    assert_worker_unharmed(daemon, before)


def assert_not_blamed_on_the_application(daemon):
    log = daemon.log()
    assert "application error" not in log and "Traceback" not in log, log[-3000:]


def test_params_over_limit_close_connection(daemon):
    before = daemon.wait_workers(1)
    with FCGIClient(daemon.address, timeout=5) as client:
        with pytest.raises(ConnectionClosed):
            client.request(make_params("GET", "/hello", extra={"HTTP_X_BIG": "a" * 100_000}))
    assert_worker_unharmed(daemon, before)
    daemon.wait_log(r"protocol error: params larger than 65536 bytes")


def test_a_second_begin_for_the_active_request_closes_the_connection(daemon):
    """BEGIN_REQUEST again for the request id in progress, before its params ended: it was
    "refused" with END_REQUEST(CANT_MPX_CONN) for that same id, which told the web server the
    first request had ended, and the first request's params then reached the next request on
    the connection (its HTTP_X_FIRST showed in the second's environ). A protocol error now."""
    before = daemon.wait_workers(1)
    first = encode_record(FCGI_PARAMS, 1, encode_params(make_params("GET", "/environ",
                                                                    extra={"HTTP_X_FIRST": "1"})))
    second = build_request(make_params("GET", "/environ"), keep_conn=True)
    with FCGIClient(daemon.address, timeout=5) as client:
        client.send_raw(BEGIN + first + second)
        assert client.read_record(time.monotonic() + 3) is None  # closed: nothing answered
    daemon.wait_log(r"protocol error: BEGIN_REQUEST for request 1, already active")
    assert_worker_unharmed(daemon, before)


def test_a_body_sent_before_the_end_of_the_params_is_bounded(daemon):
    """FCGI_STDIN before the params have ended is buffered until the application runs; it had
    no bound (400 MiB held a worker's memory). It counts against --max-params (64k here)."""
    before = daemon.wait_workers(1)
    head = BEGIN + encode_record(FCGI_PARAMS, 1, encode_params(make_params("POST", "/echo", 10**9)))
    body = encode_record(FCGI_STDIN, 1, b"x" * 65000)
    with FCGIClient(daemon.address, timeout=5) as client:
        client.send_raw(head + body)
        with pytest.raises(OSError):  # closed at the second record (a reset: unread input)
            for _ in range(400):  # 26 MB, far beyond what the socket buffers hold
                client.send_raw(body)
    daemon.wait_log(r"protocol error: more than 65536 bytes of FCGI_STDIN before the end of the params")
    assert_worker_unharmed(daemon, before)
    # some of it is fine: a short body before the params' end is served
    params = encode_record(FCGI_PARAMS, 1, encode_params(make_params("POST", "/echo", 5)))
    with FCGIClient(daemon.address, timeout=5) as client:
        client.send_raw(BEGIN + params + encode_record(FCGI_STDIN, 1, b"early") + encode_record(FCGI_PARAMS, 1)
                        + encode_record(FCGI_STDIN, 1))
        resp = client.read_response(1, keep_conn=True)
    assert resp.status == 200 and resp.body == b"early"


@pytest.mark.parametrize("length", ["12abc", "5.0", "0x10"])
def test_a_content_length_that_is_no_number_gets_400_under_max_body(daemon, length):
    """--max-body must judge the length before the application runs, and cannot: the request
    is answered 400 and the connection closed (it was closed with no answer)."""
    before = daemon.wait_workers(1)
    params = make_params("POST", "/echo", extra={"CONTENT_LENGTH": length})
    with FCGIClient(daemon.address, timeout=5) as client:
        resp = client.request(params, b"abcde", keep_conn=True)
        assert resp.status == 400 and resp.body == b"Content-Length not a number\n"
        assert client.read_record(time.monotonic() + 2) is None  # then closed (EOF, not a timeout)
    daemon.wait_log(rf"request with CONTENT_LENGTH '{length}' refused \(--max-body needs a number\)")
    assert_worker_unharmed(daemon, before)


def test_abort_while_the_app_reads_the_body(daemon):
    """FCGI_ABORT_REQUEST while the application reads the body: no response body, one
    END_REQUEST (REQUEST_COMPLETE, spec 5.4), and the kept connection serves the next request.
    Before, the connection was closed: no END_REQUEST, and the web server lost it."""
    before = daemon.wait_workers(1)
    with FCGIClient(daemon.address, timeout=5) as client:
        head = build_request(make_params("POST", "/echo", body_len=90_000), b"", keep_conn=True)
        head = head[: head.rindex(encode_record(FCGI_STDIN, 1))]  # no end of stdin
        client.send_raw(head + encode_record(FCGI_STDIN, 1, b"q" * 1000) + encode_record(2, 1))
        end = client.read_record(time.monotonic() + 3)
        after = client.request(make_params("GET", "/hello"), keep_conn=True, request_id=2)
    assert end is not None and end.type == FCGI_END_REQUEST and end.request_id == 1, end
    assert end.content == struct.pack("!LB3x", 0, 0)  # appStatus 0, FCGI_REQUEST_COMPLETE
    assert after.status == 200 and after.body.startswith(b"hello v1 ")
    daemon.wait_log(r"request 1 aborted by the web server; response ended")
    assert_worker_unharmed(daemon, before)


def test_abort_the_application_swallows_ends_the_request_at_once(daemon):
    """The application catches the RequestAborted its read raised (a "bad body -> 400" handler)
    and returns: END_REQUEST must follow at once. drain() waited for the rest of the body,
    which the web server never sends after an abort: the worker was held for --read-timeout
    (its other clients waited), and the kept connection was then reset."""
    before = daemon.wait_workers(1)
    with FCGIClient(daemon.address, timeout=5) as client:
        head = build_request(make_params("POST", "/read-or-400", body_len=90_000), b"", keep_conn=True)
        head = head[: head.rindex(encode_record(FCGI_STDIN, 1))]  # no end of stdin
        client.send_raw(head + encode_record(FCGI_STDIN, 1, b"q" * 1000))
        time.sleep(0.3)  # the application waits in its read
        started = time.monotonic()
        client.send_raw(encode_record(2, 1))  # FCGI_ABORT_REQUEST
        end = client.read_record(time.monotonic() + 3)
        took = time.monotonic() - started
        after = client.request(make_params("GET", "/hello"), keep_conn=True, request_id=2)
    print(f"\nEND_REQUEST {took:.2f}s after the abort")
    assert end is not None and end.type == FCGI_END_REQUEST and end.request_id == 1, end
    assert after.status == 200 and after.body.startswith(b"hello v1 ")
    daemon.wait_log(r"request 1 aborted by the web server; response ended")
    assert daemon.count(r"no input for") == 0
    assert_worker_unharmed(daemon, before)


@pytest.mark.parametrize("begun,unix,answered", [(False, False, "management records"),
                                                 (True, False, "management records"),
                                                 (True, True, "management records"),
                                                 (True, False, "second requests"),
                                                 (False, False, "requests ended before they ran"),
                                                 (False, True, "requests ended before they ran")],
                         ids=["no-request", "after-a-begin-request", "after-a-begin-request-unix",
                              "second-requests", "aborted-in-their-params", "unknown-roles-unix"])
def test_management_answers_nobody_reads_do_not_hold_the_worker(start_daemon, tmp_path, begun, unix,
                                                                answered):
    """A connection sending only management records (400,000 unknown types) and never reading
    the answers: each answer was a blocking send, so the worker (idle to the manager: --timeout
    does not apply) waited --read-timeout at every stall, and its other clients with it.
    Between requests an answer the socket does not take at once now closes that connection;
    so too while a request is still in its params (one BEGIN_REQUEST first was enough to get
    the blocking send back: the worker is not busy with such a request either). On a unix
    socket, closing such a connection sent the failure mark (a send that waited --read-timeout
    on a full buffer): a request still in its params has no response to mark failed.
    The same for the answers to BEGIN_REQUESTs of a second request while the first is in its
    params (FCGI_CANT_MPX_CONN, 400,000 of them), and for the END_REQUESTs of kept requests
    aborted in their params, or of a role we do not play: those sends blocked too."""
    d = start_daemon("testapp", "--read-timeout", "10", workers=1,
                     bind=f"unix:{tmp_path / 'm.sock'}" if unix else None)
    before = d.wait_workers(1)
    flooder = socket.socket(socket.AF_UNIX if unix else socket.AF_INET)
    flooder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    flooder.connect(d.address)
    if answered == "second requests":
        flood = encode_record(FCGI_BEGIN_REQUEST, 2, bytes([0, 1, FCGI_KEEP_CONN, 0, 0, 0, 0, 0])) * 400_000
    elif answered.startswith("requests ended") and unix:  # role 9, kept: FCGI_UNKNOWN_ROLE each
        flood = encode_record(FCGI_BEGIN_REQUEST, 1, bytes([0, 9, FCGI_KEEP_CONN, 0, 0, 0, 0, 0])) * 400_000
    elif answered.startswith("requests ended"):  # each begun, then aborted before its params end
        flood = (BEGIN + encode_record(FCGI_ABORT_REQUEST, 1)) * 200_000
    else:
        flood = struct.pack("!BBHHBx", 1, 77, 0, 0, 0) * 400_000  # unknown type 77, request id 0
    if begun:
        flood = BEGIN + flood
    sender = threading.Thread(target=lambda: _send_quietly(flooder, flood), daemon=True)
    sender.start()
    try:
        started = time.monotonic()
        # the answers fill both socket buffers (how soon depends on the machine's speed), and
        # the connection is closed then, not held: a blocking send waited --read-timeout (10 s)
        # at each stall, and closed the connection with another line
        d.wait_log(rf"protocol error: the peer does not read the answers to its {answered}",
                   timeout=8)
        stalled = time.monotonic() - started
        resp = get(d.address, "/hello")
        took = time.monotonic() - started
    finally:
        flooder.close()
        sender.join(10)
    print(f"\nflooding connection closed after {stalled:.2f}s; another client's request answered "
          f"{took:.2f}s after the flood began (--read-timeout 10)")
    assert resp.status == 200 and took < 8
    assert_worker_unharmed(d, before)


def test_a_flood_of_half_sent_connections_is_one_log_line(daemon):
    """50 connections that each send half a request and stall (slowloris) are closed at
    --read-timeout as before, but said in one line, not one each (3,000 such connections
    wrote 3,000 warnings)."""
    before = daemon.wait_workers(1)
    socks = []
    for _ in range(50):
        sock = socket.create_connection(daemon.address, timeout=10)
        sock.sendall(BEGIN[:12])  # a record cut short
        socks.append(sock)
    try:
        for sock in socks:  # each closed by the daemon (--read-timeout 1)
            assert sock.recv(1) == b""
    finally:
        for sock in socks:
            sock.close()
    assert daemon.count(r"no complete request within 1s") == 1
    assert_worker_unharmed(daemon, before)


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM], ids=["reload", "stop"])
def test_a_reload_or_stop_does_not_cut_a_refused_bodys_drain(start_daemon, signum):
    """A body refused by --max-body is answered 413 at once, then read and thrown away while
    the web server goes on sending it (closed, it would get a reset: 502, not the 413). A
    reload or stop that began meanwhile closed that drain as soon as our output had left: the
    rest of the body met a reset (this stop's own change, found by a review)."""
    d = start_daemon("testapp", "--max-body", "1k", workers=1)
    total = 2 << 20
    sock = socket.create_connection(d.address, timeout=10)
    try:
        sock.sendall(BEGIN + encode_record(FCGI_PARAMS, 1, encode_params(make_params("POST", "/echo", total)))
                     + encode_record(FCGI_PARAMS, 1))
        first = sock.recv(65536)
        assert b"413" in first, first
        chunk = encode_record(FCGI_STDIN, 1, b"x" * 32768)
        started, signalled = time.monotonic(), False
        for _ in range(total // 32768):
            sock.sendall(chunk)  # raises on the reset
            time.sleep(0.02)
            if not signalled and time.monotonic() - started > 0.5:
                d.signal(signum)
                signalled = True
        sock.sendall(encode_record(FCGI_STDIN, 1))
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):  # then the daemon closes: EOF, not a reset
            pass
    finally:
        sock.close()
    assert signalled


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:  # closed by the daemon (or by the test): expected
        return


def test_random_garbage_live(daemon):
    """200 blobs of random bytes, each on its own connection: no worker dies."""
    import random
    rng = random.Random(1234)
    before = daemon.wait_workers(1)
    unanswered = []
    for i in range(200):
        blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        if i % 3 == 0:
            blob = bytes([1]) + blob  # version 1: gets past the version check
        sock = socket.create_connection(daemon.address, timeout=5)
        try:
            sock.sendall(blob)
            sock.shutdown(socket.SHUT_WR)  # then EOF: every blob is closed at once or answered
            while sock.recv(65536):
                pass
        except ConnectionResetError:
            pass  # closed with our garbage unread: a reset, as good as a close
        except TimeoutError:
            unanswered.append(i)  # neither answered nor closed within 5 s
        finally:
            sock.close()
    assert unanswered == []
    assert_worker_unharmed(daemon, before)


def test_kept_connections_with_interleaved_records_get_exactly_their_answers(daemon):
    """300 kept connections, each carrying 1-5 requests (GETs naming their own id, POSTs of 0 to
    70,000 random bytes echoed back, sent in random pieces) interleaved with records the
    specification says to ignore (other request ids, even inside a request) or to answer
    (FCGI_GET_VALUES, unknown management types). Every request gets exactly its own answer,
    in order, and every management record exactly one: no crosstalk, nothing lost."""
    import random
    rng = random.Random(2026)
    before = daemon.wait_workers(1)
    requests = failures = 0
    for i in range(300):
        data, expected = b"", []  # "management", or (request id, body prefix or whole body)
        for k in range(rng.randint(1, 5)):
            rid = rng.choice([1, 2, 9, 65535])
            noise, answers = _noise(rng, rid)
            data += noise
            expected += ["management"] * answers
            if rng.random() < 0.6:
                mark = f"id={i}-{k} ".encode()
                blob = build_request(make_params("GET", f"/id?id={i}-{k}"), keep_conn=True, request_id=rid)
                want = (rid, "prefix", mark)
            else:
                sent = rng.randbytes(rng.choice([0, 1, 999, 70_000]))
                blob = build_request(make_params("POST", "/echo", len(sent)), sent, keep_conn=True,
                                     request_id=rid, stdin_chunk=rng.choice([1, 100, 65535]))
                want = (rid, "whole", sent)
            cut = blob.index(bytes([1, FCGI_PARAMS]))  # noise between BEGIN_REQUEST and PARAMS
            noise, answers = _noise(rng, rid)
            data += blob[:cut] + noise + blob[cut:]
            expected += ["management"] * answers + [want]
        with FCGIClient(daemon.address, timeout=10) as client:
            pos = 0
            while pos < len(data):
                step = rng.choice([1, 7, 64, 1000, len(data)])
                client.send_raw(data[pos:pos + step])
                pos += step
            got = _answers(client, len(expected))
        requests += sum(1 for e in expected if e != "management")
        failures += len(got) != len(expected) or not all(map(_matches, expected, got))
    print(f"\n300 kept connections, {requests} requests: {failures} connections with a wrong answer")
    assert failures == 0
    assert_worker_unharmed(daemon, before)
    assert " WARNING " not in daemon.log() and " ERROR " not in daemon.log()


def _noise(rng, active: int) -> tuple[bytes, int]:
    """Records that must not disturb request `active`, and how many answers they get."""
    roll = rng.random()
    if roll < 0.25:  # another request id: ignored (FastCGI 1.0, 3.3)
        other = rng.choice([x for x in (2, 3, 7, 65535) if x != active])
        rtype = rng.choice([FCGI_PARAMS, FCGI_STDIN, 8, 2])
        return encode_record(rtype, other, rng.randbytes(rng.choice([0, 5, 100]))), 0
    if roll < 0.4:
        return encode_record(9, 0, encode_params({"FCGI_MAX_REQS": "", "FCGI_MPXS_CONNS": ""})), 1
    if roll < 0.5:
        return encode_record(rng.choice([12, 50, 200]), 0, rng.randbytes(rng.choice([0, 3, 8]))), 1
    return b"", 0


def _matches(expected, got) -> bool:
    if expected == "management" or got == "management":
        return expected == got
    rid, kind, value = expected
    return got[0] == rid and (got[1].startswith(value) if kind == "prefix" else got[1] == value)


def _answers(client: FCGIClient, count: int) -> list:
    """Up to `count` answers, in order: "management", or (request id, CGI body) at END_REQUEST."""
    got: list = []
    stdout = bytearray()
    deadline = time.monotonic() + 10
    while len(got) < count:
        record = client.read_record(deadline)
        if record is None:
            break
        if record.type in (10, 11):  # FCGI_GET_VALUES_RESULT, FCGI_UNKNOWN_TYPE
            got.append("management" if record.request_id == 0 else ("bad id", b""))
        elif record.type == 6:  # FCGI_STDOUT
            stdout += record.content
        elif record.type == 3:  # FCGI_END_REQUEST
            status, _, body = parse_cgi_response(bytes(stdout))
            got.append((record.request_id, body if status == 200 else b"status %d" % status))
            stdout = bytearray()
    return got


class _LogRecords(logging.Handler):
    """What the fcgidaemon logger emits inside a `with` block (whatever its propagation)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._logger = logging.getLogger("fcgidaemon")

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> "_LogRecords":
        self._level = self._logger.level
        self._logger.setLevel(logging.DEBUG)
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)


class _PeerGone:
    """A socket whose peer's host has vanished from the network. MOCKED: recv() and send()
    fail with ETIMEDOUT or EHOSTUNREACH only after TCP retransmissions time out or an ICMP error
    arrives from a remote host, which loopback on this machine never produces."""

    def __init__(self, sock: socket.socket, errno_: int) -> None:
        self._sock, self._errno = sock, errno_

    def __getattr__(self, name: str):
        return getattr(self._sock, name)

    def recv(self, *args):
        raise OSError(self._errno, os.strerror(self._errno))

    send = sendmsg = recv_into = recv


@pytest.mark.parametrize("errno_", [errno.ETIMEDOUT, errno.EHOSTUNREACH], ids=["ETIMEDOUT", "EHOSTUNREACH"])
def test_a_vanished_peer_is_a_lost_connection_not_a_worker_crash(errno_):
    """receive() reports such a connection closed (it ran outside the worker's per-connection
    error handling, so the error ended the whole worker: its other connections with it), and a
    response that cannot be sent is ConnectionLost, not an 'internal error' traceback. The
    reason is kept for the worker's one line about closing it (receive() logging it too gave
    two lines for one connection)."""
    from fcgidaemon.fastcgi import Connection, ConnectionLost, Server
    from fcgidaemon.wsgi import make_handler

    ours, theirs = socket.socketpair()
    try:
        conn = Connection(ours, Server(make_handler(lambda environ, start_response: [])))
        conn.sock = _PeerGone(ours, errno_)
        logged = _LogRecords()
        with logged:
            assert conn.receive() is False
        assert conn.lost == f"receive failed: {os.strerror(errno_)}"
        assert logged.lines == []
        conn.write_stream(6, 1, b"Status: 200 OK\r\n\r\n")
        with pytest.raises(ConnectionLost, match="send failed"):
            conn.flush()
    finally:
        ours.close()
        theirs.close()


# ---------------------------------------------------------------- in-process fuzzing


def _records() -> st.SearchStrategy[bytes]:
    rtype = st.sampled_from([1, 2, 4, 5, 8, 9, 11, 42])
    rid = st.sampled_from([0, 1, 2])
    content = st.binary(max_size=300)
    plain = st.builds(lambda t, r, c: encode_record(t, r, c), rtype, rid, content)
    begin = st.builds(lambda r, f: encode_record(1, r, bytes([0, r, f, 0, 0, 0, 0, 0])), rid,
                      st.sampled_from([0, 1]))
    params = st.builds(lambda r, p: encode_record(4, r, encode_params(p)), rid,
                       st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=5))
    raw = st.binary(min_size=1, max_size=40)
    return st.one_of(plain, begin, params, raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_records(), max_size=12))
def test_fuzz_connection_state_machine(chunks):
    """Whatever arrives, the connection raises only its own errors or carries on."""
    from fcgidaemon.fastcgi import Connection, ConnectionLost, Limits, ProtocolError, RequestAborted, Server
    from fcgidaemon.wsgi import make_handler

    def app(environ, start_response):
        environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    ours, theirs = socket.socketpair()
    theirs.settimeout(0.2)
    server = Server(make_handler(app), Limits(read_timeout=0.05, max_params=4096, max_body=4096))
    conn = Connection(ours, server)
    drain = threading.Thread(target=lambda: _drain(theirs), daemon=True)
    drain.start()
    try:
        theirs.sendall(b"".join(chunks))
        theirs.shutdown(socket.SHUT_WR)
        while not conn.closed and conn.receive():
            conn.parse_available()
            while conn.request is not None and conn.request.runnable and not conn.closed:
                conn.run_request()
                conn.parse_available()
    except (ProtocolError, ConnectionLost, RequestAborted):
        pass
    finally:
        conn.close()
        theirs.close()
        drain.join(2)


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass


@pytest.mark.parametrize("limit", ["1e30", "8589934592G"])
def test_a_params_limit_past_a_c_integer_serves(start_daemon, limit):
    """--max-params accepts any finite size; past 2^63 the C scan of a request's records raised
    OverflowError, so every request was closed unanswered with an "internal error" line."""
    d = start_daemon("testapp", "--max-params", limit, workers=1)
    before = d.wait_workers(1)
    for i in range(3):
        resp = get(d.address, "/hello")
        assert resp.status == 200, (i, resp.status)
    print(f"\n--max-params {limit}: 3 of 3 requests answered 200")
    assert d.count("internal error") == 0
    assert_worker_unharmed(d, before)

"""What the client gets when an application's response breaks a WSGI rule (PEP 3333).

Each test names what it guards; each failed against the code before the fix it names (run with
PYTHONPATH pointing at a copy of that code: the daemon subprocesses inherit it).
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import struct
import time

import pytest

from daemon import wait_for
from fcgiclient import ConnectionClosed, FCGIClient, build_request, encode_params, make_params
from frontends import apache_available, nginx_available
from test_frontends_reload import daemon_and_front
from test_lifecycle import get

FRONTS = [pytest.param("nginx", marks=pytest.mark.skipif(not nginx_available(), reason="no nginx")),
          pytest.param("apache", marks=pytest.mark.skipif(not apache_available(), reason="no apache2"))]


def _through(fe, path: str) -> str:
    """'complete <status> <body>' when the client got a whole response, else 'cut: <error>'."""
    conn = fe.connection(timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return f"complete {resp.status} {body!r}"
    except (http.client.HTTPException, OSError) as exc:
        return f"cut: {type(exc).__name__}"
    finally:
        conn.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport", ["tcp", "unix"])
@pytest.mark.parametrize("front", FRONTS)
def test_a_response_that_fails_midway_reaches_the_client_cut_not_complete(tmp_path, front, transport):
    """A response that fails after part of it went out (a generator that raises after its first
    block; a body short of its Content-Length) must reach the client visibly cut: no last chunk.
    The worker closed with a FIN, which nginx without fastcgi_keep_conn took as the response's
    end: its client got "partial" as a complete chunked body. Apache completed the short body
    the same way, the application's end taken as the response's. Now the connection is reset
    (TCP), and a short body is an error. Then a whole response follows: the worker lives on."""
    # Apache keeps the client's connection after a cut chunked response until its keep-alive
    # timeout (default 5 s), and the client reads on until then: 1 s ends the wait sooner
    with daemon_and_front(tmp_path, front, False, transport, workers=1,
                          apache_extra="KeepAliveTimeout 1") as (d, fe):
        outcomes = {path: _through(fe, f"/app{path}") for path in ("/error-after", "/cl-short")}
        after = _through(fe, "/app/hello")
        print(f"\n{front} over {transport}: {outcomes}; then {after}")
        assert all(o.startswith("cut: ") for o in outcomes.values()), outcomes
        assert after.startswith("complete 200 b'hello v1 ")
        assert d.count(r"application error on GET /app/error-after") == 1
        assert d.count(r"application error on GET /app/cl-short: it sent 10 of the 100 bytes") == 1


def test_a_body_is_held_to_its_content_length(start_daemon):
    """PEP 3333: no more than the declared Content-Length goes out, and a body that ends short
    of it is an error. 37 bytes declared as 5 all went out (Apache passed them to its client); a
    one-block list of 10 declared as 100 ended normally. Now the first is cut to its 5 bytes, the
    second, none of it sent yet, becomes our 500; a HEAD may send less (its body is nobody's)."""
    d = start_daemon("testapp", workers=1)
    (pid,) = d.wait_workers(1)
    long = get(d.address, "/cl-long")
    assert (long.status, long.body) == (200, b"hello")
    short = get(d.address, "/cl-short-list")
    assert (short.status, short.body) == (500, b"Internal Server Error")
    with FCGIClient(d.address, timeout=10) as client:
        head = client.request(make_params("HEAD", "/cl-short-list"))
    assert (head.status, head.body) == (200, b"only-ten!!")
    with FCGIClient(d.address, timeout=10) as client, pytest.raises(ConnectionClosed):
        client.request(make_params("GET", "/cl-short"))  # a block went out: no END_REQUEST
    # as HTTP reads the field: spaces around it, or the same value listed twice (a 500 for a
    # while, from the checks above)
    assert [get(d.address, f"/cl-spaced?cl={cl}").body for cl in (" 5 ", "5,%205")] == [b"hello"] * 2
    assert d.count(r"more body than its Content-Length 5 allows on /cl-long") == 1
    assert d.count(r"it sent 10 of the 100 bytes its Content-Length declared") == 2
    assert d.workers() == [pid]


def test_a_failure_inside_a_list_body_gives_a_500(start_daemon, tmp_path):
    """A list body whose second item is not bytes: nothing had gone out (a list is sent with
    END_REQUEST), yet the headers counted as sent, and the connection was dropped: nginx 502,
    Apache 503, and the access log said 200. Now the client gets our 500, and so does the log."""
    log = tmp_path / "access.log"
    d = start_daemon("testapp", "--access-log", str(log), workers=1)
    (pid,) = d.wait_workers(1)
    resp = get(d.address, "/mixed-list")
    assert (resp.status, resp.body) == (500, b"Internal Server Error")
    wait_for(lambda: log.exists() and log.read_text().endswith("\n"), 5, "the access log line")
    assert '"GET /mixed-list HTTP/1.1" 500 21 ' in log.read_text()
    # and past the 256 KiB at which output is flushed: the items are checked before any is
    # written (a 300,000-byte first item went out as a 200, then the connection was reset)
    for n in (262_144, 300_000, 2_000_000):
        resp = get(d.address, f"/mixed-list?n={n}")
        assert (resp.status, resp.body) == (500, b"Internal Server Error"), n
    assert d.workers() == [pid]


def test_hop_by_hop_headers_are_dropped_and_no_body_statuses_send_none(start_daemon):
    """PEP 3333 forbids hop-by-hop headers to applications: Apache passed "Connection: close" to
    its client. They are dropped, with one warning per name for the life of the worker; so is
    a Status header of the application's own, which came after ours, and front ends take the
    last (a value that is not a status: 502). A 204 or
    304 has no body: one given was sent (nginx warned of the upstream's extra data); a 304 keeps
    its Content-Length, which is the GET's."""
    d = start_daemon("testapp", workers=1)
    for _ in range(2):
        resp = get(d.address, "/hop")
        names = {name.lower() for name, _ in resp.headers}
        assert resp.body == b"hop body" and "x-kept" in names
        assert not names & {"connection", "keep-alive"}, resp.headers
    assert d.count(r"hop-by-hop header Connection: dropped") == 1
    assert d.count(r"hop-by-hop header Keep-Alive: dropped") == 1
    for _ in range(2):  # CGI's own Status, from the application: after ours, front ends took it
        created = get(d.address, "/cgi-status")
        assert (created.status, created.body) == (201, b"created")
        assert created.raw_stdout.lower().count(b"status:") == 1, created.raw_stdout
    assert d.count(r"the application sent the header status: dropped") == 1
    no_content = get(d.address, "/no-body?code=204")
    not_modified = get(d.address, "/no-body?code=304&cl=11")
    assert (no_content.status, no_content.body) == (204, b"")
    assert (not_modified.status, not_modified.body) == (304, b"")
    assert ("Content-Length", "11") in not_modified.headers


def test_the_access_log_takes_any_remote_user_and_the_request_as_sent(start_daemon, tmp_path):
    """An application (an authenticating middleware) that set REMOTE_USER to an int or bytes
    lost its whole response: the access log's escaping raised, past the handler, and the worker
    dropped the connection (nginx 502). And a method override in the environ was logged as the
    request's method. Now each is answered and logged, with the method the web server sent."""
    log = tmp_path / "access.log"
    d = start_daemon("testapp", "--access-log", str(log), workers=1)
    answers = [get(d.address, f"/set-user?as={kind}") for kind in ("int", "bytes", "str")]
    assert [(a.status, a.body) for a in answers] == [(200, b"user set")] * 3
    wait_for(lambda: log.exists() and log.read_text().count("\n") == 3, 5, "three access log lines")
    users = re.findall(r'^127\.0\.0\.1 - (\S+) \[[^]]+\] "(\S+) ', log.read_text(), re.M)
    assert users == [("42", "GET"), ("bob", "GET"), ("carol", "GET")]
    assert d.count(r"access log line failed") == 0


def test_writes_after_the_web_server_has_gone_fail_every_time(start_daemon):
    """The web server closes its connection; the application writes 50 blocks through write(),
    swallowing each error, as export loops do. Only the first failed write raised: every later
    block was kept in memory, for nothing (a 400 MiB loop took the worker to 428 MB). Now each
    write after the failure raises (the first may still reach the kernel before the reset)."""
    d = start_daemon("testapp", workers=1)
    (pid,) = d.wait_workers(1)
    with socket.create_connection(d.address, timeout=10) as sock:
        sock.sendall(build_request(make_params("GET", "/swallow-all?blocks=50")))
    d.wait_log(r"swallowed write failures: \d+ of 50", timeout=20)
    failures = int(re.search(r"failures: (\d+) of 50", d.log()).group(1))
    print(f"\n{failures} of 50 writes failed")
    assert failures >= 49
    assert d.workers() == [pid]


def test_a_request_header_sent_twice_is_joined_not_overwritten(start_daemon):
    """nginx passes each of a repeated request header as a param of its own (two Cookie lines,
    or HTTP/2's cookies, one per field), and the last overwrote the others: the application
    lost cookies. They are joined as HTTP joins them (cookies with "; "); for other names the
    last one still wins (nginx configurations override SCRIPT_NAME so)."""
    d = start_daemon("testapp", workers=1)
    d.wait_workers(1)
    pairs = [(k, v) for k, v in make_params("GET", "/environ").items() if k != "SCRIPT_NAME"]
    pairs += [("SCRIPT_NAME", "/first"), ("HTTP_COOKIE", "a=1"), ("HTTP_X_DUP", "one"),
              ("HTTP_COOKIE", "b=2"), ("HTTP_X_DUP", "two"), ("SCRIPT_NAME", "")]
    blob = b"".join(encode_params({k: v}) for k, v in pairs)
    with FCGIClient(d.address, timeout=10) as client:
        resp = client.request(blob)
    env = json.loads(resp.body)
    assert (env["HTTP_COOKIE"], env["HTTP_X_DUP"]) == ("a=1; b=2", "one, two")
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("", "/environ")


def test_an_empty_query_string_stays_empty(start_daemon):
    """nginx `rewrite ^ /x? break;` drops the query on purpose: QUERY_STRING comes empty while
    REQUEST_URI keeps the client's. QUERY_STRING was filled from REQUEST_URI whenever empty,
    giving the application the query the configuration had dropped. Now only a QUERY_STRING
    that was not sent at all is taken from REQUEST_URI."""
    d = start_daemon("testapp", workers=1)
    dropped = make_params("GET", "/environ?secret=1", extra={"QUERY_STRING": ""})
    missing = make_params("GET", "/environ?a=1", extra={"QUERY_STRING": None})
    with FCGIClient(d.address, timeout=10) as client:
        envs = [json.loads(client.request(p, keep_conn=True).body) for p in (dropped, missing)]
    assert [e["QUERY_STRING"] for e in envs] == ["", "a=1"]


def _until_closed(sock: socket.socket) -> tuple[bytes, str]:
    data = b""
    try:
        while chunk := sock.recv(1 << 20):
            data += chunk
        return data, "EOF"
    except ConnectionResetError:
        return data, "reset"


def test_on_a_unix_socket_the_failure_mark_waits_for_a_slow_reader(start_daemon, tmp_path):
    """2 MB streamed to a web server that reads slowly, then the application fails. The mark
    that tells the web server the response failed (a version-0 record header) was sent without
    waiting: with the buffer full it was dropped, and the stream ended with a clean EOF, which
    nginx without fastcgi_keep_conn takes for the response's end. Now it waits, as any write."""
    path = str(tmp_path / "d.sock")
    d = start_daemon("testapp", workers=1, bind=f"unix:{path}")
    d.wait_workers(1)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(build_request(make_params("GET", "/blocks-then-fail?n=8&size=250000")))
        data, how = bytearray(), "EOF"
        try:
            while chunk := sock.recv(4096):  # slower than the worker writes: its buffer stays full
                data += chunk
                time.sleep(0.0005)
        except ConnectionResetError:  # not expected on a unix socket: asserted below
            how = "reset"
    print(f"\n{len(data):,} bytes, then {how}; the last 8: {data[-8:]!r}")
    assert data[-8:] == bytes(8) and how == "EOF"  # the mark, after every byte of the response


def test_a_body_over_max_body_after_the_response_began_cuts_it_visibly(start_daemon):
    """The application sent a block, then read a body that outgrew --max-body (no
    CONTENT_LENGTH). The 413 cannot replace a response that has begun: it raised an internal
    error (UnboundLocalError in run_request) and the connection ended with a FIN, a complete-
    looking response. Now it is reset, and said so."""
    d = start_daemon("testapp", "--max-body", "1k", workers=1)
    (pid,) = d.wait_workers(1)
    params = make_params("POST", "/yield-then-read", extra={"CONTENT_LENGTH": None})
    with socket.create_connection(d.address, timeout=10) as sock:
        sock.sendall(build_request(params, b"x" * 5000))
        data, how = _until_closed(sock)
    print(f"\n{len(data)} bytes, then {how}")
    assert b"first block" in data and how == "reset"
    assert d.count(r"internal error|Traceback") == 0, d.log()[-2000:]
    assert d.count(r"after part of the response went out") == 1
    assert d.workers() == [pid]


def test_a_management_answer_during_the_body_does_not_commit_the_response(start_daemon):
    """While the application read the body, the web server asked FCGI_GET_VALUES and got its
    answer. That answer counted as part of the response gone out: the application's body short
    of its Content-Length then reset the connection instead of getting our 500 (nothing of the
    response had left). Now only bytes sent after the response's headers count."""
    from fcgiclient import FCGI_BEGIN_REQUEST, FCGI_GET_VALUES, FCGI_PARAMS, FCGI_STDIN, encode_record
    d = start_daemon("testapp", workers=1)
    d.wait_workers(1)
    with socket.create_connection(d.address, timeout=10) as sock:
        params = make_params("POST", "/read-short", body_len=10)
        sock.sendall(encode_record(FCGI_BEGIN_REQUEST, 1, struct.pack("!HB5x", 1, 0))
                     + encode_record(FCGI_PARAMS, 1, encode_params(params)) + encode_record(FCGI_PARAMS, 1, b"")
                     + encode_record(FCGI_STDIN, 1, b"12345"))
        wait_for(lambda: "busy" in open(f"/proc/{d.workers()[0]}/cmdline").read(), 5, "the worker reading")
        sock.sendall(encode_record(FCGI_GET_VALUES, 0, encode_params({"FCGI_MAX_CONNS": ""})))
        time.sleep(0.2)  # the answer goes out while the application still waits for the body
        sock.sendall(encode_record(FCGI_STDIN, 1, b"67890") + encode_record(FCGI_STDIN, 1, b""))
        data, how = _until_closed(sock)
    print(f"\n{how}: {data[-80:]!r}")
    assert b"Status: 500 Internal Server Error" in data and how == "EOF"


def test_a_stall_of_the_body_after_the_response_began_cuts_it_visibly(start_daemon):
    """The application sent a block, then read a body the web server stopped sending: after
    --read-timeout the connection was closed with a FIN, which a web server without kept
    connections reads as the response's end. A connection dropped in the middle of a request
    is now reset."""
    d = start_daemon("testapp", "--read-timeout", "1", workers=1)
    (pid,) = d.wait_workers(1)
    request = build_request(make_params("POST", "/yield-then-read", body_len=5000), b"x" * 5000)
    with socket.create_connection(d.address, timeout=10) as sock:
        sock.sendall(request[:len(request) - 4000])  # most of the body is never sent
        data, how = _until_closed(sock)
    print(f"\n{len(data)} bytes, then {how}")
    assert b"first block" in data and how == "reset"
    d.wait_log(r"connection closed: no input for 1s")
    assert d.workers() == [pid]


def test_a_worker_killed_mid_response_leaves_it_visibly_cut(start_daemon):
    """--timeout 1 and an application that sends a block, then hangs: the manager kills the
    worker. The kernel then closed its connection with a FIN, which nginx without
    fastcgi_keep_conn read as the response's end (the soak: 20,000 of 40,000 bytes as a
    complete chunked body). A response sent in parts is now reset whoever ends it, until it is
    whole; its normal end is still a FIN (checked below)."""
    d = start_daemon("testapp", "--timeout", "1", workers=1)
    d.wait_workers(1)
    with socket.create_connection(d.address, timeout=15) as sock:
        sock.sendall(build_request(make_params("GET", "/drip?n=2&d=5")))
        data, how = _until_closed(sock)
    print(f"\n{len(data)} bytes, then {how}")
    assert b"data: 0 " in data and how == "reset"
    with socket.create_connection(d.address, timeout=15) as sock:  # a whole one: a plain end
        sock.sendall(build_request(make_params("GET", "/drip?n=2&d=0.1")))
        data, how = _until_closed(sock)
    assert b"data: 1 " in data and how == "EOF"


def test_a_last_send_that_stalls_cuts_the_response_visibly(start_daemon):
    """A 100,000-byte response (a list of one block) goes out in one send, the request's last (END_REQUEST in it),
    to a web server that stops reading. After --read-timeout the connection was closed with a
    FIN: end_request had turned the reset off just before that send ("the response is whole"),
    so a web server without kept connections read the part it had as the whole response. A
    send that fails is now a reset, the last one too. Small buffers on our side of the
    connection (receive buffer, segment size) make the stall happen within the response."""
    d = start_daemon("testapp", "--read-timeout", "1", workers=1)
    (pid,) = d.wait_workers(1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        sock.settimeout(15)
        sock.connect(d.address)
        sock.sendall(build_request(make_params("GET", "/sleep?s=0")))
        d.wait_log(r"connection closed: web server stopped reading the response for 1s")
        data, how = _until_closed(sock)
    print(f"\n{len(data):,} of 100,008 bytes, then {how}")
    assert len(data) < 100_000 and how == "reset"
    assert d.workers() == [pid]

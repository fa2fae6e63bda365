"""Guards for behaviours a mutation-testing review found untested (a mutant survived each).

Each test names the defect it guards against; each was seen to fail with that defect put
into a copy of the source (PYTHONPATH=copy: the daemon subprocesses inherit it).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time

import pytest

from daemon import alive, run_cli, tcp_sockets, wait_for
from fcgiclient import (ConnectionClosed, FCGI_END_REQUEST, FCGI_STDIN, FCGI_STDOUT, FCGIClient, ProtocolError, build_request,
                        decode_records, encode_record, make_params)
from load import default_check
from test_lifecycle import _closed_within, _wait_busy, app_copy, get, set_version
from test_operability import manager_status


# ---------------------------------------------------------------- kept connections


def test_sigterm_closes_an_idle_kept_connection_at_once(start_daemon):
    """SIGTERM with a kept connection open and idle: the worker closes it and the daemon exits
    at once. Not closing it (worker._wind_down) makes the stop wait for --keep-conn-idle or
    --graceful-timeout (30 s each here), then SIGKILL."""
    d = start_daemon("testapp", "--keep-conn-idle", "30", "--graceful-timeout", "30", workers=1)
    (pid,) = d.wait_workers(1)
    with FCGIClient(d.address, timeout=10) as client:
        resp = client.request(make_params("GET", "/id?id=k1"), keep_conn=True)
        assert resp.body == f"id=k1 version=v1 pid={pid}".encode()
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        code = d.wait_exit(10)
        took = time.monotonic() - t0
        eof = client.read_record(time.monotonic() + 5)  # None: EOF at a record boundary
    print(f"\nstop with an idle kept connection: exit {code} in {took:.2f}s (--keep-conn-idle 30)")
    assert code == 0
    assert eof is None
    assert took < 3
    assert not alive(pid) and d.count(r"did not stop in time") == 0


def test_idle_kept_connections_close_in_time_across_hand_overs(start_daemon):
    """Eight idle kept connections (TCP), --keep-conn-idle 2, and a reload every 0.7 s: each
    reload hands the idle connections to the new generation. The new worker started their
    idle clock again, so with workers replaced more often than --keep-conn-idle (frequent
    deploys, --max-requests), abandoned kept connections were never closed and piled up
    until accept() ran out of descriptors (found by review: 289 held after 30 s). The
    kernel's own count of the connection's idle time (TCP_INFO) now goes with it."""
    d = start_daemon("testapp", "--keep-conn-idle", "2", workers=2)
    d.wait_workers(2)
    clients = [FCGIClient(d.address, timeout=10) for _ in range(8)]
    try:
        for i, client in enumerate(clients):
            assert client.request(make_params("GET", f"/id?id=k{i}"), keep_conn=True).status == 200
        t0 = time.monotonic()
        open_ = list(clients)
        hups, closed_at = 0, []
        while open_ and time.monotonic() - t0 < 8:
            d.signal(signal.SIGHUP)
            hups += 1
            deadline = time.monotonic() + 0.7
            still = [c for c in open_ if not _closed_within(c, max(deadline - time.monotonic(), 0.001))]
            closed_at += [round(time.monotonic() - t0, 1)] * (len(open_) - len(still))
            open_ = still
        took = time.monotonic() - t0
    finally:
        for client in clients:
            client.close()
    print(f"\n{len(open_)} of 8 idle kept connections still open after {took:.1f}s, "
          f"{hups} SIGHUPs (--keep-conn-idle 2), {d.count(r'reload complete')} reloads complete; "
          f"closed at {closed_at} s")
    assert not open_
    # 2 s idle, then up to a reload's hand-over (a connection in transit, or held by a worker
    # that retires, is closed by the next one's sweep); before: none in 8 s
    assert took < 6


def test_idle_kept_connection_is_closed_after_keep_conn_idle(start_daemon):
    """An idle kept connection is closed after --keep-conn-idle (1 s): not before, not never.
    Without it (worker._sweep) a web server's idle connections pile up until file descriptors
    run out."""
    d = start_daemon("testapp", "--keep-conn-idle", "1", workers=1)
    (pid,) = d.wait_workers(1)
    with FCGIClient(d.address, timeout=10) as client:
        resp = client.request(make_params("GET", "/id?id=i1"), keep_conn=True)
        t0 = time.monotonic()
        assert resp.body == f"id=i1 version=v1 pid={pid}".encode()
        eof = client.read_record(t0 + 5)  # ResponseTimeout if still open after 5 s
        took = time.monotonic() - t0
    print(f"\nidle kept connection closed after {took:.2f}s (--keep-conn-idle 1)")
    assert eof is None
    assert 0.95 <= took < 2.5  # idle from the END_REQUEST; swept every 0.25 s, waits at most 1 s
    assert d.workers() == [pid]
    assert get(d.address, "/id?id=i2").body == f"id=i2 version=v1 pid={pid}".encode()


def test_what_arrived_during_a_long_request_is_served_not_swept(start_daemon):
    """A kept connection's next request, and the rest of a half-received one, arrive while the
    only worker runs a 2.5 s request, longer than --keep-conn-idle and --read-timeout (1 s
    each). Both are answered after it. Judged by when the worker last read (worker._sweep
    without the readable check), both connections looked idle or stalled and were closed with
    their requests unanswered."""
    d = start_daemon("testapp", "--keep-conn-idle", "1", "--read-timeout", "1", workers=1)
    (pid,) = d.wait_workers(1)
    out: dict = {}

    def slow():
        out["slow"] = get(d.address, "/sleep?s=2.5", timeout=10)

    with FCGIClient(d.address, timeout=10) as kept, FCGIClient(d.address, timeout=10) as half:
        assert kept.request(make_params("GET", "/id?id=k1"), keep_conn=True).status == 200
        raw = build_request(make_params("GET", "/id?id=h1"))
        half.send_raw(raw[:20])  # BEGIN_REQUEST and part of PARAMS: read, not complete
        wait_for(lambda: _read_by_worker(half), 5, "the worker to read the half request")
        thread = threading.Thread(target=slow)
        thread.start()
        try:
            _wait_busy(d)
            time.sleep(0.3)  # the arrival: while the worker is busy (not a readiness wait)
            kept.send_raw(build_request(make_params("GET", "/id?id=k2"), keep_conn=True))
            half.send_raw(raw[20:])
            answers = [kept.read_response(1, keep_conn=True), half.read_response(1, keep_conn=False)]
        finally:
            thread.join(15)
    bodies = [a.body for a in answers]
    print(f"\nafter a 2.5 s request: {bodies}, slow: {out['slow'].status}")
    assert bodies == [f"id=k2 version=v1 pid={pid}".encode(), f"id=h1 version=v1 pid={pid}".encode()]
    assert out["slow"].status == 200
    assert d.count(r"connection closed") == 0
    assert d.workers() == [pid]


def _read_by_worker(client: FCGIClient) -> bool:
    """The worker has read what `client` sent: the daemon's end of the connection (established,
    from the client's port to the daemon's) has nothing in its receive queue (/proc/net/tcp)."""
    sock = client._socket()
    mine, theirs = sock.getsockname()[1], sock.getpeername()[1]
    queues = [s.rx_queue for s in tcp_sockets()
              if s.local_port == theirs and s.remote_port == mine and s.state == "01"]
    return queues == [0]


def test_413_on_a_kept_connection_closes_it(start_daemon):
    """A body over --max-body is answered 413 without being read, so the connection must be
    closed after the answer even though the web server asked to keep it: the unread body would
    otherwise be parsed as the next request's records (fastcgi._too_large clears KEEP_CONN)."""
    d = start_daemon("testapp", "--max-body", "100k", workers=1)
    (pid,) = d.wait_workers(1)
    params = make_params("POST", "/echo", extra={"CONTENT_LENGTH": "200000",
                                                   "CONTENT_TYPE": "application/octet-stream"})
    with FCGIClient(d.address, timeout=3) as client:
        client.send_raw(build_request(params, b"x" * 1000, keep_conn=True))
        # keep_conn=False: read_response then requires EOF after END_REQUEST (ProtocolError
        # "server kept the connection open without FCGI_KEEP_CONN" after 3 s otherwise)
        resp = client.read_response(1, keep_conn=False)
    assert resp.status == 413
    assert resp.app_status == 0
    d.wait_log(r"request body of 200000 bytes refused \(--max-body 102400\): /echo")
    assert d.workers() == [pid]
    assert get(d.address, "/hello").body == f"hello v1 {pid}".encode()


def test_a_refused_body_is_read_while_it_comes_then_let_go_when_it_stalls(start_daemon):
    """After the 413 (and our end of the connection), the rest of the refused body is read and
    thrown away: the web server's writes for the next 1.6 s all succeed, where a closed socket
    answered them with a reset. When nothing more comes for --read-timeout (1 s), the worker
    lets the connection go: a write then fails. The worker serves others meanwhile."""
    d = start_daemon("testapp", "--max-body", "1k", "--read-timeout", "1", workers=1)
    (pid,) = d.wait_workers(1)
    params = make_params("POST", "/echo", extra={"CONTENT_LENGTH": "10000000",
                                                   "CONTENT_TYPE": "application/octet-stream"})
    with socket.create_connection(d.address, timeout=3) as sock:
        sock.sendall(build_request(params, b"x" * 60000)[:-8])  # no end of the body
        answer = b""
        while chunk := sock.recv(65536):  # the 413 and END_REQUEST, then our end's EOF
            answer += chunk
        records = decode_records(answer)
        assert [r.type for r in records] == [FCGI_STDOUT, FCGI_STDOUT, FCGI_END_REQUEST]
        assert records[0].content.startswith(b"Status: 413 ")
        body = encode_record(FCGI_STDIN, 1, b"y" * 60000)
        sent = 0
        for _ in range(8):
            sock.sendall(body)  # ConnectionResetError here if the worker had closed it
            t0, sent = time.monotonic(), sent + len(body)
            assert get(d.address, "/hello").body == f"hello v1 {pid}".encode()
            time.sleep(0.2)  # the pace of a web server sending: not a readiness wait
        d.wait_log(r"connection closed: stopped reading the rest of a refused request", timeout=5)
        took = time.monotonic() - t0
        with pytest.raises(OSError):  # closed: a write is answered with a reset
            for _ in range(50):
                sock.sendall(body)
                time.sleep(0.02)
    print(f"\n{sent:,} bytes of the refused body taken after the 413; let go {took:.2f}s after they stopped")
    assert 0.95 <= took < 2.5
    assert d.workers() == [pid]


def test_a_full_scoreboard_refuses_a_worker_as_a_process_limit_does():
    """The scoreboard's records can run out (generations retiring one reload after another):
    allocate() raised IndexError, which no caller expected, and a reload at 513 workers stayed
    stuck for good (every later SIGHUP queued, SIGUSR2 refused). It is an OSError now, which
    the manager's spawn treats like a process limit: the reload fails, the old code serves."""
    from fcgidaemon.scoreboard import Pool, Scoreboard

    board = Scoreboard(capacity=2)
    first, second = board.allocate(101, 1), board.allocate(102, 1)
    with pytest.raises(OSError, match=r"all 2 worker records are in use"):
        board.allocate(103, 2)
    board.release(first, Pool())
    assert board.allocate(104, 2) == first
    assert {board.read(i).pid for i in (first, second)} == {104, 102}


# ---------------------------------------------------------------- reloads


def test_reload_kills_a_retiring_worker_still_busy_at_graceful_timeout(start_daemon):
    """A reload (SIGHUP, not SIGTERM) while the old worker is stuck in a 20 s request: the
    retiring worker is killed at --graceful-timeout (1 s), so old code does not linger for as
    long as its slowest request (or forever, for a hung one)."""
    d = start_daemon("testapp", "--graceful-timeout", "1", workers=1)
    (old,) = d.wait_workers(1)
    out: dict = {}

    def slow():
        try:
            out["resp"] = get(d.address, "/sleep?s=20", timeout=30)
        except Exception as exc:  # noqa: BLE001 - the assertion reports it
            out["error"] = exc

    thread = threading.Thread(target=slow)
    thread.start()
    try:
        _wait_busy(d)
        d.reload(2)
        t0 = time.monotonic()
        d.wait_log(rf"worker {old} still busy after 1s; killing it", timeout=5)
        wait_for(lambda: not alive(old), 3, f"retiring worker {old} to be killed")
        took = time.monotonic() - t0
        d.wait_log(rf"worker {old} \(slot 0, gen 1, retiring\) exited: killed by SIGKILL")
    finally:
        thread.join(30)
    (new,) = d.wait_workers(1)
    print(f"\nretiring worker {old} gone {took:.2f}s after the reload completed; new worker {new}")
    assert new != old
    assert "resp" not in out  # the stuck request was cut off, not answered
    assert get(d.address, "/id?id=after").body == f"id=after version=v1 pid={new}".encode()
    assert d.count(r"still busy after") == 1


def test_reload_whose_import_outlasts_ready_timeout_fails(start_daemon, tmp_path):
    """--ready-timeout (1 s) is enforced: a reload whose import takes 4 s is aborted, `reload
    --wait` exits 1 with the reason, and the old generation serves on, its pid unchanged. Not
    enforced, the reload waited out any import, however long (or hung)."""
    src = app_copy(tmp_path)
    d = start_daemon("liveapp", "--ready-timeout", "1", workers=1, pythonpath=[src])
    (old,) = d.wait_workers(1)
    set_version(src, "v2")
    app = src / "liveapp.py"
    app.write_text("import time\ntime.sleep(4)  # longer than --ready-timeout\n" + app.read_text())
    t0 = time.monotonic()
    out = run_cli(["reload", "--wait", "--pid", str(d.pid), "--timeout", "20"], tmp_path, timeout=30)
    took = time.monotonic() - t0
    print(f"\nreload --wait: exit {out.returncode} after {took:.2f}s: {out.stderr.strip()}")
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "reload failed: not ready within 1s; still serving generation 1" in out.stderr
    assert took < 3.5
    assert d.count(r"reload to generation 2 failed: not ready within 1s; still serving generation 1") == 1
    assert d.count(r"worker \d+ not ready after 1s; killing it") == 1
    assert d.wait_workers(1) == [old]
    assert get(d.address, "/hello").body == f"hello v1 {old}".encode()
    assert d.count(r"reload complete") == 0


# The daemon's own Python, with one change of timing: the manager's timer check waits 1 s when
# a starting worker's ready deadline has run out, as a manager busy for that long would.
LATE_TICK = """\
import time

import fcgidaemon.manager as manager
from fcgidaemon.states import WState

_tick = manager.Manager._tick


def _late_tick(self):
    now = time.monotonic()
    if any(w.state is WState.STARTING and w.deadline is not None and now >= w.deadline
           for w in self.workers.values()):
        time.sleep(1.0)
    _tick(self)


manager.Manager._tick = _late_tick
"""


def test_a_worker_ready_when_its_deadline_is_checked_is_ready_not_killed(start_daemon, tmp_path):
    """The new worker reports ready 0.2 s after its --ready-timeout (1 s) ran out, while the
    manager, between its wait and its timer check, has not read the report yet. The manager
    killed it, then read the report and took the dead worker as ready: "reload complete", the
    old generation retired, and each respawn of the slow code killed in turn (one worker:
    nothing serving). The moment is made wide here (LATE_TICK, through a sitecustomize; the
    daemon is otherwise the real one). Now the manager reads what the worker sent before it
    decides: the report is there, so the worker is ready and serves."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(LATE_TICK)
    src = app_copy(tmp_path)
    d = start_daemon("liveapp", "--ready-timeout", "1", workers=1, pythonpath=[src],
                     env={"PYTHONPATH": str(hook)})
    (old,) = d.wait_workers(1)
    set_version(src, "v2")
    app = src / "liveapp.py"
    app.write_text("import time\ntime.sleep(1.2)  # ready just after --ready-timeout\n" + app.read_text())
    d.reload(2, timeout=20)
    (new,) = d.wait_workers(1)
    resp = get(d.address, "/hello")
    print(f"\nold worker {old}, new worker {new}: {resp.body!r}")
    assert new != old and resp.body == f"hello v2 {new}".encode()
    assert d.count(r"killing it|exited: killed|failed") == 0, d.log()[-3000:]
    assert d.wait_workers(1) == [new]


# ---------------------------------------------------------------- exits, status, worker count


@pytest.mark.parametrize("how", ["raises", "dies"])
def test_startup_import_failure_exits_1(start_daemon, tmp_path, how):
    """The daemon (not `check`) started with an application that raises at import, or dies in
    it with no traceback (os._exit, as a C extension's crash does): it logs why and exits 1,
    so systemd and scripts see a failed start (0 read as a clean stop). A death with no
    traceback was respawned for good instead, the manager never ready and never exiting."""
    src = tmp_path / "src"
    src.mkdir()
    code_line = ("raise RuntimeError('config missing at import')" if how == "raises"
                 else "import os; os._exit(7)")
    (src / "raising.py").write_text(code_line + "\n")
    d = start_daemon("raising", workers=2, pythonpath=[src], wait=False)
    code = d.wait_exit(15)
    print(f"\nstartup import failure ({how}): exit {code}")
    assert code == 1
    if how == "raises":
        assert d.count(r"application failed to start: RuntimeError in .*raising\.py:1: "
                       r"config missing at import") == 1
    else:
        assert d.count(r"application failed to start: worker \d+ exit 7 while importing the "
                       r"application") == 1
    assert d.count(r"manager exiting with status 1") == 1


def test_a_callable_not_found_at_startup_exits_2(start_daemon):
    """APP names a module that imports but has no such callable (a typo): like a module not
    found, the same mistake at every start, so exit 2, which the unit's
    RestartPreventExitStatus=2 does not restart (`fcgidaemon check` said 2 for it already).
    The daemon exited 1, and systemd's Restart=on-failure restarted it for good."""
    d = start_daemon("testapp:nosuch", workers=2, wait=False)
    code = d.wait_exit(15)
    print(f"\nexit {code}: " + " / ".join(line for line in d.log().splitlines() if "failed" in line))
    assert code == 2
    assert d.count(r"application failed to start: 'nosuch' not found in \S+testapp\.py") == 1
    assert d.count(r"manager exiting with status 2") == 1


def test_timeout_kill_is_counted_in_the_status(start_daemon, tmp_path):
    """A request killed at --timeout shows as timeouts == 1 in `fcgidaemon status --json`
    (and the status page): the one number that tells an operator requests are being killed."""
    d = start_daemon("testapp", "--timeout", "1", workers=1)
    assert manager_status(d, tmp_path)["timeouts"] == 0
    with pytest.raises(ProtocolError):
        get(d.address, "/sleep?s=30", timeout=15)
    d.wait_log(r"worker \d+ timed out: busy 1\.\ds on GET /sleep")
    snap = wait_for(lambda: (s := manager_status(d, tmp_path))["timeouts"] and s, 5,
                    "the timeout to be counted")
    print(f"\nstatus after one --timeout kill: timeouts={snap['timeouts']}")
    assert snap["timeouts"] == 1
    assert snap["slow_requests"] == 0


def test_sigttou_never_goes_below_one_worker(start_daemon):
    """SIGTTOU with one worker keeps that worker: same pid, still serving, and one log line
    saying so. Allowing 0 retires the last worker and the site answers nothing."""
    d = start_daemon(workers=1)
    (pid,) = d.wait_workers(1)
    d.signal(signal.SIGTTOU)
    d.wait_log(r"worker count stays 1", timeout=5)
    assert d.count(r"worker count 1 -> 0") == 0
    assert d.workers() == [pid]
    assert get(d.address, "/hello").body == f"hello v1 {pid}".encode()
    assert d.workers() == [pid]


# ---------------------------------------------------------------- WSGI


def test_wsgi_errors_lines_reach_the_log(start_daemon):
    """What the application writes to environ['wsgi.errors'] appears in the daemon's log, each
    line once (PEP 3333's error stream; dropped, the application's own diagnostics vanish)."""
    d = start_daemon("testapp", workers=1)
    marker = f"m{time.monotonic_ns()}"
    resp = get(d.address, f"/wsgi-errors?marker={marker}")
    assert resp.status == 200 and resp.body == f"logged {marker}".encode()
    d.wait_log(rf"wsgi\.errors line two {marker}\n", timeout=5)
    assert d.count(rf"wsgi\.errors line one {marker}\n") == 1
    assert d.count(rf"wsgi\.errors line two {marker}\n") == 1


def test_start_response_with_exc_info_after_the_headers_reraises(start_daemon):
    """start_response(status, headers, exc_info) after a block was sent must re-raise exc_info
    (PEP 3333): the status already went out, so the server cannot send the error page as if it
    were part of a 200. The application's error propagates and the connection is dropped
    without END_REQUEST, so the web server knows the response is incomplete."""
    d = start_daemon("testapp", workers=1)
    (pid,) = d.wait_workers(1)
    marker = f"x{time.monotonic_ns()}"
    with FCGIClient(d.address, timeout=5) as client:
        client.send_raw(build_request(make_params("GET", f"/late-exc-info?marker={marker}"), keep_conn=True))
        records = list(client.recv_records(timeout=5))
        eof = client._eof
    stdout = b"".join(r.content for r in records if r.type == FCGI_STDOUT)
    print(f"\n{len(records)} records, stdout {stdout!r}, EOF {eof}")
    assert [r.type for r in records if r.type != FCGI_STDOUT] == []  # no END_REQUEST
    assert stdout == b"Status: 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst block\n"
    assert eof  # closed by the daemon, not a client timeout
    d.wait_log(r"connection closed: the response failed after part of it was sent; reset")
    assert d.count(r"application error on GET /late-exc-info") == 1
    assert d.count(rf"\nRuntimeError: late failure {marker}\n") == 1
    assert d.workers() == [pid]


# ---------------------------------------------------------------- the test helpers themselves


@pytest.mark.parametrize("junk", [b"", b"JUNK"], ids=["clean", "stray-bytes"])
def test_fcgiclient_sees_bytes_buffered_after_end_request(junk):
    """fcgiclient's close check after a response without FCGI_KEEP_CONN: bytes that arrived in
    the same recv() as END_REQUEST were already buffered, and it only looked at later ones, so
    stray bytes after END_REQUEST went unseen. A raw loopback responder sends a response, then
    `junk`, in one send, and closes before the client reads any of it."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    sent = threading.Event()

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            out = encode_record(FCGI_STDOUT, 1, b"Content-Type: text/plain\r\n\r\nhi")
            out += encode_record(FCGI_STDOUT, 1) + encode_record(FCGI_END_REQUEST, 1, struct.pack("!IB3x", 0, 0))
            conn.sendall(out + junk)
        sent.set()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with FCGIClient(listener.getsockname(), timeout=3) as client:
            client.send_raw(build_request(make_params("GET", "/")))
            assert sent.wait(5)  # all of it in the client's receive buffer: one recv() takes it
            if junk:
                with pytest.raises(ProtocolError, match=r"data after END_REQUEST: b'JUNK'"):
                    client.read_response(1, keep_conn=False)
            else:
                assert client.read_response(1, keep_conn=False).body == b"hi"
    finally:
        thread.join(5)
        listener.close()


def test_default_check_matches_the_id_exactly():
    """load.default_check tested `uid in body`: uid "1-2" passed for the body of "11-2" or
    "1-23", so crosstalk between those two requests went unseen."""
    from fcgiclient import Response

    def body(text: str) -> Response:
        return Response(200, [], text.encode())

    default_check(body("id=1-2 version=v1 pid=7"), "1-2")  # the test app's /id
    default_check(body("id=1-2"), "1-2")  # an echo of the query string
    default_check(body("/?id=1-2"), "1-2")  # an echo of the path
    for other in ("id=11-2 version=v1 pid=7", "id=1-23 version=v1 pid=7", "/?id=1-23", "xid=1-2"):
        with pytest.raises(AssertionError, match="id missing"):
            default_check(body(other), "1-2")


def _totals_reader(board, totals) -> tuple[int, int]:
    """Fork a reader that polls board.consistent() until the returned pipe end is closed. It
    exits 0 if no element of totals(pool, slots) ever decreased, 1 if one did, 2 if it read
    100 times or fewer."""
    go_r, go_w = os.pipe()
    reader = os.fork()
    if reader == 0:
        code, reads, last = 0, 0, None
        try:
            os.close(go_w)
            os.set_blocking(go_r, False)
            while True:
                try:
                    if os.read(go_r, 1) == b"":
                        break  # the manager side is done
                except BlockingIOError:
                    pass
                now = totals(*board.consistent())
                reads += 1
                if last is not None and any(a < b for a, b in zip(now, last)):
                    code = 1
                    break
                last = now
        finally:
            os._exit(code if reads > 100 else 2)
    os.close(go_r)
    return reader, go_w


def test_scoreboard_totals_never_go_backwards_while_workers_are_folded():
    """The manager folds an exited worker's counters into the pool and frees its record in two
    writes, bracketed by a sequence number a reader checks (Scoreboard.consistent). Without the
    bracket a reader between the two writes counted that worker twice, and the next read went
    backwards (which Prometheus takes for a counter reset). Real shared memory, two processes:
    a reader in its own process polls the totals while this one plays the manager for 2 s,
    allocating a record, writing a request to it as a worker would, and folding it."""
    from fcgidaemon.scoreboard import Pool, Scoreboard

    board, pool = Scoreboard(4), Pool()
    board.write_pool(pool)
    reader, go_w = _totals_reader(board, lambda p, slots: (
        p.requests_exited + sum(s.requests for s in slots),
        sum(p.histogram_exited) + sum(sum(s.histogram) for s in slots)))
    folds, end = 0, time.monotonic() + 2.0  # the measured interval: 2 s of folding
    try:
        while time.monotonic() < end:
            index = board.allocate(1, 1)
            board.request_finished(index, 1, time.monotonic())  # as the worker does
            board.release(index, pool)
            folds += 1
            pause = time.perf_counter() + 50e-6  # room for whole reads between folds (a real
            while time.perf_counter() < pause:   # manager folds far less often)
                pass
    finally:
        os.close(go_w)
        _, status = os.waitpid(reader, 0)
    print(f"\n{folds} folds in 2 s; reader exit {os.waitstatus_to_exitcode(status)}")
    assert pool.requests_exited == folds and sum(pool.histogram_exited) == folds
    assert os.waitstatus_to_exitcode(status) == 0  # 1: a total went backwards; 2: too few reads


def test_status_reads_stay_whole_while_the_manager_writes_often():
    """A manager replacing workers every few requests changes the board (folds, and its pool
    record on every turn of its loop) more often than a status page could read a thousand
    records in place: every attempt of consistent() failed, the last reading was taken across a
    fold and counted a worker twice, and the next read went backwards (test_operability's
    status counter test failed 4 times in 16 runs, with and without this stop's other changes).
    consistent() now copies the board between two reads of the sequence number. Real shared
    memory of the manager's capacity, a reader in its own process; this process writes as such
    a manager does, for 2 s."""
    from fcgidaemon.scoreboard import Pool, Scoreboard

    board, pool = Scoreboard(), Pool()
    board.write_pool(pool)
    reader, go_w = _totals_reader(board, lambda p, slots: (
        p.requests_exited + sum(s.requests for s in slots), p.listen_queue))
    writes, end = 0, time.monotonic() + 2.0
    try:
        while time.monotonic() < end:
            index = board.allocate(1, 1)
            board.request_finished(index, 1, time.monotonic())  # as the worker does
            board.release(index, pool)
            pool.listen_queue += 1  # a change for the pool record the loop writes next
            board.write_pool(pool)
            writes += 1
            pause = time.perf_counter() + 200e-6  # one turn of a busy manager's loop
            while time.perf_counter() < pause:
                pass
    finally:
        os.close(go_w)
        _, status = os.waitpid(reader, 0)
    print(f"\n{writes} folds and pool writes in 2 s; reader exit {os.waitstatus_to_exitcode(status)}")
    assert pool.requests_exited == writes
    assert os.waitstatus_to_exitcode(status) == 0  # 1: a total went backwards; 2: too few reads


def test_a_workers_counter_writes_are_never_read_as_zero():
    """A worker writes its own counters with no lock while any worker's status page copies the
    board. struct.pack_into clears the bytes it packs into before it writes them, so a copy
    taken in between saw a counter (requests, accepted, a histogram bucket) as 0 for a moment,
    and the status totals went backwards (test_operability's status counter test failed 3 times
    in 17 runs on a quiet machine: accepted 25 -> 0 for one live worker, its other fields whole).
    The worker's writes are now single stores of whole, aligned fields. Real shared memory, a
    reader in its own process; this process writes as a busy worker does, for 2 s."""
    from fcgidaemon.scoreboard import Pool, Scoreboard

    board = Scoreboard(4)
    board.write_pool(Pool())
    index = board.allocate(1, 1)
    reader, go_w = _totals_reader(board, lambda p, slots: (
        sum(s.requests for s in slots), sum(s.accepted for s in slots),
        sum(sum(s.histogram) for s in slots), sum(s.duration_sum for s in slots)))
    requests, end = 0, time.monotonic() + 2.0
    try:
        while time.monotonic() < end:
            board.connection_accepted(index)
            since = board.request_started(index, "GET", "/hello")
            requests += 1
            board.request_finished(index, requests, since)
            board.set_conns(index, requests % 3)
    finally:
        os.close(go_w)
        _, status = os.waitpid(reader, 0)
    slot = board.read(index)
    print(f"\n{requests} requests written in 2 s; reader exit {os.waitstatus_to_exitcode(status)}")
    assert slot.requests == slot.accepted == sum(slot.histogram) == requests
    assert os.waitstatus_to_exitcode(status) == 0  # 1: a counter went backwards; 2: too few reads


def _slow_request_under_way(d) -> tuple[threading.Thread, dict]:
    """A 1.5 s request in a thread, once a worker is busy with it; its response goes in out["resp"]."""
    out: dict = {}

    def slow() -> None:
        with FCGIClient(d.address, timeout=15) as client:
            out["resp"] = client.request(make_params("GET", "/sleep?s=1.5"))

    thread = threading.Thread(target=slow)
    thread.start()
    _wait_busy(d)
    return thread, out


def test_the_managers_signals_sent_to_a_worker_cost_no_request(start_daemon):
    """`systemctl kill -s USR2` signals every process of the service, workers too. A worker had
    SIGUSR2, SIGTTIN and SIGTTOU at their default actions: USR2 ended it mid-request (the
    client got no answer) and TTIN/TTOU stopped it. Now it logs each and serves on."""
    d = start_daemon("testapp", workers=1)
    (pid,) = d.wait_workers(1)
    thread, out = _slow_request_under_way(d)
    for signum in (signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU):
        os.kill(pid, signum)
    thread.join(15)
    assert out["resp"].status == 200
    d.wait_log(r"SIGTTOU is the manager's signal; ignored by this worker")
    assert d.count(r"is the manager's signal; ignored by this worker") == 3
    assert d.workers() == [pid]


def test_a_sighup_to_the_whole_service_reloads_and_keeps_every_kept_connection(start_daemon):
    """`systemctl kill -s HUP` (or pkill -HUP, or a closed terminal) signals every process of
    the service. Workers took SIGHUP as a stop and closed their idle kept connections while
    the manager's reload was handing them over: Apache answered 503 and nginx 502 for the
    requests sent on them. Now a worker ignores it, and the reload hands every one over."""
    d = start_daemon("testapp", workers=2)
    old = set(d.wait_workers(2))
    clients = [FCGIClient(d.address, timeout=10) for _ in range(8)]
    try:
        for i, client in enumerate(clients):
            assert client.request(make_params("GET", f"/id?id=a{i}"), keep_conn=True).status == 200
        os.killpg(d.pid, signal.SIGHUP)  # the daemon leads its own process group (session)
        d.wait_serving(2)
        wait_for(lambda: not old & set(d.workers()), 15, "the old workers to leave")
        answers = []
        for i, client in enumerate(clients):
            try:
                resp = client.request(make_params("GET", f"/id?id=b{i}"), keep_conn=True)
                answers.append(resp.body.split()[0].decode())
            except (ConnectionClosed, OSError) as exc:
                answers.append(type(exc).__name__)
    finally:
        for client in clients:
            client.close()
    print(f"\nafter a group-wide SIGHUP: {answers}")
    assert answers == [f"id=b{i}" for i in range(8)]
    assert d.count(r"SIGHUP is the manager's signal; ignored by this worker") == 2
    assert d.count(r"reload complete") == 1 and d.count(r"WARNING") == 0


def test_an_application_that_takes_sigterm_at_import_does_not_keep_it(start_daemon, tmp_path):
    """The application sets its own SIGTERM handler at import (its own cleanup, as some
    frameworks do). It replaced the worker's: a stop no longer waited for the request in flight
    (the application's handler ran instead). The worker puts its own back, and says so."""
    from test_lifecycle import app_copy
    src = app_copy(tmp_path)
    (src / "liveapp.py").write_text("import signal, sys\n"
                                    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
                                    + (src / "liveapp.py").read_text())
    d = start_daemon("liveapp", workers=1, pythonpath=[src])
    d.wait_workers(1)
    thread, out = _slow_request_under_way(d)
    d.signal(signal.SIGTERM)
    thread.join(15)
    assert out["resp"].status == 200 and out["resp"].body.startswith(b"slept 1.5 ")
    assert d.wait_exit(10) == 0
    assert d.count(r"the application set its own SIGTERM handler on import") == 1



def test_kept_connections_handed_back_late_go_back_to_their_worker(start_daemon):
    """Worker A holds 4 kept connections and is busy; SIGTTIN adds an idle worker B, and the
    manager asks A for 2 back (the balance). SIGTTOU then retires B before A reads that. When A
    hands the 2 over, there was no other ready worker: the manager closed them, though A was
    ready, and the web server's next requests on them failed (the soak: "no ready worker to take
    2 connection(s); closing them"). They now go back to A."""
    d = start_daemon("testapp", workers=1)
    (a,) = d.wait_workers(1)
    conns = [FCGIClient(d.address, timeout=15) for _ in range(4)]
    try:
        for i, client in enumerate(conns):
            assert client.request(make_params("GET", f"/id?id=first{i}"), keep_conn=True).status == 200
        out: dict = {}
        slow = threading.Thread(target=lambda: out.update(
            resp=conns[0].request(make_params("GET", "/sleep?s=3"), keep_conn=True)))
        slow.start()
        _wait_busy(d)
        d.signal(signal.SIGTTIN)
        d.wait_log(rf"worker {a} holds 4 kept connections, \d+ more than the fewest; asking for 2 back")
        d.signal(signal.SIGTTOU)
        d.wait_log(r"worker count 2 -> 1")
        slow.join(15)
        assert out["resp"].status == 200
        seconds = [client.request(make_params("GET", f"/id?id=second{i}"), keep_conn=True)
                   for i, client in enumerate(conns[1:], 1)]
        assert [r.status for r in seconds] == [200] * 3
        assert d.count(r"no ready worker to take") == 0, d.log()[-2000:]
    finally:
        for client in conns:
            client.close()

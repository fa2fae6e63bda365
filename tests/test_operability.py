"""Status and ping pages, metrics, the listen queue, dynamic worker count, access log."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import threading
import time

from prometheus_client.openmetrics.parser import text_string_to_metric_families

from daemon import free_port, run_cli, wait_for
from fcgiclient import (FCGI_ABORT_REQUEST, FCGI_BEGIN_REQUEST, FCGI_END_REQUEST, FCGI_KEEP_CONN,
                        FCGIClient, build_request, encode_record, make_params)
from load import FCGIChecker, run_load
from test_lifecycle import app_copy, get, proc_title

STATUS = ("--status-path", "/fcgi-status", "--ping-path", "/fcgi-ping")


def status_json(d, query: str = "json") -> dict:
    return json.loads(get(d.address, f"/fcgi-status?{query}").body)


def manager_status(d, tmp_path) -> dict:
    out = run_cli(["status", "--json", "--pid", str(d.pid)], tmp_path)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_ping(start_daemon):
    d = start_daemon("testapp", *STATUS, workers=1)
    resp = get(d.address, "/fcgi-ping")
    assert resp.status == 200 and resp.body == b"pong\n"


def test_status_counts_requests_exactly(start_daemon):
    d = start_daemon("testapp", *STATUS, workers=3)
    for i in range(37):
        assert get(d.address, f"/id?id={i}").status == 200
    assert status_json(d)["requests"] == 37  # the status request itself is still in progress
    snap = status_json(d)
    assert snap["requests"] == 38 and snap["accepted"] == 39
    assert snap["workers"]["idle"] + snap["workers"]["busy"] == 3
    assert sum(snap["duration_histogram"].values()) == 38


def test_a_request_aborted_before_it_ran_counts_as_taking_no_time(start_daemon):
    """Its end is counted with the others, but its duration is not the time since the
    previous request began (here a 0.6 s one): that would put it in a slow bucket."""
    d = start_daemon("testapp", *STATUS, workers=1)
    assert get(d.address, "/sleep?s=0.6").status == 200
    with FCGIClient(d.address, timeout=5) as client:
        begin = encode_record(FCGI_BEGIN_REQUEST, 1, bytes([0, 1, FCGI_KEEP_CONN, 0, 0, 0, 0, 0]))
        client.send_raw(begin + encode_record(FCGI_ABORT_REQUEST, 1))
        rec = client.read_record(time.monotonic() + 3)
        assert rec.type == FCGI_END_REQUEST and rec.request_id == 1
    snap = status_json(d)
    slow = sum(n for bound, n in snap["duration_histogram"].items() if bound == "+Inf" or float(bound) >= 0.5)
    print(f"requests {snap['requests']}, histogram {snap['duration_histogram']}")
    assert snap["requests"] == 2 and slow == 1  # the sleep only


def test_a_hostile_path_cannot_add_rows_to_the_status_page(start_daemon):
    """A busy request whose path holds newlines (and a forged row) and UTF-8: the text page
    keeps one row for it, the newlines as \\x0a, "café" as itself. The path went out as it
    came (rows of its own in the text page) and UTF-8 read as latin-1 ("cafÃ©")."""
    d = start_daemon("testapp", *STATUS, workers=2)
    hostile = "/x\nidle workers:         999\ncaf\u00e9/sleep"
    params = make_params("GET", "/sleep?s=2", extra={"REQUEST_URI": hostile + "?s=2"})
    thread = threading.Thread(target=lambda: FCGIClient(d.address, timeout=10).request(params))
    thread.start()
    try:
        wait_for(lambda: status_json(d)["workers"]["busy"] == 2, 5, "the request to be busy")
        text = get(d.address, "/fcgi-status?full").body.decode()
        full = status_json(d, "json&full")
    finally:
        thread.join(10)
    print(f"\n{[line for line in text.splitlines() if 'request_uri' in line]}")
    assert len(re.findall(r"^idle workers:", text, re.M)) == 1
    assert re.search(r"^request_uri: +/x\\x0aidle workers: +999\\x0acaf\u00e9/sleep$", text, re.M)
    assert "/x\\x0aidle workers:         999\\x0acaf\u00e9/sleep" in [p["request_uri"] for p in full["processes"]]


def test_busy_request_shows_in_text_json_and_openmetrics(start_daemon):
    d = start_daemon("testapp", *STATUS, workers=2)
    thread = threading.Thread(target=lambda: get(d.address, "/sleep?s=2&secret=1", timeout=10))
    thread.start()
    wait_for(lambda: status_json(d)["workers"]["busy"] == 2, 5, "the slow request to be busy")
    time.sleep(0.3)  # let it age measurably
    full = status_json(d, "json&full")
    busy = [p for p in full["processes"] if p["request_uri"] == "/sleep"]
    assert len(busy) == 1 and busy[0]["request_method"] == "GET" and busy[0]["request_age"] >= 0.3
    assert "secret" not in json.dumps(full)  # no query strings on the status page
    text = get(d.address, "/fcgi-status?full").body.decode()
    assert re.search(r"^request_uri: +/sleep$", text, re.M)
    assert re.search(r"^last_request_duration: +[\d.]+$", text, re.M)  # ran into its value before
    assert re.search(r"^busy workers: +2$", text, re.M)
    metrics = {}
    raw = get(d.address, "/fcgi-status?openmetrics").body.decode()
    for family in text_string_to_metric_families(raw):
        for sample in family.samples:
            metrics[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert metrics[("fcgidaemon_workers", (("state", "busy"),))] == 2
    ages = [v for (name, _), v in metrics.items() if name == "fcgidaemon_worker_request_age_seconds"]
    assert any(age >= 0.3 for age in ages)
    assert ("fcgidaemon_request_duration_seconds_bucket", (("le", "+Inf"),)) in metrics
    thread.join(10)


def test_listen_queue_grows_and_drains(start_daemon, tmp_path):
    d = start_daemon("testapp", *STATUS, workers=1)
    hold = threading.Thread(target=lambda: get(d.address, "/sleep?s=3", timeout=20))
    hold.start()
    wait_for(lambda: manager_status(d, tmp_path)["workers"]["busy"] == 1, 5, "the worker to be busy")
    waiting = []
    for i in range(3):
        client = FCGIClient(d.address, timeout=10)
        client.send_raw(build_request(make_params("GET", f"/id?id=q{i}")))
        waiting.append(client)
    wait_for(lambda: manager_status(d, tmp_path)["listen_queue"] == 3, 10, "3 queued connections")
    for i, client in enumerate(waiting):
        assert client.read_response(1, keep_conn=False).body.startswith(f"id=q{i} ".encode())
    hold.join(20)
    snap = manager_status(d, tmp_path)
    assert snap["listen_queue"] == 0 and snap["listen_queue_max"] >= 3
    assert snap["all_busy"] >= 1


def test_listen_queue_on_a_unix_socket(start_daemon, tmp_path):
    path = tmp_path / "q.sock"
    d = start_daemon("testapp", *STATUS, workers=1, bind=f"unix:{path}")
    hold = threading.Thread(target=lambda: get(str(path), "/sleep?s=3", timeout=20))
    hold.start()
    wait_for(lambda: manager_status(d, tmp_path)["workers"]["busy"] == 1, 5, "the worker to be busy")
    extra = [socket.socket(socket.AF_UNIX) for _ in range(2)]
    for sock in extra:
        sock.connect(str(path))
    wait_for(lambda: manager_status(d, tmp_path)["listen_queue"] == 2, 10, "2 queued unix connections")
    for sock in extra:
        sock.close()
    hold.join(20)
    wait_for(lambda: manager_status(d, tmp_path)["listen_queue"] == 0, 10, "the queue to drain")


def test_reloads_counted_with_reason(start_daemon, tmp_path):
    src = app_copy(tmp_path)
    d = start_daemon("liveapp", *STATUS, workers=1, pythonpath=[src])
    d.reload(2)
    (src / "liveapp.py").write_text("raise RuntimeError('no database')\n")
    d.signal(signal.SIGHUP)
    d.wait_log(r"reload to generation 3 failed")
    snap = status_json(d)
    assert snap["reloads_ok"] == 1 and snap["reloads_failed"] == 1 and snap["generation"] == 2
    assert re.match(r"RuntimeError in .*liveapp\.py:1: no database", snap["last_reload_failure"])


def test_status_allow_refuses_other_addresses(start_daemon):
    d = start_daemon("testapp", *STATUS, "--status-allow", "10.0.0.0/8", workers=1)
    with FCGIClient(d.address) as client:
        assert client.request(make_params("GET", "/fcgi-status")).status == 403
    with FCGIClient(d.address) as client:
        resp = client.request(make_params("GET", "/fcgi-status", remote_addr="10.1.2.3"))
    assert resp.status == 200 and b"manager pid:" in resp.body


def test_status_allow_takes_an_ipv4_mapped_address_as_ipv4(start_daemon):
    """A front end on a dual-stack socket reports ::ffff:127.0.0.1: that is loopback, as
    --allow-from already knew; it got 403."""
    d = start_daemon("testapp", *STATUS, workers=1)
    with FCGIClient(d.address) as client:
        got = [client.request(make_params("GET", "/fcgi-ping", remote_addr=addr), keep_conn=True).status
               for addr in ("::ffff:127.0.0.1", "::ffff:10.0.0.1", "::1")]
    assert got == [200, 403, 200]


def test_status_counters_never_go_backwards(start_daemon, tmp_path):
    """Workers replaced every 3 requests and a reload every second under load, the status page
    read continuously: requests, accepted and the histogram's count never decrease (an exited
    worker's counters are folded into the pool in one step readers cannot see half of; they
    went backwards hundreds of times, which Prometheus takes for counter resets)."""
    d = start_daemon("testapp", *STATUS, "--max-requests", "3", workers=3)
    d.wait_workers(3)
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            get(d.address, "/hello", timeout=10)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    last, drops, reads = {"requests": 0, "accepted": 0, "count": 0}, [], 0
    try:
        deadline, next_hup = time.monotonic() + 5, time.monotonic() + 1
        while time.monotonic() < deadline:
            if time.monotonic() > next_hup:
                d.signal(signal.SIGHUP)
                next_hup += 1
            s = status_json(d)
            reads += 1
            now = {"requests": s["requests"], "accepted": s["accepted"],
                   "count": sum(s["duration_histogram"].values())}
            drops += [(k, last[k], now[k]) for k in now if now[k] < last[k]]
            last = {k: max(last[k], now[k]) for k in now}
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
    print(f"\n{reads} status reads, {last['requests']} requests counted, {len(drops)} decreases {drops[:5]}")
    assert reads > 100 and last["requests"] > 100 and drops == []


def test_listen_backlog_is_the_kernels(start_daemon):
    """--backlog above net.core.somaxconn is capped by the kernel: the status page said the
    option's value, not what the socket has."""
    somaxconn = int(open("/proc/sys/net/core/somaxconn").read())
    d = start_daemon("testapp", *STATUS, "--backlog", str(somaxconn * 4), workers=1)
    wait_for(lambda: status_json(d)["listen_backlog"] == somaxconn, 5, "the kernel's backlog")


def test_the_default_listen_queue_holds_a_burst(start_daemon, tmp_path):
    """300 connections arrive at once on a unix socket while the only worker is busy: they wait
    in the listen queue. The default queue was 100, and a unix socket refuses a connection to a
    full queue at once (EAGAIN: nginx answered 502 to 195 of 300 such requests); now 1024."""
    path = tmp_path / "d.sock"
    d = start_daemon("testapp", *STATUS, workers=1, bind=f"unix:{path}")
    d.wait_workers(1)
    somaxconn = int(open("/proc/sys/net/core/somaxconn").read())
    busy = threading.Thread(target=lambda: get(str(path), "/sleep?s=2", timeout=10))
    busy.start()
    socks, refused = [], 0
    try:
        wait_for(lambda: "busy" in proc_title(d.workers()[0]), 5, "the worker busy")
        for _ in range(300):
            sock = socket.socket(socket.AF_UNIX)
            sock.setblocking(False)
            socks.append(sock)
            try:
                sock.connect(str(path))
            except BlockingIOError:
                refused += 1
    finally:
        for sock in socks:
            sock.close()
        busy.join(10)
    backlog = status_json(d)["listen_backlog"]
    print(f"\n300 connections, {refused} refused; listen backlog {backlog}")
    assert backlog == min(1024, somaxconn) and refused == 0


def test_dynamic_workers_grow_to_max_and_shrink_back(start_daemon, tmp_path):
    d = start_daemon("testapp", *STATUS, "--min-workers", "1", "--max-workers", "4",
                     "--idle-timeout", "1", workers=1)
    with FCGIChecker(d.address, keep_conn=False, uri_template="/id?id={uid}&sleep=0.2") as checker:
        result = run_load(checker, clients=8, duration=4)
    targets = [int(n) for n in re.findall(r"scaling up to (\d+) workers?", d.log())]
    print(f"{result.summary()}; scaled up to {targets}")
    assert result.failures == 0, result.errors
    assert targets == [2, 3, 4]  # grew one at a time to --max-workers and not beyond
    wait_for(lambda: manager_status(d, tmp_path)["workers_target"] == 1, 15, "shrinking to --min-workers")
    d.wait_workers(1)
    assert get(d.address, "/hello").status == 200
    assert d.count(r"scaling down to \d+ workers?") == 3


def test_one_client_at_a_time_does_not_grow_the_pool(start_daemon):
    """One client sending one request at a time, each on a new connection, keeps a worker
    busy part of the time: the pool stays as it is. The manager decided from one look at the
    scoreboard: a request waiting in the listen queue for the microseconds before an idle worker
    took it, or the one worker busy at that moment, added a worker; the pool went to
    --max-workers with 5 of 6 idle, and cycled between 3 and 6 for as long as the client ran."""
    d = start_daemon("testapp", "--min-workers", "2", "--max-workers", "6", "--idle-timeout", "3",
                     workers=2)
    with FCGIChecker(d.address, keep_conn=False, uri_template="/id?id={uid}") as checker:
        result = run_load(checker, clients=1, duration=4)
    print(f"\n{result.summary()}; scaling lines: {d.count(r'scaling (up|down)')}")
    assert result.failures == 0, result.errors
    assert d.count(r"scaling up") == 0
    assert len(d.workers()) == 2


def test_kept_connections_do_not_keep_the_pool_at_its_peak(start_daemon, tmp_path):
    """A burst grows the pool to 4; then 8 kept connections carry a light load (each a request
    every 0.2 s). The balancer spreads kept connections over every worker, so the highest one,
    the only one the manager looked at, was never idle for --idle-timeout: the pool stayed at 4
    for good. Now the pool shrinks to --min-workers while that load goes on, and loses nothing."""
    d = start_daemon("testapp", *STATUS, "--min-workers", "1", "--max-workers", "4",
                     "--idle-timeout", "1", workers=1)
    with FCGIChecker(d.address, keep_conn=False, uri_template="/id?id={uid}&sleep=0.2") as checker:
        burst = run_load(checker, clients=8, duration=4)
    assert burst.failures == 0 and manager_status(d, tmp_path)["workers_target"] == 4
    done = threading.Event()
    with FCGIChecker(d.address, keep_conn=True, uri_template="/id?id={uid}") as checker:
        def paced(client: int, seq: int) -> object:
            done.wait(0.2)
            return checker(client, seq)
        out: list = []
        light = threading.Thread(target=lambda: out.append(run_load(paced, clients=8, duration=8)))
        light.start()
        try:
            wait_for(lambda: manager_status(d, tmp_path)["workers_target"] == 1, 8,
                     "shrinking to --min-workers under a light kept-connection load")
        finally:
            light.join(30)
    result = out[0]
    print(f"\nburst: {burst.summary()}\nlight, kept: {result.summary()}; "
          f"scaling down lines: {d.count(r'scaling down')}")
    assert result.failures == 0, result.errors
    assert d.count(r"scaling down to \d+ workers?") == 3


def test_access_log(start_daemon, tmp_path):
    log = tmp_path / "access.log"
    d = start_daemon("testapp", "--access-log", str(log), workers=1)
    with FCGIClient(d.address) as client:
        client.request(make_params("GET", "/id?id=1", http_user_agent="probe/1.0",
                                   http_referer="http://r/"))
    pid = d.workers()[0]
    wait_for(log.exists, 5, "the access log")
    line = log.read_text().strip()
    assert re.fullmatch(rf'127\.0\.0\.1 - - \[[^]]+\] "GET /id\?id=1 HTTP/1\.1" 200 \d+ "http://r/" '
                        rf'"probe/1\.0" \d+ {pid}', line), line


def test_a_reload_whose_access_log_cannot_be_opened_fails_safely(start_daemon, tmp_path):
    """The access log's directory removed since the start: the new generation cannot open it.
    That reload fails with the reason and the old generation serves on (its workers crashed
    with a traceback each, as if the code were broken); once it is back, the reload works."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    d = start_daemon("testapp", "--access-log", str(logdir / "access.log"), workers=2)
    old = d.wait_workers(2)
    shutil.rmtree(logdir)
    out = run_cli(["reload", "--wait", "--pid", str(d.pid)], tmp_path)
    print(f"\n{out.returncode} {out.stderr.strip()}")
    assert out.returncode == 1
    assert f"cannot open --access-log {logdir / 'access.log'}: No such file or directory" in out.stderr
    assert d.workers() == old and get(d.address, "/hello").status == 200
    assert d.count("worker crashed") == 0
    logdir.mkdir()
    d.reload(3)
    assert get(d.address, "/hello").status == 200
    wait_for(lambda: (logdir / "access.log").exists() and "GET /hello" in (logdir / "access.log").read_text(),
             5, "the new generation's access log line")


def test_the_access_log_says_what_the_client_got(start_daemon, tmp_path):
    """An application that fails before its body is sent gives the client our 500: its line says
    500 and 21 bytes. The line was missing when the application raised at once, and said the
    application's 200 when its first block raised, or when the body was str, not bytes, and "-"
    when it never called start_response; a body sent through write() was counted as none."""
    log = tmp_path / "access.log"
    d = start_daemon("testapp", "--access-log", str(log), workers=1)
    uris = ["/error", "/error-in-iter", "/str-body", "/no-start", "/drip-write?n=2&d=0", "/hello"]
    answers = [get(d.address, uri) for uri in uris]
    wait_for(lambda: log.exists() and log.read_text().count("\n") == len(uris), 5, "the access log lines")
    logged = re.findall(r'"GET (\S+) HTTP/1\.1" (\d+) (\d+|-) ', log.read_text())
    print(f"\n{logged}")
    assert [a.status for a in answers] == [500, 500, 500, 500, 200, 200]
    assert logged == [(uri, str(a.status), str(len(a.body))) for uri, a in zip(uris, answers)]


def test_the_access_log_cannot_be_forged_by_a_request(start_daemon, tmp_path):
    """Hostile values (a newline and a forged line in the user agent, CR LF in the URI, a
    terminal escape, a user name with a space and a quote) stay in one line, each byte outside
    printable ASCII as \\xhh, as nginx and Apache write them. They were written as they came:
    one request made four lines, one of them a well-formed forgery."""
    log = tmp_path / "access.log"
    d = start_daemon("testapp", "--access-log", str(log), workers=1)
    forged = '\n1.2.3.4 - - [01/Jan/2000:00:00:00 +0000] "GET /forged HTTP/1.1" 200 1 "-" "x"'
    params = make_params("GET", "/id?a=1\r\nb", http_user_agent="\x1b[31mred" + forged,
                         extra={"REMOTE_USER": 'bob "the" smith', "HTTP_REFERER": "caf\xe9"})
    with FCGIClient(d.address) as client:
        assert client.request(params).status == 200
    wait_for(lambda: log.exists() and log.read_text().endswith("\n"), 5, "the access log line")
    text = log.read_text()
    print(f"\n{text}")
    assert text.count("\n") == 1 and "\x1b" not in text and "\r" not in text
    assert text.startswith('127.0.0.1 - bob\\x20\\"the\\"\\x20smith [')
    assert '"GET /id?a=1\\x0d\\x0ab HTTP/1.1" 200 ' in text
    assert '"caf\\xc3\\xa9" "\\x1b[31mred\\x0a1.2.3.4 - - [01/Jan/2000:00:00:00 +0000] \\"GET /forged' in text


def test_the_access_log_is_reopened_when_logrotate_moves_or_removes_it(start_daemon, tmp_path):
    """logrotate's default renames the file and creates a new one: the workers notice on their
    own (no signal, no reload) and write to the new file; a removed file is created again.
    Every request's line is in exactly one of the files: none lost, none twice."""
    log = tmp_path / "access.log"
    d = start_daemon("testapp", "--access-log", str(log), workers=2)
    d.wait_workers(2)
    sent: list[str] = []

    def send(count: int, tag: str) -> None:
        for i in range(count):
            sent.append(f"{tag}{i}")
            assert get(d.address, f"/id?id={tag}{i}").status == 200

    def lines(path) -> list[str]:
        return re.findall(r'"GET /id\?id=(\w+) ', path.read_text()) if path.exists() else []

    rotated = tmp_path / "access.log.1"
    send(10, "a")
    log.rename(rotated)
    log.write_text("")  # logrotate's `create`
    send(5, "b")  # while the workers may still write to the renamed file
    d.wait_log(r"access log .*access\.log was moved or removed; reopened", count=2, timeout=5)
    send(10, "c")
    wait_for(lambda: len(lines(rotated) + lines(log)) >= len(sent), 5, "every line")
    found = lines(rotated) + lines(log)
    print(f"\n{len(sent)} requests around the rotation, {len(found)} access log lines")
    assert sorted(found) == sorted(sent)
    assert set(lines(log)) >= {f"c{i}" for i in range(10)}  # after the reopen: the new file
    log.unlink()
    d.wait_log(r"access log .*access\.log was moved or removed; reopened", count=4, timeout=5)
    send(10, "d")
    wait_for(lambda: len(lines(log)) >= 10, 5, "the lines in the file created again")
    assert lines(log) == [f"d{i}" for i in range(10)]


def test_a_full_disk_under_the_access_log_costs_no_response(start_daemon):
    """/dev/full answers every write with ENOSPC, as a full disk does: each response still goes
    out whole, and the lost lines are reported once, not once per request (a failed write used
    to turn every response into a dropped connection and an 'application error')."""
    d = start_daemon("testapp", "--access-log", "/dev/full", workers=1)
    bodies = [get(d.address, f"/id?id={i}").body for i in range(20)]
    assert [b.split()[0] for b in bodies] == [f"id={i}".encode() for i in range(20)]
    d.wait_log(r"access log write failed: No space left on device \(1 line\(s\) lost")
    assert d.count(r"access log write failed") == 1 and "application error" not in d.log()


def test_process_title_shows_the_busy_request_and_its_age(start_daemon):
    from test_lifecycle import proc_title
    d = start_daemon("testapp", workers=1)
    worker = d.wait_workers(1)[0]
    thread = threading.Thread(target=lambda: get(d.address, "/sleep?s=3&q=secret", timeout=10))
    thread.start()
    def aged() -> str | None:
        title = proc_title(worker)
        return title if re.search(r"busy [1-9]\.\ds", title) else None
    title = wait_for(aged, 5, "the title to show the request's age")
    assert re.fullmatch(r"fcgidaemon: worker 0 gen 1 busy [1-9]\.\ds GET /sleep", title), title
    thread.join(10)
    wait_for(lambda: proc_title(worker) == "fcgidaemon: worker 0 gen 1 idle", 5, "the idle title")


def test_a_control_character_in_the_request_does_not_stop_the_titles(start_daemon):
    """A NUL in the request line (REQUEST_METHOD "G\\0T"): setproctitle raised ValueError in the
    ticker thread, which died, and the worker's title stayed frozen for its life (idle while
    busy, or busy with a request long over). Control characters are shown as "?"."""
    from fcgiclient import FCGIClient, make_params
    from test_lifecycle import proc_title
    d = start_daemon("testapp", workers=1)
    worker = d.wait_workers(1)[0]

    def slow(method: str, seconds: float) -> None:
        with FCGIClient(d.address, timeout=10) as client:
            client.request(make_params(method, f"/sleep?s={seconds}"), keep_conn=False)

    def busy(pattern: str):
        return lambda: re.fullmatch(pattern, proc_title(worker))

    for method, shown in (("G\0T", "G\\?T"), ("POST", "POST")):
        thread = threading.Thread(target=slow, args=(method, 1.5))
        thread.start()
        wait_for(busy(rf"fcgidaemon: worker 0 gen 1 busy [0-9]\.\ds {shown} /sleep"), 5, f"busy {method!r}")
        thread.join(10)
        wait_for(busy(r"fcgidaemon: worker 0 gen 1 idle"), 5, "the idle title")
    assert d.count(r"Exception in thread") == 0


def test_the_manager_loads_no_module_it_never_uses(start_daemon, tmp_path):
    """Every page the manager holds at a fork counts, shared, in each worker's PSS. argparse
    imports shutil (and with it zlib, bz2, lzma) for the terminal width, and getaddrinfo() of
    a str host imports the idna codec (unicodedata, stringprep): ~0.5 MB that serve nothing.
    The manager's own memory map shows whether their libraries were loaded."""
    port = free_port()
    d = start_daemon("testapp:application", bind=f"localhost:{port}")
    maps = open(f"/proc/{d.pid}/maps").read()
    loaded = sorted({name for name in ("liblzma", "libbz2", "_lzma.", "_bz2.", "unicodedata.")
                     if name in maps})
    assert loaded == [], f"the manager mapped {loaded}"
    assert get(("127.0.0.1", port), "/").status == 200  # "localhost" was resolved and bound


def test_help_is_wrapped_to_columns(tmp_path):
    """--help keeps the terminal width (COLUMNS here) without shutil."""
    for columns in (60, 120):
        out = run_cli(["--help"], tmp_path, env={"COLUMNS": str(columns)})
        assert out.returncode == 0, out.stderr
        widths = [len(line) for line in out.stdout.splitlines()]
        assert max(widths) <= columns - 2, (columns, max(widths))
        assert max(widths) > columns - 20, (columns, max(widths))  # and uses it

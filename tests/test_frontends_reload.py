"""Deploys cost nothing, measured through the real front ends (issue 3).

64 HTTP clients hammer a real Apache (mod_proxy_fcgi) or nginx in front of the
real daemon while the daemon gets a SIGHUP every half second. Every response
is checked: status 200 AND the body names exactly this request's id (so a
response delivered to the wrong client counts as a failure too). Required:
0 non-2xx, 0 socket errors, and the daemon really reloaded (>= 15 "reload
complete" lines in 12 s: some SIGHUPs come during a reload and are queued).

Matrix: Apache without/with ``enablereuse=on``, nginx without/with
``fastcgi_keep_conn on`` (upstream keepalive pool), each over TCP and over a
unix socket; plus a 200 ms-request variant (every reload finds requests in
flight) on four of those combinations. Apache runs with 64 threads per child
so that Apache itself never runs out of threads and closes client keep-alive
connections (which would be Apache's doing, not the daemon's).

A chaos case (broken deploys and SIGTTIN/SIGTTOU in the middle of reloads) through both front
ends; finally the status and ping pages.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemon import Daemon, wait_for
from fcgiclient import Response
from frontends import (
    FrontEnd,
    apache_available,
    nginx_available,
    shared_tmpdir,
    start_apache,
    start_nginx,
)
from load import LoadResult, http_checker, run_load
from test_lifecycle import app_copy

pytestmark = pytest.mark.timeout(120)

NEEDS_APACHE = pytest.mark.skipif(not apache_available(), reason="apache2 with mod_proxy_fcgi not installed")
NEEDS_NGINX = pytest.mark.skipif(not nginx_available(), reason="nginx not installed")

CLIENTS = 64
HUP_INTERVAL = 0.5  # a reload under this load takes 0.2-0.3 s: some overlap, and are queued
# Threads per Apache child: twice the clients, so that neither child can ever run out of idle
# threads (the event MPM then closes idle client keep-alive connections, which a client sees as
# "Remote end closed connection without response", an Apache artefact that never reaches the
# daemon) and Apache never starts or stops children during a run (same effect).
APACHE_THREADS = 2 * CLIENTS
BODY = re.compile(rb"id=(\S+) version=(\S+) pid=(\d+)")

# Apache logs a failed exchange with the backend as e.g.
#   [proxy_fcgi:error] ... AH01075: Error dispatching request to ...
#   [proxy:error] ... AH00957: FCGI: attempt to connect to ... failed
#   [proxy_fcgi:error] ... AH01067: Failed to read FastCGI header
#   [proxy_fcgi:error] ... AH01097: ...
APACHE_PROXY_ERROR = re.compile(
    r"^\[[^\]]*\] \[proxy[\w]*:(?:warn|error|crit|alert|emerg)\]|AH0(?:1067|1068|1075|1097|0957|0959)")
# nginx: "... [error] ... upstream prematurely closed connection ..." and friends.
NGINX_UPSTREAM_ERROR = re.compile(r"\[(?:warn|error|crit|alert|emerg)\].*upstream")


@dataclass(frozen=True)
class Case:
    front: str  # "apache" | "nginx"
    reuse: bool  # enablereuse=on / fastcgi_keep_conn on
    transport: str  # "tcp" | "unix"
    sleep: float = 0.0  # seconds each request takes in the app
    duration: float = 12.0
    workers: int = 4
    min_reloads: int = 15

    @property
    def id(self) -> str:
        reuse = {"apache": "enablereuse", "nginx": "keep_conn"}[self.front]
        slow = "-200ms" if self.sleep else ""
        return f"{self.front}-{reuse if self.reuse else 'noreuse'}-{self.transport}{slow}"


def _param(case: Case):
    mark = NEEDS_APACHE if case.front == "apache" else NEEDS_NGINX
    return pytest.param(case, id=case.id, marks=mark)


FAST_CASES = [_param(Case(front, reuse, transport))
              for front in ("apache", "nginx") for reuse in (False, True) for transport in ("tcp", "unix")]
# 200 ms requests: 8 workers serve ~40 requests/s, so 64 clients always keep
# every worker busy and every reload retires workers in the middle of requests.
SLOW = {"sleep": 0.2, "duration": 10.0, "workers": 8, "min_reloads": 8}
SLOW_CASES = [_param(Case("apache", True, "tcp", **SLOW)),
              _param(Case("nginx", True, "tcp", **SLOW)),
              _param(Case("apache", False, "unix", **SLOW)),
              _param(Case("nginx", False, "unix", **SLOW))]


# ---------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def daemon_and_front(tmp_path: Path, front: str, reuse: bool, transport: str, *,
                     workers: int = 4, args: tuple[str, ...] = (), app: str = "testapp",
                     apache_extra: str = "", nginx_extra: str = "") -> Iterator[tuple[Daemon, FrontEnd]]:
    """A daemon on TCP or a unix socket, and Apache or nginx in front of it."""
    with contextlib.ExitStack() as stack:
        bind = None
        if transport == "unix":
            # Apache's workers run as www-data: the socket must be reachable and writable.
            sockdir = stack.enter_context(shared_tmpdir())
            bind = f"unix:{sockdir}/app.sock"
            args = (*args, "--socket-mode", "0666")
        d = Daemon(tmp_path, app, args, workers=workers, bind=bind)
        stack.callback(d.stop)
        if front == "apache":
            fe = start_apache(tmp_path, d.address, enablereuse=reuse, threads=APACHE_THREADS,
                              extra=apache_extra.format(backend=_apache_backend(d)))
        else:
            fe = start_nginx(tmp_path, d.address, keep_conn=reuse, extra=nginx_extra)
        stack.enter_context(fe)
        yield d, fe


def _apache_backend(d: Daemon) -> str:
    if isinstance(d.address, tuple):
        return "fcgi://{}:{}".format(*d.address)
    return f"unix:{d.address}|fcgi://localhost"


class Hupper:
    """SIGHUP the daemon every `interval` seconds until stopped."""

    def __init__(self, d: Daemon, interval: float = HUP_INTERVAL) -> None:
        self.d, self.interval, self.sent = d, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="hupper")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.d.signal(signal.SIGHUP)
            self.sent += 1

    def __enter__(self) -> Hupper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def settle(d: Daemon, timeout: float = 20.0) -> None:
    """Wait until the last reload the daemon started has finished (or failed)."""
    def quiet() -> bool:
        log = d.log()
        if d.proc.poll() is not None:
            raise AssertionError(f"the daemon exited ({d.proc.returncode}); log:\n{log[-3000:]}")
        started = [int(g) for g in re.findall(r"reload: starting generation (\d+)", log)]
        if not started:
            return True
        last = max(started)
        done = re.search(rf"(reload complete: generation {last} serving|reload to generation {last} failed)", log)
        return bool(done) and "reload queued" not in log.rsplit(f"starting generation {last}", 1)[1]
    wait_for(quiet, timeout, "the last reload to finish")
    time.sleep(0.3)
    wait_for(quiet, timeout, "the last reload to finish")


def exact_id_check(seen: Counter) -> Callable[[Response, str], None]:
    """Status 200 and the body is exactly this request's answer (crosstalk check)."""
    lock = threading.Lock()

    def check(resp: Response, uid: str) -> None:
        assert resp.status == 200, f"{uid}: status {resp.status}: {resp.body[:200]!r}"
        match = BODY.fullmatch(resp.body)
        assert match, f"{uid}: unexpected body {resp.body[:200]!r}"
        assert match[1].decode() == uid, f"crosstalk: {uid} got the answer for {match[1].decode()}"
        with lock:
            seen[match[2].decode()] += 1
            seen["pid:" + match[3].decode()] += 1

    return check


def front_end_errors(fe: FrontEnd) -> list[str]:
    pattern = APACHE_PROXY_ERROR if fe.name == "apache" else NGINX_UPSTREAM_ERROR
    return [line for line in fe.read_error_log().splitlines() if pattern.search(line)]


def daemon_problems(d: Daemon) -> list[str]:
    """Log lines that would mean a connection or request was lost inside the daemon."""
    return [line for line in d.log().splitlines()
            if " ERROR " in line or " CRITICAL " in line or "closing them" in line
            or "cannot pass connections" in line or "Traceback" in line]


def hammer_while_reloading(d: Daemon, fe: FrontEnd, case: Case) -> tuple[LoadResult, int, int, Counter]:
    """64 clients for case.duration seconds, SIGHUP every HUP_INTERVAL; returns
    (load result, SIGHUPs sent, reloads completed, versions/pids seen)."""
    seen: Counter = Counter()
    path = "/app/id?id={uid}" + (f"&sleep={case.sleep}" if case.sleep else "")
    with http_checker(fe.host, fe.port, path, exact_id_check(seen), timeout=60.0) as checker, Hupper(d) as hupper:
        result = run_load(checker, clients=CLIENTS, duration=case.duration, grace=30.0)
    settle(d)
    return result, hupper.sent, d.count(r"reload complete"), seen


# ---------------------------------------------------------------------------- the deploy matrix


def _run_case(tmp_path: Path, case: Case) -> None:
    with daemon_and_front(tmp_path, case.front, case.reuse, case.transport, workers=case.workers) as (d, fe):
        result, hups, reloads, seen = hammer_while_reloading(d, fe, case)
        fe_errors = front_end_errors(fe)
        problems = daemon_problems(d)
        assert d.proc.poll() is None, "the daemon died"
        pids = sum(1 for key in seen if key.startswith("pid:"))
        print(f"\n[{case.id}] {result.requests} requests, {result.failures} failures, "
              f"{hups} SIGHUPs, {reloads} reloads complete, {pids} worker pids answered, "
              f"p50 {result.p50 * 1000:.1f}ms p99 {result.p99 * 1000:.1f}ms, "
              f"{fe.name} upstream/proxy error lines: {len(fe_errors)}, daemon problem lines: {len(problems)}")
        for line in [*fe_errors[:5], *problems[:5]]:
            print("   ", line)
        assert result.failures == 0 and result.stuck == 0, result.summary()
        assert result.requests > 0
        assert reloads >= case.min_reloads, f"only {reloads} reloads completed for {hups} SIGHUPs"
        assert not problems, "\n".join(problems[:20])
        if fe.name == "apache":
            # Apache never saw a backend connection fail under it.
            assert not fe_errors, "\n".join(fe_errors[:20])
        # nginx: whatever it retried (printed above), the clients saw nothing of it.


@pytest.mark.parametrize("case", FAST_CASES)
def test_reload_twice_a_second_loses_nothing(tmp_path: Path, case: Case) -> None:
    _run_case(tmp_path, case)


@pytest.mark.parametrize("case", SLOW_CASES)
def test_reload_with_requests_in_flight_loses_nothing(tmp_path: Path, case: Case) -> None:
    _run_case(tmp_path, case)


@pytest.mark.parametrize("front", [pytest.param("apache", marks=NEEDS_APACHE),
                                   pytest.param("nginx", marks=NEEDS_NGINX)])
def test_deploys_with_broken_code_and_resizes_lose_nothing(tmp_path: Path, front: str) -> None:
    """Kept connections (enablereuse / keep_conn), 64 clients, 10 s: every 0.5 s new code (a
    0.2 s import) and a SIGHUP, every 6th deploy broken (its reload fails, the old code serves on), and every 5th
    followed by SIGTTIN or SIGTTOU. Nothing lost, every answer its own, and every good deploy
    completes (a resize in the middle of a reload once left it hanging, and deploys stopped)."""
    src = app_copy(tmp_path)
    good = (src / "liveapp.py").read_text()
    args = ("--pythonpath", str(src))
    with daemon_and_front(tmp_path, front, True, "tcp", app="liveapp", args=args) as (d, fe):
        deploys = Deployer(d, src / "liveapp.py", good)
        seen: Counter = Counter()
        with http_checker(fe.host, fe.port, "/app/id?id={uid}", exact_id_check(seen), timeout=60.0) as checker:
            with deploys:
                result = run_load(checker, clients=CLIENTS, duration=10.0, grace=30.0)
        settle(d)
        complete, failed = d.count(r"reload complete"), d.count(r"reload to generation \d+ failed")
        versions = sorted(k for k in seen if not k.startswith("pid:"))
        print(f"\n[{front}, reuse] {result.requests} requests, {result.failures} failures, "
              f"{deploys.sent} deploys ({deploys.broken} broken, {deploys.resized} resizes), "
              f"{complete} reloads complete, {failed} failed, {len(versions)} versions answered")
        assert result.failures == 0 and result.stuck == 0, result.summary()
        assert failed == deploys.broken
        assert complete == deploys.sent - deploys.broken, "a reload did not complete"
        assert d.proc.poll() is None
        if fe.name == "apache":
            assert not front_end_errors(fe)


class Deployer(Hupper):
    """Every `interval` seconds: new code (or, every 6th time, broken code), then SIGHUP after
    the last reload finished; every 5th time also SIGTTIN or SIGTTOU."""

    def __init__(self, d: Daemon, path: Path, good: str) -> None:
        super().__init__(d, interval=0.5)
        self.path, self.good, self.broken, self.resized = path, good, 0, 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            settle(self.d, timeout=10)  # one deploy at a time: each must be counted
            n = self.sent + 1
            if n % 6 == 3:
                self._write(self.good + "\ndef broken(:\n")
                self.broken += 1
            else:
                # a 0.2 s import: the resizes below land in the middle of the reload
                self._write("import time\ntime.sleep(0.2)\n"
                            + self.good.replace('VERSION = "v1"', f'VERSION = "v{n}"'))
            self.d.signal(signal.SIGHUP)
            self.sent = n
            # started before the next write: settle() only sees a reload once it has begun
            self.d.wait_log(rf"reload: starting generation {n + 1}")
            if n % 5 == 0:
                self.d.signal(signal.SIGTTIN if n % 10 else signal.SIGTTOU)
                self.resized += 1

    def _write(self, text: str) -> None:
        """As a deploy should: whole or not at all. Written in place, a worker importing
        meanwhile (a reload's, or one a resize started) could read half a file and fail a
        good deploy (seen once in CI: "module 'liveapp' has no attribute 'application'")."""
        tmp = self.path.with_name(self.path.name + ".new")
        tmp.write_text(text)
        os.replace(tmp, self.path)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self._write(self.good)


# ---------------------------------------------------------------------------- saturation, no reloads

# Found while measuring the 200 ms variant: with kept connections and every
# worker busy, requests on connections the front end opened later wait in the
# daemon's listen queue until the load drops. A worker only accepts when it
# served nothing in a loop pass (worker.py _loop, "if not served"), and under
# saturation each worker always has a ready request on a kept connection it
# already holds. 64 clients, 8 workers, 200 ms requests, no reloads: 48
# connections sat in the listen queue for the whole run (ss Recv-Q 48), p99
# latency = the run's length; in a 45 s run nginx answered 48 requests with
# 504 after fastcgi_read_timeout (30 s). Without kept connections the queue is
# FIFO and every request takes ~64/40 s = 1.6 s. The reload tests above do not
# see it because each reload's new workers start holding nothing and accept.
@pytest.mark.parametrize("case", [
    pytest.param(Case("apache", True, "tcp", sleep=0.2, duration=8.0, workers=8), id="apache-enablereuse",
                 marks=[NEEDS_APACHE]),
    pytest.param(Case("nginx", True, "tcp", sleep=0.2, duration=8.0, workers=8), id="nginx-keep_conn",
                 marks=[NEEDS_NGINX]),
])
def test_kept_connections_do_not_starve_new_ones(tmp_path: Path, case: Case) -> None:
    fair = CLIENTS * case.sleep / case.workers  # seconds per request when served first come, first served
    with daemon_and_front(tmp_path, case.front, case.reuse, case.transport, workers=case.workers) as (_, fe):
        path = f"/app/id?id={{uid}}&sleep={case.sleep}"
        with http_checker(fe.host, fe.port, path, exact_id_check(Counter()), timeout=60.0) as checker:
            result = run_load(checker, clients=CLIENTS, duration=case.duration, grace=30.0)
        slowest = max(result.latencies, default=0.0)
        print(f"\n[{case.id}, saturated, no reloads] {result.summary()}; slowest {slowest:.1f}s "
              f"(first come, first served: ~{fair:.1f}s)")
        assert result.failures == 0, result.summary()
        # Served in turns (each ready connection one request per pass), a request that just
        # missed its worker's pass waits that pass and its place in the next: about 2x fair at
        # worst (measured here: slowest 2.8-3.8 s in 8 runs, 4.4 s once in CI, with 2.5x as the
        # bound). Starvation, the bug this guards, shows as the run's whole length (8 s) or 504s.
        assert slowest < 3 * fair, f"a request waited {slowest:.1f}s behind kept connections"


# ---------------------------------------------------------------------------- status and ping pages

STATUS_ARGS = ("--status-path", "/fcgi-status", "--ping-path", "/fcgi-ping")
# Apache: a dedicated ProxyPass per page. REQUEST_URI (and SCRIPT_NAME) is then
# exactly the configured path. Through the /app/ catch-all the daemon sees
# /app/fcgi-status (Apache does not split SCRIPT_NAME/PATH_INFO), which is
# not the status path: the application answers it.
APACHE_STATUS = """\
ProxyPass "/fcgi-status" "{backend}/fcgi-status"
ProxyPass "/fcgi-ping" "{backend}/fcgi-ping"
"""
# nginx: exact-match locations; they inherit the server-level fastcgi_params.
NGINX_STATUS = """\
        location = /fcgi-status { fastcgi_pass fcgidaemon; }
        location = /fcgi-ping { fastcgi_pass fcgidaemon; }
"""


@pytest.mark.parametrize("front", [pytest.param("apache", marks=NEEDS_APACHE),
                                   pytest.param("nginx", marks=NEEDS_NGINX)])
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_status_and_ping_pages_through_front_end(tmp_path: Path, front: str, transport: str) -> None:
    with daemon_and_front(tmp_path, front, True, transport, workers=2, args=STATUS_ARGS,
                          apache_extra=APACHE_STATUS, nginx_extra=NGINX_STATUS) as (d, fe):
        status, headers, body = fe.request("GET", "/fcgi-ping")
        assert (status, body) == (200, b"pong\n"), (status, body, fe.read_error_log()[-2000:])

        status, headers, body = fe.request("GET", "/fcgi-status")
        assert status == 200, (status, body)
        assert headers["content-type"].startswith("text/plain")
        assert str(d.pid) in body.decode(), body

        status, headers, body = fe.request("GET", "/fcgi-status?json")
        assert status == 200, (status, body)
        snap = json.loads(body)
        assert snap["manager_pid"] == d.pid
        assert snap["generation"] == 1 and snap["workers_target"] == 2

        status, headers, body = fe.request("GET", "/fcgi-status?openmetrics")
        assert status == 200 and b"fcgidaemon_requests_total" in body, (status, body[:300])

        # The application still gets everything else.
        status, _, body = fe.request("GET", "/app/id?id=x")
        assert status == 200 and body.startswith(b"id=x version=v1 "), (status, body)

        # Through the /app/ mount: nginx splits SCRIPT_NAME=/app PATH_INFO=/fcgi-status,
        # and the daemon matches PATH_INFO; Apache sends the whole path, which the
        # application answers.
        status, _, body = fe.request("GET", "/app/fcgi-ping")
        if front == "nginx":
            assert (status, body) == (200, b"pong\n")
        else:
            assert status == 200 and body.startswith(b"hello v1 "), (status, body)
        print(f"\n[{front}-{transport}] status/ping OK: /fcgi-ping, /fcgi-status (text, json, openmetrics); "
              f"/app/fcgi-ping answered by {'the ping page' if front == 'nginx' else 'the application'}")


@pytest.mark.parametrize("front", [pytest.param("apache", marks=NEEDS_APACHE),
                                   pytest.param("nginx", marks=NEEDS_NGINX)])
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_a_body_over_max_body_gets_413_through_the_front_end(tmp_path: Path, front: str,
                                                             transport: str) -> None:
    """A 15 MB POST against --max-body 1k, far more than the socket buffers hold: the client
    gets the 413, and the next request is served by the same workers. The daemon answered and
    closed with the body unread; the kernel answered the web server's further writes with a
    reset: nginx answered 502 (writev() failed: Broken pipe), Apache 503 (AH01075: Error
    dispatching request ... sending stdin)."""
    size = 15_000_000
    with daemon_and_front(tmp_path, front, transport == "tcp", transport, workers=2,
                          args=("--max-body", "1k")) as (d, fe):
        pids = sorted(d.wait_workers(2))
        status, _, body = fe.request("POST", "/app/echo", body=b"x" * size,
                                     headers={"Content-Type": "application/octet-stream"},
                                     timeout=30)
        after, _, hello = fe.request("GET", "/app/hello")
        print(f"\n[{front}-{transport}] POST of {size:,} bytes with --max-body 1k: {status} {body!r}; "
              f"then GET: {after}")
        assert (status, body) == (413, b"Request body too large.\n"), fe.read_error_log()[-1500:]
        assert after == 200 and hello.startswith(b"hello v1 ")
        d.wait_log(rf"request body of {size} bytes refused \(--max-body 1024\)")
        assert sorted(d.workers()) == pids
        assert front_end_errors(fe) == []

"""Bounded concurrent load generation for tests.

:func:`run_load` drives ``make_request(client_index, seq)`` from several
threads for a fixed time; :func:`fcgi_checker` and :func:`http_checker`
build such callables that issue one request carrying a unique id and check
that the response belongs to it (status 200 and the id echoed in the body)
to catch crosstalk between concurrent requests.
"""
from __future__ import annotations

import http.client
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

try:
    from .fcgiclient import Address, FCGIClient, Response, make_params
except ImportError:  # tests/ is on sys.path, not a package
    from fcgiclient import Address, FCGIClient, Response, make_params

MAX_ERRORS = 20
Check = Callable[[Response, str], None]


@dataclass
class LoadResult:
    """Outcome of :func:`run_load`; ``latencies`` are of successful requests."""

    requests: int = 0
    failures: int = 0
    errors: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    stuck: int = 0  # client threads still running after the join timeout

    @property
    def successes(self) -> int:
        return self.requests - self.failures

    @property
    def ok(self) -> bool:
        """At least one request, none failed, no thread left hanging."""
        return self.requests > 0 and self.failures == 0 and self.stuck == 0

    def percentile(self, p: float) -> float:
        """Latency percentile ``p`` in seconds (nearest rank; 0.0 if none)."""
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    def summary(self) -> str:
        rate = self.requests / self.elapsed if self.elapsed else 0.0
        text = (f"{self.requests} requests, {self.failures} failures, "
                f"{self.stuck} stuck, {self.elapsed:.2f}s ({rate:.0f}/s), "
                f"p50 {self.p50 * 1000:.1f}ms, p99 {self.p99 * 1000:.1f}ms")
        return "\n  ".join([text, *self.errors])


def run_load(make_request: Callable[[int, int], object], clients: int,
             duration: float, max_requests: int | None = None,
             grace: float = 15.0) -> LoadResult:
    """Call ``make_request(client, seq)`` in a loop from ``clients`` threads.

    Threads stop issuing requests after ``duration`` seconds or once
    ``max_requests`` have been started in total.  Any exception raised by
    ``make_request`` counts as a failure (the first ``MAX_ERRORS`` distinct
    messages are kept).  Threads get ``grace`` seconds after the deadline
    to finish their request; those that do not are counted as ``stuck``
    (and as failures) and abandoned as daemon threads.
    """
    result = LoadResult()
    lock = threading.Lock()
    started = 0
    t0 = time.monotonic()
    deadline = t0 + duration

    def record(latency: float | None, error: BaseException | None) -> None:
        with lock:
            result.requests += 1
            if error is None:
                result.latencies.append(latency or 0.0)
                return
            result.failures += 1
            msg = f"{type(error).__name__}: {error}"
            if len(result.errors) < MAX_ERRORS and msg not in result.errors:
                result.errors.append(msg)

    def client(index: int) -> None:
        nonlocal started
        seq = 0
        while time.monotonic() < deadline:
            with lock:
                if max_requests is not None and started >= max_requests:
                    return
                started += 1
            begin = time.monotonic()
            try:
                make_request(index, seq)
            except Exception as exc:  # noqa: BLE001 - every failure is data
                record(None, exc)
            else:
                record(time.monotonic() - begin, None)
            seq += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True,
                                name=f"load-client-{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline + grace - time.monotonic()))
    with lock:
        result.elapsed = time.monotonic() - t0
        result.stuck = sum(thread.is_alive() for thread in threads)
        if result.stuck:
            result.failures += result.stuck
            result.errors.append(f"{result.stuck} client thread(s) still busy "
                                 f"{grace:.0f}s after the deadline")
        # Copy so a stuck thread cannot mutate what the caller inspects.
        return LoadResult(result.requests, result.failures, list(result.errors),
                          result.elapsed, list(result.latencies), result.stuck)


def id_token(uid: str) -> re.Pattern[bytes]:
    """``id=<uid>`` as a whole token: the test app's ``/id`` answers ``id=<uid> version=...``,
    an echo of the query string or path ends ``?id=<uid>`` or ``&id=<uid>``. A plain substring
    test let uid ``1-2`` match a body for ``11-2`` or ``1-23`` (crosstalk unseen)."""
    return re.compile(rb"(?:^|[\s?&])id=" + re.escape(uid.encode()) + rb"(?:$|[\s&])")


def default_check(resp: Response, uid: str) -> None:
    """Status 200 and the request's unique id in the body, exactly (``id=<uid>`` as a token)."""
    assert resp.status == 200, f"{uid}: status {resp.status}: {resp.body[:200]!r}"
    assert id_token(uid).search(resp.body), f"{uid}: id missing from body {resp.body[:200]!r}"


class _PerClient:
    """Base for checkers keeping one connection per client index.

    Each client index is used by exactly one thread in :func:`run_load`,
    so the connection dict needs no locking beyond dict atomicity.
    """

    def __init__(self, uri_template: str, check: Check | None) -> None:
        self.uri_template = uri_template
        self.check = check or default_check
        self._conns: dict[int, Any] = {}

    def uri(self, client: int, seq: int) -> tuple[str, str]:
        uid = f"{client}-{seq}"
        return uid, self.uri_template.format(uid=uid, client=client, seq=seq)

    def close(self) -> None:
        """Close all connections (call after :func:`run_load` returns)."""
        for conn in list(self._conns.values()):
            conn.close()
        self._conns.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FCGIChecker(_PerClient):
    """``make_request`` doing one FastCGI GET of ``uri_template``."""

    def __init__(self, address: Address, *, keep_conn: bool = True,
                 check: Check | None = None, uri_template: str = "/?id={uid}",
                 timeout: float = 10.0,
                 extra: Mapping[str, str | bytes | None] | None = None) -> None:
        super().__init__(uri_template, check)
        self.address, self.keep_conn = address, keep_conn
        self.timeout, self.extra = timeout, extra

    def __call__(self, client: int, seq: int) -> None:
        uid, uri = self.uri(client, seq)
        conn = self._conns.get(client)
        if conn is None:
            conn = FCGIClient(self.address, self.timeout, connect=False)
            if self.keep_conn:
                self._conns[client] = conn
        try:
            resp = conn.request(make_params("GET", uri, extra=self.extra),
                                keep_conn=self.keep_conn)
        except BaseException:
            conn.close()
            self._conns.pop(client, None)
            raise
        self.check(resp, uid)


class HTTPChecker(_PerClient):
    """``make_request`` doing one HTTP/1.1 GET over a persistent connection."""

    def __init__(self, host: str, port: int, path_template: str = "/?id={uid}",
                 check: Check | None = None, *, timeout: float = 10.0,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(path_template, check)
        self.host, self.port, self.timeout = host, port, timeout
        self.headers = dict(headers or {})

    def __call__(self, client: int, seq: int) -> None:
        uid, path = self.uri(client, seq)
        conn = self._conns.get(client)
        if conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self._conns[client] = conn
        try:
            conn.request("GET", path, headers=self.headers)
            reply = conn.getresponse()
            body = reply.read()
        except BaseException:
            conn.close()
            self._conns.pop(client, None)
            raise
        if reply.will_close:
            conn.close()
            self._conns.pop(client, None)
        self.check(Response(reply.status, list(reply.getheaders()), body), uid)


def fcgi_checker(address: Address, **kwargs) -> FCGIChecker:
    """Shorthand for :class:`FCGIChecker` (``keep_conn``, ``check``,
    ``uri_template``, ``timeout``, ``extra`` keyword arguments)."""
    return FCGIChecker(address, **kwargs)


def http_checker(host: str, port: int, path_template: str = "/?id={uid}",
                 check: Check | None = None, **kwargs) -> HTTPChecker:
    """Shorthand for :class:`HTTPChecker`."""
    return HTTPChecker(host, port, path_template, check, **kwargs)

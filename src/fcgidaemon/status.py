"""The status and ping pages, answered by the worker itself from the shared scoreboard.

They sit in front of the application as a small WSGI layer, so they work through
any front end that forwards the path, and the application is never called for
them.  Formats: plain text (default), ``?json``, ``?full`` (one block per
worker) and ``?openmetrics`` (Prometheus/OpenMetrics text).
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
from typing import Any, Callable, Iterable

from .config import in_networks
from .scoreboard import BUCKETS, Scoreboard, Slot, SlotState

WSGIApp = Callable[..., Iterable[bytes]]
LOOPBACK = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def snapshot(board: Scoreboard, app: str = "") -> dict[str, Any]:
    """Everything the pages show, read from shared memory (and /proc for RSS)."""
    pool, slots = board.consistent()
    now = time.monotonic()
    histogram = list(pool.histogram_exited)
    for slot in slots:
        histogram = [a + b for a, b in zip(histogram, slot.histogram)]
    states = {state.name.lower(): 0 for state in SlotState if state is not SlotState.FREE}
    for slot in slots:
        states[slot.state.name.lower()] += 1
    return {
        "app": app, "manager_pid": pool.manager_pid, "start_time": pool.start_time,
        "uptime": round(time.time() - pool.start_time, 3), "phase": pool.phase,
        "generation": pool.generation, "workers_target": pool.target,
        "reloads_ok": pool.reloads_ok, "reloads_failed": pool.reloads_failed,
        "last_reload_failure": pool.last_failure,
        "accepted": pool.accepted_exited + sum(s.accepted for s in slots),
        "requests": pool.requests_exited + sum(s.requests for s in slots),
        "kept_connections": sum(s.conns for s in slots),
        "listen_queue": pool.listen_queue, "listen_queue_max": pool.listen_queue_max,
        "listen_backlog": pool.backlog, "all_busy": pool.all_busy,
        "slow_requests": pool.slow, "timeouts": pool.timeouts,
        "workers": states,
        "duration_sum": pool.duration_sum_exited + sum(s.duration_sum for s in slots),
        "duration_histogram": dict(zip([*map(str, BUCKETS), "+Inf"], histogram)),
        "processes": [_worker(slot, now) for slot in slots],
    }


def _worker(slot: Slot, now: float) -> dict[str, Any]:
    busy = slot.state is SlotState.BUSY
    return {"pid": slot.pid, "generation": slot.generation, "state": slot.state.name.lower(),
            "requests": slot.requests, "accepted": slot.accepted, "kept_connections": slot.conns,
            "request_method": slot.method if busy else "", "request_uri": slot.uri if busy else "",
            "request_age": round(slot.busy_for(now), 3),
            "last_request_duration": round(slot.last_duration, 6), "rss": rss_bytes(slot.pid)}


def render_text(snap: dict[str, Any], full: bool = False) -> str:
    w = snap["workers"]
    rows = [
        ("app", snap["app"]), ("manager pid", snap["manager_pid"]),
        ("start time", time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(snap["start_time"]))),
        ("uptime", f"{snap['uptime']:.0f}s"), ("phase", snap["phase"]),
        ("generation", snap["generation"]),
        ("reloads", f"{snap['reloads_ok']} ok, {snap['reloads_failed']} failed"),
        ("last reload failure", snap["last_reload_failure"] or "-"),
        ("accepted conn", snap["accepted"]), ("requests", snap["requests"]),
        ("kept connections", snap["kept_connections"]),
        ("listen queue", snap["listen_queue"]), ("max listen queue", snap["listen_queue_max"]),
        ("listen queue len", snap["listen_backlog"]),
        ("idle workers", w["idle"]), ("busy workers", w["busy"]),
        ("starting workers", w["starting"]), ("retiring workers", w["retiring"]),
        ("total workers", sum(w.values())), ("target workers", snap["workers_target"]),
        ("all workers busy", snap["all_busy"]), ("slow requests", snap["slow_requests"]),
        ("timed out requests", snap["timeouts"]),
    ]
    out = [f"{name + ':':<22}{value}" for name, value in rows]
    if full:
        for proc in snap["processes"]:
            out.append("")
            out.append("*" * 30)
            out += [f"{name + ':':<24}{value}" for name, value in proc.items()]  # the longest: 22
    return "\n".join(out) + "\n"


# (kind, metric name, help, snapshot key) of the single-valued metrics
SCALARS = (
    ("counter", "fcgidaemon_requests", "Requests served", "requests"),
    ("counter", "fcgidaemon_accepted_connections", "Connections accepted", "accepted"),
    ("gauge", "fcgidaemon_kept_connections", "Connections held open between requests",
     "kept_connections"),
    ("gauge", "fcgidaemon_workers_target", "Target worker count", "workers_target"),
    ("gauge", "fcgidaemon_listen_queue", "Connections waiting to be accepted", "listen_queue"),
    ("gauge", "fcgidaemon_listen_queue_max", "Largest listen queue seen", "listen_queue_max"),
    ("gauge", "fcgidaemon_listen_queue_length", "Listen backlog", "listen_backlog"),
    ("gauge", "fcgidaemon_generation", "Serving generation", "generation"),
    ("counter", "fcgidaemon_all_workers_busy", "Times all workers were busy", "all_busy"),
    ("counter", "fcgidaemon_slow_requests", "Requests past --slow-log", "slow_requests"),
    ("counter", "fcgidaemon_request_timeouts", "Workers killed by --timeout", "timeouts"),
    ("gauge", "fcgidaemon_start_time_seconds", "Manager start time", "start_time"),
)


def render_openmetrics(snap: dict[str, Any]) -> bytes:
    """The OpenMetrics text format (what Prometheus scrapes), written here: a few lines of
    text did not need a fourth dependency (the design card names three); the tests check it
    with prometheus_client's own parser."""
    out: list[str] = []
    for kind, name, text, key in SCALARS:
        _family(out, name, kind, text, [((), snap[key])])
    _family(out, "fcgidaemon_workers", "gauge", "Worker processes by state",
            [((("state", state),), count) for state, count in snap["workers"].items()])
    _family(out, "fcgidaemon_reloads", "counter", "Reloads by result",
            [((("result", "ok"),), snap["reloads_ok"]), ((("result", "failed"),), snap["reloads_failed"])])
    name = "fcgidaemon_request_duration_seconds"
    out += [f"# TYPE {name} histogram", f"# HELP {name} Request duration"]
    running = 0
    for bound, count in snap["duration_histogram"].items():
        running += count
        out.append(f'{name}_bucket{{le="{_escape(str(bound))}"}} {running}')
    out += [f"{name}_count {running}", f"{name}_sum {_number(snap['duration_sum'])}"]
    procs = snap["processes"]
    _family(out, "fcgidaemon_worker_request_age_seconds", "gauge",
            "Age of the request each busy worker serves",
            [((("pid", str(p["pid"])),), p["request_age"]) for p in procs if p["state"] == "busy"])
    _family(out, "fcgidaemon_worker_rss_bytes", "gauge", "Resident memory per worker",
            [((("pid", str(p["pid"])),), p["rss"]) for p in procs])
    out.append("# EOF")
    return ("\n".join(out) + "\n").encode()


def _family(out: list[str], name: str, kind: str, text: str,
            samples: list[tuple[tuple[tuple[str, str], ...], float]]) -> None:
    out += [f"# TYPE {name} {kind}", f"# HELP {name} {_escape(text)}"]
    suffix = "_total" if kind == "counter" else ""
    for labels, value in samples:
        shown = "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}" if labels else ""
        out.append(f"{name}{suffix}{shown} {_number(value)}")


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(int(value))


def middleware(app: WSGIApp, board: Scoreboard, app_name: str, status_path: str | None,
               ping_path: str | None, allow: list) -> WSGIApp:
    """Answer the status and ping paths here; everything else goes to the application."""
    allow = allow or LOOPBACK

    def paths(environ: dict[str, Any]) -> set[str]:
        uri = environ.get("REQUEST_URI", "").partition("?")[0]
        return {uri, environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""),
                environ.get("PATH_INFO", "")}

    ours = {path for path in (status_path, ping_path) if path}

    def handle(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        seen = paths(environ) & ours
        if not seen:
            return app(environ, start_response)
        if not _allowed(environ, allow):
            return _answer(start_response, "403 Forbidden", "text/plain", b"forbidden\n")
        if ping_path in seen:
            return _answer(start_response, "200 OK", "text/plain", b"pong\n")
        return _status(environ, start_response, board, app_name)

    return handle


def _allowed(environ: dict[str, Any], allow: list) -> bool:
    return in_networks(environ.get("REMOTE_ADDR", ""), allow)


def _status(environ: dict[str, Any], start_response: Callable[..., Any], board: Scoreboard,
            app_name: str) -> list[bytes]:
    query = environ.get("QUERY_STRING", "")
    flags = {part.partition("=")[0] for part in query.split("&") if part}
    snap = snapshot(board, app_name)
    if "openmetrics" in flags:
        return _answer(start_response, "200 OK",
                       "application/openmetrics-text; version=1.0.0; charset=utf-8",
                       render_openmetrics(snap))
    if "json" in flags:
        if "full" not in flags:
            snap.pop("processes")
        return _answer(start_response, "200 OK", "application/json", json.dumps(snap).encode())
    return _answer(start_response, "200 OK", "text/plain; charset=utf-8",
                   render_text(snap, full="full" in flags).encode())


def _answer(start_response: Callable[..., Any], status: str, ctype: str, body: bytes) -> list[bytes]:
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store")])
    return [body]
